"""The divergence of the merged (student) model from cached teacher targets, DivMerge's loss:
``dense_divergence`` on dense teacher log-probabilities (the fused pymerge.ops kernels), and for causal LMs
``token_divergence`` per ŷ token (dense rows, or top-k rows through pymerge.ops.topk_divergence) and
``sequence_divergence``, its mean over each sequence's ŷ positions.
"""
import torch

from .. import ops
from ..ops.topk_divergence import DIVERGENCES, topk_divergence


def _check_divergence(divergence):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence = {divergence!r}; expected one of {DIVERGENCES}")


def dense_divergence(student_logits, teacher_log_probs, *, divergence="js", beta=0.5, temperature=1.0,
                     reduction="mean", backend="auto"):
    """D(teacher || student) per row of the last dim on dense cached teacher log-probabilities (at the same
    temperature): student_logits [..., V], teacher_log_probs [..., V]; "js" (generalised with beta) or "kl".
    reduction "mean" (scalar), "sum" or "none" ([...]); fp32 (fp64 for fp64 logits), differentiable w.r.t.
    the student. The fused pymerge.ops kernel on `backend` (pymerge.ops.backend.resolve chooses for "auto")."""
    _check_divergence(divergence)
    if divergence == "js":
        return ops.js_divergence(student_logits, teacher_log_probs, teacher_is_logits=False, beta=beta,
                                 temperature=temperature, reduction=reduction, backend=backend)
    return ops.kl_divergence(student_logits, teacher_log_probs, teacher_is_logits=False, temperature=temperature,
                             reduction=reduction, backend=backend)


def _teacher_rows(teacher):
    """(dense [M, V] or None, top [M, k], idx [M, k] int64, tail [M]) from a dict of teacher rows."""
    if teacher.get("teacher_log_probs") is not None:
        return teacher["teacher_log_probs"], None, None, None
    return None, teacher["top_log_probs"], teacher["top_indices"].long(), teacher["tail_log_mass"]


def token_divergence(logits, target_mask, teacher, *, divergence="js", beta=0.5, temperature=1.0, backend="auto",
                     chunk_rows=None) -> torch.Tensor:
    """D(teacher || student) per ŷ token [M], in the row-major order of target_mask.

    logits: the student's [B, L, V] on x+ŷ; target_mask: bool [B, L], True at the M positions whose logits
    predict a ŷ token; teacher: {"teacher_log_probs": [M, V]} (dense) or {"top_log_probs": [M, k],
    "top_indices": [M, k], "tail_log_mass": [M]} (top-k; see topk_divergence for the approximation).
    Differentiable w.r.t. logits; fp32 (fp64 for fp64 logits).
    """
    _check_divergence(divergence)
    if logits.dim() != 3 or logits.shape[:2] != target_mask.shape:
        raise ValueError(f"token_divergence: logits {tuple(logits.shape)} do not match target_mask [B, L] = "
                         f"{tuple(target_mask.shape)}")
    dense, top, idx, tail = _teacher_rows(teacher)
    M = int(target_mask.sum())
    rows = dense if dense is not None else top
    if rows.shape[0] != M:
        raise ValueError(f"token_divergence: {M} target positions but {rows.shape[0]} teacher rows")
    dev = logits.device
    if dense is None:
        where = target_mask.reshape(-1).nonzero().reshape(-1).to(dev)
        return topk_divergence(logits, top.to(dev), idx.to(dev), tail.to(dev), divergence=divergence, beta=beta,
                               temperature=temperature, rows=where, chunk_rows=chunk_rows)
    if logits.shape[-1] != dense.shape[-1]:
        raise ValueError(f"token_divergence: student vocabulary {logits.shape[-1]} != teacher vocabulary "
                         f"{dense.shape[-1]}")
    return dense_divergence(logits[target_mask.to(dev)], dense.to(dev), divergence=divergence, beta=beta,
                            temperature=temperature, reduction="none", backend=backend)


def sequence_divergence(logits, target_mask, teacher, **kw) -> torch.Tensor:
    """Per-sequence mean of token_divergence over its ŷ positions [B] (docs/METHODS.md §DivMerge, generative: per
    sequence, then the caller averages over sequences). Every row of target_mask must have a True entry."""
    tok = token_divergence(logits, target_mask, teacher, **kw)
    counts = target_mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("sequence_divergence: a sequence has no target (ŷ) position")
    seq = target_mask.nonzero()[:, 0].to(tok.device)
    return torch.zeros(target_mask.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, seq, tok) / \
        counts.to(tok.device, tok.dtype)

