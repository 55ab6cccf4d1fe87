"""pymerge.adapters.lora on a tiny Llama with three peft LoRA adapters (random factors, different r / lora_alpha /
rank_pattern / rsLoRA): the materialised updates against peft's own merge_and_unload, the dense merge against
pymerge.merge on the materialised models and a float64 task-arithmetic oracle, the re-factored LoRA loaded back
into peft against the dense merge (the truncation bound from the merged deltas' spectra, exact at full rank),
embeddings and Conv1D layers, and the errors for adapters that cannot be merged."""
import copy

import pytest
import torch
from torch import nn

import pymerge
from pymerge.adapters.lora import LoraAdapter, lora_delta_weights, merge_lora_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
# Three adapters of one base on the same modules, each with its own scaling rules.
CONFIGS = [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
    dict(r=3, lora_alpha=6, use_rslora=True),
]


def lora_config(**kw):
    return LoraConfig(target_modules=list(TARGETS), **kw)


def randomise_lora(model, seed):
    """peft initialises lora_B to 0 (a no-op adapter): give every factor random entries instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    adapters, configs, materialised, peft_models = [], [], [], []
    for t, kw in enumerate(CONFIGS):
        config = lora_config(**kw)
        model = get_peft_model(copy.deepcopy(base), config)
        randomise_lora(model, seed=10 + t)
        adapters.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
        configs.append(config)
        peft_models.append(model)
        # peft's own materialisation: theta_0 + scaling * B A merged into the weights.
        materialised.append({k: v.clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()})
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    return dict(base=base, base_sd=base_sd, adapters=adapters, configs=configs, materialised=materialised,
                peft_models=peft_models, tokens=tokens)


def target_keys(base_sd):
    return [k for k in base_sd if any(f".{m}." in k for m in TARGETS)]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.double()


def load_dense(base, state_dict):
    model = copy.deepcopy(base)
    model.load_state_dict(state_dict)
    return model


def load_lora(base, adapter: LoraAdapter):
    model = get_peft_model(copy.deepcopy(base), adapter.lora_config())
    result = set_peft_model_state_dict(model, adapter.state_dict)
    assert not result.unexpected_keys
    return model.eval()


def lora_weights(base, adapter):
    """The weights peft runs with the re-factored adapter: its own merge_and_unload."""
    return load_lora(base, adapter).merge_and_unload().state_dict()


# ------------------------------------------------------------------------------------------ materialise
def test_delta_weights_match_peft_merge_and_unload(setup):
    base_sd = setup["base_sd"]
    for adapter, config, want in zip(setup["adapters"], setup["configs"], setup["materialised"]):
        deltas = lora_delta_weights(base_sd, adapter, config)
        assert sorted(deltas) == sorted(target_keys(base_sd))
        for key, delta in deltas.items():
            torch.testing.assert_close(base_sd[key] + delta, want[key], rtol=0, atol=1e-6)
    # A peft model as the adapter (its active adapter and config) reads the same.
    got = lora_delta_weights(base_sd, setup["peft_models"][1])
    want = lora_delta_weights(base_sd, setup["adapters"][1], setup["configs"][1])
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------- dense
def test_dense_cart_equals_pymerge_merge_of_materialised_models(setup):
    base_sd = setup["base_sd"]
    dense = merge_lora_adapters(setup["base"], setup["adapters"], setup["configs"])
    want = pymerge.merge("cart", base_sd, setup["materialised"])
    assert list(dense) == list(base_sd)
    targets = set(target_keys(base_sd))
    for key in base_sd:
        if key in targets:
            scale = float(want[key].abs().max())
            assert float((dense[key] - want[key]).abs().max()) <= 1e-6 * scale, key
        else:
            # Untouched keys are the base's (merging T copies of theta_0 gives theta_0 up to rounding).
            torch.testing.assert_close(dense[key], want[key], rtol=1e-6, atol=1e-7)
            assert torch.equal(dense[key], base_sd[key])
    # The merge changed every target: CART is not a no-op here.
    assert all(not torch.equal(dense[k], base_sd[k]) for k in targets)


def test_dense_task_arithmetic_against_float64_oracle(setup):
    base_sd = setup["base_sd"]
    weights = [0.5, 1.25, -0.75]
    dense = merge_lora_adapters(base_sd, setup["adapters"], setup["configs"], method="task_arithmetic", lam=0.8,
                                weights=weights)
    for key in target_keys(base_sd):
        b = base_sd[key].double()
        want = b + 0.8 * sum(w * (m[key].double() - b) for w, m in zip(weights, setup["materialised"]))
        assert float((dense[key].double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), key


# ----------------------------------------------------------------------------------- re-factored LoRA
def test_refactored_lora_within_the_truncation_bound(setup):
    base, base_sd, tokens = setup["base"], setup["base_sd"], setup["tokens"]
    dense = merge_lora_adapters(base_sd, setup["adapters"], setup["configs"])
    r = 5
    adapter = merge_lora_adapters(base_sd, setup["adapters"], setup["configs"], output="lora", lora_rank=r)
    assert adapter.r == r and adapter.lora_alpha == r
    assert adapter.target_modules == [k[:-len(".weight")] for k in target_keys(base_sd)]
    loaded = lora_weights(base, adapter)
    for key in target_keys(base_sd):
        D = dense[key].double() - base_sd[key].double()
        s = torch.linalg.svdvals(D)
        assert s[r] > 1e-3 * s[0], "the test needs merged deltas of rank > r"
        # ||D - D_r||_2 = s_(r+1) for the best rank-r approximation; rounding of the fp32 weights on top.
        err = torch.linalg.matrix_norm(loaded[key].double() - dense[key].double(), ord=2)
        assert err <= s[r] * (1 + 1e-4) + 1e-6 * s[0], (key, float(err), float(s[r]))
        module = key[:-len(".weight")]
        want_rel = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(adapter.errors[module] - want_rel) <= 1e-4, (module, adapter.errors[module], want_rel)
    # The truncated merge runs closer to the dense merge than the base model does.
    dense_logits = logits(load_dense(base, dense), tokens)
    gap = (logits(load_lora(base, adapter), tokens) - dense_logits).norm()
    assert gap < 0.5 * (logits(base, tokens) - dense_logits).norm()


@pytest.mark.parametrize("method,params", [("cart", {}), ("task_arithmetic", {"lam": 0.6})])
def test_refactored_lora_at_full_rank_is_exact(setup, method, params):
    """lora_rank None = the largest sum of the adapters' ranks (4 + 4 + 3): a linear method's merged delta has at
    most that rank, so the LoRA reproduces it to fp32 rounding."""
    base, base_sd, tokens = setup["base"], setup["base_sd"], setup["tokens"]
    dense = merge_lora_adapters(base_sd, setup["adapters"], setup["configs"], method=method, **params)
    adapter = merge_lora_adapters(base_sd, setup["adapters"], setup["configs"], method=method, output="lora",
                                  **params)
    assert adapter.r == 11
    assert max(adapter.errors.values()) < 1e-5
    loaded = lora_weights(base, adapter)
    for key in target_keys(base_sd):
        D = (dense[key] - base_sd[key]).double()
        assert float((loaded[key].double() - dense[key].double()).norm()) <= 1e-5 * float(D.norm()), key
    torch.testing.assert_close(logits(load_lora(base, adapter), tokens), logits(load_dense(base, dense), tokens),
                               rtol=1e-4, atol=1e-5)


def test_exact_factoring_and_peft_model_adapters(setup):
    base_sd = setup["base_sd"]
    a = merge_lora_adapters(base_sd, setup["adapters"], setup["configs"], output="lora", lora_rank=3,
                            lora_svd="exact")
    b = merge_lora_adapters(base_sd, setup["peft_models"], output="lora", lora_rank=3, lora_svd="exact")
    assert list(a.state_dict) == list(b.state_dict)
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key])
    assert list(a.state_dict)[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


# --------------------------------------------------------------------------------- Embedding, Conv1D
class EmbedConv(nn.Module):
    """An nn.Embedding and a transformers Conv1D (GPT-2's weight layout [in, out]: fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.proj = transformers.pytorch_utils.Conv1D(12, 8)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.emb(x))))


def test_embedding_and_conv1d_adapters():
    torch.manual_seed(1)
    base = EmbedConv().eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    adapters, materialised = [], []
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "proj"], fan_in_fan_out=True)
    for t in range(3):
        model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        randomise_lora(model, seed=20 + t)
        adapters.append(get_peft_model_state_dict(model))
        materialised.append(copy.deepcopy(model).merge_and_unload().state_dict())
    assert "base_model.model.emb.lora_embedding_A" in adapters[0]
    for adapter, want in zip(adapters, materialised):
        for key, delta in lora_delta_weights(base_sd, adapter, config).items():
            torch.testing.assert_close(base_sd[key] + delta, want[key], rtol=0, atol=1e-6)
    dense = merge_lora_adapters(base_sd, adapters, config, method="task_arithmetic", lam=1.0)
    for key in ("emb.weight", "proj.weight"):
        want = base_sd[key] + sum(m[key] - base_sd[key] for m in materialised)
        torch.testing.assert_close(dense[key], want, rtol=1e-5, atol=1e-6)
    adapter = merge_lora_adapters(base_sd, adapters, config, method="task_arithmetic", lam=1.0, output="lora")
    assert adapter.r == 6 and adapter.fan_in_fan_out
    assert set(adapter.state_dict) == {"base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B",
                                       "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"}
    model = get_peft_model(copy.deepcopy(base), adapter.lora_config())
    assert not set_peft_model_state_dict(model, adapter.state_dict).unexpected_keys
    x = torch.randint(0, 16, (3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_dense(base, dense)(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_mismatched_adapters_are_refused(setup):
    base, base_sd = setup["base"], setup["base_sd"]
    adapters, configs = setup["adapters"], setup["configs"]
    # Different target modules.
    other = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapters\[1\] targets other modules than adapters\[0\]: it lacks"):
        merge_lora_adapters(base_sd, [adapters[0], get_peft_model_state_dict(other)],
                            [configs[0], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])])
    # An adapter of another model size: factor shapes do not fit the base weights.
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=64))
    small_lora = get_peft_model(small, lora_config(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match=r"adapters\[1\]: module 'model.layers.0.self_attn.q_proj': lora_B @ lora_A "
                                         r"is \(16, 16\) but base weight .* is \(32, 32\)"):
        merge_lora_adapters(base_sd, [adapters[0], get_peft_model_state_dict(small_lora)], configs[0])
    # A config that does not describe the adapter.
    with pytest.raises(ValueError, match="has factors of rank 4 but its config says r = 8"):
        merge_lora_adapters(base_sd, adapters[:1], lora_config(r=8, lora_alpha=8))
    # Factors of different ranks within one module.
    broken = dict(adapters[0])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    broken[key] = broken[key][:3]
    with pytest.raises(ValueError, match="disagree on the rank"):
        merge_lora_adapters(base_sd, [broken], scalings=1.0)


def test_unsupported_inputs_are_refused(setup):
    base, base_sd, adapters, configs = setup["base"], setup["base_sd"], setup["adapters"], setup["configs"]
    with pytest.raises(ValueError, match="use_dora=True"):
        merge_lora_adapters(base_sd, adapters[:1], lora_config(r=4, lora_alpha=8, use_dora=True))
    # A peft model's whole state dict holds the base layers too.
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.embed_tokens.weight' is not a LoRA factor"
                                         r".*get_peft_model_state_dict"):
        merge_lora_adapters(base_sd, [setup["peft_models"][0].state_dict()], configs[0])
    with pytest.raises(ValueError, match="give the adapter's LoraConfig"):
        merge_lora_adapters(base_sd, adapters)
    with pytest.raises(ValueError, match="not both"):
        merge_lora_adapters(base_sd, adapters, configs, scalings=1.0)
    with pytest.raises(ValueError, match="scalings has no entry for module"):
        merge_lora_adapters(base_sd, adapters[:1], scalings={"model.layers.0.self_attn.q_proj": 2.0})
    with pytest.raises(ValueError, match="no adapters to merge"):
        merge_lora_adapters(base_sd, [], configs)
    with pytest.raises(ValueError, match="configs has 2 entries for 3 adapters"):
        merge_lora_adapters(base_sd, adapters, configs[:2])
    with pytest.raises(ValueError, match="output must be one of"):
        merge_lora_adapters(base_sd, adapters, configs, output="svd")
    with pytest.raises(ValueError, match="base is a peft model"):
        merge_lora_adapters(setup["peft_models"][0], adapters, configs)
    # pymerge.merge's own checks reach the caller (a parameter of the method).
    with pytest.raises(ValueError, match="cart"):
        merge_lora_adapters(base_sd, adapters, configs, rank_ratio=2.0)


def test_scalings_instead_of_configs(setup):
    """scalings= gives alpha / r directly: the first adapter's config is r = 4, lora_alpha = 8, i.e. 2.0."""
    base_sd, adapter, config = setup["base_sd"], setup["adapters"][0], setup["configs"][0]
    want = lora_delta_weights(base_sd, adapter, config)
    got = lora_delta_weights(base_sd, adapter, scaling=2.0)
    assert all(torch.equal(got[k], want[k]) for k in want)
