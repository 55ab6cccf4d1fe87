"""center_task_vectors: weighted average of T same-shape tensors and their deviations from it, in one pass."""
from typing import Optional, Sequence, Union

import torch

from .. import reference
from ..dtypes import FLOAT_DTYPES, accumulation_dtype
from .backend import extension_loaded, resolve


def as_tensor_list(thetas, op, name="thetas"):
    """A Tensor[T, *S] or a sequence of T tensors -> list of T tensors (views, never a stacking copy)."""
    if isinstance(thetas, torch.Tensor):
        if thetas.dim() == 0:
            raise ValueError(f"{op}: {name} must be a Tensor[T, ...] or a sequence of tensors, got a 0-d tensor")
        thetas = list(thetas.unbind(0))
    else:
        thetas = list(thetas)
    if len(thetas) == 0:
        raise ValueError(f"{op}: {name} is empty (T = 0); need at least one tensor")
    first = thetas[0]
    for t, theta in enumerate(thetas):
        if not isinstance(theta, torch.Tensor):
            raise ValueError(f"{op}: {name}[{t}] is a {type(theta).__name__}, expected a Tensor")
        if theta.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name}[{t}] has dtype {theta.dtype}; expected one of {FLOAT_DTYPES}")
        if theta.shape != first.shape:
            raise ValueError(f"{op}: {name}[{t}] has shape {tuple(theta.shape)} but {name}[0] has "
                             f"{tuple(first.shape)}")
        if theta.dtype != first.dtype:
            raise ValueError(f"{op}: {name}[{t}] has dtype {theta.dtype} but {name}[0] has {first.dtype}")
        if theta.device != first.device:
            raise ValueError(f"{op}: {name}[{t}] is on {theta.device} but {name}[0] is on {first.device}")
    return thetas


def task_weights(weights, T, dtype, device, op):
    """None -> uniform 1/T; a scalar sequence or Tensor of length T -> float32 (float64 for float64 data)."""
    acc = accumulation_dtype(dtype)
    if weights is None:
        return torch.full((T,), 1.0 / T, dtype=acc, device=device)
    w = torch.as_tensor(weights, dtype=acc).to(device).reshape(-1)
    if w.numel() != T:
        raise ValueError(f"{op}: weights has {w.numel()} entries for T = {T} tensors")
    if not torch.isfinite(w).all():
        raise ValueError(f"{op}: weights must be finite, got {w.tolist()}")
    return w


def center_task_vectors(thetas: Union[torch.Tensor, Sequence[torch.Tensor]], weights=None,
                        out_dtype: Optional[torch.dtype] = None, *, out=None, return_centered: bool = True,
                        backend: str = "auto"):
    """avg = sum_t w_t theta_t (w_t = 1/T by default); centered[t] = theta_t - avg.

    thetas: Tensor[T, *S] or a sequence of T same-shape, same-dtype float tensors (fp16/bf16/fp32/fp64) on
    one device; nothing is stacked (a non-contiguous input is made contiguous on its own). weights: None
    (uniform 1/T), or T numbers / a Tensor[T]. Accumulates in fp32 (fp64 for fp64 inputs) in the order
    t = 0..T-1; each input element is read from memory once, avg and centered are written once.
    Returns (avg [*S], centered [T, *S]) in out_dtype (default: the inputs' dtype; any float dtype). With
    return_centered=False, centered is an empty tensor and only the average is computed.
    out=(avg_buffer, centered_buffer): fill caller buffers of shapes [*S] and [T, *S] (one float dtype, which
    then sets the output dtype; centered_buffer may be None) and return them. centered_buffer may be the
    input stack itself (centered[t] exactly aliasing thetas[t]: centering in place); other overlaps between
    out buffers and inputs are not supported.
    Errors (ValueError): T = 0, non-float or mismatched dtypes, mismatched shapes or devices, weights not of
    length T or not finite, out_dtype not a float dtype, out buffers of the wrong shape, dtype or device.
    """
    op = "center_task_vectors"
    thetas = as_tensor_list(thetas, op)
    T, shape, dtype, device = len(thetas), thetas[0].shape, thetas[0].dtype, thetas[0].device
    out_dtype = out_dtype or dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype {out_dtype} is not a float dtype")
    w = task_weights(weights, T, dtype, device, op)
    be = resolve(backend, device, op)
    if out is None:
        return _functional(be, thetas, w, out_dtype, return_centered)

    avg_buf, cent_buf = _check_out(out, T, shape, device, op)
    if be in ("cpu", "cuda"):
        empty = avg_buf.new_empty(0)
        torch.ops.pymerge.center_task_vectors_out(thetas, w, avg_buf, empty if cent_buf is None else cent_buf)
        return avg_buf, cent_buf
    if be == "triton" and avg_buf.is_contiguous() and (cent_buf is None or cent_buf.is_contiguous()):
        from pymerge.kernels.center import center_task_vectors as triton_center
        return triton_center(thetas, w, out=(avg_buf, cent_buf))
    avg, cent = _functional(be, thetas, w, avg_buf.dtype, cent_buf is not None)
    avg_buf.copy_(avg)
    if cent_buf is not None:
        cent_buf.copy_(cent)
    return avg_buf, cent_buf


def _check_out(out, T, shape, device, op):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"{op}: out must be a pair (avg_buffer, centered_buffer or None)")
    avg_buf, cent_buf = out
    want_cent = (T, *shape)
    if not isinstance(avg_buf, torch.Tensor) or (cent_buf is not None and not isinstance(cent_buf, torch.Tensor)):
        raise ValueError(f"{op}: out buffers must be tensors (centered_buffer may be None)")
    if avg_buf.shape != shape or (cent_buf is not None and cent_buf.shape != want_cent):
        raise ValueError(f"{op}: out buffers have shapes {tuple(avg_buf.shape)}, "
                         f"{None if cent_buf is None else tuple(cent_buf.shape)}; expected {tuple(shape)}"
                         f" and {want_cent}")
    if avg_buf.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out avg buffer has dtype {avg_buf.dtype}; expected one of {FLOAT_DTYPES}")
    if cent_buf is not None and cent_buf.dtype != avg_buf.dtype:
        raise ValueError(f"{op}: out buffers have dtypes {avg_buf.dtype} and {cent_buf.dtype}; they must match")
    for buf in (avg_buf, cent_buf):
        if buf is not None and buf.device != device:
            raise ValueError(f"{op}: out buffer is on {buf.device} but thetas are on {device}")
    return avg_buf, cent_buf


def _functional(be, thetas, w, out_dtype, want_centered):
    if be == "reference":
        return reference.center_task_vectors(thetas, w, out_dtype, want_centered)
    if be == "triton":
        from pymerge.kernels.center import center_task_vectors as triton_center
        return triton_center(thetas, w, out_dtype, want_centered)
    return torch.ops.pymerge.center_task_vectors(thetas, w, out_dtype, want_centered)


if extension_loaded():
    @torch.library.register_fake("pymerge::center_task_vectors")
    def _(thetas, weights, out_dtype=None, centered=True):
        dtype = out_dtype or thetas[0].dtype
        avg = thetas[0].new_empty(thetas[0].shape, dtype=dtype)
        cent = thetas[0].new_empty((len(thetas), *thetas[0].shape) if centered else (0,), dtype=dtype)
        return avg, cent

    @torch.library.register_fake("pymerge::center_task_vectors_out")
    def _(thetas, weights, avg, centered):
        return None
