"""Row-wise divergences between distributions over the last dim, with a fused backward.

js_divergence (generalised Jensen-Shannon), kl_divergence (forward KL, teacher || student) and entropy
(AdaMerging's objective) share one op, pymerge::divergence, which returns per-row losses and, when the
student needs a gradient, d loss_row / d student computed in the same pass over the vocabulary.
"""
import math

import torch

from .. import reference
from ..dtypes import FLOAT_DTYPES, accumulation_dtype
from ..fused_grad import scale_saved_grad
from .backend import extension_loaded, resolve

JS, KL, ENTROPY = reference.JS, reference.KL, reference.ENTROPY
_REDUCTIONS = ("mean", "sum", "none")
_NAMES = {JS: "js_divergence", KL: "kl_divergence", ENTROPY: "entropy"}


def js_divergence(student_logits, teacher, *, teacher_is_logits=True, temperature=1.0, beta=0.5, mask=None,
                  reduction="mean", backend="auto"):
    """Generalised Jensen-Shannon divergence beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q.

    p: the teacher distribution (softmax(teacher / temperature), or teacher itself as log-probabilities when
    teacher_is_logits=False, used as given); q = softmax(student_logits / temperature). beta = 0.5 is JS,
    bounded by log 2. student_logits, teacher: [..., V] (any float dtype; fp32 accumulation).
    mask: bool [...], True where a row counts. reduction: "mean" over counted rows, "sum", or "none"
    (shape [...], 0 on masked rows). Differentiable w.r.t. student_logits (the teacher is a constant).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"js_divergence: beta = {beta} must lie in (0, 1); use kl_divergence for the limits")
    return _divergence(JS, student_logits, teacher, teacher_is_logits, temperature, beta, mask, reduction, backend)


def kl_divergence(student_logits, teacher, *, teacher_is_logits=True, temperature=1.0, mask=None,
                  reduction="mean", backend="auto"):
    """Forward KL(p || q) = sum_v p_v (log p_v - log q_v); p teacher, q student. Arguments as js_divergence."""
    return _divergence(KL, student_logits, teacher, teacher_is_logits, temperature, 0.5, mask, reduction, backend)


def entropy(logits, *, temperature=1.0, mask=None, reduction="mean", backend="auto"):
    """Shannon entropy -sum_v q_v log q_v of q = softmax(logits / temperature), per row; as js_divergence."""
    return _divergence(ENTROPY, logits, None, True, temperature, 0.5, mask, reduction, backend)


def _check(kind, student, teacher, temperature, mask, reduction):
    op = _NAMES[kind]
    if not isinstance(student, torch.Tensor) or student.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: logits must be a float tensor, got "
                         f"{getattr(student, 'dtype', type(student).__name__)}")
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty last (vocabulary) dim, got {tuple(student.shape)}")
    if teacher is not None:
        if not isinstance(teacher, torch.Tensor) or teacher.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: teacher must be a float tensor")
        if teacher.shape != student.shape:
            raise ValueError(f"{op}: teacher has shape {tuple(teacher.shape)} but student_logits has "
                             f"{tuple(student.shape)}")
        if teacher.device != student.device:
            raise ValueError(f"{op}: teacher is on {teacher.device} but student_logits on {student.device}")
        if teacher.requires_grad:
            raise ValueError(f"{op}: teacher requires grad; pass teacher.detach() (it is treated as a constant)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{op}: temperature = {temperature} must be a positive finite number")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction = {reduction!r}; expected one of {_REDUCTIONS}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{op}: mask must be a bool tensor")
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"{op}: mask has shape {tuple(mask.shape)}, expected the leading shape "
                             f"{tuple(student.shape[:-1])} of the logits")
    return op


def _divergence(kind, student, teacher, teacher_is_logits, temperature, beta, mask, reduction, backend):
    op = _check(kind, student, teacher, temperature, mask, reduction)
    lead, V = student.shape[:-1], student.shape[-1]
    s2 = student.reshape(-1, V)
    t2 = teacher.reshape(-1, V) if teacher is not None else s2.new_empty(0, V)
    m2 = mask.reshape(-1) if mask is not None else None
    be = resolve(backend, student.device, op)
    temperature, beta = float(temperature), float(beta)
    if be == "reference":
        rows = reference.divergence(s2, t2, m2, kind, beta, temperature, teacher_is_logits)
    elif be == "triton":
        from pymerge.kernels.divergence import divergence as triton_divergence
        rows = triton_divergence(s2, t2, m2, kind, beta, temperature, teacher_is_logits)
    else:
        need_grad = torch.is_grad_enabled() and s2.requires_grad
        rows, _ = torch.ops.pymerge.divergence(s2, t2, m2, kind, beta, temperature, teacher_is_logits, need_grad)
    if not torch.compiler.is_compiling():
        bad = ~torch.isfinite(rows.detach())
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: non-finite result at row {row} of {tuple(lead)} (NaN/Inf in the inputs?)")
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = m2.sum() if m2 is not None else torch.tensor(rows.numel(), device=rows.device)
    return total / count.clamp(min=1).to(total.dtype)


if extension_loaded():
    @torch.library.register_fake("pymerge::divergence")
    def _(student, teacher, mask, kind, beta, temperature, teacher_is_logits, compute_grad):
        rows = student.new_empty((student.shape[0],), dtype=accumulation_dtype(student.dtype))
        grad = student.new_empty(student.shape if compute_grad else (0,))
        return rows, grad

    def _setup_context(ctx, inputs, output):
        student, teacher, mask, kind, beta, temperature, teacher_is_logits, compute_grad = inputs
        ctx.save_for_backward(student, teacher, mask)
        ctx.pymerge_args = (kind, beta, temperature, teacher_is_logits)
        # (a direct call with compute_grad=False still differentiates: backward then recomputes the gradient)
        ctx.pymerge_grad = output[1].detach() if compute_grad else None
        # the gradient output is no loss: never let autograd build an N x V zero "gradient" for it
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_rows, _grad_of_grad):
        def recompute():
            with torch.no_grad():
                return torch.ops.pymerge.divergence(*ctx.saved_tensors, *ctx.pymerge_args, True)[1]
        return (scale_saved_grad(ctx, grad_rows, recompute),) + (None,) * 7

    torch.library.register_autograd("pymerge::divergence", _backward, setup_context=_setup_context)
