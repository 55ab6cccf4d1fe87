"""CART (docs/METHODS.md §CART) against a direct float64 implementation written from it (full SVD), plus its
properties.

Tolerances: exact-SVD path 1e-5 relative to the float64 oracle (fp32 inputs, spectra with gaps so the rank-k
truncation is well conditioned); float64 inputs 1e-10. Randomized path with a fixed power_iters = 2 (p = max(10,
k // 2); spectra with a gap, s_i ~ 0.6^i): the merged low-rank part (theta - theta_avg) within 1e-3 relative of
the exact one, the documented bound in pymerge/methods/cart.py (HMT 2011: the excess residual shrinks like
(sigma_{k+1}/sigma_l)^(2q)). The fidelity control (tol, the default) is tested in tests/test_cart_fidelity.py.
"""
import collections
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pymerge
from pymerge.methods import cart, cart_factors, get
from pymerge.ops import center_task_vectors

from backend_lists import method_backends


OPS_BACKENDS = method_backends("center_task_vectors", "randomized_svd", "randomized_svd_centered", "low_rank_sum")


# ------------------------------------------------------------------------------------------------ the oracle
def oracle_cart(base, models, lam, selected, rank_ratio=None, rank=None, energy=None):
    """docs/METHODS.md §CART in float64 with torch.linalg.svd per centered task vector (the official route)."""
    T = len(models)
    out = collections.OrderedDict()
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b
            continue
        thetas = [m[key].double() for m in models]
        avg = sum(thetas) / T                               # theta_avg = (1/T) sum_t theta_t
        if key not in selected:
            out[key] = avg                                  # sum_t tau_bar_t = 0
            continue
        shape = avg.shape
        total = torch.zeros_like(avg).reshape(shape[0], -1)
        for theta in thetas:
            c = (theta - avg).reshape(shape[0], -1)         # tau_bar_t (conv kernels as [out, rest])
            U, s, Vh = torch.linalg.svd(c, full_matrices=False)
            if energy is not None:
                frac = (s ** 2).cumsum(0) / (s ** 2).sum()
                hit = (frac >= energy).nonzero()
                k = int(hit[0]) + 1 if len(hit) else len(s)
            elif rank is not None:
                k = rank
            else:
                k = max(1, int((rank_ratio or 0.08) * min(c.shape)))
            total += U[:, :k] @ torch.diag(s[:k]) @ Vh[:k]
        out[key] = avg + lam * total.reshape(shape)
    return out


def _decaying(m, n, g, scale=1.0, decay=0.6, dtype=torch.float64):
    """A random m x n matrix with singular values scale * decay^i (well separated, like real task vectors)."""
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = scale * decay ** torch.arange(r, dtype=torch.float64)
    return ((U * s) @ V.mT).to(dtype)


SHAPES = collections.OrderedDict([
    ("embeddings.word_embeddings.weight", (30, 12)),
    ("layer.0.attn.q.weight", (24, 16)),
    ("layer.0.attn.q.bias", (24,)),
    ("layer.0.ln_1.weight", (16,)),
    ("layer.0.mlp.fc.weight", (40, 16)),
    ("layer.1.attn.q.weight", (24, 16)),
    ("layer.1.mlp.fc.weight", (40, 16)),
    ("lm_head.weight", (30, 16)),
])


def family(T=4, dtype=torch.float32, seed=0, shapes=SHAPES, decay=0.6):
    g = torch.Generator().manual_seed(seed)
    base = collections.OrderedDict((k, torch.randn(s, generator=g, dtype=torch.float64)) for k, s in shapes.items())
    models = []
    for _ in range(T):
        m = collections.OrderedDict()
        for k, b in base.items():
            if b.dim() >= 2:
                d = _decaying(b.shape[0], b[0].numel(), g, 0.5, decay).reshape(b.shape)
            else:
                d = 0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64)
            m[k] = (b + d).to(dtype)
        models.append(m)
    return collections.OrderedDict((k, v.to(dtype)) for k, v in base.items()), models


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


DEFAULT_SELECTED = {"layer.0.attn.q.weight", "layer.0.mlp.fc.weight", "layer.1.attn.q.weight",
                    "layer.1.mlp.fc.weight"}


# ----------------------------------------------------------------------------------------- exact vs oracle
@pytest.mark.parametrize("backend", OPS_BACKENDS)
@pytest.mark.parametrize("opts", [dict(rank_ratio=0.25), dict(rank=3), dict(energy=0.9), dict()])
def test_exact_matches_oracle_fp32(opts, backend):
    base, models = family(dtype=torch.float32)
    got = pymerge.merge("cart", base, models, lam=1.7, svd="exact", backend=backend, **opts)
    want = oracle_cart(base, models, 1.7, DEFAULT_SELECTED, **opts)
    for k in base:
        assert _rel(got[k], want[k]) <= 1e-5, k


@pytest.mark.parametrize("opts", [dict(rank_ratio=0.25), dict(rank=3), dict(energy=0.95)])
def test_exact_matches_oracle_fp64(opts):
    base, models = family(dtype=torch.float64)
    got = pymerge.merge("cart", base, models, lam=2.0, svd="exact", backend="reference", **opts)
    want = oracle_cart(base, models, 2.0, DEFAULT_SELECTED, **opts)
    for k in base:
        assert got[k].dtype == torch.float64
        assert _rel(got[k], want[k]) <= 1e-10, k


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 20), T=st.integers(1, 5), ratio=st.floats(0.05, 1.0),
       lam=st.floats(-2.0, 3.0), seed=st.integers(0, 1000))
def test_exact_random_shapes_fp64(m, n, T, ratio, lam, seed):
    shapes = collections.OrderedDict([("w", (m, n)), ("b", (m,))])
    base, models = family(T=T, dtype=torch.float64, seed=seed, shapes=shapes, decay=0.5)
    got = pymerge.merge("cart", base, models, lam=lam, rank_ratio=ratio, svd="exact", backend="reference")
    want = oracle_cart(base, models, lam, {"w"}, rank_ratio=ratio)
    for k in base:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-10), k


# ------------------------------------------------------------------------------------ randomized vs exact
@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("backend", OPS_BACKENDS)
@pytest.mark.parametrize("opts", [dict(rank_ratio=0.25), dict(rank=4), dict(energy=0.9)])
def test_randomized_within_bound(opts, backend, implicit, monkeypatch):
    if implicit:    # force the Centered (never materialised) route on these small keys
        monkeypatch.setattr(cart, "MATERIALIZE_BYTES", 0)
    base, models = family(dtype=torch.float32, seed=3)
    got = pymerge.merge("cart", base, models, lam=2.0, backend=backend, power_iters=2, **opts)
    want = oracle_cart(base, models, 2.0, DEFAULT_SELECTED, **opts)
    for k in base:
        avg = sum(m[k].double() for m in models) / len(models)
        if k in DEFAULT_SELECTED:
            # Relative to the low-rank part itself (stricter than relative to the weights).
            assert _rel(got[k].double() - avg, want[k] - avg) <= 1e-3, k
        else:
            assert _rel(got[k], want[k]) <= 1e-6, k


def test_randomized_energy_keeps_at_least_the_fraction():
    """Randomized energy mode: the kept part of each tau_bar_t (U_k U_k^T tau_bar_t, an orthogonal projection)
    carries >= e of its squared norm, and its rank is never below the exact k_t. Flat spectrum (no gap, the
    hard case), so the adaptive k_try doubling is exercised too."""
    g = torch.Generator().manual_seed(1)
    m, n, T, e = 60, 50, 3, 0.5
    thetas = [torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]
    avg = sum(thetas) / T
    A = torch.stack([t - avg for t in thetas])
    U, S, V = cart_factors.randomized_factors(A, lambda: A.square().sum((-2, -1)), m, n, None, e, 10, 2, 0, "reference",
                                       lambda: pytest.fail("fell back to the exact SVD"))
    for t in range(T):
        k = int((S[t] > 0).sum())
        kept = U[t] @ torch.diag(S[t]) @ V[t].mT
        assert torch.allclose(kept, U[t, :, :k] @ (U[t, :, :k].mT @ A[t]), atol=1e-10)   # a projection of A_t
        assert kept.norm() ** 2 >= e * A[t].norm() ** 2 * (1 - 1e-12)
        exact_k = int(((torch.linalg.svdvals(A[t]) ** 2).cumsum(0) >= e * A[t].norm() ** 2).nonzero()[0]) + 1
        assert exact_k <= k <= exact_k + 3


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_full_rank_or_zero_lambda_is_weight_average(svd):
    base, models = family(dtype=torch.float64, seed=5)
    wa = pymerge.merge("weight_average", base, models, backend="reference")
    full = pymerge.merge("cart", base, models, rank_ratio=1.0, svd=svd, backend="reference")
    zero = pymerge.merge("cart", base, models, lam=0.0, svd=svd, backend="reference")
    for k in base:
        assert torch.allclose(full[k], wa[k], rtol=0, atol=1e-12), k
        assert torch.allclose(zero[k], wa[k], rtol=0, atol=1e-14), k


def test_two_tasks_is_weight_average():
    # T = 2: tau_bar_2 = -tau_bar_1, and SVD_k(-A) = -SVD_k(A), so the low-rank terms cancel at any rank.
    base, models = family(T=2, dtype=torch.float64, seed=6)
    wa = pymerge.merge("weight_average", base, models, backend="reference")
    got = pymerge.merge("cart", base, models, rank=2, svd="exact", backend="reference")
    for k in base:
        assert torch.allclose(got[k], wa[k], atol=1e-12), k


@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_centered_task_vectors_sum_to_zero(backend):
    base, models = family(dtype=torch.float32, seed=7)
    for k in DEFAULT_SELECTED:
        thetas = [m[k] for m in models]
        avg, cent = center_task_vectors(thetas, out_dtype=torch.float64, backend=backend)
        assert cent.sum(0).abs().max() <= 1e-6 * max(t.abs().max() for t in thetas)


def test_linear_in_lambda():
    base, models = family(dtype=torch.float64, seed=8)
    one = pymerge.merge("cart", base, models, lam=1.0, svd="exact", backend="reference")
    three = pymerge.merge("cart", base, models, lam=3.0, svd="exact", backend="reference")
    for k in base:
        avg = sum(m[k] for m in models) / len(models)
        assert torch.allclose(three[k] - avg, 3 * (one[k] - avg), atol=1e-12), k


# ------------------------------------------------------------------------------------------------ selection
def test_default_selection_excludes_embeddings_heads_and_vectors():
    keys = {k: torch.empty(s) for k, s in SHAPES.items()}
    assert set(cart.select_low_rank_keys(keys)) == DEFAULT_SELECTED
    # The pattern list is the user's to change: an empty exclusion list selects every 2-D key.
    assert set(cart.select_low_rank_keys(keys, exclude_keys=())) == {k for k, s in SHAPES.items() if len(s) == 2}


def test_vit_preset_is_official_selection():
    vit = {"visual.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
           "visual.transformer.resblocks.0.attn.in_proj_bias": (12,),
           "visual.transformer.resblocks.0.attn.out_proj.weight": (4, 4),
           "visual.transformer.resblocks.0.ln_1.weight": (4,),
           "visual.transformer.resblocks.0.mlp.c_fc.weight": (16, 4),
           "visual.transformer.resblocks.0.mlp.c_fc.bias": (16,),
           "visual.proj": (4, 3), "visual.conv1.weight": (4, 3, 2, 2)}
    keys = {k: torch.empty(s) for k, s in vit.items()}
    official = [k for k in vit if ("attn" in k or "mlp" in k) and not ("ln" in k or "bias" in k)]
    assert cart.select_low_rank_keys(keys, "vit") == official


def test_regex_list_predicate_and_conv():
    shapes = collections.OrderedDict([("a.q.weight", (6, 5)), ("a.k.weight", (6, 5)), ("conv.weight", (6, 2, 3, 3)),
                                      ("a.q.bias", (6,))])
    base, models = family(T=3, dtype=torch.float64, seed=9, shapes=shapes)
    keys = {k: v for k, v in base.items()}
    assert cart.select_low_rank_keys(keys, r"\.q\.") == ["a.q.weight"]
    assert cart.select_low_rank_keys(keys, [r"\.q\.", "conv"]) == ["a.q.weight", "conv.weight"]
    assert cart.select_low_rank_keys(keys, lambda k: k.startswith("a.k")) == ["a.k.weight"]
    # A conv kernel selected explicitly is approximated as a [6, 18] matrix.
    got = pymerge.merge("cart", base, models, low_rank_keys=["conv"], rank=2, svd="exact", backend="reference")
    want = oracle_cart(base, models, 2.0, {"conv.weight"}, rank=2)
    for k in base:
        assert torch.allclose(got[k], want[k], atol=1e-12), k


def test_batched_same_shape_keys_equal_per_key():
    shapes = collections.OrderedDict((f"layer.{i}.attn.w", (12, 10)) for i in range(5))
    base, models = family(T=3, dtype=torch.float64, seed=10, shapes=shapes)
    exact = oracle_cart(base, models, 2.0, set(shapes), rank=3)
    batched = pymerge.merge("cart", base, models, rank=3, backend="reference")
    per_key = pymerge.merge("cart", base, models, rank=3, backend="reference", max_group_bytes=1)
    for k in base:
        avg = sum(m[k] for m in models) / 3
        assert _rel(batched[k] - avg, exact[k] - avg) <= 1e-3, k
        assert _rel(per_key[k] - avg, exact[k] - avg) <= 1e-3, k


def test_reproducible_for_a_seed():
    base, models = family(T=4, dtype=torch.float32, seed=11, decay=0.95)
    a = pymerge.merge("cart", base, models, seed=3, backend="reference", power_iters=0, oversample=2)
    b = pymerge.merge("cart", base, models, seed=3, backend="reference", power_iters=0, oversample=2)
    c = pymerge.merge("cart", base, models, seed=4, backend="reference", power_iters=0, oversample=2)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert any(not torch.equal(a[k], c[k]) for k in DEFAULT_SELECTED)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implicit", [False, True])
def test_low_precision_inputs(dtype, implicit, monkeypatch):
    """bf16/fp16 inputs: compute in fp32, return the input dtype. Compared with the oracle on the same
    (rounded) inputs: within one rounding of the output dtype plus fp32 error of the low-rank part."""
    if implicit:
        monkeypatch.setattr(cart, "MATERIALIZE_BYTES", 0)
    base, models = family(dtype=dtype, seed=12)
    got = pymerge.merge("cart", base, models, rank=3, svd="randomized", backend="reference")
    up = pymerge.merge("cart", base, models, rank=3, svd="randomized", backend="reference", out_dtype=torch.float32)
    want = oracle_cart(base, models, 2.0, DEFAULT_SELECTED, rank=3)
    eps = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for k in base:
        assert got[k].dtype == dtype and up[k].dtype == torch.float32
        assert _rel(got[k], want[k]) <= 2 * eps, k
        # fp32 centering either way: while pymerge.ops.Centered rounds theta_avg to the inputs' dtype, cart
        # centers bf16/fp16 keys explicitly in fp32 (an error ~eps * |theta_avg| would be of the order of tau_bar).
        assert _rel(up[k], want[k]) <= 1e-4, k


# ---------------------------------------------------------------------------------------------------- errors
def test_pattern_matching_nothing():
    base, models = family(T=2)
    with pytest.raises(ValueError, match=r"low_rank_keys pattern 'nothere' matches no key; keys with >= 2 dims"):
        pymerge.merge("cart", base, models, low_rank_keys="nothere")
    with pytest.raises(ValueError, match=r"pattern 'xyz' matches no key"):
        pymerge.merge("cart", base, models, low_rank_keys=["attn", "xyz"])
    with pytest.raises(ValueError, match=r"low_rank_keys=.*matches no key"):
        pymerge.merge("cart", base, models, low_rank_keys=lambda k: False)
    with pytest.raises(ValueError, match="not a valid regex"):
        pymerge.merge("cart", base, models, low_rank_keys="(")
    vec = {"b": torch.zeros(3)}
    with pytest.raises(ValueError, match="default selection .* is empty"):
        pymerge.merge("cart", vec, [vec, vec])


def test_rank_too_large_names_key_and_shape():
    base, models = family(T=2)
    with pytest.raises(ValueError, match=re.escape("rank = 16 >= min(m, n) = 16 for key 'layer.0.attn.q.weight' "
                                                   "of shape (24, 16)")):
        pymerge.merge("cart", base, models, rank=16)
    pymerge.merge("cart", base, models, rank=15, backend="reference")   # fine


def test_rank_options_exclusive_and_ranges():
    base, models = family(T=2)
    with pytest.raises(ValueError, match="mutually exclusive"):
        pymerge.merge("cart", base, models, rank=3, energy=0.9)
    with pytest.raises(ValueError, match="mutually exclusive"):
        pymerge.merge("cart", base, models, rank_ratio=0.1, rank=3)
    for name, bad in (("rank_ratio", 0.0), ("rank_ratio", 1.5), ("energy", 0.0), ("energy", 2.0), ("rank", 0),
                      ("oversample", -1), ("power_iters", 1.5)):
        with pytest.raises(ValueError, match=f"cart: {name} = "):
            pymerge.merge("cart", base, models, **{name: bad})


def test_spec_documents_defaults():
    spec = get("cart")
    text = spec.describe()
    for word in ("rank_ratio", "0.08", "lam = 2.0", "randomized", "low_rank_keys", "exclude_keys", "backend"):
        assert word in text
