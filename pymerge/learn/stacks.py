"""The stacked task vectors of a learned merge: merged keys of one (numel, dtype) share a TaskVectorStack, whose
K merged tensors theta_s[k] + Gamma[k] @ delta[k] are one baddbmm (an autograd.Function: no graph over delta,
d Gamma = one GEMV per key)."""
from dataclasses import dataclass
from typing import List

import torch

from ..dtypes import accumulation_dtype


class _MergeGroup(torch.autograd.Function):
    """K same-numel keys at once: out[k] = start[k] + coef[k] @ delta[k] as one baddbmm, returned as K views.

    coef [K, T] (the only input with a gradient), start [K, 1, S] or [1, 1, S], delta [K, T, S].
    backward: d coef[k] = delta[k] @ grad[k] (one GEMV per key, reading delta once; no stacking of the K
    gradients and no autograd graph over delta).
    """

    @staticmethod
    def forward(ctx, coef, start, delta, shapes):
        out = torch.baddbmm(start, coef.unsqueeze(1).to(delta.dtype), delta)      # [K, 1, S]
        ctx.save_for_backward(delta)
        ctx.coef_dtype = coef.dtype
        return tuple(out[k, 0].view(shape) for k, shape in enumerate(shapes))

    @staticmethod
    def backward(ctx, *grads):
        (delta,) = ctx.saved_tensors
        K, T = delta.shape[0], delta.shape[1]
        dcoef = torch.zeros(K, T, dtype=delta.dtype, device=delta.device)
        for k, g in enumerate(grads):
            if g is not None:
                torch.mv(delta[k], g.reshape(-1).to(delta.dtype), out=dcoef[k])
        return dcoef.to(ctx.coef_dtype), None, None, None


@dataclass
class TaskVectorStack:
    """Merged keys of one (numel, dtype): start [K, 1, S], delta [K, T, S], coefficient-group index [K]."""
    keys: List[str]
    shapes: List[torch.Size]
    start: torch.Tensor
    delta: torch.Tensor
    index: torch.Tensor

    def merged(self, coef):
        """The K merged tensors (views, in the keys' shapes) for coefficients coef [K, T]; differentiable
        w.r.t. coef."""
        return _MergeGroup.apply(coef, self.start, self.delta, self.shapes)

    def dense(self, i, row):
        """Key i merged for Gamma row [T], fp32 accumulation (fp64 for fp64), in the key's dtype and shape."""
        acc = accumulation_dtype(self.delta.dtype)
        v = self.start[i, 0].to(acc) + row.to(acc) @ self.delta[i].to(acc)
        return v.to(self.delta.dtype).view(self.shapes[i])
