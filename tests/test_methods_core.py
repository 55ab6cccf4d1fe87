"""pymerge.merge(): validation, key grouping, dtypes, the method registry and spec contract."""
import ast
import collections
import importlib
import inspect
import pkgutil

import pytest
import torch

import pymerge
from pymerge import methods
from pymerge.merge import _plan_groups
from pymerge.methods import KeyGroup, KeyInfo, LearnedMethodSpec, MethodSpec

from backend_lists import method_backends

MINE = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "cart")


# "reference" always; "auto" (the C++ kernels) once they are built.
OPS_BACKENDS = method_backends("center_task_vectors", "randomized_svd", "randomized_svd_centered", "low_rank_sum")


def _with_backend(name, backend, **params):
    if any(p.name == "backend" for p in methods.get(name).params):
        params["backend"] = backend
    return params


def _model(seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()
    sd["embed.weight"] = torch.randn(11, 6, generator=g)
    sd["layer.0.attn.q.weight"] = torch.randn(8, 6, generator=g)
    sd["layer.0.attn.q.bias"] = torch.randn(8, generator=g)
    sd["layer.0.mlp.fc.weight"] = torch.randn(8, 6, generator=g)
    sd["layer.0.ln.weight"] = torch.randn(6, generator=g)
    sd["position_ids"] = torch.arange(7)
    sd["layer.1.attn.q.weight"] = torch.randn(8, 6, generator=g)
    sd["scalar"] = torch.randn((), generator=g)
    return collections.OrderedDict((k, (v * scale).to(dtype) if v.is_floating_point() else v) for k, v in sd.items())


def _family(T=3, dtype=torch.float32):
    base = _model(0, dtype)
    models = []
    for t in range(T):
        d = _model(100 + t, torch.float32, 0.1)
        models.append(collections.OrderedDict(
            (k, (base[k].float() + d[k]).to(dtype) if base[k].is_floating_point() else base[k].clone())
            for k in base))
    return base, models


# ------------------------------------------------------------------------------------------ registry / spec
# The static methods docs/METHODS.md defines, by registry name.
DOCUMENTED = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv_m", "iso_c", "iso_cts",
              "cart")
# The learned methods docs/METHODS.md defines (§AdaMerging, §DivMerge): specs too, run by their own functions.
DOCUMENTED_LEARNED = ("adamerging", "divmerge")
PER_MODEL = " (scalar or one per model)"


def _method_modules(kind):
    """{module name: its SPEC} for every module of pymerge/methods that defines a spec of `kind`."""
    found = {}
    for info in pkgutil.iter_modules(methods.__path__):
        spec = getattr(importlib.import_module(f"{methods.__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, (MethodSpec, LearnedMethodSpec)) and spec.kind == kind:
            found[info.name] = spec
    return found


def test_registry_holds_every_method_module_and_documented_method():
    static, learned = _method_modules("static"), _method_modules("learned")
    assert sorted(methods.available()) == sorted(methods.available("static")) == sorted(DOCUMENTED) == sorted(static)
    assert sorted(methods.available("learned")) == sorted(DOCUMENTED_LEARNED) == sorted(learned)
    assert sorted(methods.available("all")) == sorted(DOCUMENTED + DOCUMENTED_LEARNED)
    for name, spec in {**static, **learned}.items():
        assert methods.get(name) is spec and spec.name == name
    with pytest.raises(ValueError, match="unknown merging method 'nope'"):
        methods.get("nope")


@pytest.mark.parametrize("name", DOCUMENTED)
def test_describe_shows_every_param_with_its_default_and_declared_type(name):
    """describe() has one line per Param, in order, showing its default (a literal equal to it, of the same type),
    whether it is per-model, and its help; each default has the Param's declared type, passes its own checks, is
    what resolve_params fills in, and agrees with any default merge_group's signature declares."""
    spec = methods.get(name)
    lines = spec.describe().splitlines()
    assert lines[0] == f"{name}: {spec.description}"
    assert len(lines) == 1 + len(spec.params)
    assert len({p.name for p in spec.params}) == len(spec.params)
    for line, p in zip(lines[1:], spec.params):
        head, tail = f"  {p.name} = ", f": {p.help}"
        assert line.startswith(head) and line.endswith(tail), (line, p)
        shown = line[len(head):len(line) - len(tail)]
        assert shown.endswith(PER_MODEL) == p.per_model, (line, p)
        shown = shown[:-len(PER_MODEL)] if p.per_model else shown
        value = ast.literal_eval(shown)
        assert value == p.default and type(value) is type(p.default), (name, p.name, shown)
        assert p.default is None or isinstance(p.default, p.type), (name, p.name, p.type)
        assert p.choices is None or p.default in p.choices, (name, p.name)
        assert p.default is None or p.check is None or p.check(p.default) is None, (name, p.name)
    T = 3
    resolved = spec.resolve_params({}, T)
    assert resolved == {p.name: [p.default] * T if p.per_model else p.default for p in spec.params}
    signature = inspect.signature(spec.merge_group).parameters
    for p in spec.params:
        assert p.name in signature, (name, p.name)
        declared = signature[p.name].default
        assert declared is inspect.Parameter.empty or declared == p.default, (name, p.name, declared)


def test_unknown_and_bad_params():
    base, models = _family()
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lamda'\]"):
        pymerge.merge("task_arithmetic", base, models, lamda=0.3)
    with pytest.raises(ValueError, match="weights has 2 values for 3 models"):
        pymerge.merge("task_arithmetic", base, models, weights=[1.0, 2.0])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"ties: density = {bad}: must be in \(0, 1\]"):
            pymerge.merge("ties", base, models, density=bad)
    with pytest.raises(ValueError, match=r"ties: density = 0.0: must be in \(0, 1\]"):
        pymerge.merge("ties", base, models, density=[0.2, 0.3, 0.0])
    with pytest.raises(ValueError, match=r"dare_linear: p = 1.0: must be in \[0, 1\)"):
        pymerge.merge("dare_linear", base, models, p=1.0)
    with pytest.raises(ValueError, match="expected one of"):
        pymerge.merge("cart", base, models, svd="full")
    with pytest.raises(ValueError, match="backend"):
        pymerge.merge("weight_average", base, models, backend="gpu")


# ----------------------------------------------------------------------------------------------- validation
def test_no_models():
    base, _ = _family()
    with pytest.raises(ValueError, match=r"T = 0"):
        pymerge.merge("weight_average", base, [])


def test_models_must_be_a_sequence():
    base, models = _family()
    with pytest.raises(ValueError, match="sequence of state dicts"):
        pymerge.merge("weight_average", base, models[0])


def test_missing_and_extra_keys_named():
    base, models = _family()
    del models[1]["layer.0.mlp.fc.weight"]
    models[1]["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        pymerge.merge("weight_average", base, models, backend="reference")
    msg = str(e.value)
    assert "models[1]" in msg and "missing ['layer.0.mlp.fc.weight']" in msg and "extra ['extra.weight']" in msg


def test_shape_mismatch_named():
    base, models = _family()
    models[2]["layer.1.attn.q.weight"] = torch.zeros(8, 7)
    with pytest.raises(ValueError, match=r"'layer.1.attn.q.weight' has shape \(8, 7\) in models\[2\] but \(8, 6\)"):
        pymerge.merge("ties", base, models)


def test_dtype_mismatch_named():
    base, models = _family()
    models[0]["layer.0.ln.weight"] = models[0]["layer.0.ln.weight"].half()
    with pytest.raises(ValueError, match=r"'layer.0.ln.weight' has dtype torch.float16 in models\[0\] but "
                                         r"torch.float32 in base \(shape \(6,\)\)"):
        pymerge.merge("ties", base, models)


def test_non_tensor_value():
    base, models = _family()
    base["junk"] = 3
    for m in models:
        m["junk"] = 3
    with pytest.raises(ValueError, match="key 'junk' holds a int"):
        pymerge.merge("ties", base, models)


def test_bad_out_dtype_and_group_bytes():
    base, models = _family()
    with pytest.raises(ValueError, match="out_dtype"):
        pymerge.merge("ties", base, models, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="max_group_bytes"):
        pymerge.merge("ties", base, models, max_group_bytes=0)


# ------------------------------------------------------------------------- output: order, passthrough, dtypes
@pytest.mark.parametrize("name", MINE)
def test_order_passthrough_and_inputs_untouched(name):
    base, models = _family()
    # Non-float buffers keep the base's value even where a model's differs, with a warning naming the key and
    # the model (documented in merge()).
    models[1]["position_ids"] = torch.arange(7) + 5
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in (base, *models)]
    with pytest.warns(UserWarning, match=r"'position_ids' .* differs from the base's in models\[1\];"):
        out = pymerge.merge(name, base, models, **_with_backend(name, "reference"))
    assert list(out) == list(base)
    assert torch.equal(out["position_ids"], base["position_ids"]) and out["position_ids"].dtype == torch.int64
    for k in base:
        assert out[k].shape == base[k].shape and out[k].dtype == base[k].dtype
    for before, after in zip(snapshot, (base, *models)):
        assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", MINE)
def test_dtypes_and_out_dtype(name, dtype):
    base, models = _family(dtype=dtype)
    params = _with_backend(name, "reference")
    if name == "cart":
        params["svd"] = "exact"
    if name.startswith("dare"):
        params["p"] = 0.5
    out = pymerge.merge(name, base, models, **params)
    up = pymerge.merge(name, base, models, out_dtype=torch.float32, **params)
    # float64 result from the same inputs upcast: the method computes in fp32 (fp64 for fp64) either way.
    ref = pymerge.merge(name, {k: v.double() if v.is_floating_point() else v for k, v in base.items()},
                        [{k: v.double() if v.is_floating_point() else v for k, v in m.items()} for m in models],
                        **params)
    for k in base:
        if not base[k].is_floating_point():
            continue
        assert out[k].dtype == dtype and up[k].dtype == torch.float32
        # Output = the one computation (fp32, fp64 for fp64) rounded once to the requested dtype.
        if dtype == torch.float64:
            assert torch.equal(out[k].float(), up[k])
        else:
            assert torch.equal(out[k], up[k].to(dtype))
        # The fp32 computation agrees with fp64 on the same (low-precision) inputs to fp32 accuracy
        # (ties / dare: up to elements at the trim threshold or mask boundary, none here).
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        got = out[k] if dtype == torch.float64 else up[k].double()
        err = (got - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)
        assert err <= tol, (k, float(err))


def test_zero_element_and_scalar_keys():
    base, models = _family()
    base["empty"] = torch.zeros(0, 4)
    for m in models:
        m["empty"] = torch.zeros(0, 4)
    out = pymerge.merge("ties", base, models)
    assert out["empty"].shape == (0, 4)
    ta = pymerge.merge("task_arithmetic", base, models, lam=0.5, backend="reference")
    want = base["scalar"] + 0.5 * sum(m["scalar"] - base["scalar"] for m in models)
    assert torch.allclose(ta["scalar"], want, atol=1e-6)


def test_single_model():
    base, models = _family(T=1)
    wa = pymerge.merge("weight_average", base, models, backend="reference")
    assert all(torch.allclose(wa[k], models[0][k]) for k in base if base[k].is_floating_point())
    cart = pymerge.merge("cart", base, models, backend="reference")
    assert all(torch.allclose(cart[k], models[0][k], atol=1e-6) for k in base if base[k].is_floating_point())


# -------------------------------------------------------------------------------------------------- grouping
def test_plan_groups_by_shape_dtype_and_bytes():
    infos = {"a": KeyInfo(torch.Size([4, 4]), torch.float32), "b": KeyInfo(torch.Size([4]), torch.float32),
             "c": KeyInfo(torch.Size([4, 4]), torch.float32), "d": KeyInfo(torch.Size([4, 4]), torch.bfloat16),
             "e": KeyInfo(torch.Size([4, 4]), torch.float32)}
    T = 3
    assert _plan_groups(list(infos), infos, T, 1 << 30) == [["a", "c", "e"], ["b"], ["d"]]
    per_key = (T + 1) * 16 * 4
    assert _plan_groups(list(infos), infos, T, 2 * per_key) == [["a", "c"], ["e"], ["b"], ["d"]]
    # A key larger than the bound is a group of its own.
    assert _plan_groups(list(infos), infos, T, 1) == [["a"], ["c"], ["e"], ["b"], ["d"]]


@pytest.mark.parametrize("name", MINE)
def test_result_independent_of_group_size(name):
    base, models = _family(T=4)
    params = _with_backend(name, "reference")
    if name == "cart":
        params["svd"] = "exact"
    big = pymerge.merge(name, base, models, **params)
    small = pymerge.merge(name, base, models, max_group_bytes=1, **params)
    for k in base:
        assert torch.allclose(big[k], small[k], rtol=0, atol=1e-6), k


def test_merge_group_sees_same_shape_keys_together():
    seen = []

    def merge_group(group: KeyGroup):
        seen.append((list(group.keys), tuple(group.shape), group.dtype, group.num_models))
        return [torch.zeros(group.shape, dtype=group.compute_dtype) for _ in group.keys]

    spec = methods.MethodSpec("probe", "records groups", merge_group)
    base, models = _family(T=2)
    out = pymerge.merge(spec, base, models)
    assert (["layer.0.attn.q.weight", "layer.0.mlp.fc.weight", "layer.1.attn.q.weight"], (8, 6),
            torch.float32, 2) in seen
    assert list(out) == list(base)


def test_prepare_sees_all_float_keys_once():
    calls = []

    def prepare(params, keys):
        calls.append(dict(keys))
        return {**params, "extra": len(keys)}

    def merge_group(group, extra):
        assert extra == 7
        return [b.float() for b in group.base]

    spec = methods.MethodSpec("probe", "records prepare", merge_group, prepare=prepare)
    base, models = _family(T=2)
    pymerge.merge(spec, base, models)
    assert len(calls) == 1 and "position_ids" not in calls[0] and calls[0]["embed.weight"].shape == (11, 6)


class LazyStateDict(collections.abc.Mapping):
    """A mapping that reports shapes without reading and counts reads (what a pymerge.io reader looks like)."""

    def __init__(self, sd):
        self.sd, self.reads = sd, collections.Counter()

    def __getitem__(self, k):
        self.reads[k] += 1
        return self.sd[k]

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)

    def key_info(self, k):
        return KeyInfo(self.sd[k].shape, self.sd[k].dtype)


def test_lazy_mapping_read_once_per_key():
    base, models = _family()
    lazy = [LazyStateDict(m) for m in models]
    out = pymerge.merge("ties", LazyStateDict(base), lazy)
    want = pymerge.merge("ties", base, models)
    assert all(torch.equal(out[k], want[k]) for k in base)
    assert all(set(m.reads.values()) == {1} for m in lazy)
