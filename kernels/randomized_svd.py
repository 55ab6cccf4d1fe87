"""Triton kernels of randomized_svd / randomized_svd_centered / low_rank_sum (pymerge.ops backend="triton").

The heavy part of a randomized SVD is its (2q + 2) products with the m x n matrix; here each one is a tiled
Triton GEMM whose operand load forms (theta - avg) on the fly in fp32 (fp64 for fp64 data): fp16 / bf16
storage is widened before the subtraction and before tl.dot, the centered matrices are never materialised and
each product costs one GEMM per task. The same kernel serves A @ X and A^T @ Y (the transpose is a swap of
strides). Factorisations stay in torch on the tensors' device, the same steps as the C++ driver
(csrc/randomized_svd.cpp): LU-with-pivoting basis between power iterations, Householder QR for the two bases
that must be orthonormal, SVD of an l x l triangle. low_rank_sum is one GEMM with inner dimension B*k whose
operand loads fold in S and the (b, r) -> b*k + r flattening, with base + scale * acc in the epilogue.

Shapes and dtypes as in pymerge.reference: A [B, m, n] / thetas T x [m, n] (any float dtype), avg [m, n],
omega [B, n, l] (fp32, fp64 for fp64 data) -> U [B, m, k], S [B, k], V [B, n, k] in fp32 (fp64).
"""
import os

import numpy as np
import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRETED:  # the interpreter is slow: one modest tile (tl.dot needs blocks >= 16)
        return [triton.Config({"BM": 32, "BN": 32, "BK": 16}, num_warps=4)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 64, 32, 4, 3), (64, 64, 32, 4, 4), (128, 128, 32, 8, 3),
                                     (64, 128, 32, 4, 3))]


def _precision(acc):
    # fp32 on a GPU: 3xTF32 (error ~ fp32 rounding, tensor-core speed); fp64 and the interpreter: plain IEEE.
    if acc == torch.float64 or _INTERPRETED:
        return "ieee"
    return "tf32x3"


@triton.autotune(configs=_configs(), key=["M", "N", "K", "HAS_AVG"])
@triton.jit
def _centered_gemm_kernel(a_ptr, v_ptr, x_ptr, c_ptr, M, N, K, s_am, s_ak, s_vm, s_vk, s_xk, s_xn, s_cm, s_cn,
                          HAS_AVG: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[M, N] = (A - avg)[M, K] @ X[K, N]; A any float dtype, avg / X / C of dtype ACC; strides in elements."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a_mask = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=a_mask, other=0.0).to(ACC)
        if HAS_AVG:
            a = a - tl.load(v_ptr + rm[:, None] * s_vm + kk[None, :] * s_vk, mask=a_mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + kk[:, None] * s_xk + rn[None, :] * s_xn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0).to(ACC)
        acc += tl.dot(a, x, input_precision=PRECISION, out_dtype=ACC)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even by bit arithmetic (float_to_bf16_bits of pymerge/center.h): the
    interpreter's own cast truncates; on a GPU this is the same rounding as cvt.rn.bf16.f32."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.autotune(configs=_configs(), key=["M", "N", "KB", "HAS_BASE"])
@triton.jit
def _low_rank_sum_kernel(u_ptr, s_ptr, v_ptr, base_ptr, out_ptr, M, N, KB, k, s_ub, s_um, s_uk, s_sb, s_sk,
                         s_vb, s_vn, s_vk, s_bm, s_bn, s_om, s_on, scale,
                         HAS_BASE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[i, j] = base[i, j] + scale * sum_{b, r} U[b, i, r] S[b, r] V[b, j, r]  (inner index kk = b * k + r)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, KB, BK):
        kk = k0 + rk
        b = kk // k
        r = kk - b * k
        kmask = kk < KB
        s = tl.load(s_ptr + b * s_sb + r * s_sk, mask=kmask, other=0.0).to(ACC)
        u = tl.load(u_ptr + b[None, :] * s_ub + rm[:, None] * s_um + r[None, :] * s_uk,
                    mask=(rm[:, None] < M) & kmask[None, :], other=0.0).to(ACC)
        v = tl.load(v_ptr + b[:, None] * s_vb + rn[None, :] * s_vn + r[:, None] * s_vk,
                    mask=kmask[:, None] & (rn[None, :] < N), other=0.0).to(ACC)
        acc += tl.dot(u * s[None, :], v, input_precision=PRECISION, out_dtype=ACC)
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    res = scale * acc
    if HAS_BASE:  # base + scale * acc, the epilogue of pymerge/randomized_svd.h, rounded once
        res = tl.load(base_ptr + rm[:, None] * s_bm + rn[None, :] * s_bn, mask=omask, other=0.0).to(ACC) + res
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = _bf16_rne(res.to(tl.float32))
    else:
        out = res.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, out, mask=omask)


def _tl_acc(acc):
    return tl.float64 if acc == torch.float64 else tl.float32


def _product(theta, avg, transpose, X, C):
    """C [M, N] = (theta - avg) @ X, or (theta - avg)^T @ X with transpose=True; C written in place (any strides)."""
    s_am, s_ak = (theta.stride(1), theta.stride(0)) if transpose else (theta.stride(0), theta.stride(1))
    if avg is not None:
        s_vm, s_vk = (avg.stride(1), avg.stride(0)) if transpose else (avg.stride(0), avg.stride(1))
    else:
        s_vm = s_vk = 0
    M, N = C.shape
    K = X.shape[0]

    def grid(meta):
        return triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"])

    _centered_gemm_kernel[grid](theta, avg if avg is not None else theta, X, C, M, N, K, s_am, s_ak, s_vm, s_vk,
                                X.stride(0), X.stride(1), C.stride(0), C.stride(1), HAS_AVG=avg is not None,
                                ACC=_tl_acc(C.dtype), PRECISION=_precision(C.dtype))


def _fwd(thetas, avg, Zt, Yt):
    for b, theta in enumerate(thetas):   # Y [m, l] = (A - avg) Z, stored transposed in Yt [l, m]
        _product(theta, avg, False, Zt[b].mT, Yt[b].mT)


def _bwd(thetas, avg, Yt, Zt):
    for b, theta in enumerate(thetas):   # Z [n, l] = (A - avg)^T Y
        _product(theta, avg, True, Yt[b].mT, Zt[b].mT)


def _perm_from_pivots(piv, m):
    """LAPACK pivots [B, l] (1-based sequential swaps) -> row permutation [B, m] (apply_pivots of the C++ side)."""
    pv = piv.cpu().numpy().astype(np.int64) - 1
    B, l = pv.shape
    perm = np.tile(np.arange(m, dtype=np.int64), (B, 1))
    rows = np.arange(B)
    for j in range(l):
        p = pv[:, j]
        held = perm[rows, j].copy()
        perm[rows, j] = perm[rows, p]
        perm[rows, p] = held
    return torch.from_numpy(perm).to(piv.device)


def _lu_factor(Y):
    """Packed LU [B, m, l] and 1-based pivots [B, l] (int32) of Y [B, m, l], partial pivoting.

    CPU tensors are factored one matrix at a time: torch 2.13's batched CPU lu_factor returns garbage pivots
    with 2+ threads (then MKL aborts in SLASWP), the per-matrix call is correct (lu_factor_cpu of the C++ side).
    """
    if Y.device.type != "cpu":
        LU, piv, _ = torch.linalg.lu_factor_ex(Y)
        return LU, piv
    B, m, l = Y.shape
    LU = torch.empty(B, l, m, dtype=Y.dtype).mT   # column-major per matrix: LAPACK writes in place
    piv = torch.empty(B, l, dtype=torch.int32)
    info = torch.empty(B, dtype=torch.int32)
    for b in range(B):
        torch.linalg.lu_factor_ex(Y[b], out=(LU[b], piv[b], info[b]))
    return LU, piv


def _lu_basis(Yt):
    """P L of Y = P L U (partial pivoting), both given transposed: [B, l, m] -> [B, l, m]."""
    B, l, m = Yt.shape
    LU, piv = _lu_factor(Yt.mT)   # info > 0 (zero pivot) still leaves a valid unit-L basis
    L = LU.tril(-1) + torch.eye(m, l, dtype=LU.dtype, device=LU.device)
    out = torch.empty_like(Yt)
    out.scatter_(2, _perm_from_pivots(piv, m)[:, None, :].expand(B, l, m), L.mT)
    return out


def _run(thetas, avg, omega, k, q):
    B, n, l = omega.shape
    m = thetas[0].shape[0]
    acc = torch.float64 if thetas[0].dtype == torch.float64 else torch.float32
    dev = omega.device
    Zt = omega.to(acc).transpose(1, 2).contiguous()    # omega arrives as a transposed view: no copy, read only
    Yt = torch.empty(B, l, m, dtype=acc, device=dev)
    _fwd(thetas, avg, Zt, Yt)
    if not bool(torch.isfinite(Yt).all()):   # every entry of A reaches the sketch through a non-zero weight
        raise ValueError(f"randomized_svd: A contains NaN or Inf (shape {(B, m, n)})")
    for _ in range(q):
        Yt = _lu_basis(Yt)
        Zt = torch.empty(B, l, n, dtype=acc, device=dev)
        _bwd(thetas, avg, Yt, Zt)
        Zt = _lu_basis(Zt)
        Yt = torch.empty(B, l, m, dtype=acc, device=dev)
        _fwd(thetas, avg, Zt, Yt)
    del Zt
    a, tau = torch.geqrf(Yt.mT)
    del Yt
    Qt = torch.linalg.householder_product(a, tau).mT.contiguous()     # [B, l, m], orthonormal rows
    Bt = torch.empty(B, l, n, dtype=acc, device=dev)
    _bwd(thetas, avg, Qt, Bt)                                          # Q^T A = B, i.e. B^T column-major
    a, tau = torch.geqrf(Bt.mT)                                        # B^T = Z2 R
    del Bt
    R = a[:, :l, :].triu()
    Z2 = torch.linalg.householder_product(a, tau)
    del a
    Ur, S, Vrh = torch.linalg.svd(R.mT, full_matrices=False)           # R^T = Ur S Vr^T
    U = Qt.mT @ Ur[..., :k]
    V = Z2 @ Vrh[..., :k, :].mT
    return U.contiguous(), S[..., :k].contiguous(), V.contiguous()


def randomized_svd(A, omega, k, q):
    """A [B, m, n] (any float dtype / strides), omega [B, n, l] -> U [B, m, k], S [B, k], V [B, n, k]."""
    return _run(list(A.unbind(0)), None, omega, k, q)


def randomized_svd_centered(thetas, avg, omega, k, q):
    """The batch thetas[t] - avg, never materialised; avg [m, n] is used in the accumulation dtype."""
    acc = torch.float64 if thetas[0].dtype == torch.float64 else torch.float32
    return _run(list(thetas), avg.to(acc), omega, k, q)


def centered_matmul(thetas, avg, Xt, transpose):
    """The implicit batch's products alone: Xt [T, l, n] -> (A[t] X[t])^T [T, l, m], or with transpose
    Xt [T, l, m] -> (A[t]^T X[t])^T [T, l, n], A[t] = thetas[t] - avg, in the accumulation dtype."""
    acc = torch.float64 if thetas[0].dtype == torch.float64 else torch.float32
    m, n = avg.shape
    X = Xt.to(acc)
    out = torch.empty(X.shape[0], X.shape[1], n if transpose else m, dtype=acc, device=X.device)
    if X.shape[1]:
        (_bwd if transpose else _fwd)(list(thetas), avg.to(acc), X, out)
    return out


def low_rank_sum(U, S, V, scale, base):
    """base + scale * sum_b U[b] diag(S[b]) V[b]^T: U [B, m, k], S [B, k], V [B, n, k], base [m, n] or None."""
    B, m, k = U.shape
    n = V.shape[1]
    acc = torch.float64 if U.dtype == torch.float64 else torch.float32
    out = torch.empty(m, n, dtype=base.dtype if base is not None else U.dtype, device=U.device)
    if m == 0 or n == 0:
        return out
    if B * k == 0:
        return (base.to(acc) if base is not None else torch.zeros(m, n, dtype=acc, device=U.device)).to(out.dtype)

    def grid(meta):
        return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])

    bref = base if base is not None else out
    # scale folded into S in the accumulation dtype: a Python float reaches the kernel as fp32 only
    S = S.to(acc) * scale
    _low_rank_sum_kernel[grid](U, S, V, bref, out, m, n, B * k, k, U.stride(0), U.stride(1), U.stride(2),
                               S.stride(0), S.stride(1), V.stride(0), V.stride(1), V.stride(2), bref.stride(0),
                               bref.stride(1), out.stride(0), out.stride(1), 1.0,
                               HAS_BASE=base is not None, ACC=_tl_acc(acc), PRECISION=_precision(acc))
    return out
