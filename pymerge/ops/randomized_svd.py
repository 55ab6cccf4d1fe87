"""randomized_svd (Halko-Martinsson-Tropp), its implicit centered form, the implicit batch's products
(centered_matmul), and low_rank_sum."""
from typing import Optional, Sequence, Union

import torch

from .. import reference
from ..dtypes import FLOAT_DTYPES, accumulation_dtype
from .backend import extension_loaded, resolve
from .center import as_tensor_list, center_task_vectors


class Centered:
    """The batch A[t] = thetas[t] - avg, given implicitly: kernels never materialise the T centered matrices.

    thetas: Tensor[T, m, n] or a sequence of T [m, n] tensors (fp16/bf16/fp32/fp64, any strides, not stacked);
    avg: [m, n] (default: their uniform average, or the `weights`-weighted one). avg is kept in the
    accumulation dtype (fp32 for fp16/bf16 thetas, fp64 for fp64): rounding the mean to 8 or 11 mantissa bits
    would perturb every theta - avg by eps * |avg|, large next to small centered task vectors.
    """

    def __init__(self, thetas, avg: Optional[torch.Tensor] = None, weights=None):
        op = "Centered"
        self.thetas = as_tensor_list(thetas, op)
        if self.thetas[0].dim() != 2:
            raise ValueError(f"{op}: thetas must be 2-D matrices, got shape {tuple(self.thetas[0].shape)}")
        acc = accumulation_dtype(self.thetas[0].dtype)
        if avg is None:
            avg = center_task_vectors(self.thetas, weights, out_dtype=acc, return_centered=False)[0]
        if not isinstance(avg, torch.Tensor) or avg.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: avg must be a float Tensor, got "
                             f"{getattr(avg, 'dtype', type(avg).__name__)}")
        if avg.shape != self.thetas[0].shape:
            raise ValueError(f"{op}: avg has shape {tuple(avg.shape)} but thetas have "
                             f"{tuple(self.thetas[0].shape)}")
        if avg.device != self.thetas[0].device:
            raise ValueError(f"{op}: avg is on {avg.device} but thetas are on {self.thetas[0].device}")
        self.avg = avg.to(acc)

    @property
    def shape(self):
        return torch.Size((len(self.thetas), *self.thetas[0].shape))

    @property
    def dtype(self):
        return self.thetas[0].dtype

    @property
    def device(self):
        return self.thetas[0].device

    def materialize(self):
        """The explicit [T, m, n] batch in the accumulation dtype (for checks and small cases)."""
        return torch.stack([theta.to(self.avg.dtype) - self.avg for theta in self.thetas])


def _block_seeds(seed, B, op):
    """seed (None, an int, or a sequence of G ints with G dividing B) -> [(block length, int seed)]."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return [(B, torch.seed() if seed is None else int(seed))]
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__len__"):
        raise ValueError(f"{op}: seed must be None, an int or a sequence of ints, got {type(seed).__name__}")
    seeds = list(seed)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{op}: a seed sequence must hold at least one int and only ints, got {seeds[:8]}")
    if B % len(seeds):
        raise ValueError(f"{op}: {len(seeds)} seeds do not split the batch of {B} matrices into equal blocks")
    return [(B // len(seeds), s) for s in seeds]


def _test_matrix(B, n, l, dtype, device, seed, op="randomized_svd"):
    # Drawn on the CPU in float32 whatever the backend: a fixed seed gives the same omega everywhere. Stored as
    # [B, l, n] and handed over as its [B, n, l] transpose: the kernels keep their iterates transposed and use it
    # in place (no copy of the largest operand they are given). Each block of the batch gets its own generator,
    # so a block's omega is the one a call on that block alone with its seed draws.
    omega = torch.empty(B, l, n, dtype=torch.float32)
    start = 0
    for length, block_seed in _block_seeds(seed, B, op):
        gen = torch.Generator()
        gen.manual_seed(block_seed)
        torch.randn(length, l, n, generator=gen, dtype=torch.float32, out=omega[start:start + length])
        start += length
    acc = accumulation_dtype(dtype)
    return omega.to(device=device, dtype=acc).transpose(1, 2)


def randomized_svd(A, k: int, oversample: int = 10, power_iters: int = 2,
                   seed: Union[None, int, Sequence[int]] = None, *, start: Optional[torch.Tensor] = None,
                   backend: str = "auto"):
    """Rank-k randomized SVD: A ~= U diag(S) V^T.

    A: Tensor [m, n], a batch [B, m, n], or Centered(thetas, avg) (the batch thetas[t] - avg, implicit);
    fp16/bf16/fp32/fp64, any strides. fp16/bf16 are widened exactly and computed in fp32.
    Halko-Martinsson-Tropp range finder with l = min(k + oversample, m, n) columns and power_iters power
    iterations, the basis re-normalised between products (LU with partial pivoting in the kernels, which spans
    the same range; Householder QR in the reference), an orthonormal basis Q by Householder QR, then the SVD of
    the small l x n matrix Q^T A (through a QR of its transpose). Cost ~ (2 power_iters + 2) m n l flops.
    Returns U [.., m, k], S [.., k] (descending), V [.., n, k] in float32 (float64 for float64 input), batch dim
    kept iff the input had one. Deterministic for a fixed seed (bitwise on one backend and thread count); the
    test matrix omega is drawn on the CPU, so every backend sees the same one.
    seed: None (fresh randomness), an int (one generator draws omega for the whole batch), or a sequence of G
    ints with G dividing B: the batch is G blocks of B / G consecutive matrices and block g's omega is drawn
    from seed[g] exactly as a call on that block alone with seed=seed[g] draws it (e.g. one seed per task or
    per key). Every batch element is computed on its own, so a block's U, S, V equal that call's up to
    rounding, but not always bitwise: LAPACK (MKL outside its MKL_CBWR mode) rounds a matrix differently at
    another 16-byte alignment inside the batched buffers. Callers that need bitwise per-key results call once
    per key.
    start: instead of the Gaussian test matrix, a given [B, n, l] block ([n, l] for an unbatched A), any float
    dtype and strides, k <= l <= min(m, n); seed and oversample are then unused. Passing the V of a previous call
    made with k = l continues its subspace iteration: each call with power_iters = 0 is one more step
    (A^T A applied once, 2 passes over A) followed by its Rayleigh-Ritz SVD, so a caller can iterate until the
    factors settle (pymerge/methods/cart.py's tol).
    Raises ValueError for a non-float dtype, a wrong ndim, k outside [1, min(m, n)], NaN / Inf in A, a seed
    sequence that is empty, holds a non-int, or whose length does not divide B, or a start block of the wrong
    shape, dtype or device.
    """
    op = "randomized_svd"
    centered = isinstance(A, Centered)
    if not centered and not isinstance(A, torch.Tensor):
        raise ValueError(f"{op}: A must be a Tensor or a Centered, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: A has dtype {A.dtype}; expected one of {FLOAT_DTYPES}")
    batched = centered or A.dim() == 3
    if not centered:
        if A.dim() not in (2, 3):
            raise ValueError(f"{op}: A must be [m, n] or [B, m, n], got shape {tuple(A.shape)}")
        if not batched:
            A = A.unsqueeze(0)
    B, m, n = A.shape
    if m == 0 or n == 0:
        raise ValueError(f"{op}: A has an empty matrix dimension (shape {tuple(A.shape)})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > min(m, n):
        raise ValueError(f"{op}: k = {k} must be an int in [1, min(m, n) = {min(m, n)}] for A of shape "
                         f"{tuple(A.shape)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (oversample, power_iters)) \
            or oversample < 0 or power_iters < 0:
        raise ValueError(f"{op}: oversample ({oversample}) and power_iters ({power_iters}) must be >= 0")
    l = min(k + oversample, m, n)
    if start is not None:
        start = _check_start(start, batched, B, m, n, k, A.device, op)
        l = start.shape[-1]
    be = resolve(backend, A.device, op)
    if be == "reference":
        # The kernels refuse NaN / Inf from the sketch A @ omega (every entry of A reaches it) at no extra pass;
        # the plain-torch reference would hand them to LAPACK, so it is checked here.
        parts = [*A.thetas, A.avg] if centered else [A]
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            raise ValueError(f"{op}: A contains NaN or Inf (shape {tuple(A.shape)})")
    acc = accumulation_dtype(A.dtype)
    if B == 0:
        U, S, V = (torch.empty(0, m, k, dtype=acc, device=A.device), torch.empty(0, k, dtype=acc, device=A.device),
                   torch.empty(0, n, k, dtype=acc, device=A.device))
    else:
        omega = _test_matrix(B, n, l, A.dtype, A.device, seed, op) if start is None else start.to(acc)
        U, S, V = _dispatch(be, A, omega, k, power_iters, centered)
    if not batched:
        U, S, V = U[0], S[0], V[0]
    return U, S, V


def _check_start(start, batched, B, m, n, k, device, op):
    """The start block as [B, n, l], or ValueError naming what is wrong with it."""
    if not isinstance(start, torch.Tensor) or start.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: start must be a float Tensor, got {getattr(start, 'dtype', type(start).__name__)}")
    if start.device != device:
        raise ValueError(f"{op}: start is on {start.device} but A is on {device}")
    want = "[B, n, l]" if batched else "[n, l]"
    if start.dim() != (3 if batched else 2):
        raise ValueError(f"{op}: start must be {want}, got shape {tuple(start.shape)}")
    if not batched:
        start = start.unsqueeze(0)
    l = start.shape[-1]
    if start.shape[0] != B or start.shape[1] != n or not k <= l <= min(m, n):
        raise ValueError(f"{op}: start must be {want} with n = {n} and k = {k} <= l <= min(m, n) = {min(m, n)} "
                         f"for A of shape {(B, m, n) if batched else (m, n)}; got {tuple(start.shape)}")
    if not bool(torch.isfinite(start).all()):
        raise ValueError(f"{op}: start contains NaN or Inf")
    return start


def _dispatch(be, A, omega, k, q, centered):
    if be == "reference":
        if centered:
            return reference.randomized_svd_centered(A.thetas, A.avg, omega, k, q)
        return reference.randomized_svd(A, omega, k, q)
    if be == "triton":
        from pymerge.kernels import randomized_svd as triton_rsvd
        if centered:
            return triton_rsvd.randomized_svd_centered(A.thetas, A.avg, omega, k, q)
        return triton_rsvd.randomized_svd(A, omega, k, q)
    if centered:
        return torch.ops.pymerge.randomized_svd_centered(A.thetas, A.avg, omega, k, q)
    return torch.ops.pymerge.randomized_svd(A, omega, k, q)


def centered_matmul(A: Centered, X: torch.Tensor, *, transpose: bool = False, backend: str = "auto"):
    """The products of the implicit centered batch, for callers that run their own iteration on it:
    A[t] @ X[t] (X [T, n, l] -> [T, m, l]) or, with transpose, A[t]^T @ X[t] (X [T, m, l] -> [T, n, l]),
    A[t] = thetas[t] - avg never materialised (the fused, blocked GEMMs randomized_svd runs on a Centered).

    X: any float dtype and strides. The result is in the accumulation dtype (fp32; fp64 for fp64 thetas) and is
    a transposed view of contiguous [T, l, m] storage, LAPACK's column-major layout: an X that is such a view
    (X.mT contiguous) is read without a copy. Raises ValueError for an A that is not a Centered, or an X of
    the wrong shape, dtype or device.
    """
    op = "centered_matmul"
    if not isinstance(A, Centered):
        raise ValueError(f"{op}: A must be a Centered, got {type(A).__name__}")
    T, m, n = A.shape
    inner = m if transpose else n
    if not isinstance(X, torch.Tensor) or X.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: X must be a float Tensor (fp16/bf16/fp32/fp64), got "
                         f"{getattr(X, 'dtype', type(X).__name__)}")
    if X.dim() != 3 or X.shape[0] != T or X.shape[1] != inner:
        raise ValueError(f"{op}: X must be [T = {T}, {inner}, l] for A of shape {(T, m, n)}"
                         f"{' (transpose)' if transpose else ''}, got {tuple(X.shape)}")
    if X.device != A.device:
        raise ValueError(f"{op}: X is on {X.device} but A is on {A.device}")
    be = resolve(backend, A.device, op)
    Xt = X.mT
    if be == "reference":
        out = reference.centered_matmul(A.thetas, A.avg, Xt, transpose)
    elif be == "triton":
        from pymerge.kernels import randomized_svd as triton_rsvd
        out = triton_rsvd.centered_matmul(A.thetas, A.avg, Xt, transpose)
    else:
        out = torch.ops.pymerge.centered_matmul(A.thetas, A.avg, Xt, transpose)
    return out.mT


def low_rank_sum(U, S, V, scale: float = 1.0, base: Optional[torch.Tensor] = None, *, backend: str = "auto"):
    """base + scale * sum_b U[b] diag(S[b]) V[b]^T, as one GEMM with inner dimension B*k.

    U: [B, m, k] (or [m, k] with S [k], V [n, k]), S: [B, k], V: [B, n, k]; base: [m, n] or None; any float
    dtypes. Accumulates in fp32 (fp64 when U is fp64); the sum with base is rounded once. Returns [m, n] in
    base's dtype (U's dtype without base).
    """
    op = "low_rank_sum"
    for name, t in (("U", U), ("S", S), ("V", V), ("base", base)):
        if t is None and name == "base":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a float Tensor (fp16/bf16/fp32/fp64), got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != U.device:
            raise ValueError(f"{op}: {name} is on {t.device} but U is on {U.device}")
    if U.dim() == 2:
        U, S, V = U.unsqueeze(0), S.unsqueeze(0), V.unsqueeze(0)
    if U.dim() != 3 or S.dim() != 2 or V.dim() != 3 or U.shape[0] != S.shape[0] or V.shape[0] != U.shape[0] \
            or U.shape[2] != S.shape[1] or V.shape[2] != S.shape[1]:
        raise ValueError(f"{op}: expected U [B, m, k], S [B, k], V [B, n, k]; got {tuple(U.shape)}, "
                         f"{tuple(S.shape)}, {tuple(V.shape)}")
    if base is not None and base.shape != (U.shape[1], V.shape[1]):
        raise ValueError(f"{op}: base has shape {tuple(base.shape)}, expected {(U.shape[1], V.shape[1])}")
    be = resolve(backend, U.device, op)
    if be == "reference":
        return reference.low_rank_sum(U, S, V, scale, base)
    if be == "triton":
        from pymerge.kernels import randomized_svd as triton_rsvd
        return triton_rsvd.low_rank_sum(U, S, V, scale, base)
    if isinstance(scale, torch.Tensor):
        scale = scale.item()
    return torch.ops.pymerge.low_rank_sum(U, S, V, float(scale), base)


if extension_loaded():
    def _fake_svd(B, m, n, k, like):
        acc = accumulation_dtype(like.dtype)
        return (like.new_empty((B, m, k), dtype=acc), like.new_empty((B, k), dtype=acc),
                like.new_empty((B, n, k), dtype=acc))

    @torch.library.register_fake("pymerge::randomized_svd")
    def _(A, omega, k, power_iters):
        return _fake_svd(A.shape[0], A.shape[1], A.shape[2], k, A)

    @torch.library.register_fake("pymerge::randomized_svd_centered")
    def _(thetas, avg, omega, k, power_iters):
        return _fake_svd(len(thetas), avg.shape[0], avg.shape[1], k, avg)

    @torch.library.register_fake("pymerge::centered_matmul")
    def _(thetas, avg, Xt, transpose):
        return avg.new_empty((len(thetas), Xt.shape[1], avg.shape[1] if transpose else avg.shape[0]),
                             dtype=accumulation_dtype(thetas[0].dtype))

    @torch.library.register_fake("pymerge::low_rank_sum")
    def _(U, S, V, scale, base):
        like = base if base is not None else U
        return like.new_empty((U.shape[1], V.shape[1]))
