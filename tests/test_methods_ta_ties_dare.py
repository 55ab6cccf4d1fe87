"""weight_average, task_arithmetic, ties, dare_linear, dare_ties against direct float64 implementations of
docs/METHODS.md (§Weight averaging, §Task arithmetic, §TIES, §DARE) written here, plus the issue's properties."""
import collections

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pymerge
from pymerge.methods import dare_linear as dare_mod, key_seed, ties as ties_mod

from backend_lists import method_backends, op_backends


OPS_BACKENDS = method_backends("center_task_vectors")


# ---------------------------------------------------------------------------------------------- the oracles
def oracle_weight_average(base, models, weights):
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return {k: sum(w[t] * m[k].double() for t, m in enumerate(models)) for k in base}


def oracle_task_arithmetic(base, models, lam, weights):
    return {k: base[k].double() + lam * sum(weights[t] * (m[k].double() - base[k].double())
                                            for t, m in enumerate(models)) for k in base}


def _trim(tau, density):
    """Top-k magnitude (k = max(1, int(density * n)), density 1 keeps all); ties at the threshold: lowest index."""
    flat = tau.reshape(-1)
    if density >= 1:
        return tau
    k = max(1, int(density * flat.numel()))
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    mask = torch.zeros_like(flat)
    mask[order[:k]] = 1
    return (flat * mask).reshape(tau.shape)


def _disjoint_mean(taus, weights):
    """Elected sign = sign(sum_t w_t tau_t) (+ on exact 0); weighted mean over entries agreeing with it."""
    X = torch.stack([w * tau for w, tau in zip(weights, taus)])
    plus = X.sum(0) >= 0
    agree = torch.where(plus, X > 0, X < 0)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (X.dim() - 1)))
    num = (X * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


def oracle_ties(base, models, density, lam, weights):
    out = {}
    for k in base:
        b = base[k].double()
        taus = [_trim(m[k].double() - b, density[t]) for t, m in enumerate(models)]
        out[k] = b + lam * _disjoint_mean(taus, weights)
    return out


def dare_masks(key, shape, ps, seed):
    """The documented drop recipe: per task a Generator seeded key_seed(seed, key, t); float32 uniforms drawn in
    CHUNK-sized pieces of the flattened key; an entry survives when u < 1 - p."""
    n = 1
    for s in shape:
        n *= s
    masks = []
    for t, p in enumerate(ps):
        if p == 0:
            masks.append(torch.ones(shape, dtype=torch.float64))
            continue
        g = torch.Generator().manual_seed(key_seed(seed, key, t))
        chunk = dare_mod.CHUNK
        u = torch.cat([torch.rand(min(chunk, n - s), generator=g) for s in range(0, n, chunk)])
        masks.append((u < 1 - p).double().reshape(shape))
    return masks


def oracle_dare_linear(base, models, p, seed, lam, weights):
    out = {}
    for k in base:
        b = base[k].double()
        masks = dare_masks(k, b.shape, p, seed)
        out[k] = b + lam * sum(weights[t] * masks[t] * (m[k].double() - b) / (1 - p[t]) for t, m in enumerate(models))
    return out


def oracle_dare_ties(base, models, p, seed, lam, weights):
    out = {}
    for k in base:
        b = base[k].double()
        masks = dare_masks(k, b.shape, p, seed)
        taus = [masks[t] * (m[k].double() - b) / (1 - p[t]) for t, m in enumerate(models)]
        out[k] = b + lam * _disjoint_mean(taus, weights)
    return out


# -------------------------------------------------------------------------------------------------- fixtures
SHAPES = collections.OrderedDict([("a.weight", (17, 13)), ("a.bias", (17,)), ("b.weight", (17, 13)),
                                  ("c.weight", (5, 4, 3)), ("s", ())])


def family(T=4, dtype=torch.float64, seed=0, shapes=SHAPES, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = collections.OrderedDict((k, torch.randn(s, generator=g, dtype=torch.float64)) for k, s in shapes.items())
    models = [collections.OrderedDict((k, (b + scale * torch.randn(b.shape, generator=g, dtype=torch.float64))
                                       .to(dtype)) for k, b in base.items()) for _ in range(T)]
    return collections.OrderedDict((k, b.to(dtype)) for k, b in base.items()), models


def _close(got, want, tol):
    for k in want:
        err = (got[k].double() - want[k]).norm() / want[k].norm().clamp_min(1e-300)
        assert err <= tol, (k, float(err))


# ----------------------------------------------------------------------------------------- against oracles
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_weight_average_and_task_arithmetic(dtype, tol, backend):
    base, models = family(dtype=dtype)
    w = [1.0, 2.0, 0.5, 1.5]
    _close(pymerge.merge("weight_average", base, models, weights=w, backend=backend),
           oracle_weight_average(base, models, w), tol)
    _close(pymerge.merge("task_arithmetic", base, models, lam=0.7, weights=w, backend=backend),
           oracle_task_arithmetic(base, models, 0.7, w), tol)
    # defaults: lam = 0.3, unit weights
    _close(pymerge.merge("task_arithmetic", base, models, backend=backend),
           oracle_task_arithmetic(base, models, 0.3, [1.0] * 4), tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", OPS_BACKENDS + ["triton"] if "triton" in op_backends() else OPS_BACKENDS)
def test_low_precision_result_is_one_rounding_of_the_fp32_result(dtype, backend):
    # Both fused sums write their bf16 / fp16 result directly (KeyGroup.out_dtype): it must be the fp32 result
    # rounded once, as merge() casting an fp32 result gives; and within half an output ulp of the float64 oracle.
    shapes = collections.OrderedDict([("big", (67, 129)), ("v", (1000,)), ("s", ())])
    base, models = family(dtype=dtype, seed=3, shapes=shapes, scale=0.3)
    w = [1.0, 2.0, 0.5, 1.5]
    for method, params, oracle in (("task_arithmetic", dict(lam=0.7, weights=w),
                                    oracle_task_arithmetic(base, models, 0.7, w)),
                                   ("weight_average", dict(weights=w), oracle_weight_average(base, models, w))):
        got = pymerge.merge(method, base, models, backend=backend, **params)
        fp32 = pymerge.merge(method, base, models, backend=backend, out_dtype=torch.float32, **params)
        for k in base:
            assert got[k].dtype == dtype
            assert torch.equal(got[k], fp32[k].to(dtype)), (method, k)
            ulp = torch.finfo(dtype).eps * oracle[k].abs().clamp_min(torch.finfo(dtype).tiny)
            assert bool(((got[k].double() - oracle[k]).abs() <= ulp + 1e-5 * oracle[k].abs().max()).all()), k


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_ties(dtype, tol):
    base, models = family(dtype=dtype, seed=1)
    d, w = [0.2, 0.5, 1.0, 0.05], [1.0, 0.5, 2.0, 1.0]
    _close(pymerge.merge("ties", base, models, density=d, lam=0.8, weights=w), oracle_ties(base, models, d, 0.8, w),
           tol)
    _close(pymerge.merge("ties", base, models), oracle_ties(base, models, [0.2] * 4, 1.0, [1.0] * 4), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dare(dtype, tol):
    base, models = family(dtype=dtype, seed=2)
    p, w = [0.3, 0.9, 0.0, 0.5], [1.0, 2.0, 1.0, 0.5]
    _close(pymerge.merge("dare_linear", base, models, p=p, seed=7, lam=0.4, weights=w, backend="reference"),
           oracle_dare_linear(base, models, p, 7, 0.4, w), tol)
    _close(pymerge.merge("dare_ties", base, models, p=p, seed=7, lam=0.9, weights=w),
           oracle_dare_ties(base, models, p, 7, 0.9, w), tol)


def test_multi_chunk_keys(monkeypatch):
    """Keys longer than CHUNK: the trim's tie bookkeeping and the DARE streams continue across chunks."""
    monkeypatch.setattr(ties_mod, "CHUNK", 37)
    monkeypatch.setattr(dare_mod, "CHUNK", 37)
    base, models = family(seed=3)
    # integer-valued task vectors: many ties at the trim threshold
    models = [{k: base[k] + torch.randint(-2, 3, base[k].shape, generator=torch.Generator().manual_seed(t))
               .double() for k in base} for t in range(4)]
    _close(pymerge.merge("ties", base, models, density=0.3), oracle_ties(base, models, [0.3] * 4, 1.0, [1.0] * 4),
           1e-12)
    _close(pymerge.merge("dare_linear", base, models, p=0.5, seed=1, backend="reference"),
           oracle_dare_linear(base, models, [0.5] * 4, 1, 0.3, [1.0] * 4), 1e-12)
    _close(pymerge.merge("dare_ties", base, models, p=0.5, seed=1),
           oracle_dare_ties(base, models, [0.5] * 4, 1, 1.0, [1.0] * 4), 1e-12)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=3), T=st.integers(1, 5),
       density=st.floats(0.01, 1.0), lam=st.floats(-1.0, 2.0), seed=st.integers(0, 10 ** 6),
       wneg=st.booleans())
def test_ties_random_shapes(shape, T, density, lam, seed, wneg):
    base, models = family(T=T, seed=seed, shapes={"x": tuple(shape)}, scale=1.0)
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(T, generator=g, dtype=torch.float64) * (2 if wneg else 1) - (0.5 if wneg else 0)).tolist()
    got = pymerge.merge("ties", base, models, density=density, lam=lam, weights=w)
    want = oracle_ties(base, models, [density] * T, lam, w)
    assert torch.allclose(got["x"], want["x"], rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_ta_with_lambda_one_over_T_is_weight_average(backend):
    base, models = family(T=5, dtype=torch.float64, seed=4)
    ta = pymerge.merge("task_arithmetic", base, models, lam=1 / 5, backend=backend)
    wa = pymerge.merge("weight_average", base, models, backend=backend)
    for k in base:
        assert torch.allclose(ta[k], wa[k], rtol=0, atol=1e-13), k


def test_ties_density_one_same_sign_is_mean_of_task_vectors():
    base, models = family(T=3, seed=5)
    # same sign per entry across tasks (sign pattern fixed, magnitudes differ)
    sign = torch.sign(torch.randn(17, 13, generator=torch.Generator().manual_seed(0)))
    same = [{"w": base["a.weight"] + sign * (0.1 + m["a.weight"].abs())} for m in models]
    b = {"w": base["a.weight"]}
    got = pymerge.merge("ties", b, same, density=1.0, lam=0.6)["w"]
    mean_tau = sum(m["w"] - b["w"] for m in same) / 3
    assert torch.allclose(got, b["w"] + 0.6 * mean_tau, atol=1e-12)


def test_ties_entries_without_agreement_stay_at_base():
    b = {"w": torch.zeros(4, dtype=torch.float64)}
    ms = [{"w": torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)},
          {"w": torch.tensor([-1.0, 1.0, 0.0, -3.0], dtype=torch.float64)}]
    got = pymerge.merge("ties", b, ms, density=1.0)["w"]
    # sums 0, 0, 0, -1: + elected on exact zeros (mergekit) -> mean of the positive entries; zeros stay 0
    assert got.tolist() == [1.0, 1.0, 0.0, -3.0]


def test_ties_keeps_exactly_k():
    b = {"w": torch.zeros(10, dtype=torch.float64)}
    ms = [{"w": torch.tensor([3, 1, 1, 1, 1, 1, 0.5, 0.5, 2, 1], dtype=torch.float64)}]
    got = pymerge.merge("ties", b, ms, density=0.4)["w"]        # k = 4: 3, 2 and the first two tied 1s
    assert got.tolist() == [3, 1, 1, 0, 0, 0, 0, 0, 2, 0]


@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_dare_p0_equals_ta_and_ties(backend):
    base, models = family(dtype=torch.float32, seed=6)
    ta = pymerge.merge("task_arithmetic", base, models, lam=0.4, weights=[1, 2, 3, 4], backend=backend)
    dl = pymerge.merge("dare_linear", base, models, p=0.0, lam=0.4, weights=[1, 2, 3, 4], backend=backend)
    ti = pymerge.merge("ties", base, models, density=1.0, lam=0.9)
    dt = pymerge.merge("dare_ties", base, models, p=0.0, lam=0.9)
    for k in base:
        assert torch.equal(ta[k], dl[k]) and torch.equal(ti[k], dt[k]), k


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_reproducible_for_a_seed(name):
    base, models = family(dtype=torch.float32, seed=7)
    kw = {"backend": "reference"} if name == "dare_linear" else {}
    a = pymerge.merge(name, base, models, p=0.5, seed=11, **kw)
    b = pymerge.merge(name, base, models, p=0.5, seed=11, **kw)
    c = pymerge.merge(name, base, models, p=0.5, seed=12, **kw)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert not all(torch.equal(a[k], c[k]) for k in base)
    # same seed, different grouping: the masks depend on (seed, key, task) only
    d = pymerge.merge(name, base, models, p=0.5, seed=11, max_group_bytes=1, **kw)
    assert all(torch.equal(a[k], d[k]) for k in base)


def test_dare_drop_rate_and_unbiased_rescale():
    n, p = 200_000, 0.7
    b = {"w": torch.zeros(n, dtype=torch.float64)}
    ms = [{"w": torch.ones(n, dtype=torch.float64)}]
    got = pymerge.merge("dare_linear", b, ms, p=p, lam=1.0, seed=0)["w"]
    kept = (got != 0).double().mean()
    assert abs(kept - (1 - p)) < 5e-3                       # ~ 5 sigma of a Binomial(n, 0.3) fraction
    assert torch.allclose(got[got != 0], torch.full_like(got[got != 0], 1 / (1 - p)))
    assert abs(got.mean() - 1.0) < 0.02                     # E[drop(tau)] = tau
