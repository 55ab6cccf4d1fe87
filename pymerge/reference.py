"""Plain-torch reference of every pymerge op: the tests' oracle and the fallback backend.

Pure math, no input validation (the public wrappers in pymerge.ops validate). Every function works in
float64 when given float64 tensors; lower-precision inputs are computed in float32 and cast back.
"""
import math

import torch

from .dtypes import accumulation_dtype

JS, KL, ENTROPY = 0, 1, 2


# ---------------------------------------------------------------------------------------------- center
def center_task_vectors(thetas, weights, out_dtype=None, centered=True):
    """avg = sum_t weights[t] * thetas[t]; centered[t] = thetas[t] - avg.

    thetas: sequence of T same-shape float tensors [*S]; weights: [T]. Returns (avg [*S],
    centered [T, *S] or an empty tensor when centered=False), in out_dtype (default: the inputs' dtype).
    """
    dtype = thetas[0].dtype
    acc = accumulation_dtype(dtype)
    out_dtype = out_dtype or dtype
    w = weights.to(acc)
    avg = torch.zeros(thetas[0].shape, dtype=acc, device=thetas[0].device)
    for t, theta in enumerate(thetas):
        avg += w[t] * theta.to(acc)
    if not centered:
        return avg.to(out_dtype), torch.empty(0, dtype=out_dtype, device=avg.device)
    cent = torch.stack([theta.to(acc) - avg for theta in thetas])
    return avg.to(out_dtype), cent.to(out_dtype)


# ---------------------------------------------------------------------------------------- randomized SVD
def _orthonormal_basis(Y):
    return torch.linalg.qr(Y, mode="reduced").Q


def randomized_svd(A, omega, k, power_iters):
    """Halko-Martinsson-Tropp: range finder with re-orthonormalisation between power iterations.

    A: [B, m, n]; omega: [B, n, l] with k <= l <= min(m, n). Returns U [B, m, k], S [B, k], V [B, n, k]
    (float32, or float64 for float64 A) with A[b] ~= U[b] diag(S[b]) V[b]^T.
    """
    acc = accumulation_dtype(A.dtype)
    A = A.to(acc)
    Q = _orthonormal_basis(A @ omega.to(acc))
    for _ in range(power_iters):
        Z = _orthonormal_basis(A.mT @ Q)
        Q = _orthonormal_basis(A @ Z)
    small = Q.mT @ A                                      # [B, l, n]
    Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ Ub[..., :k], S[..., :k], Vh[..., :k, :].mT


def randomized_svd_centered(thetas, avg, omega, k, power_iters):
    """randomized_svd of the batch A[t] = thetas[t] - avg (materialised here; kernels never do)."""
    acc = accumulation_dtype(thetas[0].dtype)
    A = torch.stack([theta.to(acc) - avg.to(acc) for theta in thetas])
    return randomized_svd(A, omega, k, power_iters)


def centered_matmul(thetas, avg, Xt, transpose):
    """(A[t] X[t])^T = Xt[t] A[t]^T ([T, l, n] -> [T, l, m]), or with transpose (A[t]^T X[t])^T = Xt[t] A[t]
    ([T, l, m] -> [T, l, n]), A[t] = thetas[t] - avg materialised, in the accumulation dtype."""
    acc = accumulation_dtype(thetas[0].dtype)
    A = [theta.to(acc) - avg.to(acc) for theta in thetas]
    return torch.stack([Xt[t].to(acc) @ (a if transpose else a.mT) for t, a in enumerate(A)])


def low_rank_sum(U, S, V, scale, base=None):
    """base + scale * sum_b U[b] diag(S[b]) V[b]^T. U [B, m, k], S [B, k], V [B, n, k]; base [m, n] or None."""
    acc = accumulation_dtype(U.dtype)
    total = torch.einsum("bmk,bk,bnk->mn", U.to(acc), S.to(acc), V.to(acc)) * scale
    if base is not None:
        total = base.to(acc) + total
        return total.to(base.dtype)
    return total.to(U.dtype)


# ------------------------------------------------------------------------------------------ divergences
def _xlogy_ratio(p, logp, logq):
    """p * (logp - logq) with the convention 0 * log(0 / x) = 0 (NaN stays NaN)."""
    return torch.where(p != 0, p * (logp - logq), torch.zeros_like(p))


def divergence(student, teacher, mask, kind, beta, temperature, teacher_is_logits):
    """Per-row divergence of distributions over the last dim; student, teacher: [N, V] -> loss [N].

    kind JS: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q, where
    p = teacher distribution, q = softmax(student / temperature). beta = 0.5 is the Jensen-Shannon divergence.
    kind KL: KL(p || q) = sum p (log p - log q). kind ENTROPY: -sum q log q (teacher unused).
    teacher_is_logits=False: teacher rows are log-probabilities used as given (no temperature, no renorm).
    Differentiable w.r.t. student via autograd. Masked-out rows (mask False) give 0.
    """
    acc = accumulation_dtype(student.dtype)
    logq = torch.log_softmax(student.to(acc) / temperature, dim=-1)
    q = logq.exp()
    if kind == ENTROPY:
        loss = -_xlogy_ratio(q, logq, torch.zeros_like(logq)).sum(-1)
    else:
        t = teacher.to(acc)
        logp = torch.log_softmax(t / temperature, dim=-1) if teacher_is_logits else t
        p = logp.exp()
        if kind == KL:
            loss = _xlogy_ratio(p, logp, logq).sum(-1)
        elif kind == JS:
            logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
            loss = beta * _xlogy_ratio(p, logp, logm).sum(-1) + (1 - beta) * _xlogy_ratio(q, logq, logm).sum(-1)
        else:
            raise ValueError(f"unknown divergence kind {kind}")
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss.float() if acc != torch.float64 else loss
