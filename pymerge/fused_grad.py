"""The backward of pymerge's fused-gradient divergence kernels, shared by both of their autograd wrappers: the
C++/CUDA op's register_autograd (pymerge.ops.divergence) and the Triton autograd.Function
(pymerge.kernels.divergence). It lives below both, so neither imports the other."""
import torch


def scale_saved_grad(ctx, grad_rows, recompute):
    """Backward of the fused op: d loss / d student = grad * grad_rows[:, None].

    grad is the gradient the forward's sweep computed, held as ctx.pymerge_grad (a detached alias: nothing
    else references it, the wrappers drop the op's gradient output). It is scaled in place and ctx lets go of
    it first, so backward allocates no second N x V buffer and autograd adopts the result as student.grad
    without a copy. A second backward through a retained graph (retain_graph=True, gradcheck) finds the buffer
    gone and calls recompute() for a fresh gradient from the saved inputs.
    The scale is applied in fp32 / fp64 and rounded once into the gradient's dtype: a uniform scale (the
    "mean" and "sum" reductions: an expanded scalar) as a 0-dim tensor, which torch's kernels read in their
    compute precision; per-row scales of a bf16 / fp16 gradient block by block (a whole-tensor mixed-dtype
    in-place multiply would make fp32 copies of the gradient). An upstream gradient of exactly 1 (CPU) skips
    the multiply; with create_graph=True or under torch.compile the multiply is out of place.
    """
    grad = ctx.pymerge_grad
    ctx.pymerge_grad = None
    if grad is None:
        grad = recompute()
    if grad_rows is None or grad.numel() == 0:
        return grad if grad_rows is not None else torch.zeros_like(grad)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return (grad.to(grad_rows.dtype) * grad_rows.unsqueeze(-1)).to(grad.dtype)
    on_cpu = grad_rows.device.type == "cpu"
    if grad_rows.stride(0) == 0 or (on_cpu and bool((grad_rows == grad_rows[0]).all())):
        first = grad_rows[0]
        if on_cpu and float(first) == 1.0:
            return grad
        return grad.mul_(first)
    if grad.dtype == grad_rows.dtype:
        return grad.mul_(grad_rows.unsqueeze(-1))
    step = max(1, (1 << 20) // grad.shape[-1])
    for i in range(0, grad.shape[0], step):
        block = grad[i:i + step]
        block.copy_(block.to(grad_rows.dtype).mul_(grad_rows[i:i + step].unsqueeze(-1)))
    return grad
