"""Triton kernels of center_task_vectors: avg = sum_t w_t theta_t, centered[t] = theta_t - avg.

Reached through pymerge.ops.center_task_vectors(..., backend="triton"). One program handles BLOCK elements of
the flattened range: it accumulates the weighted sum in fp32 (fp64 for fp64 inputs) in the order t = 0..T-1
(first term a product, then fused multiply-adds, as the C++ and CUDA kernels do), writes the average and then
centered[t] = x_t - avg, re-reading x_t's block while it is still in L1/L2.

How the T inputs reach the kernel (no stacking copy in any case):
- stacked: the inputs are rows of one storage with a constant pointer step (e.g. a Tensor[T, ...] unbound by
  the wrapper) -> one base pointer and a row stride, a runtime loop over t: one launch, one pass, any T, one
  compiled kernel for every T.
- pointer tuple: otherwise up to MAX_POINTERS separate tensors go in one launch as a tuple of pointers
  (unrolled at compile time; one compiled kernel per T): one pass.
- more than MAX_POINTERS separate tensors: groups of MAX_POINTERS accumulate into an fp32 buffer across
  launches, then a second sweep writes centered group by group. The inputs are then read twice (the only
  case that is not one pass); stack them yourself (or pass a Tensor[T, ...]) to get one pass.
A non-contiguous input is made contiguous on its own first (one copy of that tensor only).
"""
import torch
import triton
import triton.language as tl

MAX_POINTERS = 16
BLOCK = 1024


@triton.jit
def _to_bf16(v):
    """fp32 -> bf16 rounding to nearest even, NaN -> 0x7fc0: the integer math of pymerge/center.h
    (float_to_bf16_bits). Spelled out because the interpreter's own cast truncates; on a GPU it costs a few
    integer ops and keeps Triton, C++ and CUDA bit-identical."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load(ptr, mask, ACC: tl.constexpr):
    """Load and widen to the accumulator type; bf16 widens as a 16-bit shift (exact for subnormals, which the
    interpreter's own cast is not)."""
    x = tl.load(ptr, mask=mask, other=0)
    if ptr.dtype.element_ty == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC)


@triton.jit
def _store_out(ptr, v, mask, NARROW: tl.constexpr):
    # fp64 sums reach fp16/bf16 through fp32 (as torch's .to() and the C++/CUDA kernels do).
    if NARROW:
        v = v.to(tl.float32)
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _to_bf16(v), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _center_stacked_kernel(x_ptr, row_stride, w_ptr, avg_ptr, cent_ptr, N, T,
                           ACC: tl.constexpr, NARROW: tl.constexpr, WANT_CENTERED: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    stride = row_stride + tl.zeros([], tl.int64)       # int64 row offsets (also when specialised to 1)
    acc = tl.load(w_ptr).to(ACC) * _load(x_ptr + offs, mask, ACC)
    for t in range(1, T):
        x = _load(x_ptr + t * stride + offs, mask, ACC)
        acc = tl.fma(tl.load(w_ptr + t).to(ACC), x, acc)
    if WANT_CENTERED:
        n64 = N + tl.zeros([], tl.int64)
        for t in range(0, T):
            x = _load(x_ptr + t * stride + offs, mask, ACC)
            _store_out(cent_ptr + t * n64 + offs, x - acc, mask, NARROW)
    _store_out(avg_ptr + offs, acc, mask, NARROW)


@triton.jit
def _center_tuple_kernel(xs, w_ptr, avg_ptr, cent_ptr, acc_ptr, N,
                         NT: tl.constexpr, ACC: tl.constexpr, NARROW: tl.constexpr, ACCUMULATE: tl.constexpr,
                         FINISH: tl.constexpr, WANT_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """Sum over the NT pointers of xs. ACCUMULATE: add to (and FINISH=False: store into) the fp32 buffer
    acc_ptr across launches; FINISH: the sum is complete -> write avg and, if WANT_CENTERED, centered."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if ACCUMULATE:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0)
        acc = tl.fma(tl.load(w_ptr).to(ACC), _load(xs[0] + offs, mask, ACC), acc)
    else:
        acc = tl.load(w_ptr).to(ACC) * _load(xs[0] + offs, mask, ACC)
    for t in tl.static_range(1, NT):
        x = _load(xs[t] + offs, mask, ACC)
        acc = tl.fma(tl.load(w_ptr + t).to(ACC), x, acc)
    if FINISH:
        if WANT_CENTERED:
            n64 = N + tl.zeros([], tl.int64)
            for t in tl.static_range(NT):
                x = _load(xs[t] + offs, mask, ACC)
                _store_out(cent_ptr + t * n64 + offs, x - acc, mask, NARROW)
        _store_out(avg_ptr + offs, acc, mask, NARROW)
    else:
        tl.store(acc_ptr + offs, acc, mask=mask)


@triton.jit
def _center_subtract_kernel(xs, acc_ptr, avg_ptr, cent_ptr, N, NT: tl.constexpr, WRITE_AVG: tl.constexpr,
                            ACC: tl.constexpr, NARROW: tl.constexpr, BLOCK: tl.constexpr):
    """With the finished sum in the buffer acc_ptr: centered rows of one group = x_t - acc (NT of them), and
    the average itself if WRITE_AVG."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    if WRITE_AVG:
        _store_out(avg_ptr + offs, acc, mask, NARROW)
    n64 = N + tl.zeros([], tl.int64)
    for t in tl.static_range(NT):
        x = _load(xs[t] + offs, mask, ACC)
        _store_out(cent_ptr + t * n64 + offs, x - acc, mask, NARROW)


def _row_stride(thetas):
    """Element step between consecutive inputs if they are rows of one storage with a constant step, else None."""
    first = thetas[0]
    if len(thetas) < 2 or not all(t.is_contiguous() for t in thetas):
        return None
    base = first.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != base for t in thetas):
        return None
    step = thetas[1].data_ptr() - first.data_ptr()
    es = first.element_size()
    if step % es != 0 or any(thetas[t].data_ptr() - thetas[t - 1].data_ptr() != step for t in range(2, len(thetas))):
        return None
    return step // es


def center_task_vectors(thetas, weights, out_dtype=None, want_centered=True, *, out=None):
    """thetas: list of T same-shape, same-dtype tensors [*S] on one device (fp16/bf16/fp32/fp64);
    weights: [T] (cast to fp32, fp64 for fp64 inputs). Returns (avg [*S], centered [T, *S] or an empty tensor
    when want_centered=False) in out_dtype (default: the inputs' dtype). out=(avg, centered): contiguous
    buffers of the right shapes to fill instead (centered may be None)."""
    T, shape, dtype, device = len(thetas), thetas[0].shape, thetas[0].dtype, thetas[0].device
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if dtype == torch.float64 else tl.float32
    if out is not None:
        avg, cent = out
        want_centered = cent is not None
    else:
        out_dtype = out_dtype or dtype
        avg = torch.empty(shape, dtype=out_dtype, device=device)
        cent = torch.empty((T, *shape) if want_centered else (0,), dtype=out_dtype, device=device)
    N = avg.numel()
    if N == 0:
        return avg, cent
    thetas = [t.contiguous() for t in thetas]
    w = weights.to(device=device, dtype=acc_dtype).contiguous()
    narrow = avg.element_size() < 4
    cent_arg = cent if want_centered else avg      # never written when WANT_CENTERED is False
    grid = (triton.cdiv(N, BLOCK),)

    step = _row_stride(thetas)
    if T == 1 or step is not None:
        _center_stacked_kernel[grid](thetas[0], step or 0, w, avg, cent_arg, N, T,
                                     ACC=acc_tl, NARROW=narrow, WANT_CENTERED=want_centered, BLOCK=BLOCK)
    elif T <= MAX_POINTERS:
        _center_tuple_kernel[grid](tuple(thetas), w, avg, cent_arg, avg, N, NT=T, ACC=acc_tl, NARROW=narrow,
                                   ACCUMULATE=False, FINISH=True, WANT_CENTERED=want_centered, BLOCK=BLOCK)
    else:
        acc = torch.empty(N, dtype=acc_dtype, device=device)
        starts = range(0, T, MAX_POINTERS)
        for t0 in starts:                        # first sweep: the weighted sum into acc, group by group
            group = tuple(thetas[t0:t0 + MAX_POINTERS])
            _center_tuple_kernel[grid](group, w[t0:], avg, avg, acc, N, NT=len(group), ACC=acc_tl, NARROW=narrow,
                                       ACCUMULATE=t0 > 0, FINISH=False, WANT_CENTERED=False, BLOCK=BLOCK)
        for t0 in starts:                        # second sweep: avg, then centered group by group
            group = tuple(thetas[t0:t0 + MAX_POINTERS])
            _center_subtract_kernel[grid](group, acc, avg, cent_arg[t0:] if want_centered else avg, N,
                                          NT=len(group) if want_centered else 0, WRITE_AVG=t0 == 0,
                                          ACC=acc_tl, NARROW=narrow, BLOCK=BLOCK)
            if not want_centered:
                break
    return avg, cent
