// center_task_vectors on CUDA: raw kernels behind a C-ABI launcher (no torch headers; the torch glue is in
// csrc/center.cpp under PYMERGE_WITH_CUDA). Per-element math and dtype conversions come from
// pymerge/center.h, the same functions the CPU kernel (and its tests) use.
//
// One pass over the flat element range: each thread owns VEC consecutive elements (16-byte loads when every
// input is 16-byte aligned and rows stay aligned, else VEC = 1), accumulates sum_t w_t x_t in registers
// (fp32; fp64 for fp64 inputs) in the order t = 0..T-1, then writes centered[t] = x_t - avg, re-reading x_t
// from L1/L2 (just loaded by the same thread), and the average last. Input pointers and weights come as
// device arrays, so any T works with one launch.
#include <cuda_runtime.h>
#include <stdint.h>

#include "pymerge/center.h"

namespace {

using pymerge::center::accumulate;
using pymerge::center::bf16_bits_to_float;
using pymerge::center::deviation;
using pymerge::center::first_term;
using pymerge::center::float_to_bf16_bits;
using pymerge::center::float_to_half_bits;
using pymerge::center::half_bits_to_float;

// Storage types: fp16 / bf16 as raw bits, converted by the shared header.
struct f16 { uint16_t x; };
struct bf16 { uint16_t x; };

template <class In> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float load1(f16 v) { return half_bits_to_float(v.x); }
__device__ __forceinline__ float load1(bf16 v) { return bf16_bits_to_float(v.x); }
__device__ __forceinline__ float load1(float v) { return v; }
__device__ __forceinline__ double load1(double v) { return v; }

// fp64 -> fp16 / bf16 rounds through fp32, as torch's .to() and the CPU kernel do.
template <class Out> struct Store;
template <> struct Store<f16> {
  template <class A> __device__ static f16 from(A a) { return f16{float_to_half_bits(static_cast<float>(a))}; }
};
template <> struct Store<bf16> {
  template <class A> __device__ static bf16 from(A a) { return bf16{float_to_bf16_bits(static_cast<float>(a))}; }
};
template <> struct Store<float> {
  template <class A> __device__ static float from(A a) { return static_cast<float>(a); }
};
template <> struct Store<double> {
  template <class A> __device__ static double from(A a) { return static_cast<double>(a); }
};

constexpr int align_of_pack(int bytes) { return bytes >= 16 ? 16 : bytes; }

// VEC elements moved as one (or, past 16 bytes, a few) vector memory instructions.
template <class S, int VEC>
struct alignas(align_of_pack(static_cast<int>(sizeof(S)) * VEC)) Pack {
  S v[VEC];
};

template <class In, class Out, int VEC>
__global__ void center_kernel(const In* const* __restrict__ xs, const typename AccOf<In>::type* __restrict__ w,
                              int64_t T, int64_t groups, int64_t numel, Out* __restrict__ avg, Out* __restrict__ cent) {
  using Acc = typename AccOf<In>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t i = g * VEC;
    Acc acc[VEC];
    {
      const Pack<In, VEC> x = *reinterpret_cast<const Pack<In, VEC>*>(xs[0] + i);
      const Acc w0 = w[0];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = first_term(w0, static_cast<Acc>(load1(x.v[j])));
    }
    for (int64_t t = 1; t < T; ++t) {
      const Pack<In, VEC> x = *reinterpret_cast<const Pack<In, VEC>*>(xs[t] + i);
      const Acc wt = w[t];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = accumulate(acc[j], wt, static_cast<Acc>(load1(x.v[j])));
    }
    if (cent != nullptr) {
      for (int64_t t = 0; t < T; ++t) {
        const Pack<In, VEC> x = *reinterpret_cast<const Pack<In, VEC>*>(xs[t] + i);
        Pack<Out, VEC> y;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          y.v[j] = Store<Out>::from(deviation(static_cast<Acc>(load1(x.v[j])), acc[j]));
        *reinterpret_cast<Pack<Out, VEC>*>(cent + t * numel + i) = y;
      }
    }
    Pack<Out, VEC> a;
#pragma unroll
    for (int j = 0; j < VEC; ++j) a.v[j] = Store<Out>::from(acc[j]);
    *reinterpret_cast<Pack<Out, VEC>*>(avg + i) = a;
  }
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <class In, class Out>
int launch(const void* const* thetas, const void* weights, int64_t T, int64_t numel, void* avg, void* centered,
           bool inputs_aligned16, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(In));
  constexpr int64_t kOutAlign = align_of_pack(static_cast<int>(sizeof(Out)) * kVec);
  // 16-byte loads need every input and every centered row aligned: all inputs 16-byte aligned (checked by the
  // caller, which holds the host copies of the pointers), and numel a multiple of the vector width.
  const bool vec = inputs_aligned16 && numel % kVec == 0 && aligned(avg, kOutAlign) &&
                   (centered == nullptr || aligned(centered, kOutAlign));
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t groups = vec ? numel / kVec : numel;
  const int threads = 256;
  int64_t blocks = (groups + threads - 1) / threads;
  const int64_t max_blocks = static_cast<int64_t>(sms) * 16;  // enough to fill every SM; the rest is grid-stride
  if (blocks > max_blocks) blocks = max_blocks;
  const auto* w = static_cast<const typename AccOf<In>::type*>(weights);
  const auto* xs = reinterpret_cast<const In* const*>(thetas);
  if (vec)
    center_kernel<In, Out, kVec><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        xs, w, T, groups, numel, static_cast<Out*>(avg), static_cast<Out*>(centered));
  else
    center_kernel<In, Out, 1><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        xs, w, T, groups, numel, static_cast<Out*>(avg), static_cast<Out*>(centered));
  return static_cast<int>(cudaGetLastError());
}

template <class In>
int launch_out(int out_dtype, const void* const* thetas, const void* weights, int64_t T, int64_t numel, void* avg,
               void* centered, bool inputs_aligned16, cudaStream_t stream) {
  switch (out_dtype) {
    case 0: return launch<In, f16>(thetas, weights, T, numel, avg, centered, inputs_aligned16, stream);
    case 1: return launch<In, bf16>(thetas, weights, T, numel, avg, centered, inputs_aligned16, stream);
    case 2: return launch<In, float>(thetas, weights, T, numel, avg, centered, inputs_aligned16, stream);
    case 3: return launch<In, double>(thetas, weights, T, numel, avg, centered, inputs_aligned16, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

// thetas: device array of T input pointers (numel elements each, dtype in_dtype); weights: device array of T
// accumulators (float; double for fp64 inputs); avg: numel outputs; centered: T * numel outputs or nullptr.
// dtype codes: 0 fp16, 1 bf16, 2 fp32, 3 fp64. inputs_aligned16: every input pointer is 16-byte aligned.
// Returns 0 or the cudaError_t of the launch.
extern "C" int pymerge_center_task_vectors_cuda(const void* const* thetas, const void* weights, int64_t T,
                                                int64_t numel, int in_dtype, int out_dtype, void* avg,
                                                void* centered, int inputs_aligned16, void* stream) {
  if (numel == 0) return 0;
  if (T <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool a16 = inputs_aligned16 != 0;
  switch (in_dtype) {
    case 0: return launch_out<f16>(out_dtype, thetas, weights, T, numel, avg, centered, a16, s);
    case 1: return launch_out<bf16>(out_dtype, thetas, weights, T, numel, avg, centered, a16, s);
    case 2: return launch_out<float>(out_dtype, thetas, weights, T, numel, avg, centered, a16, s);
    case 3: return launch_out<double>(out_dtype, thetas, weights, T, numel, avg, centered, a16, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
