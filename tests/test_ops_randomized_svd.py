"""randomized_svd (explicit and implicit centered batch) and low_rank_sum on every available backend.

Oracles: the float64 plain-torch reference (pymerge.reference, same test matrix omega), torch.linalg.svd, and
matrices built as U diag(s) V^T with a known decaying spectrum s, whose optimal rank-k Frobenius error is
sqrt(sum_{i >= k} s_i^2). Tolerances: fp32 results within 1e-5 (relative to the largest singular value /
to the reference's norm) of the float64 reference; fp16 / bf16 inputs are widened exactly and computed in fp32,
so they are compared with the float64 reference on the same (rounded) values at the same 1e-5.
Triton runs in the interpreter (tests/conftest.py), on small shapes only.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.ops import Centered, centered_matmul, low_rank_sum, randomized_svd
from pymerge.ops.backend import extension_loaded

from backend_lists import kernel_backends, op_backends

BACKENDS = op_backends()
KERNELS = kernel_backends(BACKENDS)
LOW = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def orthonormal(rows, cols, gen):
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def spectrum_matrix(m, n, s, seed=0):
    """float64 [m, n] = U diag(s) V^T with random orthonormal U [m, r], V [n, r], r = len(s)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(s)
    return (orthonormal(m, r, gen) * s) @ orthonormal(n, r, gen).T


def geometric(r, ratio=0.85):
    return ratio ** torch.arange(r, dtype=torch.float64)


def rel(a, b):
    """Relative Frobenius distance (absolute when b is zero, e.g. the centered batch of T = 1)."""
    d, r = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return d / r if r > 0 else d


def recon(U, S, V):
    return (U.double() * S.double().unsqueeze(-2)) @ V.double().mT


def rank_k_error(A, U, S, V):
    return (A.double() - recon(U, S, V)).norm(dim=(-2, -1))


def optimal_error(A64, k):
    s = torch.linalg.svdvals(A64)
    return s[..., k:].square().sum(-1).sqrt()


# ------------------------------------------------------------------------------------- near-optimal error
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(48, 48, 6), (64, 24, 5), (20, 56, 4)])
def test_error_within_1p1_of_optimal(backend, dtype, m, n, k):
    """Decaying spectrum: the rank-k error is within 1.1x the optimal one (Eckart-Young, known spectrum)."""
    s = geometric(min(m, n))
    A64 = spectrum_matrix(m, n, s, seed=m + n)
    A = A64.to(dtype)
    U, S, V = randomized_svd(A, k, seed=1, backend=backend)
    assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    assert U.dtype == S.dtype == V.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The kernels see the rounded matrix: its optimum (torch.linalg.svd) and, for fp32/fp64, the known one.
    Ar = A.double()
    opt = optimal_error(Ar, k).item()
    if dtype in (torch.float32, torch.float64):
        assert opt == pytest.approx(s[k:].square().sum().sqrt().item(), rel=1e-5)
    assert rank_k_error(Ar, U, S, V).item() <= 1.1 * opt


@pytest.mark.parametrize("backend", KERNELS)
def test_larger_matrix_error_and_singular_values(backend):
    if backend == "triton":
        m, n, k = 96, 80, 8
    else:
        m, n, k = 600, 400, 40
    s = 1.0 / (1.0 + torch.arange(min(m, n), dtype=torch.float64)) ** 1.5   # power-law decay, CART-like
    A64 = spectrum_matrix(m, n, s, seed=5)
    U, S, V = randomized_svd(A64.float(), k, seed=3, backend=backend)
    opt = s[k:].square().sum().sqrt().item()
    assert rank_k_error(A64, U, S, V).item() <= 1.1 * opt
    # leading singular values of a well-separated spectrum are resolved to fp32 accuracy
    assert torch.allclose(S[:5].double(), s[:5], rtol=1e-4)


# ------------------------------------------------------------------------------- vs the float64 reference
def _compare_to_reference(A64, k, got, seed, q=2, p=10, tol=1e-5):
    """got = (U, S, V) of the rounded A; compares with the float64 reference on the same values and omega."""
    Ur, Sr, Vr = randomized_svd(A64, k, oversample=p, power_iters=q, seed=seed, backend="reference")
    U, S, V = got
    scale = Sr[..., :1]
    assert ((S.double() - Sr).abs() <= tol * scale).all()
    assert rel(recon(U, S, V), recon(Ur, Sr, Vr)) <= tol
    # singular vectors agree up to sign where the spectrum is separated (geometric: gaps of 15%)
    sign_u = torch.sign((U.double() * Ur).sum(-2, keepdim=True))
    assert ((U.double() * sign_u - Ur).abs().max() <= 100 * tol)
    assert ((V.double() * sign_u - Vr).abs().max() <= 100 * tol)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(40, 40, 5), (52, 30, 4), (30, 52, 6)])
def test_matches_float64_reference(backend, dtype, m, n, k):
    A64 = spectrum_matrix(m, n, geometric(min(m, n)), seed=7 * m + n)
    A = A64.to(dtype)
    got = randomized_svd(A, k, seed=11, backend=backend)
    _compare_to_reference(A.double(), k, got, seed=11, tol=1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_orthonormal_factors_and_descending_values(backend):
    A = spectrum_matrix(45, 33, geometric(33), seed=2).float()
    U, S, V = randomized_svd(A, 9, seed=0, backend=backend)
    eye = torch.eye(9, dtype=torch.float64)
    assert (U.double().T @ U.double() - eye).abs().max() < 1e-5
    assert (V.double().T @ V.double() - eye).abs().max() < 1e-5
    assert (S[:-1] >= S[1:]).all() and (S >= 0).all()


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 36), n=st.integers(1, 36), kfrac=st.floats(0.0, 1.0), q=st.integers(0, 3),
       p=st.integers(0, 12), dtype=st.sampled_from(ALL_DTYPES), seed=st.integers(0, 2 ** 31 - 1),
       backend=st.sampled_from(KERNELS or ["reference"]))
def test_random_shapes_match_reference(m, n, kfrac, q, p, dtype, seed, backend):
    """Random Gaussian matrices of any small shape: singular values, and the attained rank-k error, as the
    float64 reference's (those are insensitive to the gaps a flat spectrum has; the factors themselves may not be)."""
    k = max(1, min(min(m, n), 1 + int(kfrac * min(m, n))))
    A = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    U, S, V = randomized_svd(A, k, oversample=p, power_iters=q, seed=seed, backend=backend)
    Ur, Sr, Vr = randomized_svd(A.double(), k, oversample=p, power_iters=q, seed=seed, backend="reference")
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert ((S.double() - Sr).abs() <= tol * Sr[0]).all()
    err, err_ref = rank_k_error(A, U, S, V).item(), rank_k_error(A, Ur, Sr, Vr).item()
    assert abs(err - err_ref) <= tol * A.double().norm().item() * math.sqrt(k)


# --------------------------------------------------------------------------------- exactness / edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n", [(12, 12), (20, 7), (7, 20), (1, 9), (9, 1)])
def test_full_rank_k_reconstructs(backend, m, n):
    """k = min(m, n): l = min(m, n) too, the range is the whole column space and A is reproduced."""
    A = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n), dtype=torch.float64)
    k = min(m, n)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        U, S, V = randomized_svd(A.to(dtype), k, seed=0, backend=backend)
        assert rel(recon(U, S, V), A) <= tol
        assert torch.allclose(S.double(), torch.linalg.svdvals(A), rtol=tol, atol=tol * A.norm().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_input_is_exact(backend):
    """A of exact rank 3 < l: the sketch is rank-deficient (zero LU pivots), the result still exact."""
    A = spectrum_matrix(30, 25, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), seed=4)
    U, S, V = randomized_svd(A, 3, seed=0, backend=backend)
    assert rel(recon(U, S, V), A) <= 1e-12
    U, S, V = randomized_svd(A.float(), 5, seed=0, backend=backend)   # k beyond the rank: zeros after 3
    assert S[3:].abs().max() <= 1e-5 * S[0] and rel(recon(U, S, V), A) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_matrix(backend):
    U, S, V = randomized_svd(torch.zeros(10, 8), 3, seed=0, backend=backend)
    assert (S == 0).all() and torch.isfinite(U).all() and torch.isfinite(V).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_for_a_fixed_seed(backend):
    """Same seed: bitwise identical on one backend; another seed: another test matrix."""
    A = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    a = randomized_svd(A, 4, seed=123, backend=backend)
    b = randomized_svd(A, 4, seed=123, backend=backend)
    c = randomized_svd(A, 4, seed=124, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("backend", KERNELS)
def test_same_test_matrix_on_every_backend(backend):
    """omega is drawn on the CPU from the seed: backends differ by rounding only (fp64: ~1e-12)."""
    A = spectrum_matrix(36, 28, geometric(28), seed=9)
    U, S, V = randomized_svd(A, 5, seed=77, backend=backend)
    Ur, Sr, Vr = randomized_svd(A, 5, seed=77, backend="reference")
    assert rel(recon(U, S, V), recon(Ur, Sr, Vr)) <= 1e-10


# --------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 3])
def test_batches(backend, B):
    """A [B, m, n]: every item within 1.1x optimal, matches the reference with the same omega, and a batch
    of one equals the unbatched call (same omega)."""
    s = geometric(24)
    A64 = torch.stack([spectrum_matrix(32, 24, s * (b + 1), seed=b) for b in range(B)])
    U, S, V = randomized_svd(A64.float(), 4, seed=5, backend=backend)
    assert U.shape == (B, 32, 4) and S.shape == (B, 4) and V.shape == (B, 24, 4)
    opt = torch.stack([s[4:].square().sum().sqrt() * (b + 1) for b in range(B)])
    assert (rank_k_error(A64, U, S, V) <= 1.1 * opt).all()
    _compare_to_reference(A64, 4, (U, S, V), seed=5)
    if B == 1:
        u, s1, v = randomized_svd(A64[0].float(), 4, seed=5, backend=backend)
        assert torch.equal(s1, S[0]) and torch.equal(u, U[0]) and torch.equal(v, V[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_per_block_equals_each_block_alone(backend, dtype):
    """seed=[s_0, .., s_{G-1}]: the batch is G blocks of B / G matrices and block g gets the test matrix of the
    call on that block alone with seed=s_g, so its rank-k approximation is that call's up to rounding (not
    bitwise: LAPACK rounds a matrix at another alignment in the batched buffers differently). Gaussian
    matrices have no gap at k, so another test matrix gives an O(1) different approximation. One seed in a
    list is the int seed, bitwise."""
    rough = dict(oversample=0, power_iters=0)    # l = k, no power iteration: omega shapes the result
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(21)
    A = torch.randn(6, 20, 14, generator=gen, dtype=torch.float64).to(dtype)
    seeds = [11, 5, 11]                           # blocks 0 and 2: same seed, other data
    batched = recon(*randomized_svd(A, 3, **rough, seed=seeds, backend=backend))
    for g, seed in enumerate(seeds):
        block = slice(2 * g, 2 * g + 2)
        alone = recon(*randomized_svd(A[block], 3, **rough, seed=seed, backend=backend))
        assert rel(batched[block], alone) <= tol, g
    # Per block, not one generator for the batch: the int seed 11 draws another omega for the last block.
    whole = recon(*randomized_svd(A, 3, **rough, seed=11, backend=backend))
    assert rel(whole[4:], batched[4:]) > 1e-2
    one = randomized_svd(A, 3, **rough, seed=[7], backend=backend)
    ref = randomized_svd(A, 3, **rough, seed=7, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(one, ref))
    # The implicit centered batch takes the same seeds (one per task here).
    thetas = list(A)
    batched = recon(*randomized_svd(Centered(thetas, A[0]), 3, **rough, seed=list(range(6)), backend=backend))
    alone = recon(*randomized_svd(Centered(thetas[3:4], A[0]), 3, **rough, seed=3, backend=backend))
    assert rel(batched[3:4], alone) <= tol


@pytest.mark.parametrize("seed, match", [([1, 2, 3, 4], "4 seeds do not split the batch of 6"),
                                         ([], "at least one int"), ([1, 2.0], "only ints"), ([True], "only ints"),
                                         ("12", "seed must be None, an int or a sequence"),
                                         (1.5, "seed must be None, an int or a sequence")])
def test_bad_seed(seed, match):
    with pytest.raises(ValueError, match=match):
        randomized_svd(torch.randn(6, 8, 5), 2, seed=seed, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    U, S, V = randomized_svd(torch.empty(0, 6, 5), 2, seed=0, backend=backend)
    assert U.shape == (0, 6, 2) and S.shape == (0, 2) and V.shape == (0, 5, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_non_contiguous_inputs(backend, dtype):
    """Transposed views, strided slices and a column-major batch give what their contiguous copies give."""
    base = spectrum_matrix(70, 60, geometric(60), seed=3).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for X in (base.T, base[::2, ::3], base.T[1::2, ::2]):
        got = randomized_svd(X, 3, seed=8, backend=backend)
        want = randomized_svd(X.contiguous(), 3, seed=8, backend=backend)
        assert rel(recon(*got), recon(*want)) <= tol
    batch = torch.stack([base[:20, :30], base[20:40, 30:]]).mT          # [2, 30, 20], column-major items
    got = randomized_svd(batch, 3, seed=8, backend=backend)
    want = randomized_svd(batch.contiguous(), 3, seed=8, backend=backend)
    assert rel(recon(*got), recon(*want)) <= tol


# -------------------------------------------------------------------------------------- centered batch
def _thetas(T, m, n, dtype, seed, offset=3.0, spread=0.05):
    """T fine-tuned matrices close to a common point (centered parts small next to theta, as in CART)."""
    gen = torch.Generator().manual_seed(seed)
    base = offset + torch.randn(m, n, generator=gen, dtype=torch.float64)
    taus = [spectrum_matrix(m, n, geometric(min(m, n)) * spread, seed=seed + t + 1) for t in range(T)]
    return [(base + tau).to(dtype) for tau in taus]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("T", [1, 3])
def test_centered_equals_explicit(backend, dtype, T):
    """Centered(thetas, avg) == the explicit batch thetas[t] - avg (materialised in the accumulation dtype)."""
    m, n = (34, 26) if backend == "triton" else (50, 38)
    thetas = _thetas(T, m, n, dtype, seed=T)
    C = Centered(thetas)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert C.avg.dtype == acc and C.shape == (T, m, n)
    explicit = C.materialize()
    assert explicit.dtype == acc
    U, S, V = randomized_svd(C, 4, seed=21, backend=backend)
    Ue, Se, Ve = randomized_svd(explicit, 4, seed=21, backend=backend)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    if T == 1:      # theta - avg = 0 exactly (avg of one matrix): every path gives S = 0
        assert (S == 0).all() and (Se == 0).all()
        return
    assert ((S - Se).abs() <= tol * Se[:, :1]).all()
    assert rel(recon(U, S, V), recon(Ue, Se, Ve)) <= tol
    # and both match the float64 reference on the exactly-centered values
    if True:
        A64 = torch.stack([t.double() for t in thetas]) - C.avg.double()
        _compare_to_reference(A64, 4, (U, S, V), seed=21, tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_avg_kept_in_fp32_for_bf16(backend):
    """bf16 thetas: the mean is not rounded to bf16, so theta - avg keeps its accuracy."""
    thetas = _thetas(3, 30, 20, torch.bfloat16, seed=4, offset=10.0, spread=0.01)
    exact = torch.stack([t.double() for t in thetas])
    exact = exact - exact.mean(0)
    U, S, V = randomized_svd(Centered(thetas), 20, seed=0, backend=backend)  # full rank: reproduces the batch
    # fp32 avg: error ~ 2^-24 |avg| (|avg| ~ 10 here, 300x the centered entries) -> ~1e-5 relative
    assert rel(recon(U, S, V), exact) <= 1e-4
    # an avg rounded to bf16 (ulp 1/16 at 10) would be off by about the size of the centered entries
    avg16 = torch.stack([t.double() for t in thetas]).mean(0).bfloat16()
    U, S, V = randomized_svd(Centered(thetas, avg=avg16), 20, seed=0, backend=backend)
    assert rel(recon(U, S, V), exact) > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_weights_avg_and_inputs(backend):
    thetas = _thetas(3, 24, 18, torch.float32, seed=6)
    w = [0.5, 0.3, 0.2]
    C = Centered(torch.stack(thetas), weights=w)
    want = sum(wi * t.double() for wi, t in zip(w, thetas))
    assert (C.avg.double() - want).abs().max() < 1e-5
    avg = torch.randn(24, 18)
    C2 = Centered(thetas, avg=avg)
    got = randomized_svd(C2, 3, seed=2, backend=backend)
    want = randomized_svd(torch.stack([t - avg for t in thetas]), 3, seed=2, backend=backend)
    assert rel(recon(*got), recon(*want)) <= 1e-5
    # non-contiguous thetas (transposed views) are read in place
    Ct = Centered([t.T.contiguous().T for t in thetas], avg=avg)
    got_t = randomized_svd(Ct, 3, seed=2, backend=backend)
    assert rel(recon(*got_t), recon(*got)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_centered_matmul_matches_float64(backend, dtype, transpose):
    """A[t] @ X[t] (or A[t]^T @ X[t]) of the implicit batch == the float64 product of the exactly centered
    matrices, for every input layout; the result is a transposed view of contiguous storage."""
    T, m, n, l = 3, 37, 29, 7
    thetas = _thetas(T, m, n, dtype, seed=11, offset=2.0, spread=0.05)
    C = Centered(thetas)
    A64 = torch.stack([t.double() for t in thetas]) - C.avg.double()
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(T, m if transpose else n, l, generator=gen, dtype=torch.float64)
    want = (A64.mT if transpose else A64) @ X
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # the centered entries are ~2.5% of |theta|: fp32 products of fp32 avg keep ~1e-6 of the product
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for Xin in (X.to(acc), X.to(acc).mT.contiguous().mT, X.to(dtype)):
        got = centered_matmul(C, Xin, transpose=transpose, backend=backend)
        assert got.dtype == acc and got.shape == want.shape and got.mT.is_contiguous()
        ref = (A64.mT if transpose else A64) @ Xin.double()
        assert rel(got, ref) <= tol
    assert centered_matmul(C, X[..., :0], transpose=transpose, backend=backend).shape == (T, want.shape[1], 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_matmul_errors(backend):
    C = Centered(_thetas(2, 6, 4, torch.float32, seed=1))
    with pytest.raises(ValueError, match=r"X must be \[T = 2, 4, l\] for A of shape \(2, 6, 4\), got \(2, 6, 3\)"):
        centered_matmul(C, torch.randn(2, 6, 3), backend=backend)
    with pytest.raises(ValueError, match=r"X must be \[T = 2, 6, l\] .*\(transpose\), got \(3, 6, 3\)"):
        centered_matmul(C, torch.randn(3, 6, 3), transpose=True, backend=backend)
    with pytest.raises(ValueError, match=r"X must be a float Tensor"):
        centered_matmul(C, torch.ones(2, 4, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"A must be a Centered, got Tensor"):
        centered_matmul(torch.randn(2, 6, 4), torch.randn(2, 4, 3), backend=backend)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.filterwarnings("ignore:invalid value encountered")   # the Triton interpreter's numpy on NaN input
@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    A = torch.randn(12, 9)
    with pytest.raises(ValueError, match=r"k = 10 must be an int in \[1, min\(m, n\) = 9\]"):
        randomized_svd(A, 10, backend=backend)
    with pytest.raises(ValueError, match=r"k = 0"):
        randomized_svd(A, 0, backend=backend)
    with pytest.raises(ValueError, match=r"k = 2.5"):
        randomized_svd(A, 2.5, backend=backend)
    with pytest.raises(ValueError, match=r"must be \[m, n\] or \[B, m, n\]"):
        randomized_svd(torch.randn(5), 1, backend=backend)
    with pytest.raises(ValueError, match=r"must be \[m, n\] or \[B, m, n\]"):
        randomized_svd(torch.randn(2, 3, 4, 5), 1, backend=backend)
    with pytest.raises(ValueError, match=r"dtype torch.int64"):
        randomized_svd(torch.ones(5, 4, dtype=torch.int64), 1, backend=backend)
    with pytest.raises(ValueError, match=r"Tensor or a Centered"):
        randomized_svd([[1.0, 2.0]], 1, backend=backend)
    with pytest.raises(ValueError, match=r"oversample"):
        randomized_svd(A, 2, oversample=-1, backend=backend)
    with pytest.raises(ValueError, match=r"empty matrix dimension"):
        randomized_svd(torch.empty(0, 4), 1, backend=backend)
    for bad in (float("nan"), float("inf")):
        X = A.clone()
        X[7, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or Inf"):
            randomized_svd(X, 2, backend=backend)
        thetas = [torch.randn(12, 9) for _ in range(3)]
        thetas[1][3, 3] = bad
        with pytest.raises(ValueError, match=r"NaN or Inf"):
            randomized_svd(Centered(thetas, avg=torch.zeros(12, 9)), 2, backend=backend)


def test_centered_errors():
    with pytest.raises(ValueError, match=r"T = 0"):
        Centered([])
    with pytest.raises(ValueError, match=r"2-D"):
        Centered([torch.randn(3, 4, 5)])
    with pytest.raises(ValueError, match=r"avg has shape \(4, 3\)"):
        Centered([torch.randn(3, 4)], avg=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"thetas\[1\] has shape"):
        Centered([torch.randn(3, 4), torch.randn(4, 4)])
    with pytest.raises(ValueError, match=r"dtype torch.int32"):
        Centered([torch.ones(3, 4, dtype=torch.int32)])


def test_op_level_checks():
    """The registered ops validate their own inputs (ValueError), whatever the caller."""
    if not extension_loaded():
        pytest.skip("pymerge._C not built")
    A = torch.randn(1, 6, 5)
    with pytest.raises(ValueError, match="omega must be"):
        torch.ops.pymerge.randomized_svd(A, torch.randn(1, 4, 3), 2, 1)
    with pytest.raises(ValueError, match="k = 4"):
        torch.ops.pymerge.randomized_svd(A, torch.randn(1, 5, 3), 4, 1)
    with pytest.raises(ValueError, match="exceeds min"):
        torch.ops.pymerge.randomized_svd(A, torch.randn(1, 5, 6), 2, 1)
    with pytest.raises(ValueError, match="thetas\\[1\\]"):
        torch.ops.pymerge.randomized_svd_centered([A[0], torch.randn(5, 5)], A[0], torch.randn(2, 5, 3), 2, 1)
    with pytest.raises(ValueError, match="low_rank_sum"):
        torch.ops.pymerge.low_rank_sum(torch.randn(2, 4, 3), torch.randn(2, 3), torch.randn(2, 5, 2), 1.0, None)


def test_fake_tensor_shapes():
    """register_fake gives torch.compile the output shapes / dtypes without running the kernels."""
    if not extension_loaded():
        pytest.skip("pymerge._C not built")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        A = torch.empty(2, 30, 20, dtype=torch.bfloat16)
        U, S, V = torch.ops.pymerge.randomized_svd(A, torch.empty(2, 20, 8), 5, 2)
        assert U.shape == (2, 30, 5) and S.shape == (2, 5) and V.shape == (2, 20, 5) and U.dtype == torch.float32
        U, S, V = torch.ops.pymerge.randomized_svd_centered([A[0], A[1]], torch.empty(30, 20), torch.empty(2, 20, 8),
                                                            5, 2)
        assert U.shape == (2, 30, 5)
        out = torch.ops.pymerge.low_rank_sum(U, S, V, 2.0, torch.empty(30, 20, dtype=torch.float16))
        assert out.shape == (30, 20) and out.dtype == torch.float16


def test_opcheck():
    """torch.library.opcheck: schemas, fake kernels against the real ones, AOT dispatch."""
    if not extension_loaded():
        pytest.skip("pymerge._C not built")
    A = torch.randn(2, 20, 15)
    omega = torch.randn(2, 8, 15).transpose(1, 2)
    cases = [(torch.ops.pymerge.randomized_svd.default, (A, omega, 5, 2)),
             (torch.ops.pymerge.randomized_svd_centered.default, ([A[0], A[1]], A.mean(0), omega, 5, 2)),
             (torch.ops.pymerge.low_rank_sum.default, (torch.randn(2, 20, 5), torch.rand(2, 5), torch.randn(2, 15, 5),
                                                       1.5, torch.randn(20, 15).bfloat16())),
             (torch.ops.pymerge.low_rank_sum.default, (torch.randn(2, 20, 5), torch.rand(2, 5), torch.randn(2, 15, 5),
                                                       1.5, None))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ---------------------------------------------------------------------------------------- low_rank_sum
def _factors(B, m, n, k, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, m, k, generator=gen).to(dtype), torch.rand(B, k, generator=gen).to(dtype),
            torch.randn(B, n, k, generator=gen).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,m,n,k", [(1, 7, 5, 3), (4, 33, 20, 6), (3, 17, 40, 1)])
@pytest.mark.parametrize("base_dtype", [None, torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_low_rank_sum_vs_einsum(backend, B, m, n, k, base_dtype):
    U, S, V = _factors(B, m, n, k, seed=B * m + n)
    base = None if base_dtype is None else torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(base_dtype)
    out = low_rank_sum(U, S, V, 0.75, base, backend=backend)
    want = torch.einsum("bmk,bk,bnk->mn", U.double(), S.double(), V.double()) * 0.75
    if base is not None:
        want = want + base.double()
    assert out.shape == (m, n) and out.dtype == (base_dtype or torch.float32)
    if base_dtype in LOW:   # one rounding of the fp32 result to the output dtype (plus fp32 error)
        eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[base_dtype]
        assert ((out.double() - want).abs() <= eps * want.abs() + 1e-5 * want.abs().max()).all()
    else:
        assert rel(out, want) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_sum_fp64_and_layouts(backend):
    U, S, V = _factors(3, 21, 14, 4, seed=3, dtype=torch.float64)
    assert rel(low_rank_sum(U, S, V, 0.1, backend=backend), torch.einsum("bmk,bk,bnk->mn", U, S, V) * 0.1) <= 1e-13
    want = torch.einsum("bmk,bk,bnk->mn", U, S, V) * -1.5
    out = low_rank_sum(U, S, V, -1.5, backend=backend)
    assert out.dtype == torch.float64 and rel(out, want) <= 1e-13
    # non-contiguous factors and base; unbatched [m, k], [k], [n, k]
    Ut, Vt = U.mT.contiguous().mT, V.mT.contiguous().mT
    base = torch.randn(14, 21, dtype=torch.float64).T
    assert rel(low_rank_sum(Ut, S[:, :], Vt, -1.5, base, backend=backend), want + base) <= 1e-13
    single = low_rank_sum(U[0].float(), S[0].float(), V[0].float(), backend=backend)
    assert rel(single, (U[0] * S[0]) @ V[0].T) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_sum_of_randomized_svd_reconstructs(backend):
    """CART's use: sum over tasks of the rank-k parts, added to the average."""
    thetas = _thetas(3, 26, 22, torch.float32, seed=2)
    C = Centered(thetas)
    U, S, V = randomized_svd(C, 22, seed=0, backend=backend)     # full rank
    merged = low_rank_sum(U, S, V, 1.0, C.avg, backend=backend)
    # the centered matrices sum to zero, so the full-rank merge is the average again
    assert rel(merged, C.avg) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_sum_errors(backend):
    U, S, V = _factors(2, 6, 5, 3, seed=0)
    with pytest.raises(ValueError, match=r"expected U \[B, m, k\]"):
        low_rank_sum(U, S[:, :2], V, backend=backend)
    with pytest.raises(ValueError, match=r"expected U \[B, m, k\]"):
        low_rank_sum(U, S, V[:1], backend=backend)
    with pytest.raises(ValueError, match=r"base has shape \(5, 6\)"):
        low_rank_sum(U, S, V, base=torch.zeros(5, 6), backend=backend)
    with pytest.raises(ValueError, match=r"U must be a float Tensor"):
        low_rank_sum(U.long(), S, V, backend=backend)
    with pytest.raises(ValueError, match=r"base must be a float Tensor"):
        low_rank_sum(U, S, V, base=torch.zeros(6, 5, dtype=torch.int32), backend=backend)


# ------------------------------------------------------------------------------- start: continued iteration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centered", [False, True])
def test_start_continues_the_subspace_iteration(backend, centered):
    """A call with start = V of a previous call (k = l, power_iters = 0) advances the same subspace iteration:
    q0 power iterations then j such steps span (A^T A)^(q0 + 1 + j) omega, as one call with q0 + j power
    iterations does; the rank-k factors agree with it (float64 reference) up to the conditioning of the
    iterates. Works through the implicit Centered operator too."""
    s = geometric(40, 0.8)
    A64 = torch.stack([spectrum_matrix(56, 40, s, seed=t) for t in range(3)])
    A = A64.float()
    if centered:
        avg = A.mean(0)
        A, A64 = Centered(list(A), avg), torch.stack([t.double() - avg.double() for t in A])
    l, k = 14, 5
    U, S, V = randomized_svd(A, l, oversample=0, power_iters=1, seed=4, backend=backend)
    for _ in range(2):
        U, S, V = randomized_svd(A, l, power_iters=0, start=V, backend=backend)
    Ur, Sr, Vr = randomized_svd(A64, k, oversample=l - k, power_iters=3, seed=4, backend="reference")
    assert U.shape == (3, 56, l) and V.shape == (3, 40, l)
    assert rel(recon(U[..., :k], S[..., :k], V[..., :k]), recon(Ur, Sr, Vr)) <= 1e-4
    # unbatched start for an unbatched A
    u, s1, v = randomized_svd(A64[0], l, power_iters=0, start=V[0].double(), backend=backend)
    assert v.shape == (40, l) and s1.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_errors(backend):
    A = torch.randn(2, 12, 9)
    with pytest.raises(ValueError, match=r"start must be \[B, n, l\], got shape \(9, 4\)"):
        randomized_svd(A, 2, start=torch.randn(9, 4), backend=backend)
    with pytest.raises(ValueError, match=r"start must be \[B, n, l\] with n = 9 and k = 5 <= l"):
        randomized_svd(A, 5, start=torch.randn(2, 9, 4), backend=backend)
    with pytest.raises(ValueError, match=r"start must be \[B, n, l\] with n = 9"):
        randomized_svd(A, 2, start=torch.randn(2, 8, 4), backend=backend)
    with pytest.raises(ValueError, match=r"start must be \[B, n, l\] with n = 9"):
        randomized_svd(A, 2, start=torch.randn(2, 9, 10), backend=backend)     # l > min(m, n)
    with pytest.raises(ValueError, match=r"start must be a float Tensor"):
        randomized_svd(A, 2, start=torch.ones(2, 9, 4, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"start contains NaN or Inf"):
        randomized_svd(A, 2, start=torch.full((2, 9, 4), float("nan")), backend=backend)
    with pytest.raises(ValueError, match=r"start must be \[n, l\]"):
        randomized_svd(A[0], 2, start=torch.randn(2, 9, 4), backend=backend)
