"""The divergence of a top-k-compressed teacher from the student (DivMerge's causal-LM teachers cache only the
top-k log-probabilities of each token and the log of the remaining tail mass).

topk_teacher compresses dense teacher log-probabilities [N, V] to (top log-probs [N, k], their indices, tail
log-mass [N]); topk_divergence is D(teacher || student) per row on the teacher's top-k support plus one tail
bucket (never above the dense value, exact when k = V; bound in its docstring), an autograd.Function whose
backward recomputes chunk by chunk; topk_gap_bound bounds the gap to the dense divergence per row.
Plain torch (no backend): the work is a gather, a log-sum-exp and k + 1 terms per row.
"""
import math

import torch

from ..dtypes import accumulation_dtype

DIVERGENCES = ("js", "kl")


def topk_teacher(teacher_log_probs: torch.Tensor, k: int):
    """Compress teacher log-probabilities [N, V] to (top_log_probs [N, k], top_indices [N, k] int64,
    tail_log_mass [N]), fp32 (fp64 for fp64 input): the k largest log-probs, their vocabulary indices, and the
    log of the probability mass outside them (a log-sum-exp over the tail itself, exact even when it is tiny;
    -inf when k = V)."""
    if teacher_log_probs.dim() != 2:
        raise ValueError(f"topk_teacher: expected log-probs [N, V], got {tuple(teacher_log_probs.shape)}")
    V = teacher_log_probs.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"topk_teacher: k = {k} must lie in [1, V = {V}]")
    lp = teacher_log_probs.to(accumulation_dtype(teacher_log_probs.dtype))
    top, idx = torch.topk(lp, k, dim=-1)
    tail = torch.logsumexp(lp.scatter(-1, idx, float("-inf")), dim=-1)
    return top, idx, tail


def _bucket_terms(lz, L, logp_s, idx, tail_logp, kind, beta, need):
    """Per-row loss (and bucket gradients) on the k+1 buckets (top-k support + tail) for one chunk.

    lz: student logits / temperature [c, V] (a private copy: it is overwritten with the tail); L: their
    log-sum-exp [c]. Returns loss [c], log Q [c, k+1] and, when need, g [c, k+1] with
    d loss / d z_v = q_v (g_{b(v)} - sum_b Q_b g_b).
    """
    logq_s = lz.gather(-1, idx) - L[:, None]
    lz.scatter_(-1, idx, float("-inf"))
    logq_r = torch.logsumexp(lz, dim=-1) - L
    logP = torch.cat([logp_s, tail_logp[:, None]], dim=-1)
    logQ = torch.cat([logq_s, logq_r[:, None]], dim=-1)
    P, Q = logP.exp(), logQ.exp()
    zero = torch.zeros((), dtype=P.dtype, device=P.device)
    if kind == "kl":
        loss = torch.where(P > 0, P * (logP - logQ), zero).sum(-1)
        g = torch.where(P > 0, -(logP - logQ).exp(), zero) if need else None
    else:
        logM = torch.logaddexp(logP + math.log(beta), logQ + math.log1p(-beta))
        loss = (beta * torch.where(P > 0, P * (logP - logM), zero).sum(-1)
                + (1 - beta) * torch.where(Q > 0, Q * (logQ - logM), zero).sum(-1))
        g = torch.where(Q > 0, (1 - beta) * (logQ - logM), zero) if need else None
    return loss, logQ, g


class _TopKDivergence(torch.autograd.Function):
    """Rows of the top-k divergence; the backward recomputes per chunk, so only one chunk of [rows, V]
    temporaries is alive at a time (the logits and their gradient are the only full-size tensors)."""

    @staticmethod
    def forward(ctx, logits2d, rows, top_lp, top_idx, tail_lp, kind, beta, temperature, chunk):
        acc = accumulation_dtype(logits2d.dtype)
        M = rows.numel()
        loss = torch.empty(M, dtype=acc, device=logits2d.device)
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            lz = logits2d.index_select(0, rows[s:e]).to(acc) / temperature
            L = torch.logsumexp(lz, dim=-1)
            loss[s:e], _, _ = _bucket_terms(lz, L, top_lp[s:e].to(acc), top_idx[s:e], tail_lp[s:e].to(acc),
                                            kind, beta, False)
        ctx.save_for_backward(logits2d, rows, top_lp, top_idx, tail_lp)
        ctx.cfg = (kind, beta, temperature, chunk)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits2d, rows, top_lp, top_idx, tail_lp = ctx.saved_tensors
        kind, beta, temperature, chunk = ctx.cfg
        acc = accumulation_dtype(logits2d.dtype)
        grad = torch.zeros_like(logits2d)
        M = rows.numel()
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            r = rows[s:e]
            lz = logits2d.index_select(0, r).to(acc) / temperature
            L = torch.logsumexp(lz, dim=-1)
            idx = top_idx[s:e]
            _, logQ, g = _bucket_terms(lz, L, top_lp[s:e].to(acc), idx, tail_lp[s:e].to(acc), kind, beta, True)
            c0 = (logQ.exp() * g).sum(-1, keepdim=True)
            scale = grad_loss[s:e].to(acc)[:, None] / temperature
            # lz now holds the tail logits (support set to -inf): exp(lz - L) is q on the tail, 0 on the support.
            gz = lz.sub_(L[:, None]).exp_().mul_((g[:, -1:] - c0) * scale)
            gz.scatter_(-1, idx, logQ[:, :-1].exp() * (g[:, :-1] - c0) * scale)
            grad.index_add_(0, r, gz.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def topk_divergence(student_logits, top_log_probs, top_indices, tail_log_mass, *, divergence="js", beta=0.5,
                    temperature=1.0, rows=None, chunk_rows=None):
    """Divergence of a top-k-compressed teacher from the student, per row, on the teacher's top-k support
    plus one tail bucket.

    student_logits: [..., V] float (flattened to [N, V]); rows: int64 [M] indices into those N rows (default:
    all, M = N); top_log_probs [M, k], top_indices [M, k] (int, distinct per row), tail_log_mass [M] as from
    topk_teacher (teacher log-probs at the same temperature). divergence: "js" (generalised JS with beta,
    0.5 = Jensen-Shannon) or "kl" (teacher || student). Returns [M], fp32 (fp64 for fp64 logits);
    differentiable w.r.t. student_logits (gradient rows outside `rows` are 0).

    The student side: log q_v = z_v/T - logsumexp(z/T) over the FULL vocabulary for v in the support S, and
    the tail bucket q_R = sum of q outside S (a log-sum-exp over the tail, exact). Both distributions are
    thus coarsened to the same k+1 buckets P = (p_S, p_R), Q = (q_S, q_R), and D(P || Q) is returned.

    The approximation (exact when k = V, or whenever the tail is empty):
    - it never overestimates: coarsening cannot increase an f-divergence (data processing), so
      0 <= D_dense - D_topk for KL and JS;
    - KL: D_dense - D_topk = p_R * KL(p(.|R) || q(.|R)) exactly (chain rule): small when the teacher's tail
      mass p_R is small, but not bounded by cached quantities (the tail conditionals are not cached);
    - JS: D_dense - D_topk <= beta p_R log(m_R / (beta p_R)) + (1-beta) q_R log(m_R / ((1-beta) q_R))
      with m_R = beta p_R + (1-beta) q_R, i.e. <= m_R * ln 2 at most (topk_gap_bound computes it per row).

    Memory: rows are processed in chunks of chunk_rows (default: about 4M elements, i.e. 16 MiB of fp32,
    per chunk); forward and backward keep at most two [chunk_rows, V] temporaries besides the logits and
    their gradient.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"topk_divergence: divergence = {divergence!r}; expected one of {DIVERGENCES}")
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise ValueError("topk_divergence: student_logits must be a float tensor")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"topk_divergence: student_logits must have a vocabulary dim, got "
                         f"{tuple(student_logits.shape)}")
    if divergence == "js" and not 0.0 < beta < 1.0:
        raise ValueError(f"topk_divergence: beta = {beta} must lie in (0, 1)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"topk_divergence: temperature = {temperature} must be a positive finite number")
    V = student_logits.shape[-1]
    logits2d = student_logits.reshape(-1, V)
    N = logits2d.shape[0]
    dev = student_logits.device
    rows = torch.arange(N, device=dev) if rows is None else rows.to(device=dev, dtype=torch.long).reshape(-1)
    M = rows.numel()
    if top_log_probs.dim() != 2 or top_log_probs.shape[0] != M or top_indices.shape != top_log_probs.shape:
        raise ValueError(f"topk_divergence: top_log_probs {tuple(top_log_probs.shape)} and top_indices "
                         f"{tuple(top_indices.shape)} must both be [M = {M}, k]")
    if tail_log_mass.shape != (M,):
        raise ValueError(f"topk_divergence: tail_log_mass has shape {tuple(tail_log_mass.shape)}, expected ({M},)")
    k = top_log_probs.shape[1]
    if k > V:
        raise ValueError(f"topk_divergence: k = {k} exceeds the vocabulary V = {V}")
    if M and (int(rows.min()) < 0 or int(rows.max()) >= N):
        raise ValueError(f"topk_divergence: rows must index the {N} logit rows")
    idx = top_indices.to(device=dev, dtype=torch.long)
    if M and k:
        if int(idx.min()) < 0 or int(idx.max()) >= V:
            raise ValueError(f"topk_divergence: top_indices must lie in [0, V = {V})")
        srt = idx.sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("topk_divergence: top_indices repeat an index within a row")
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 22) // V)
    out = _TopKDivergence.apply(logits2d, rows, top_log_probs.to(dev), idx, tail_log_mass.to(dev),
                                divergence, float(beta), float(temperature), int(chunk_rows))
    bad = ~torch.isfinite(out.detach())
    if bad.any():
        raise ValueError(f"topk_divergence: non-finite result at row {int(bad.nonzero()[0, 0])} "
                         f"(NaN/Inf logits, or a teacher bucket the student gives probability 0 under KL?)")
    return out


def topk_gap_bound(student_logits, top_indices, tail_log_mass, *, divergence="js", beta=0.5, temperature=1.0,
                   rows=None):
    """Per-row upper bound on D_dense - D_topk >= 0 (see topk_divergence): for JS
    beta p_R log(m_R/(beta p_R)) + (1-beta) q_R log(m_R/((1-beta) q_R)), m_R = beta p_R + (1-beta) q_R
    (<= m_R ln 2); for KL there is none from cached quantities: +inf where the teacher tail p_R > 0, else 0.
    Shapes as topk_divergence. Not differentiable (a diagnostic)."""
    with torch.no_grad():
        V = student_logits.shape[-1]
        z = student_logits.reshape(-1, V)
        if rows is not None:
            z = z.index_select(0, rows.to(z.device, torch.long).reshape(-1))
        lz = z.double() / temperature
        L = torch.logsumexp(lz, -1)
        lz.scatter_(-1, top_indices.to(z.device, torch.long), float("-inf"))
        q_r = (torch.logsumexp(lz, -1) - L).exp()
        p_r = tail_log_mass.to(z.device).double().exp()
        if divergence == "kl":
            return torch.where(p_r > 0, torch.full_like(p_r, math.inf), torch.zeros_like(p_r))
        m_r = beta * p_r + (1 - beta) * q_r
        zero = torch.zeros_like(p_r)
        a = torch.where(p_r > 0, beta * p_r * torch.log(m_r / (beta * p_r)), zero)
        b = torch.where(q_r > 0, (1 - beta) * q_r * torch.log(m_r / ((1 - beta) * q_r)), zero)
        return a + b
