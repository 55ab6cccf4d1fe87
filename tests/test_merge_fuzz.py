"""Fuzzing pymerge.merge: random small models and parameters, every registered method.

Each example draws 1-4 float keys (0-D, 1-D, tall / wide / square 2-D, 3-D, sometimes a zero-element key) and
an integer buffer, T = 1..5 fine-tunes (some equal to the base), one dtype (fp64 / fp32 / bf16 / fp16), inputs
that require grad or are non-contiguous views, sometimes one NaN / +-Inf (one entry or a whole tensor, in the
base or in models[t]), and the method's parameters: left at their default, in range, or out of range. The
outcome must be one of:
- a ValueError that names a bad parameter (out of range, wrong count, exclusive options given together);
- else a ValueError that names the poisoned key and where it is (base / models[t]), or a key the method cannot
  merge with valid parameters (the structural limits below);
- else a result: every key in the base's order, float keys finite, in their input dtype and shape, not requiring
  grad, the integer buffer the base's (with a UserWarning naming it exactly when a model's differs), and equal
  to the method's float64 reference where one applies (below).
Inputs are never modified (bitwise, NaN payloads included), whatever the outcome.

The float64 references are the oracles of the method tests (tests/test_methods_ta_ties_dare.py,
test_methods_tsv_iso.py, test_methods_cart.py), imported from there, evaluated on the inputs upcast to float64:
- weight_average, task_arithmetic, ties, dare_linear, dare_ties: every dtype (dare's oracle redraws the same masks
  from the seed, so it is exact for p > 0 too; seed=None draws fresh masks and is not compared). The allowed error
  is the output dtype's rounding of the result plus float32 accumulation (float64 for float64 inputs) on the
  magnitudes involved; ties / dare_ties only with same-sign weights (mixed signs make the disjoint mean's divisor
  cancel, an ill-conditioned result).
- tsv_m, iso_c, iso_cts, cart: float64 inputs on the deterministic route (svd="exact"; iso_c always; iso_cts's
  "auto" when no matrix key is tall), within 1e-8 of the result's scale. Not compared: the randomized routes
  (checked for everything but values), lower-precision inputs (their float32 SVDs' error depends on the spectrum;
  tests/test_methods_tsv_iso.py and test_methods_cart.py bound it on controlled spectra), a matrix key where a
  task vector is zero (tsv_m / iso_cts drop numerically zero components, a documented deviation from the
  formula), and iso_cts where the official common-space rounding leaves more than r task-specific components.

Structural limits (ValueErrors naming a key with valid parameters): tsv_m on a matrix key with min(m, n) < T;
cart with rank >= min(m, n) of a selected key, or with no 2-D key at all (its selection is empty).

CI runs it derandomized (tests/conftest.py's "ci" profile, when CI is set) with FUZZ_EXAMPLES examples per
method; locally hypothesis explores afresh each run. A longer local run:
    PYMERGE_FUZZ_EXAMPLES=2000 python -P -m pytest -q tests/test_merge_fuzz.py
"""
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import pymerge
from pymerge import methods

from test_methods_cart import oracle_cart
from test_methods_ta_ties_dare import (_trim as trim_to_density, dare_masks, oracle_dare_linear, oracle_dare_ties,
                                       oracle_task_arithmetic, oracle_ties, oracle_weight_average)
from test_methods_tsv_iso import oracle_iso_c, oracle_iso_cts, oracle_tsv_m

FUZZ_EXAMPLES = int(os.environ.get("PYMERGE_FUZZ_EXAMPLES", "200"))
METHODS = methods.available()
DTYPES = (torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16)   # float64 twice as often
INT_KEY = "blocks.ids"
NONFINITE = (float("nan"), float("inf"), -float("inf"))
SVD_METHODS = ("tsv_m", "iso_c", "iso_cts", "cart")


# ------------------------------------------------------------------------------------------- parameters
@dataclass
class Drawn:
    """Parameters as given to merge(), and which of them the test knows to be out of range."""
    params: Dict[str, object] = field(default_factory=dict)
    bad: set = field(default_factory=set)
    allow_bad: bool = False


def _finite_float(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


NOT_A_NUMBER = st.sampled_from(NONFINITE + ("0.5", None))


def _scalar(draw, drawn, name, valid, invalid):
    """Leave `name` at its default, or give a valid or (when the case allows bad ones) an invalid value."""
    choice = draw(st.sampled_from(("default", "valid", "valid") + (("invalid",) if drawn.allow_bad else ())))
    if choice == "default":
        return
    drawn.params[name] = draw(valid if choice == "valid" else invalid)
    if choice == "invalid":
        drawn.bad.add(name)


def _per_model(draw, drawn, name, T, valid, invalid):
    """A per-model parameter: default, one scalar, a list of T values, or a bad list (a bad entry, or T + 1 values)."""
    choice = draw(st.sampled_from(("default", "scalar", "list", "list")
                                  + (("bad_entry", "bad_count") if drawn.allow_bad else ())))
    if choice == "default":
        return
    if choice == "scalar":
        drawn.params[name] = draw(valid)
    elif choice == "list":
        drawn.params[name] = draw(st.lists(valid, min_size=T, max_size=T))
    elif choice == "bad_entry":
        values = draw(st.lists(valid, min_size=T, max_size=T))
        values[draw(st.integers(0, T - 1))] = draw(invalid)
        drawn.params[name] = values
        drawn.bad.add(name)
    else:
        drawn.params[name] = draw(st.lists(valid, min_size=T + 1, max_size=T + 1))
        drawn.bad.add(name)


def _choice(draw, drawn, name, valid):
    _scalar(draw, drawn, name, st.sampled_from(valid), st.just("no-such-choice"))


@st.composite
def method_params(draw, name, T, allow_bad):
    """The parameters of `name` (see each method's SPEC.params for the ranges stated here); out-of-range values
    only when allow_bad."""
    d = Drawn(allow_bad=allow_bad)
    scale = _finite_float(-3.0, 3.0)
    # 0, or |w| in [1e-3, 2] (the float64 oracles' own products underflow for weights near 1e-308;
    # tests/test_merge_inputs.py covers extreme weights by scale invariance).
    weights = st.one_of(st.just(0.0), _finite_float(1e-3, 2.0), _finite_float(-2.0, -1e-3))
    bad_weight = st.sampled_from(NONFINITE + ("1",))
    if name == "weight_average":
        _per_model(draw, d, "weights", T, weights, bad_weight)
    if name in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        _scalar(draw, d, "lam", scale, NOT_A_NUMBER)
        _per_model(draw, d, "weights", T, weights, bad_weight)
    if name == "ties":
        _per_model(draw, d, "density", T, st.one_of(_finite_float(0.01, 1.0), st.just(1.0)),
                   st.one_of(st.just(0.0), _finite_float(-1.0, -1e-3), _finite_float(1.001, 5.0), NOT_A_NUMBER))
    if name in ("dare_linear", "dare_ties"):
        _per_model(draw, d, "p", T, st.one_of(_finite_float(0.0, 0.95), st.just(0.0)),
                   st.one_of(st.just(1.0), _finite_float(1.0, 3.0), _finite_float(-1.0, -1e-3), NOT_A_NUMBER))
        _scalar(draw, d, "seed", st.one_of(st.integers(0, 2 ** 40), st.none()), st.sampled_from((1.5, True, "0")))
    if name in ("tsv_m", "iso_c", "iso_cts"):
        _scalar(draw, d, "alpha", scale, NOT_A_NUMBER)
    if name == "tsv_m":
        _choice(draw, d, "svd", ("exact", "exact", "randomized"))
    if name == "iso_c":
        _choice(draw, d, "polar", ("auto", "svd", "gram"))
    if name == "iso_cts":
        _scalar(draw, d, "common_space_fraction", _finite_float(0.0, 1.0),
                st.one_of(_finite_float(1.01, 2.0), _finite_float(-1.0, -0.01), NOT_A_NUMBER))
        _choice(draw, d, "svd", ("exact", "exact", "auto", "randomized"))
    if name == "cart":
        _scalar(draw, d, "lam", scale, NOT_A_NUMBER)
        _choice(draw, d, "svd", ("exact", "exact", "randomized"))
        rank_options = {"rank_ratio": (_finite_float(0.01, 1.0), st.sampled_from((0.0, 1.5, float("nan")))),
                        "rank": (st.integers(1, 6), st.sampled_from((0, -2, 2.5, True))),
                        "energy": (_finite_float(0.01, 1.0), st.sampled_from((0.0, 1.5, float("inf"))))}
        given_options = draw(st.lists(st.sampled_from(sorted(rank_options)), max_size=2, unique=True))
        for option in given_options:
            valid, invalid = rank_options[option]
            bad = allow_bad and draw(st.booleans())
            d.params[option] = draw(invalid if bad else valid)
            if bad:
                d.bad.add(option)
        if len(given_options) > 1:          # mutually exclusive: the error names them
            d.bad.update(given_options)
    if name in ("weight_average",) and "weights" not in d.bad:
        w = d.params.get("weights", 1.0)
        if math.fsum(w if isinstance(w, list) else [w] * T) == 0:
            d.bad.add("weights")            # weights summing to 0 cannot be normalised
    return d


# ------------------------------------------------------------------------------------------------ models
# 2-D keys (tall, wide, square, single row / column) twice as often as each other kind.
SHAPE = st.sampled_from(("2-D", "2-D", "1-D", "0-D", "3-D", "empty")).flatmap(lambda kind: {
    "2-D": st.tuples(st.integers(1, 9), st.integers(1, 9)), "1-D": st.tuples(st.integers(1, 9)), "0-D": st.just(()),
    "3-D": st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)), "empty": st.just((0, 3))}[kind])


@dataclass
class Case:
    name: str
    T: int
    dtype: torch.dtype
    shapes: List[Tuple[int, ...]]
    seed: int
    same_as_base: List[bool]              # models[t] == base on every float key (a zero task vector)
    requires_grad: bool
    non_contiguous: bool
    poison: Optional[Tuple[float, int, int, bool]]   # (value, float key index, 0 = base / t + 1, whole tensor)
    ids_differ: Optional[int]             # models[t] whose integer buffer differs from the base's
    drawn: Drawn

    @property
    def keys(self):
        return [f"blocks.{i}.w" for i in range(len(self.shapes))]


@st.composite
def cases(draw, name):
    T = draw(st.integers(1, 5))
    shapes = draw(st.lists(SHAPE, min_size=1, max_size=4))
    if not any(len(s) == 2 and math.prod(s) > 0 for s in shapes) and draw(st.sampled_from((True, True, False))):
        shapes.append(draw(st.tuples(st.integers(1, 9), st.integers(1, 9))))   # mostly a matrix key or more
    filled = [i for i, s in enumerate(shapes) if math.prod(s) > 0]
    # Mostly valid inputs (which must merge and match the reference); else bad parameters, or a NaN / Inf.
    mode = draw(st.sampled_from(("valid", "valid", "valid", "bad parameters", "non-finite input")))
    poison = None
    if filled and mode == "non-finite input":
        poison = (draw(st.sampled_from(NONFINITE)), draw(st.sampled_from(filled)), draw(st.integers(0, T)),
                  draw(st.booleans()))
    return Case(name=name, T=T, dtype=draw(st.sampled_from(DTYPES)), shapes=shapes, seed=draw(st.integers(0, 2 ** 20)),
                same_as_base=draw(st.lists(st.sampled_from((False,) * 5 + (True,)), min_size=T, max_size=T)),
                requires_grad=draw(st.booleans()), non_contiguous=draw(st.booleans()), poison=poison,
                ids_differ=draw(st.one_of(st.none(), st.integers(0, T - 1))),
                drawn=draw(method_params(name, T, allow_bad=mode == "bad parameters")))


def _stored(value, case):
    """value (already in the case's dtype) stored the way the case asks: a strided view, requiring grad."""
    if case.non_contiguous and value.dim() > 0:
        buffer = torch.zeros(*value.shape, 2, dtype=value.dtype)
        view = buffer[..., 1]
        view.copy_(value)
        value = view
    else:
        value = value.clone()
    return value.requires_grad_() if case.requires_grad else value


def build(case):
    """(base, models) state dicts for a case, poisoned as drawn."""
    g = torch.Generator().manual_seed(case.seed)
    base64 = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in zip(case.keys, case.shapes)}
    models64 = [{k: b if same else b + 0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64)
                 for k, b in base64.items()} for same in case.same_as_base]
    state = []
    for who, sd in enumerate((base64, *models64)):
        values = {k: v.to(case.dtype, copy=True) for k, v in sd.items()}
        if case.poison is not None and case.poison[2] == who:
            bad, index, _, whole = case.poison
            key = case.keys[index]
            flat = values[key].reshape(-1)
            if whole:
                flat.fill_(bad)
            else:
                flat[case.seed % flat.numel()] = bad
        out = {k: _stored(v, case) for k, v in values.items()}
        differs = case.ids_differ is not None and who == case.ids_differ + 1
        out[INT_KEY] = torch.arange(4) + int(differs)
        state.append(out)
    return state[0], state[1:]


def _bits(x):
    """The bytes of x's values (bitwise: NaN payloads and signed zeros count)."""
    return torch.empty(x.numel(), dtype=x.dtype).copy_(x.detach().reshape(-1)).view(torch.uint8)


# --------------------------------------------------------------------------------------------- references
def _resolved(case):
    return methods.get(case.name).resolve_params(dict(case.drawn.params), case.T)


def _matrix_keys(case):
    """The 2-D keys with entries (zero-element keys are passed through, never merged)."""
    return [k for k, s in zip(case.keys, case.shapes) if len(s) == 2 and math.prod(s) > 0]


def structural_error_keys(case) -> Optional[List[str]]:
    """Keys a method cannot merge with these (valid) parameters, or None; [] for cart's empty selection."""
    if case.name == "tsv_m":
        keys = [k for k in _matrix_keys(case) if min(case.shapes[case.keys.index(k)]) < case.T]
        return keys or None
    if case.name == "cart":
        matrices = _matrix_keys(case)
        if not matrices:
            return []
        rank = case.drawn.params.get("rank")
        keys = [k for k in matrices if rank is not None and rank >= min(case.shapes[case.keys.index(k)])]
        return keys or None
    return None


def reference(case, base, models):
    """{key: float64 reference} for the float keys, or None where the value is not compared (module doc)."""
    p = _resolved(case)
    keys = [k for k, s in zip(case.keys, case.shapes) if math.prod(s) > 0]
    b = {k: base[k].detach().double() for k in keys}
    ms = [{k: m[k].detach().double() for k in keys} for m in models]
    name = case.name
    if name == "weight_average":
        return oracle_weight_average(b, ms, p["weights"])
    if name == "task_arithmetic":
        return oracle_task_arithmetic(b, ms, p["lam"], p["weights"])
    if name in ("dare_linear", "dare_ties") and p["seed"] is None:
        return None
    if name == "dare_linear":
        return oracle_dare_linear(b, ms, p["p"], p["seed"], p["lam"], p["weights"])
    if name in ("ties", "dare_ties"):
        w = p["weights"]
        if not (all(x > 0 for x in w) or all(x < 0 for x in w)):
            return None
        if len(set(w)) == 1 and w[0] > 0:
            w = [1.0] * case.T          # the same signs and disjoint mean as unit weights, exactly
        if name == "ties":
            return oracle_ties(b, ms, p["density"], p["lam"], w)
        return oracle_dare_ties(b, ms, p["p"], p["seed"], p["lam"], w)
    # The SVD-based methods: float64 inputs on the deterministic route only.
    if case.dtype != torch.float64:
        return None
    matrices = [k for k in _matrix_keys(case) if k in b]
    if name == "cart":
        if p["svd"] != "exact":
            return None
        return oracle_cart(b, ms, p["lam"], set(matrices), rank_ratio=p["rank_ratio"], rank=p["rank"],
                           energy=p["energy"])
    if name == "tsv_m" and p["svd"] != "exact":
        return None
    if name == "iso_cts":
        if p["svd"] == "randomized" or (p["svd"] == "auto" and any(b[k].shape[0] > b[k].shape[1] for k in matrices)):
            return None
        for k in matrices:
            r = min(b[k].shape)
            if round((r - int(r * p["common_space_fraction"])) / case.T) * case.T > r:
                return None             # the official rounding overshoots r (iso_cts.py's documented deviation)
    if name in ("tsv_m", "iso_cts") and any(same for same in case.same_as_base) and matrices:
        return None                     # zero task vectors: numerically zero components are dropped (doc)
    out = {}
    for k in keys:
        thetas = [m[k] for m in ms]
        if k in matrices:
            if name == "tsv_m":
                out[k] = oracle_tsv_m(b[k], thetas, p["alpha"])
            elif name == "iso_c":
                out[k] = oracle_iso_c(b[k], thetas, p["alpha"])
            else:
                out[k] = oracle_iso_cts(b[k], thetas, p["alpha"], p["common_space_fraction"])
        else:                           # non-matrix keys: theta_0 + alpha * mean_t tau_t (docs/METHODS.md)
            out[k] = b[k] + p["alpha"] * sum(t - b[k] for t in thetas) / case.T
    return out


def ill_elected_entries(case, base, models):
    """{key: bool mask} of the entries whose TIES sign election may be decided by rounding (ties, dare_ties):
    |sum_t w_t tau_t| (trimmed or dropped and rescaled tau_t) within 1e-5 of sum_t |w_t tau_t|, e.g. an exactly
    zero sum of quantised task vectors that w_t tau_t or tau_t / (1 - p_t), rounded in float32, tips either way.
    Such entries are not compared (tests/test_methods_ta_ties_dare.py pins the exact-zero convention)."""
    p = _resolved(case)
    if case.name not in ("ties", "dare_ties"):
        return {}
    masks = {}
    for k, shape in zip(case.keys, case.shapes):
        if math.prod(shape) == 0:
            continue
        b = base[k].detach().double()
        taus = [m[k].detach().double() - b for m in models]
        if case.name == "ties":
            taus = [trim_to_density(tau, d) for tau, d in zip(taus, p["density"])]
        else:
            taus = [mask * tau / (1 - q) for mask, tau, q in zip(dare_masks(k, b.shape, p["p"], p["seed"]), taus,
                                                                   p["p"])]
        X = torch.stack([w * tau for w, tau in zip(p["weights"], taus)])
        masks[k] = X.sum(0).abs() <= 1e-5 * X.abs().sum(0)
    return masks


ROUNDING = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def allowed_error(case, ref, inputs_max):
    """Max-norm error allowed against the float64 reference: the output dtype's rounding of the result plus the
    computation's rounding (float32, float64 for float64 inputs) on the magnitudes it combines."""
    p = _resolved(case)
    acc = ROUNDING[torch.float64 if case.dtype == torch.float64 else torch.float32]
    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    if case.name in SVD_METHODS:
        return 1e-8 * (ref_max + inputs_max)
    w = [abs(x) for x in p["weights"]]
    keep = min((1.0 - x for x in p.get("p", [0.0])), default=1.0)
    if case.name == "weight_average":
        growth = sum(w) / abs(sum(p["weights"]))
    elif case.name in ("task_arithmetic", "dare_linear"):
        growth = 1.0 + 2.0 * abs(p["lam"]) * sum(w) / keep
    else:                               # disjoint mean: the divisor is >= min |w_t| for same-sign weights
        growth = 1.0 + 2.0 * abs(p["lam"]) * max(w) / keep * sum(w) / min(w)
    return 2 * ROUNDING[case.dtype] * ref_max + 16 * case.T * acc * inputs_max * growth


# ----------------------------------------------------------------------------------------------- the test
def _expected_error(case, message):
    """Whether a ValueError with this message is an allowed outcome of the case; None when none is expected."""
    if case.drawn.bad:
        return any(re.search(rf"\b{re.escape(n)}\b", message) for n in case.drawn.bad), "a bad parameter"
    allowed, what = [], []
    structural = structural_error_keys(case)
    if structural is not None:
        allowed += [re.escape(repr(k)) for k in structural] or ["selection"]
        what.append(f"structural {structural}")
    if case.poison is not None and not (case.name == "weight_average" and case.poison[2] == 0):
        where = "base" if case.poison[2] == 0 else f"models[{case.poison[2] - 1}]"
        allowed.append(re.escape(f"key {case.keys[case.poison[1]]!r} of {where} holds"))
        what.append(f"poisoned {case.keys[case.poison[1]]!r} of {where}")
    if not allowed:
        return None
    return any(re.search(a, message) for a in allowed), " or ".join(what)


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_merge_fuzz(name, data):
    case = data.draw(cases(name), label="case")
    base, models = build(case)
    before = [{k: _bits(v) for k, v in sd.items()} for sd in (base, *models)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = pymerge.merge(name, base, models, **case.drawn.params)
            error = None
        except ValueError as e:
            out, error = None, str(e)
    for sd, bits in zip((base, *models), before):
        assert all(torch.equal(_bits(sd[k]), bits[k]) for k in sd), "an input was modified"

    expectation = _expected_error(case, error or "")
    event("ValueError" if error is not None else "merged")
    if error is not None and expectation is None and f"an overflow of {case.dtype}" in error:
        # valid parameters whose exact result does not fit the output dtype (e.g. weights that nearly cancel:
        # normalised, they are huge): the float64 reference must overflow it too
        ref = reference(case, base, models)
        top = max((float(v.abs().max()) for v in (ref or {}).values() if v.numel()), default=0.0)
        assert top > torch.finfo(case.dtype).max, f"overflow error, but the float64 result peaks at {top}: {error}"
        return
    if error is not None:
        assert expectation is not None, f"unexpected ValueError: {error}"
        ok, what = expectation
        assert ok, f"the ValueError does not name {what}: {error}"
        return
    assert expectation is None, f"merge returned although {expectation[1]} should have raised"

    assert list(out) == list(base)
    assert torch.equal(out[INT_KEY], base[INT_KEY])
    ids_warnings = [w for w in caught if repr(INT_KEY) in str(w.message)]
    if case.ids_differ is None:
        assert not ids_warnings
    else:
        assert len(ids_warnings) == 1 and f"models[{case.ids_differ}]" in str(ids_warnings[0].message)
    for k in case.keys:
        assert out[k].shape == base[k].shape and out[k].dtype == case.dtype, k
        assert not out[k].requires_grad and out[k].grad_fn is None, k
        assert bool(torch.isfinite(out[k]).all()), k
    ref = reference(case, base, models)
    event("compared with the float64 reference" if ref is not None else "not compared")
    if ref is None:
        return
    compared = ill_elected_entries(case, base, models)
    for k, want in ref.items():
        # (a poisoned base that weight_average never reads does not count)
        inputs_max = max(float(sd[k].detach().double().nan_to_num(0, 0, 0).abs().max()) for sd in (base, *models))
        diff = (out[k].double() - want).abs()
        err = float(diff.masked_fill(compared[k], 0).max()) if k in compared else float(diff.max())
        assert err <= allowed_error(case, want, inputs_max), (k, err, allowed_error(case, want, inputs_max))
