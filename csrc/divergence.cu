// pymerge::divergence on CUDA: raw kernels and a C-ABI launcher, no torch headers (the glue that turns tensors
// into pointers is in csrc/divergence.cpp under PYMERGE_WITH_CUDA). Every loss term and gradient comes from
// csrc/pymerge/divergence.h, the math the CPU kernel and its tests use.
//
// One block per row, chunked over the vocabulary by the block's threads (consecutive threads read consecutive
// elements: coalesced), in the CPU kernel's three passes:
//   1. per-thread online log-sum-exp of the student (and of teacher logits), merged across the block;
//   2. loss terms and the gradient's row sum (JS: sum q g, KL: sum p, entropy: H), block-summed;
//   3. only with a gradient output: d loss_row / d student in the student's dtype.
// Intermediates never exceed a few registers per thread. fp32 (fp64 for fp64 students) accumulation;
// block reductions go through warp shuffles and one 32-entry shared array.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "pymerge/divergence.h"

namespace {

using namespace pymerge::divergence;

// dtype codes shared with csrc/divergence.cpp.
enum Dtype : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

template <class A> __device__ __forceinline__ A to_acc(float x) { return static_cast<A>(x); }
template <class A> __device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <class A> __device__ __forceinline__ A to_acc(__half x) { return static_cast<A>(__half2float(x)); }
template <class A> __device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <class T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ float zero_of<float>() { return 0.0f; }
template <> __device__ __forceinline__ double zero_of<double>() { return 0.0; }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half_rn(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16_rn(0.0f); }

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Block-wide sum; every thread gets the result. `shared` holds kWarps entries.
template <class A>
__device__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous reduction's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kWarps ? shared[lane] : A(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide merge of per-thread log-sum-exp partials (mx, s) (lse_merge of the shared header).
template <class A>
__device__ void block_lse(A& mx, A& s, A* shared_m, A* shared_s) {
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, mx, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge<A>(mx, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    shared_m[warp] = mx;
    shared_s[warp] = s;
  }
  __syncthreads();
  mx = lane < kWarps ? shared_m[lane] : A(-INFINITY);
  s = lane < kWarps ? shared_s[lane] : A(0);
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, mx, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge<A>(mx, s, m2, s2);
  }
}

// TS: student dtype, TT: teacher dtype, A: accumulator (float, double for fp64 students).
template <class TS, class TT, class A, int KIND>
__global__ void __launch_bounds__(kThreads) divergence_kernel(const TS* __restrict__ student, int64_t s_stride,
                                                              const TT* __restrict__ teacher, int64_t t_stride,
                                                              const bool* __restrict__ mask, int64_t V, A beta,
                                                              A inv_t, int teacher_is_logits, A* __restrict__ rows,
                                                              TS* __restrict__ grad) {
  __shared__ A shared_a[kWarps];
  __shared__ A shared_b[kWarps];
  const int64_t row = blockIdx.x;
  TS* const g = grad != nullptr ? grad + row * V : nullptr;
  if (mask != nullptr && !mask[row]) {  // masked row: loss 0, zero gradient, nothing read
    if (threadIdx.x == 0) rows[row] = A(0);
    if (g != nullptr)
      for (int64_t i = threadIdx.x; i < V; i += kThreads) g[i] = zero_of<TS>();
    return;
  }
  const TS* z = student + row * s_stride;
  const TT* t = KIND == kEntropy ? nullptr : teacher + row * t_stride;
  const bool tl = KIND != kEntropy && teacher_is_logits != 0;
  const A omb = A(1) - beta;

  // Pass 1: log-sum-exps.
  A ms = A(-INFINITY), ss = A(0), mt = A(-INFINITY), st = A(0);
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    lse_push<A>(ms, ss, to_acc<A>(z[i]) * inv_t);
    if (tl) lse_push<A>(mt, st, to_acc<A>(t[i]) * inv_t);
  }
  block_lse<A>(ms, ss, shared_a, shared_b);
  const A lse_s = lse_finish<A>(ms, ss);
  A lse_t = A(0);
  if (tl) {
    block_lse<A>(mt, st, shared_a, shared_b);
    lse_t = lse_finish<A>(mt, st);
  }

  // Pass 2: loss and the gradient's row sum.
  A loss = A(0), rsum = A(0);
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const A logq = to_acc<A>(z[i]) * inv_t - lse_s;
    const A q = ScalarMath::exp(logq);
    if (KIND == kEntropy) {
      loss += entropy_term<ScalarMath>(q, logq);
    } else {
      const A logp = tl ? to_acc<A>(t[i]) * inv_t - lse_t : to_acc<A>(t[i]);
      const A p = ScalarMath::exp(logp);
      if (KIND == kJS) {
        A logm, qg;
        loss += js_term<ScalarMath>(p, logp, q, logq, beta, omb, logm, qg);
        rsum += qg;
      } else {
        loss += kl_term<ScalarMath>(p, logp, logq);
        rsum += p;
      }
    }
  }
  loss = block_sum<A>(loss, shared_a);
  if (KIND != kEntropy) rsum = block_sum<A>(rsum, shared_a);
  if (threadIdx.x == 0) rows[row] = loss;
  if (g == nullptr) return;

  // Pass 3: the gradient.
  const A S = KIND == kEntropy ? loss : rsum;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const A logq = to_acc<A>(z[i]) * inv_t - lse_s;
    const A q = ScalarMath::exp(logq);
    A d;
    if (KIND == kEntropy) {
      d = entropy_grad<ScalarMath>(q, logq, S, inv_t);
    } else {
      const A logp = tl ? to_acc<A>(t[i]) * inv_t - lse_t : to_acc<A>(t[i]);
      const A p = ScalarMath::exp(logp);
      if (KIND == kJS) {
        A logm, qg;
        js_term<ScalarMath>(p, logp, q, logq, beta, omb, logm, qg);
        d = js_grad<ScalarMath>(q, qg, S, inv_t);
      } else {
        d = kl_grad<ScalarMath>(p, q, S, inv_t);
      }
    }
    store_out(g + i, d);
  }
}

template <class TS, class TT, class A>
int launch(const void* student, int64_t s_stride, const void* teacher, int64_t t_stride, const bool* mask,
           int64_t N, int64_t V, int kind, double beta, double inv_t, int teacher_is_logits, void* rows, void* grad,
           cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned>(N)), threads(kThreads);
  const TS* s = static_cast<const TS*>(student);
  const TT* t = static_cast<const TT*>(teacher);
  A* r = static_cast<A*>(rows);
  TS* g = static_cast<TS*>(grad);
  switch (kind) {
    case kJS:
      divergence_kernel<TS, TT, A, kJS><<<blocks, threads, 0, stream>>>(s, s_stride, t, t_stride, mask, V, A(beta),
                                                                       A(inv_t), teacher_is_logits, r, g);
      break;
    case kKL:
      divergence_kernel<TS, TT, A, kKL><<<blocks, threads, 0, stream>>>(s, s_stride, t, t_stride, mask, V, A(beta),
                                                                       A(inv_t), teacher_is_logits, r, g);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

template <class TS, class A>
int launch_entropy(const void* student, int64_t s_stride, const bool* mask, int64_t N, int64_t V, double inv_t,
                   void* rows, void* grad, cudaStream_t stream) {
  divergence_kernel<TS, TS, A, kEntropy><<<dim3(static_cast<unsigned>(N)), dim3(kThreads), 0, stream>>>(
      static_cast<const TS*>(student), s_stride, nullptr, 0, mask, V, A(0.5), A(inv_t), 0, static_cast<A*>(rows),
      static_cast<TS*>(grad));
  return static_cast<int>(cudaGetLastError());
}

template <class TS, class A>
int dispatch_teacher(const void* student, int64_t s_stride, const void* teacher, int t_dtype, int64_t t_stride,
                     const bool* mask, int64_t N, int64_t V, int kind, double beta, double inv_t,
                     int teacher_is_logits, void* rows, void* grad, cudaStream_t stream) {
  if (kind == kEntropy) return launch_entropy<TS, A>(student, s_stride, mask, N, V, inv_t, rows, grad, stream);
  switch (t_dtype) {
    case kF16:
      return launch<TS, __half, A>(student, s_stride, teacher, t_stride, mask, N, V, kind, beta, inv_t,
                                   teacher_is_logits, rows, grad, stream);
    case kBF16:
      return launch<TS, __nv_bfloat16, A>(student, s_stride, teacher, t_stride, mask, N, V, kind, beta, inv_t,
                                          teacher_is_logits, rows, grad, stream);
    case kF32:
      return launch<TS, float, A>(student, s_stride, teacher, t_stride, mask, N, V, kind, beta, inv_t,
                                  teacher_is_logits, rows, grad, stream);
    case kF64:
      return launch<TS, double, A>(student, s_stride, teacher, t_stride, mask, N, V, kind, beta, inv_t,
                                   teacher_is_logits, rows, grad, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

// student [N, V] (row stride s_stride, unit column stride), teacher likewise (ignored for entropy);
// mask: bool [N] or nullptr; rows: [N] float (double for an fp64 student); grad: [N, V] contiguous in the
// student's dtype, or nullptr for the loss only. dtype codes: 0 fp16, 1 bf16, 2 fp32, 3 fp64.
// Returns 0 or a cudaError_t.
extern "C" int pymerge_divergence_cuda(const void* student, int s_dtype, int64_t s_stride, const void* teacher,
                                       int t_dtype, int64_t t_stride, const bool* mask, int64_t N, int64_t V,
                                       int kind, double beta, double inv_t, int teacher_is_logits, void* rows,
                                       void* grad, void* stream) {
  if (N == 0) return 0;
  if (N > 2147483647ll || V <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (s_dtype) {
    case kF16:
      return dispatch_teacher<__half, float>(student, s_stride, teacher, t_dtype, t_stride, mask, N, V, kind, beta,
                                             inv_t, teacher_is_logits, rows, grad, s);
    case kBF16:
      return dispatch_teacher<__nv_bfloat16, float>(student, s_stride, teacher, t_dtype, t_stride, mask, N, V, kind,
                                                    beta, inv_t, teacher_is_logits, rows, grad, s);
    case kF32:
      return dispatch_teacher<float, float>(student, s_stride, teacher, t_dtype, t_stride, mask, N, V, kind, beta,
                                            inv_t, teacher_is_logits, rows, grad, s);
    case kF64:
      return dispatch_teacher<double, double>(student, s_stride, teacher, t_dtype, t_stride, mask, N, V, kind, beta,
                                              inv_t, teacher_is_logits, rows, grad, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
