"""pymerge's methods inside mergekit 0.1.5 (pymerge/adapters/mergekit.py): `merge_method: pymerge_<name>` run by
mergekit's own command (planner, lazy loader, writer) on tiny Llama models written here, and by mergekit's
in-memory API (merge_state_dicts, merge_tensors). Every output key is compared with pymerge.merge on the whole
state dicts, same parameters: bitwise (torch.equal), randomized methods included (each key is seeded by its name,
and a key's result does not depend on the keys merged with it). Bad parameters fail at planning time with the
Param's message; mergekit's parameter names the method lacks are refused; register() is idempotent.

mergekit is installed by `make test` (requirements-dev.txt); a missing mergekit is an error, not a skip.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import pymerge
import pymerge.adapters.mergekit as pm
from pymerge.peers import mergekit as mergekit_peer
from test_divmerge import one_thread  # noqa: F401 (autouse: tiny tensors, 1 intra-op thread)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.utils.logging.set_verbosity_error()

T = 3
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])




def fine_tune(base, seed, rank=2, scale=0.02, noise=1e-3):
    """base + a rank-`rank` perturbation of every matrix (the structure CART / TSV-M / Iso look for) + noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        d = noise * torch.randn(v.shape, generator=g)
        if v.dim() == 2:
            d += scale * torch.randn(v.shape[0], rank, generator=g) @ torch.randn(rank, v.shape[1], generator=g)
        out[k] = v + d
    return out


def write_family(root, tie):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tie))
    base.save_pretrained(root / "base")
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for t in range(1, T + 1):
        m = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tie))
        m.load_state_dict(fine_tune(sd, t))
        # one fine-tune sharded: mergekit's loader reads the index
        m.save_pretrained(root / f"m{t}", **({"max_shard_size": "40KB"} if t == 2 else {}))
    return root


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """base and m1..m3 (m2 sharded), untied embeddings (lm_head is a key of its own)."""
    root = write_family(tmp_path_factory.mktemp("llama"), tie=False)
    assert (root / "m2" / "model.safetensors.index.json").exists()
    return root


@pytest.fixture(scope="module", autouse=True)
def registered():
    return pm.register()


def model_sd(path):
    """The state dict of a saved model, read with the safetensors package."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def models(root):
    return [root / f"m{t}" for t in range(1, T + 1)]


def config_text(root, method, per_model=None, shared=None, dtype="float32", extra=""):
    """A mergekit-yaml config: per_model {name: [T values]} under each model, shared under parameters."""
    per_model, shared = per_model or {}, shared or {}
    lines = [f"merge_method: {method}", f"base_model: {root / 'base'}", "models:"]
    for t, m in enumerate(models(root)):
        lines.append(f"  - model: {m}")
        if per_model:
            lines.append(f"    parameters: {json.dumps({k: v[t] for k, v in per_model.items()})}")
    if shared:
        lines.append(f"parameters: {json.dumps(shared)}")
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n" + extra


def run_yaml(tmp_path, text, *options):
    """mergekit-yaml (its click command, in this process) with pymerge's methods registered: pm.main."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yml"
    config.write_text(text)
    out = tmp_path / "out"
    pm.main([config, out, "--no-copy-tokenizer", "--quiet", *options], standalone_mode=False)
    return out


def reference(root, method, per_model=None, shared=None, dtype=None):
    base = model_sd(root / "base")
    thetas = [model_sd(m) for m in models(root)]
    if dtype is not None:
        base = {k: v.to(dtype) for k, v in base.items()}
        thetas = [{k: v.to(dtype) for k, v in sd.items()} for sd in thetas]
    return pymerge.merge(method, base, thetas, **(per_model or {}), **(shared or {}))


def assert_equal_dicts(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), (k, float((got[k].double() - want[k].double()).abs().max()))


# Per method: per-model parameters ({name: [T values]}, under each model of the config) and shared ones, every
# one away from its default (a value that did not reach pymerge would change the result). exclude_keys and
# low_rank_keys are single regexes in a config (a YAML list is mergekit's per-layer gradient).
CASES = {
    "cart": ({}, {"rank_ratio": 0.25, "lam": 1.5, "seed": 3}),
    "cart-energy-regex": ({}, {"energy": 0.9, "low_rank_keys": "self_attn|down_proj", "seed": 4}),
    "cart-vit-exact": ({}, {"low_rank_keys": "vit", "rank": 3, "svd": "exact"}),
    "tsv_m": ({}, {"alpha": 0.8, "seed": 7, "exclude_keys": "embed|lm_head|o_proj"}),
    "iso_c": ({}, {"alpha": 1.2}),
    "iso_cts": ({}, {"common_space_fraction": 0.5, "svd": "randomized", "seed": 11}),
    "ties": ({"density": [0.3, 0.6, 0.5], "weights": [1.0, 0.5, 2.0]}, {"lam": 0.9}),
    "task_arithmetic": ({"weights": [1.0, 0.5, 0.8]}, {"lam": 0.4}),
    "dare_ties": ({"p": [0.2, 0.5, 0.7], "weights": [1.0, 2.0, 0.5]}, {"seed": 5, "lam": 1.1}),
}


def method_of(case):
    return case.split("-")[0]


def pymerge_params(shared):
    """The config's values as pymerge.merge takes them (one regex -> a tuple of one for exclude_keys)."""
    return {k: ((v,) if k == "exclude_keys" else v) for k, v in shared.items()}


# ------------------------------------------------------------------------------------------- mergekit-yaml
@pytest.mark.parametrize("case,threads", [(c, 1) for c in CASES] + [("iso_cts", 2), ("dare_ties", 2)])
def test_mergekit_yaml_equals_pymerge_merge_on_every_key(llama, tmp_path, case, threads):
    torch.set_num_threads(threads)                 # restored by one_thread
    per_model, shared = CASES[case]
    method = method_of(case)
    out = run_yaml(tmp_path, config_text(llama, pm.mergekit_name(method), per_model, shared),
                   "--no-write-model-card")
    assert_equal_dicts(load_file(out / "model.safetensors"),
                       reference(llama, method, per_model, pymerge_params(shared)))


def test_defaults_are_pymerges_and_transformers_loads_the_output(llama, tmp_path):
    """No parameter given: pymerge's defaults (not mergekit's); the model card names the method; transformers
    loads the directory and its logits are those of the reference weights."""
    out = run_yaml(tmp_path, config_text(llama, "pymerge_tsv_m"))
    want = reference(llama, "tsv_m")
    assert_equal_dicts(load_file(out / "model.safetensors"), want)
    assert "pymerge tsv_m" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(llama / "base"), local_files_only=True).eval()
    ref.load_state_dict(want)
    loaded = model.state_dict()
    for k, v in want.items():
        assert torch.equal(loaded[k], v), k
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_bfloat16_inputs_fp32_math_out_dtype(llama, tmp_path):
    """dtype: bfloat16 (mergekit loads the inputs in bf16): pymerge merges them in fp32 and returns bf16, as
    pymerge.merge on bf16 state dicts; out_dtype: float32 then widens what is written."""
    per_model, shared = CASES["cart"]
    out = run_yaml(tmp_path, config_text(llama, "pymerge_cart", per_model, shared, dtype="bfloat16",
                                         extra="out_dtype: float32\n"), "--no-write-model-card")
    want = reference(llama, "cart", per_model, shared, dtype=torch.bfloat16)
    assert_equal_dicts(load_file(out / "model.safetensors"), {k: v.float() for k, v in want.items()})


def test_tied_embeddings_no_lm_head_anywhere(tmp_path):
    """Tied models hold no lm_head.weight: mergekit skips the optional weight, as pymerge has no such key."""
    root = write_family(tmp_path / "tied", tie=True)
    out = run_yaml(tmp_path, config_text(root, "pymerge_iso_cts", shared={"seed": 2}), "--no-write-model-card")
    got = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in got
    assert_equal_dicts(got, reference(root, "iso_cts", shared={"seed": 2}))


def test_seed_none_text_means_fresh_randomness(llama, tmp_path):
    """`seed: none` reaches pymerge as None (mergekit itself reads a None value as "not set"): two runs differ,
    where the default seed would give equal runs."""
    text = config_text(llama, "pymerge_dare_ties", shared={"seed": "none", "p": 0.5})
    first = load_file(run_yaml(tmp_path / "a", text, "--no-write-model-card") / "model.safetensors")
    second = load_file(run_yaml(tmp_path / "b", text, "--no-write-model-card") / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[key], second[key])


def test_numbers_written_as_text_and_filters_reach_the_key(llama, tmp_path):
    """YAML reads 1e-1 as a string: it is the number for a float Param. A mergekit filter gives one key its
    own value (a per-key parameter pymerge.merge has no form for): that key is pymerge's merge at that value."""
    text = config_text(llama, "pymerge_task_arithmetic", shared={"lam": "1e-1"})
    text = text.replace('parameters: {"lam": "1e-1"}',
                        'parameters: {lam: [{filter: q_proj, value: 0.7}, {value: 1e-1}]}')
    got = load_file(run_yaml(tmp_path, text, "--no-write-model-card") / "model.safetensors")
    low, high = reference(llama, "task_arithmetic", shared={"lam": 0.1}), \
        reference(llama, "task_arithmetic", shared={"lam": 0.7})
    for k in got:
        assert torch.equal(got[k], (high if "q_proj" in k else low)[k]), k


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method,per_model,shared,match", [
    ("pymerge_ties", {}, {"density": 1.5}, r"pymerge_ties: density = 1\.5: must be in \(0, 1\]"),
    ("pymerge_ties", {"density": [0.5, 0.0, 0.5]}, {}, r"pymerge_ties: density = 0\.0: must be in \(0, 1\]"),
    ("pymerge_ties", {"weight": [1.0, 1.0, 1.0]}, {}, r"`weight` is a parameter of mergekit.*`weights`"),
    ("pymerge_dare_ties", {}, {"density": 0.5}, r"drop probability `p` = 1 - density"),
    ("pymerge_task_arithmetic", {}, {"lambda": 0.5}, r"pymerge's scaling is `lam`"),
    ("pymerge_tsv_m", {}, {"svd": "fast"},
     r"pymerge_tsv_m: svd = 'fast'; expected one of \['auto', 'randomized', 'exact'\]"),
    ("pymerge_cart", {}, {"lam": "big"}, r"pymerge_cart: lam = 'big': expected a number"),
    ("pymerge_cart", {}, {"low_rank_keys": "q_proj("}, r"'q_proj\(' is not a valid regex"),
    ("pymerge_cart", {}, {"lam": "none"}, r"pymerge_cart: lam = 'none': must be a finite number"),
    ("pymerge_iso_cts", {}, {"seed": 1.5}, r"pymerge_iso_cts: seed = 1\.5: must be an int"),
    ("pymerge_cart", {}, {"rank": 2, "rank_ratio": 0.5}, r"cart: rank_ratio, rank and energy are mutually exclusive"),
    ("pymerge_cart", {}, {"rank": 16, "low_rank_keys": "k_proj"}, r"cart: rank = 16 >= min\(m, n\) = 16"),
])
def test_bad_parameter_is_a_clear_error(llama, tmp_path, method, per_model, shared, match):
    with pytest.raises(ValueError, match=match):
        run_yaml(tmp_path, config_text(llama, method, per_model, shared), "--no-write-model-card")


def test_no_base_model_is_refused(llama, tmp_path):
    text = config_text(llama, "pymerge_ties").replace(f"base_model: {llama / 'base'}\n", "")
    with pytest.raises(ValueError, match="requires a base input"):
        run_yaml(tmp_path, text, "--no-write-model-card")


# ------------------------------------------------------------------------------------ mergekit's in-memory API
@pytest.mark.parametrize("case", list(CASES))
def test_merge_state_dicts_equals_pymerge_merge(llama, case):
    """merge_state_dicts hands every weight at once: one pymerge.merge over the whole model (its whole-model
    prepare and same-shape batching). Per-model values are lists in the models' order; merge_tensors on one
    weight (the per-key rule) gives that key's value too."""
    from mergekit.merge_methods import merge_state_dicts, merge_tensors
    per_model, shared = CASES[case]
    method = method_of(case)
    params = {**per_model, **pymerge_params(shared)}
    base = model_sd(llama / "base")
    thetas = [model_sd(m) for m in models(llama)]
    want = pymerge.merge(method, base, thetas, **params)
    got = merge_state_dicts({"base": base, **{f"m{t}": sd for t, sd in enumerate(thetas)}},
                            pm.mergekit_name(method), base="base", parameters=params)
    assert list(got) == list(want)
    assert_equal_dicts(got, want)
    for key in ("model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"):
        one = merge_tensors([base[key], *[sd[key] for sd in thetas]], pm.mergekit_name(method), base_index=0,
                            name=key, parameters=params)
        assert torch.equal(one, want[key]), key


def test_registry_call_like_the_mergekit_peer(llama):
    """registry.get(name)(groups, parameters=..., dtype=...), the call pymerge/peers/mergekit.py makes."""
    base = model_sd(llama / "base")
    thetas = [model_sd(m) for m in models(llama)]
    got = mergekit_peer.merge("pymerge_ties", base, thetas, dtype=torch.float32, density=[0.3, 0.6, 0.5])
    assert_equal_dicts(got, pymerge.merge("ties", base, thetas, density=[0.3, 0.6, 0.5]))


def test_in_memory_whole_model_checks_and_errors(llama):
    from mergekit.merge_methods import merge_state_dicts, merge_tensors
    base = model_sd(llama / "base")
    sds = {"base": base, **{f"m{t}": model_sd(m) for t, m in enumerate(models(llama))}}
    # A whole model: pymerge's whole-model check that a selection matches some key.
    with pytest.raises(ValueError, match="cart: low_rank_keys pattern 'nomatch' matches no key"):
        merge_state_dicts(sds, "pymerge_cart", base="base", parameters={"low_rank_keys": "nomatch"})
    with pytest.raises(ValueError, match=r"pymerge_ties: weights = nan: must be a finite number"):
        merge_state_dicts(sds, "pymerge_ties", base="base", parameters={"weights": [1.0, float("nan"), 1.0]})
    with pytest.raises(TypeError, match="Unknown parameter"):
        merge_state_dicts(sds, "pymerge_ties", base="base", parameters={"densities": 0.5})
    key = "model.norm.weight"
    tensors = [sd[key] for sd in sds.values()]
    with pytest.raises(ValueError, match="low_rank_keys = \\[\\]: an empty list"):
        merge_tensors(tensors, "pymerge_cart", base_index=0, name=key, parameters={"low_rank_keys": []})
    with pytest.raises(ValueError, match="has no name"):
        merge_tensors(tensors, "pymerge_ties", base_index=0)
    with pytest.raises(ValueError, match="requires a base input"):
        merge_tensors(tensors, "pymerge_ties", name=key)
    bad = [t.clone() for t in tensors]
    bad[2][3] = float("nan")
    with pytest.raises(ValueError, match=r"key 'model.norm.weight' of models\[1\] holds 1 NaN"):
        merge_tensors(bad, "pymerge_ties", base_index=0, name=key)


# ------------------------------------------------------------------------------------------------ register
def test_register_is_idempotent_and_refuses_a_foreign_name(monkeypatch):
    from mergekit import merge_methods
    from mergekit.merge_methods import BatchedMergeMethod, MergeMethodSpec, registry
    names = pm.register()
    assert names == [pm.mergekit_name(m) for m in pm.METHODS]
    objects = [merge_methods.get(n) for n in names]
    assert pm.register() == names
    assert [merge_methods.get(n) for n in names] == objects
    for name, method in zip(pm.METHODS, objects):
        assert method.pymerge_spec is pymerge.methods.get(name)
        spec = {p.name: p for p in method.spec.parameters}
        for p in pymerge.methods.get(name).params:
            assert spec[p.name].default == p.default
            assert spec[p.name].scope.value == ("non_base" if p.per_model else "shared")
    # A name already taken by another method: a clear error, nothing replaced.
    monkeypatch.setattr(registry, "_METHODS", {k: v for k, v in registry._METHODS.items()
                                              if k != "pymerge_iso_c"})
    registry.register(BatchedMergeMethod(MergeMethodSpec(name="pymerge_iso_c"), lambda batch: batch.tensors[0]))
    with pytest.raises(ValueError, match="already has a method named 'pymerge_iso_c' that is not pymerge's"):
        pm.register()
