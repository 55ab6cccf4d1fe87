"""pymerge.merge() on inputs that used to give wrong output without an error, or crash deep inside a method:
non-finite weights, integer buffers that differ from the base, LoRA factor keys, inputs that require grad,
tensors on the meta device. Each case is checked for every registered method."""
import collections
import re
import warnings

import pytest
import torch

import pymerge
from pymerge import methods

from backend_lists import method_backends

METHODS = methods.available()
CENTER_BACKENDS = method_backends("center_task_vectors")


def _family(T=3, dtype=torch.float32, seed=0):
    """A base and T fine-tunes: one 2-D key every SVD-based method treats as a matrix, a bias, a scalar and an
    integer buffer."""
    g = torch.Generator().manual_seed(seed)
    base = collections.OrderedDict([("enc.w", torch.randn(6, 4, generator=g)), ("enc.b", torch.randn(6, generator=g)),
                                    ("scale", torch.randn((), generator=g)), ("position_ids", torch.arange(5))])
    models = [collections.OrderedDict((k, v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                                       else v.clone()) for k, v in base.items()) for _ in range(T)]
    cast = [collections.OrderedDict((k, v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items())
            for sd in (base, *models)]
    return cast[0], cast[1:]


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["base", "models[1]"])
@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_input_named(name, where, bad):
    base, models = _family()
    sd = base if where == "base" else models[1]
    sd["enc.w"][2, 3] = bad
    if name == "weight_average" and where == "base":
        # weight_average never reads the base: a corrupt base cannot change its result.
        clean_base = _family()[0]
        out = pymerge.merge(name, base, models)
        want = pymerge.merge(name, clean_base, models)
        assert all(torch.equal(out[k], want[k]) for k in base)
        return
    counts = "1 NaN and 0" if bad != bad else "0 NaN and 1"
    pattern = (rf"merge\({name}\): key 'enc\.w' of {re.escape(where)} holds {counts} \+-Inf of its 24 entries "
               r"\(the first at index \[2, 3\]\)")
    with pytest.raises(ValueError, match=pattern):
        pymerge.merge(name, base, models)


@pytest.mark.parametrize("backend", CENTER_BACKENDS)
@pytest.mark.parametrize("name,params", [("weight_average", {"weights": [1.0, 0.0, 1.0]}),
                                         ("task_arithmetic", {"lam": 0.0}),
                                         ("task_arithmetic", {"lam": 0.5, "weights": [1.0, 0.0, 2.0]})])
def test_propagating_methods_catch_nonfinite_behind_a_zero_coefficient(name, params, backend):
    """The nonfinite_propagates promise holds where a coefficient is 0 (0 * NaN = NaN, 0 * Inf = NaN)."""
    assert getattr(methods.get(name), "nonfinite_propagates", None), "merge checks only this method's output"
    for bad in (float("nan"), float("inf")):
        base, models = _family()
        models[1]["enc.b"][4] = bad
        with pytest.raises(ValueError, match=r"key 'enc\.b' of models\[1\]"):
            pymerge.merge(name, base, models, backend=backend, **params)


def test_check_finite_false_lets_values_propagate():
    base, models = _family()
    models[0]["enc.w"][1, 1] = float("nan")
    out = pymerge.merge("task_arithmetic", base, models, check_finite=False)
    assert torch.isnan(out["enc.w"][1, 1]) and int(torch.isnan(out["enc.w"]).sum()) == 1
    clean = _family()[1]
    want = pymerge.merge("task_arithmetic", base, [clean[0], *models[1:]])
    assert torch.equal(out["enc.b"], want["enc.b"])
    with pytest.raises(ValueError, match="check_finite must be True or False"):
        pymerge.merge("task_arithmetic", base, models, check_finite="no")


@pytest.mark.parametrize("name", METHODS)
def test_overflowing_sum_of_finite_inputs_is_not_an_error(name):
    """The cheap check sums each tensor; a float16 key of large finite entries overflows that sum (60000 * 24 >
    65504) and must still be accepted."""
    base, models = _family(dtype=torch.float16)
    base["enc.w"] = torch.full((6, 4), 6e4, dtype=torch.float16) + torch.arange(24).reshape(6, 4).half()
    for t, m in enumerate(models):
        m["enc.w"] = base["enc.w"] - 32 * (t + 1)
    assert not torch.isfinite(base["enc.w"].sum())
    out = pymerge.merge(name, base, models)
    assert torch.isfinite(out["enc.w"]).all()


@pytest.mark.parametrize("name", METHODS)
def test_overflow_of_the_out_dtype_is_named(name):
    """Finite inputs whose merged bias (~1e5) does not fit the float16 out_dtype: an error, not Inf."""
    base, models = _family()
    for sd in (base, *models):
        sd["enc.b"] = sd["enc.b"] + 1e5
    with pytest.raises(ValueError, match=r"merged key 'enc\.b' holds 0 NaN and 6 \+-Inf .* although every input "
                                         r"is finite: an overflow of torch\.float16"):
        pymerge.merge(name, base, models, out_dtype=torch.float16)


def test_overflow_of_the_computation_is_named():
    """task_arithmetic checks only its output: finite float32 inputs whose combination overflows float32."""
    base, models = _family()
    for m in models:
        m["scale"] = torch.tensor(3e38)
    with pytest.raises(ValueError, match=r"merged key 'scale' holds .*1 \+-Inf .* overflow of torch\.float32"):
        pymerge.merge("task_arithmetic", base, models, lam=1.0)


# ----------------------------------------------------------------------------------- integer buffers
@pytest.mark.parametrize("name", METHODS)
def test_integer_buffer_that_differs_from_the_base_warns(name):
    base, models = _family()
    models[0]["position_ids"] = torch.arange(5) + 3
    models[2]["position_ids"] = torch.arange(5).flip(0)
    base["mask"] = torch.tensor([True, False])
    for m in models:
        m["mask"] = torch.tensor([True, False])
    with pytest.warns(UserWarning, match=r"merge\(" + name + r"\): non-float key 'position_ids' \(torch\.int64\) "
                                         r"differs from the base's in models\[0\], models\[2\];") as record:
        out = pymerge.merge(name, base, models)
    assert len(record) == 1 and record[0].filename == __file__     # one warning, pointing at the caller
    assert torch.equal(out["position_ids"], base["position_ids"]) and torch.equal(out["mask"], base["mask"])
    models[0]["position_ids"], models[2]["position_ids"] = torch.arange(5), torch.arange(5)
    models[1]["mask"] = torch.tensor([True, True])
    with pytest.warns(UserWarning, match=r"non-float key 'mask' \(torch\.bool\) differs from the base's in "
                                         r"models\[1\];"):
        pymerge.merge(name, base, models)


def test_equal_integer_buffers_do_not_warn():
    base, models = _family()
    _no_warnings(pymerge.merge, "ties", base, models)


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("key", ["base_model.model.q_proj.lora_A.weight", "q_proj.lora_B.default.weight",
                                 "embed_tokens.lora_embedding_A", "lora_embedding_B.default"])
@pytest.mark.parametrize("name", METHODS)
def test_lora_factor_keys_refused(name, key):
    base, models = _family()
    base[key] = torch.randn(4, 6)
    for m in models:
        m[key] = base[key] + 0.1
    with pytest.raises(ValueError, match=rf"merge\({name}\): key '{re.escape(key)}' is a LoRA factor .* "
                                         r"delta_W = B @ A"):
        pymerge.merge(name, base, models)


def test_names_that_only_contain_lora_are_merged():
    base, models = _family()
    for key in ("explora_A.weight", "lora_Alpha", "blocks.lora_AB.w"):
        base[key] = torch.ones(3)
        for m in models:
            m[key] = torch.ones(3)
    out = pymerge.merge("task_arithmetic", base, models)
    assert torch.equal(out["lora_Alpha"], torch.ones(3))


# ----------------------------------------------------------------------------------- requires_grad
class _Tiny(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = torch.nn.Linear(4, 6)
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))
        with torch.no_grad():
            for p in (self.enc.weight, self.enc.bias):
                p.copy_(torch.randn(p.shape, generator=g))
        self.register_buffer("position_ids", torch.arange(5))


@pytest.mark.parametrize("name", METHODS)
def test_inputs_that_require_grad(name):
    """dict(model.named_parameters()) / a live state dict: merged under no_grad, results are plain tensors equal
    to the merge of detached copies."""
    base_model = _Tiny(0)
    fine = [_Tiny(0) for _ in range(3)]
    for t, m in enumerate(fine):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(t + 1)))
    base = dict(base_model.named_parameters())
    models = [dict(m.named_parameters()) for m in fine]
    assert all(v.requires_grad for v in base.values())
    out = pymerge.merge(name, base, models)
    want = pymerge.merge(name, {k: v.detach().clone() for k, v in base.items()},
                         [{k: v.detach().clone() for k, v in m.items()} for m in models])
    for k in base:
        assert not out[k].requires_grad and out[k].grad_fn is None, k
        assert torch.equal(out[k], want[k]), k
    live = pymerge.merge(name, base_model.state_dict(keep_vars=True), [m.state_dict(keep_vars=True) for m in fine])
    assert not any(v.requires_grad for v in live.values())


# ------------------------------------------------------------------------------------------ meta device
@pytest.mark.parametrize("name", METHODS)
def test_meta_tensors_refused_at_the_boundary(name):
    base, models = _family()
    meta = [collections.OrderedDict((k, v.to("meta")) for k, v in sd.items()) for sd in (base, *models)]
    with pytest.raises(ValueError, match=rf"merge\({name}\): key 'enc\.w' of base is on the meta device"):
        pymerge.merge(name, {k: v for k, v in meta[0].items() if k != "position_ids"},
                      [{k: v for k, v in m.items() if k != "position_ids"} for m in meta[1:]])
    with pytest.raises(ValueError, match=r"key 'position_ids' of base is on the meta device"):
        pymerge.merge(name, meta[0], meta[1:])
    with pytest.raises(ValueError, match=r"key 'enc\.w' of models\[1\] is on the meta device"):
        pymerge.merge(name, base, [models[0], {**models[1], "enc.w": meta[2]["enc.w"]}, models[2]])


# ------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name,param", [("task_arithmetic", "lam"), ("ties", "density"), ("iso_c", "alpha"),
                                        ("dare_linear", "p"), ("weight_average", "weights")])
def test_none_is_refused_where_it_means_nothing(name, param):
    base, models = _family()
    with pytest.raises(ValueError, match=rf"{name}: {param} = None; pass a value"):
        pymerge.merge(name, base, models, **{param: None})


def test_none_is_accepted_for_seeds_and_none_defaults():
    base, models = _family()
    for name, params in [("dare_linear", {"seed": None, "p": 0.5}), ("cart", {"seed": None, "rank": None}),
                         ("tsv_m", {"oversample": None, "seed": None})]:
        out = pymerge.merge(name, base, models, **params)
        assert torch.isfinite(out["enc.w"]).all()


def test_weights_summing_to_zero_refused_before_any_key_is_read():
    base, models = _family()
    read = []

    class Recording(dict):
        """A lazy reader: shapes without reading (key_info), reads recorded."""
        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

        def key_info(self, key):
            value = super().__getitem__(key)
            return value.shape, value.dtype

    with pytest.raises(ValueError, match=r"weight_average: weights \[1\.0, -3\.0, 2\.0\] sum to 0"):
        pymerge.merge("weight_average", Recording(base), [Recording(m) for m in models], weights=[1.0, -3.0, 2.0])
    assert read == []


@pytest.mark.parametrize("scale", [1e-40, 1e-300, 1e39, 1e300])
@pytest.mark.parametrize("name", ["weight_average", "ties", "dare_ties"])
def test_extreme_weights_give_the_result_of_rescaled_ones(name, scale):
    """weight_average and the disjoint mean of ties / dare_ties do not change when all weights are scaled by one
    c > 0; weights far outside float32's (or float64's) range must not under- or overflow on the way."""
    base, models = _family()
    weights = [0.5, 1.0, 2.0]
    want = pymerge.merge(name, base, models, weights=weights)
    got = pymerge.merge(name, base, models, weights=[w * scale for w in weights])
    for k in base:
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7), (k, got[k], want[k])


def test_ties_one_element_strided_key():
    """A one-element view with stride 2 (non-contiguous storage of a 1-element key) through the magnitude trim."""
    base = {"x": torch.tensor([[1.0, 0.0]], dtype=torch.float64)[:, 0]}
    models = [{"x": torch.tensor([[1.5, 0.0]], dtype=torch.float64)[:, 0]}]
    assert base["x"].stride() == (2,)
    out = pymerge.merge("ties", base, models, density=0.5)
    assert torch.equal(out["x"], torch.tensor([1.5], dtype=torch.float64))


def test_ties_equal_weights_elect_as_unit_weights():
    """Five bfloat16 task vectors of one entry summing to exactly 0 elect the + sign (docs/METHODS.md §TIES); equal
    weights 0.001 must elect it too (the products 0.001 tau_t, rounded, used to sum to a negative number)."""
    base = {"x": torch.tensor([-0.486328125], dtype=torch.bfloat16)}
    taus = [0.1171875, 0.05859375, -0.029296875, 0.03125, -0.177734375]
    assert sum(taus) == 0
    models = [{"x": base["x"] + tau} for tau in taus]
    assert [float(m["x"].double() - base["x"].double()) for m in models] == taus      # stored exactly
    unit = pymerge.merge("ties", base, models, density=1.0)
    assert torch.equal(unit["x"], (base["x"].double() + (0.1171875 + 0.05859375 + 0.03125) / 3).bfloat16())
    for w in (0.001, 3.0):
        assert torch.equal(pymerge.merge("ties", base, models, density=1.0, weights=w)["x"], unit["x"]), w
