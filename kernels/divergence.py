"""Triton kernel of pymerge's row-wise divergences (JS / KL / entropy) with a fused gradient.

    divergence(student, teacher, mask, kind, beta, temperature, teacher_is_logits) -> loss_rows

student, teacher: [N, V] float tensors (any of fp16 / bf16 / fp32 / fp64, not necessarily the same); teacher is
ignored for entropy. mask: bool [N] or None. Returns per-row losses [N] (float32; float64 for an fp64
student), 0 on masked rows, differentiable w.r.t. student through _DivergenceFunction below (Liger-Kernel
style: the gradient is computed in the forward's sweep and only scaled in backward).

One program per row loops over the vocabulary in BLOCK-wide chunks, in the passes of the C++ / CUDA kernels
(csrc/divergence.cpp, csrc/divergence.cu; math in csrc/pymerge/divergence.h, restated here):
  1. online log-sum-exp of student (and of teacher logits);
  2. loss terms and the gradient's row sum S (JS: sum q g, KL: sum p, entropy: H);
  3. only when a gradient is wanted: dL/dz_j = (1/T) q_j (g_j - sum_i q_i g_i), i.e.
     JS (qg_j - q_j S) / T, KL (q_j S - p_j) / T, entropy -q_j (log q_j + H) / T.
So no intermediate larger than one BLOCK per row exists. On CPU tensors this runs only under
TRITON_INTERPRET=1 (slow: for tests on small shapes).
"""
import torch
import triton
import triton.language as tl

from pymerge.dtypes import accumulation_dtype
from pymerge.fused_grad import scale_saved_grad

JS, KL, ENTROPY = 0, 1, 2


@triton.jit
def _log_probs(row_ptr, cols, inside, inv, lse, ACC64: tl.constexpr, LOGITS: tl.constexpr):
    """Log-probabilities of one chunk of a row: x / T - lse for logits, the stored values for log-probs."""
    x = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float64 if ACC64 else tl.float32)
    if LOGITS:
        x = x * inv - lse
    return x


@triton.jit
def _js_student_term(q, logq, p, beta_a, omb):
    """JS mixture m = beta p + (1 - beta) q, its log, and the student's term (1 - beta) q log(q / m) (0 where q m = 0)."""
    m = beta_a * p + omb * q
    logm = tl.log(m)
    return tl.where(q * m == 0, 0.0, omb * q * (logq - logm)), m, logm


@triton.jit
def _divergence_kernel(S, T, MASK, ROWS, G, PARAMS, V, s_stride, t_stride,
                       KIND: tl.constexpr, TLOGITS: tl.constexpr, HAS_MASK: tl.constexpr, GRAD: tl.constexpr,
                       ACC64: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.float64 if ACC64 else tl.float32
    cols0 = tl.arange(0, BLOCK)
    keep = True
    if HAS_MASK:
        keep = tl.load(MASK + row) != 0
    s_row = S + row * s_stride
    t_row = T + row * t_stride
    g_row = G + row * V
    if keep:
        # beta and 1 / T arrive as fp64 (scalar arguments would be fp32 even for fp64 rows)
        beta_a = tl.load(PARAMS).to(acc)
        omb = 1.0 - beta_a
        inv = tl.load(PARAMS + 1).to(acc)
        # Pass 1: log-sum-exps, merged chunk by chunk; an all -inf chunk (or row so far) adds nothing.
        ms = tl.full([], float("-inf"), acc)
        ss = tl.zeros([], acc)
        mt = tl.full([], float("-inf"), acc)
        st = tl.zeros([], acc)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            inside = cols < V
            x = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(acc) * inv
            new_m = tl.maximum(ms, tl.max(x, 0))
            live = new_m != float("-inf")
            ss = tl.where(live, ss * tl.exp(ms - new_m) + tl.sum(tl.exp(x - new_m), 0), ss)
            ms = new_m
            if KIND != 2:
                if TLOGITS:
                    y = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(acc) * inv
                    new_t = tl.maximum(mt, tl.max(y, 0))
                    live_t = new_t != float("-inf")
                    st = tl.where(live_t, st * tl.exp(mt - new_t) + tl.sum(tl.exp(y - new_t), 0), st)
                    mt = new_t
        lse_s = ms + tl.log(ss)
        lse_t = mt + tl.log(st)

        # Pass 2: loss and the gradient's row sum. Terms vanish where their probability is 0 (0 log 0 = 0);
        # for JS a side is dropped where q m (p m) is 0, as in pymerge/divergence.h's js_term.
        vloss = tl.zeros([BLOCK], acc)
        vsum = tl.zeros([BLOCK], acc)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            inside = cols < V
            logq = _log_probs(s_row, cols, inside, inv, lse_s, ACC64, True)
            q = tl.exp(logq)
            if KIND == 2:
                vloss += tl.where(q == 0, 0.0, -(q * logq))
            else:
                logp = _log_probs(t_row, cols, inside, inv, lse_t, ACC64, TLOGITS)
                p = tl.exp(logp)
                if KIND == 0:
                    qg, m, logm = _js_student_term(q, logq, p, beta_a, omb)
                    vloss += tl.where(p * m == 0, 0.0, beta_a * p * (logp - logm)) + qg
                    vsum += qg
                else:
                    vloss += tl.where(p == 0, 0.0, p * (logp - logq))
                    vsum += p
        loss = tl.sum(vloss, 0)
        tl.store(ROWS + row, loss)

        # Pass 3: the gradient, in the student's dtype.
        if GRAD:
            if KIND == 2:
                rs = loss
            else:
                rs = tl.sum(vsum, 0)
            for off in range(0, V, BLOCK):
                cols = off + cols0
                inside = cols < V
                logq = _log_probs(s_row, cols, inside, inv, lse_s, ACC64, True)
                q = tl.exp(logq)
                if KIND == 2:
                    d = tl.where(q == 0, 0.0, -(q * (logq + rs))) * inv
                else:
                    logp = _log_probs(t_row, cols, inside, inv, lse_t, ACC64, TLOGITS)
                    p = tl.exp(logp)
                    if KIND == 0:
                        qg, _, _ = _js_student_term(q, logq, p, beta_a, omb)
                        d = (qg - q * rs) * inv
                    else:
                        d = (q * rs - p) * inv
                tl.store(g_row + cols, d.to(G.dtype.element_ty), mask=inside)
    else:
        tl.store(ROWS + row, tl.zeros([], ROWS.dtype.element_ty))
        if GRAD:
            for off in range(0, V, BLOCK):
                cols = off + cols0
                tl.store(g_row + cols, tl.zeros([BLOCK], G.dtype.element_ty), mask=cols < V)


def _unit_columns(x):
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def divergence_rows(student, teacher, mask, kind, beta, temperature, teacher_is_logits, compute_grad):
    """Launch the kernel: (loss_rows [N], grad [N, V] in student's dtype or None). No autograd."""
    N, V = student.shape
    student = _unit_columns(student)
    ent = kind == ENTROPY
    teacher = student if ent else _unit_columns(teacher)
    acc64 = student.dtype == torch.float64
    rows = torch.empty(N, dtype=accumulation_dtype(student.dtype), device=student.device)
    grad = torch.empty((N, V), dtype=student.dtype, device=student.device) if compute_grad else None
    if N == 0:
        return rows, grad
    mask_arg = mask.contiguous() if mask is not None else rows  # never read without HAS_MASK
    block = min(triton.next_power_of_2(V), 4096)
    params = torch.tensor([float(beta), 1.0 / float(temperature)], dtype=torch.float64, device=student.device)
    _divergence_kernel[(N,)](
        student, teacher, mask_arg, rows, grad if compute_grad else rows, params, V,
        student.stride(0) if N > 1 else V, teacher.stride(0) if N > 1 else V,
        KIND=int(kind), TLOGITS=bool(teacher_is_logits) and not ent, HAS_MASK=mask is not None,
        GRAD=bool(compute_grad), ACC64=acc64, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return rows, grad


class _DivergenceFunction(torch.autograd.Function):
    """Per-row losses whose backward scales the gradient the forward sweep already computed."""

    @staticmethod
    def forward(ctx, student, teacher, mask, kind, beta, temperature, teacher_is_logits):
        rows, grad = divergence_rows(student, teacher, mask, kind, beta, temperature, teacher_is_logits,
                                     compute_grad=True)
        ctx.save_for_backward(student, teacher, mask)
        ctx.pymerge_args = (kind, beta, temperature, teacher_is_logits)
        ctx.pymerge_grad = grad
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        def recompute():
            return divergence_rows(*ctx.saved_tensors, *ctx.pymerge_args, compute_grad=True)[1]
        return scale_saved_grad(ctx, grad_rows, recompute), None, None, None, None, None, None


def divergence(student, teacher, mask, kind, beta, temperature, teacher_is_logits):
    """Per-row losses [N] of student [N, V] against teacher [N, V]; differentiable w.r.t. student.

    kind: 0 generalised JS (beta), 1 KL(teacher || student), 2 entropy of student (teacher unused).
    teacher_is_logits=False: teacher rows are log-probabilities used as given. mask: bool [N] or None.
    """
    if torch.is_grad_enabled() and student.requires_grad:
        return _DivergenceFunction.apply(student, teacher, mask, kind, beta, temperature, teacher_is_logits)
    rows, _ = divergence_rows(student, teacher, mask, kind, beta, temperature, teacher_is_logits, False)
    return rows
