// center_task_vectors on CPU (AVX2 baseline, AVX-512 chosen at run time) and, when built with CUDA, the glue
// to the raw CUDA kernel in csrc/center.cu.
//
//   avg = sum_t w_t theta_t,  centered[t] = theta_t - avg      (schemas in csrc/ops.cpp)
//
// One pass: the flat element range is split into ranges processed in parallel (at::parallel_for); within a
// range, blocks of two cache lines per input are accumulated in fp32 registers (fp64 for fp64 inputs), then
// centered[t] re-reads input t's block from L1, so every input element is read from memory once and every
// output element written once (csrc/pymerge/center_cpu.h). Outputs larger than half the last-level
// cache are written with streaming stores (measured at T = 8, 16M fp32: 1.6x faster than cached stores).
//
// Inputs are a list of T tensors, never stacked. A non-contiguous input is made contiguous on its own (one
// copy of that tensor only): weights of a checkpoint and rows of a stacked Tensor[T, ...] are contiguous, and
// a contiguous copy keeps the kernel a flat, vectorisable sweep instead of a strided gather per element.
// Non-contiguous out= buffers are filled through a contiguous temporary and copied back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "pymerge/cpu_isa.h"
#include "pymerge/center.h"

namespace pymerge {
namespace center {
namespace {

// Vectors per register block: enough for two cache lines of each input per block (see center_cpu.h).
constexpr int64_t unroll(int64_t vector_bytes) { return vector_bytes >= 128 ? 1 : 128 / vector_bytes; }
// How far ahead of the block each input stream is prefetched (measured: 1-2 KiB best, 4 KiB+ worse).
constexpr int64_t kPrefetchBytes = 2048;
// Parallel work is split at multiples of kUnit elements, so every task starts on a cache line of every output.
constexpr int64_t kUnit = 1024;

struct CenterArgs {
  const void* const* thetas;  // T pointers to numel elements each
  const void* weights;        // T accumulators (float, or double for fp64 inputs)
  int64_t T;
  int64_t numel;
  void* avg;       // numel outputs
  void* centered;  // T * numel outputs, or nullptr
};

// Scalar element access through the shared math of pymerge/center.h (c10 Half / BFloat16 hold the raw bits).
inline float load1(const c10::Half* p) { return half_bits_to_float(p->x); }
inline float load1(const c10::BFloat16* p) { return bf16_bits_to_float(p->x); }
inline float load1(const float* p) { return *p; }
inline double load1(const double* p) { return *p; }
// fp64 -> fp16/bf16 rounds through fp32 exactly as torch's .to() does.
template <class A> inline void store1(c10::Half* p, A v) { p->x = float_to_half_bits(static_cast<float>(v)); }
template <class A> inline void store1(c10::BFloat16* p, A v) { p->x = float_to_bf16_bits(static_cast<float>(v)); }
template <class A> inline void store1(float* p, A v) { *p = static_cast<float>(v); }
template <class A> inline void store1(double* p, A v) { *p = static_cast<double>(v); }

// Fills elements [lo, hi) of avg and centered: one instantiation of process_range (center_cpu.h).
using RangeFn = void (*)(const CenterArgs&, int64_t lo, int64_t hi);

// --------------------------------------------------------------------------------- AVX2 (x86-64-v3)
namespace avx2 {
struct Vec {
  using Acc = float;
  using V = __m256;
  static constexpr int64_t W = 8;
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V w, V x, V acc) { return _mm256_fmadd_ps(w, x, acc); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const c10::BFloat16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }

  template <bool NT> static void store(float* p, V v) {
    if (NT) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
  }
  template <bool NT> static void store(double* p, V v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    if (NT) { _mm256_stream_pd(p, lo); _mm256_stream_pd(p + 4, hi); }
    else { _mm256_storeu_pd(p, lo); _mm256_storeu_pd(p + 4, hi); }
  }
  template <bool NT> static void store16(void* p, __m128i h) {
    if (NT) _mm_stream_si128(static_cast<__m128i*>(p), h); else _mm_storeu_si128(static_cast<__m128i*>(p), h);
  }
  template <bool NT> static void store(c10::Half* p, V v) {
    store16<NT>(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // bf16: round to nearest even on the bits, NaN -> 0x7fc0 (float_to_bf16_bits, eight lanes at a time).
  template <bool NT> static void store(c10::BFloat16* p, V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // packus works within 128-bit lanes: [r0..3 r0..3 | r4..7 r4..7]; gather qwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    store16<NT>(p, _mm256_castsi256_si128(packed));
  }
};
#include "pymerge/center_cpu.h"
}  // namespace avx2

// --------------------------------------------------------------------------- AVX-512 (run-time choice)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// GCC 12's own AVX-512 headers trip -Wmaybe-uninitialized (_mm256_undefined_si256 is `__Y = __Y`; GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
struct Vec {
  using Acc = float;
  using V = __m512;
  static constexpr int64_t W = 16;
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V w, V x, V acc) { return _mm512_fmadd_ps(w, x, acc); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const c10::BFloat16* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }

  template <bool NT> static void store(float* p, V v) {
    if (NT) _mm512_stream_ps(p, v); else _mm512_storeu_ps(p, v);
  }
  template <bool NT> static void store(double* p, V v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    if (NT) { _mm512_stream_pd(p, lo); _mm512_stream_pd(p + 8, hi); }
    else { _mm512_storeu_pd(p, lo); _mm512_storeu_pd(p + 8, hi); }
  }
  template <bool NT> static void store32(void* p, __m256i h) {
    if (NT) _mm256_stream_si256(static_cast<__m256i*>(p), h); else _mm256_storeu_si256(static_cast<__m256i*>(p), h);
  }
  template <bool NT> static void store(c10::Half* p, V v) {
    store32<NT>(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  template <bool NT> static void store(c10::BFloat16* p, V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    store32<NT>(p, _mm512_cvtepi32_epi16(r));
  }
};
#include "pymerge/center_cpu.h"
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

// ------------------------------------------------------------------ fp64 inputs (compiler-vectorised)
namespace f64 {
struct Vec {
  using Acc = double;
  using V = double;
  static constexpr int64_t W = 1;
  static V set1(double a) { return a; }
  static V mul(V a, V b) { return first_term(a, b); }
  static V fma(V w, V x, V acc) { return accumulate(acc, w, x); }
  static V sub(V a, V b) { return deviation(a, b); }
  static V load(const double* p) { return *p; }
  template <bool NT, class Out> static void store(Out* p, V v) { store1(p, v); }  // no streaming stores
};
#include "pymerge/center_cpu.h"
}  // namespace f64

// ------------------------------------------------------------------------------------------ dispatch
// Outputs larger than this bypass the caches (streaming stores): they cannot stay cached anyway, and skipping
// the read-for-ownership of every output line saves a third of the memory traffic. Smaller outputs are left in
// cache for the caller (the next op usually reads them at once).
int64_t streaming_threshold_bytes() {
  const char* env = std::getenv("PYMERGE_CENTER_NT_BYTES");
  if (env != nullptr) return std::atoll(env);
  static const int64_t llc = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return static_cast<int64_t>(l3 > 0 ? l3 : (l2 > 0 ? l2 : (8l << 20)));
  }();
  return llc / 2;
}

template <class In, class Out>
RangeFn pick_float(bool nt, bool wide) {
  if (wide) return nt ? avx512::process_range<true, In, Out> : avx512::process_range<false, In, Out>;
  return nt ? avx2::process_range<true, In, Out> : avx2::process_range<false, In, Out>;
}

template <class In>
RangeFn pick_out(at::ScalarType out, bool nt, bool wide) {
  switch (out) {
    case at::kHalf: return pick_float<In, c10::Half>(nt, wide);
    case at::kBFloat16: return pick_float<In, c10::BFloat16>(nt, wide);
    case at::kFloat: return pick_float<In, float>(nt, wide);
    case at::kDouble: return pick_float<In, double>(nt, wide);
    default: TORCH_CHECK(false, "center_task_vectors: unsupported output dtype ", out);
  }
}

template <class Out>
RangeFn pick_f64(bool nt) {
  return nt ? f64::process_range<true, double, Out> : f64::process_range<false, double, Out>;
}

RangeFn pick(at::ScalarType in, at::ScalarType out, bool nt) {
  const bool wide = use_avx512();
  switch (in) {
    case at::kHalf: return pick_out<c10::Half>(out, nt, wide);
    case at::kBFloat16: return pick_out<c10::BFloat16>(out, nt, wide);
    case at::kFloat: return pick_out<float>(out, nt, wide);
    case at::kDouble:
      switch (out) {
        case at::kHalf: return pick_f64<c10::Half>(nt);
        case at::kBFloat16: return pick_f64<c10::BFloat16>(nt);
        case at::kFloat: return pick_f64<float>(nt);
        case at::kDouble: return pick_f64<double>(nt);
        default: break;
      }
      [[fallthrough]];
    default: TORCH_CHECK(false, "center_task_vectors: unsupported dtypes ", in, " -> ", out);
  }
}

// ------------------------------------------------------------------------------------- validation
bool is_float(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

at::ScalarType acc_type(at::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::TensorList thetas, const at::Tensor& weights) {
  TORCH_CHECK(!thetas.empty(), "center_task_vectors: thetas is empty (T = 0)");
  const auto& first = thetas[0];
  TORCH_CHECK(is_float(first.scalar_type()), "center_task_vectors: thetas have non-float dtype ",
              first.scalar_type());
  for (size_t t = 1; t < thetas.size(); ++t) {
    TORCH_CHECK(thetas[t].sizes() == first.sizes(), "center_task_vectors: thetas[", t, "] has shape ",
                thetas[t].sizes(), " but thetas[0] has ", first.sizes());
    TORCH_CHECK(thetas[t].scalar_type() == first.scalar_type(), "center_task_vectors: thetas[", t,
                "] has dtype ", thetas[t].scalar_type(), " but thetas[0] has ", first.scalar_type());
    TORCH_CHECK(thetas[t].device() == first.device(), "center_task_vectors: thetas[", t, "] is on ",
                thetas[t].device(), " but thetas[0] is on ", first.device());
  }
  TORCH_CHECK(weights.numel() == static_cast<int64_t>(thetas.size()), "center_task_vectors: weights has ",
              weights.numel(), " entries for T = ", thetas.size(), " tensors");
}

std::vector<int64_t> stacked_shape(int64_t T, at::IntArrayRef shape) {
  std::vector<int64_t> s{T};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

void check_outputs(const at::TensorList thetas, const at::Tensor& avg, const at::Tensor& centered) {
  const auto& first = thetas[0];
  TORCH_CHECK(avg.device() == first.device() && centered.device() == first.device(),
              "center_task_vectors_out: out buffers must be on ", first.device());
  TORCH_CHECK(is_float(avg.scalar_type()), "center_task_vectors_out: avg buffer has non-float dtype ",
              avg.scalar_type());
  TORCH_CHECK(avg.sizes() == first.sizes(), "center_task_vectors_out: avg buffer has shape ", avg.sizes(),
              "; expected ", first.sizes());
  if (centered.numel() > 0 || centered.dim() > 1) {
    TORCH_CHECK(centered.scalar_type() == avg.scalar_type(), "center_task_vectors_out: centered buffer has ",
                "dtype ", centered.scalar_type(), " but avg buffer has ", avg.scalar_type());
    TORCH_CHECK(centered.sizes() == at::IntArrayRef(stacked_shape(thetas.size(), first.sizes())),
                "center_task_vectors_out: centered buffer has shape ", centered.sizes(), "; expected [",
                thetas.size(), ", ", first.sizes(), "]");
  }
}

// Fills contiguous avg (and centered, if defined) from contiguous thetas.
void center_contiguous_cpu(const std::vector<at::Tensor>& thetas, const at::Tensor& weights, at::Tensor& avg,
                           at::Tensor* centered) {
  const int64_t T = static_cast<int64_t>(thetas.size()), numel = avg.numel();
  if (numel == 0) return;
  std::vector<const void*> ptrs(T);
  for (int64_t t = 0; t < T; ++t) ptrs[t] = thetas[t].data_ptr();
  const at::Tensor w = weights.to(at::kCPU, acc_type(thetas[0].scalar_type())).contiguous();
  const CenterArgs args{ptrs.data(), w.data_ptr(), T, numel, avg.data_ptr(),
                        centered != nullptr ? centered->data_ptr() : nullptr};
  // Streaming stores need every output stream on a cache-line boundary at each block: true for torch's
  // 64-byte aligned allocations when a centered row is a whole number of lines.
  const int64_t es = avg.element_size(), out_bytes = (centered != nullptr ? T + 1 : 1) * numel * es;
  const bool aligned = reinterpret_cast<uintptr_t>(avg.data_ptr()) % 64 == 0 &&
                       (centered == nullptr || (reinterpret_cast<uintptr_t>(centered->data_ptr()) % 64 == 0 &&
                                                numel * es % 64 == 0));
  const bool streaming = aligned && out_bytes > streaming_threshold_bytes();
  const RangeFn fn = pick(thetas[0].scalar_type(), avg.scalar_type(), streaming);
  const int64_t units = (numel + kUnit - 1) / kUnit;
  // 64 units (64K elements) per task at least keeps thread start-up negligible next to the work.
  at::parallel_for(0, units, 64, [&](int64_t b, int64_t e) { fn(args, b * kUnit, std::min(e * kUnit, numel)); });
}

std::vector<at::Tensor> contiguous_all(const at::TensorList thetas) {
  std::vector<at::Tensor> xs;
  xs.reserve(thetas.size());
  for (const auto& x : thetas) xs.push_back(x.contiguous());
  return xs;
}

// Fills contiguous avg (and *centered unless null) from contiguous thetas: the CPU or the CUDA kernel.
using Fill = void (*)(const std::vector<at::Tensor>&, const at::Tensor&, at::Tensor&, at::Tensor*);

std::tuple<at::Tensor, at::Tensor> center_functional(at::TensorList thetas, const at::Tensor& weights,
                                                     std::optional<at::ScalarType> out_dtype, bool want_centered,
                                                     Fill fill) {
  check_inputs(thetas, weights);
  const auto out = out_dtype.value_or(thetas[0].scalar_type());
  TORCH_CHECK(is_float(out), "center_task_vectors: out_dtype ", out, " is not a float dtype");
  const auto xs = contiguous_all(thetas);
  const auto opts = thetas[0].options().dtype(out);
  at::Tensor avg = at::empty(thetas[0].sizes(), opts);
  at::Tensor cent = want_centered ? at::empty(stacked_shape(thetas.size(), thetas[0].sizes()), opts)
                                  : at::empty({0}, opts);
  fill(xs, weights, avg, want_centered ? &cent : nullptr);
  return {avg, cent};
}

void center_out(at::TensorList thetas, const at::Tensor& weights, at::Tensor avg, at::Tensor centered, Fill fill) {
  check_inputs(thetas, weights);
  check_outputs(thetas, avg, centered);
  const bool want_centered = centered.numel() > 0;
  const auto xs = contiguous_all(thetas);
  at::Tensor avg_c = avg.is_contiguous() ? avg : at::empty(avg.sizes(), avg.options());
  at::Tensor cent_c = !want_centered || centered.is_contiguous() ? centered
                                                                 : at::empty(centered.sizes(), centered.options());
  fill(xs, weights, avg_c, want_centered ? &cent_c : nullptr);
  if (!avg_c.is_same(avg)) avg.copy_(avg_c);
  if (want_centered && !cent_c.is_same(centered)) centered.copy_(cent_c);
}

std::tuple<at::Tensor, at::Tensor> center_task_vectors_cpu(at::TensorList thetas, const at::Tensor& weights,
                                                           std::optional<at::ScalarType> out_dtype,
                                                           bool want_centered) {
  return center_functional(thetas, weights, out_dtype, want_centered, &center_contiguous_cpu);
}

void center_task_vectors_out_cpu(at::TensorList thetas, const at::Tensor& weights, at::Tensor avg,
                                 at::Tensor centered) {
  center_out(thetas, weights, std::move(avg), std::move(centered), &center_contiguous_cpu);
}

}  // namespace
}  // namespace center
}  // namespace pymerge

TORCH_LIBRARY_IMPL(pymerge, CPU, m) {
  m.impl("center_task_vectors", &pymerge::center::center_task_vectors_cpu);
  m.impl("center_task_vectors_out", &pymerge::center::center_task_vectors_out_cpu);
}

// ------------------------------------------------------------------------------------------- CUDA glue
#ifdef PYMERGE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

// csrc/center.cu. dtype codes: 0 fp16, 1 bf16, 2 fp32, 3 fp64. thetas: device array of T input pointers;
// weights: device array of T accumulators (float, double for fp64 inputs); inputs_aligned16: every input
// pointer is 16-byte aligned (vector loads). Returns 0 or a cudaError_t.
extern "C" int pymerge_center_task_vectors_cuda(const void* const* thetas, const void* weights, int64_t T,
                                                int64_t numel, int in_dtype, int out_dtype, void* avg,
                                                void* centered, int inputs_aligned16, void* stream);

namespace pymerge {
namespace center {
namespace {

int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    case at::kFloat: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "center_task_vectors: unsupported dtype ", s);
  }
}

void center_contiguous_cuda(const std::vector<at::Tensor>& thetas, const at::Tensor& weights, at::Tensor& avg,
                            at::Tensor* centered) {
  const int64_t T = static_cast<int64_t>(thetas.size()), numel = avg.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(avg.device());
  // The pointer table travels as a small pinned host tensor copied asynchronously on the current stream
  // (the caching host allocator keeps the pinned block alive until the copy is done); any T works.
  at::Tensor host = at::empty({T}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  bool aligned16 = true;
  for (int64_t t = 0; t < T; ++t) {
    host.data_ptr<int64_t>()[t] = reinterpret_cast<int64_t>(thetas[t].data_ptr());
    aligned16 = aligned16 && reinterpret_cast<uintptr_t>(thetas[t].data_ptr()) % 16 == 0;
  }
  const at::Tensor table = host.to(avg.device(), /*non_blocking=*/true);
  const at::Tensor w = weights.to(avg.device(), acc_type(thetas[0].scalar_type())).contiguous();
  const int err = pymerge_center_task_vectors_cuda(
      reinterpret_cast<const void* const*>(table.data_ptr()), w.data_ptr(), T, numel,
      dtype_code(thetas[0].scalar_type()), dtype_code(avg.scalar_type()), avg.data_ptr(),
      centered != nullptr ? centered->data_ptr() : nullptr, aligned16 ? 1 : 0,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "center_task_vectors: CUDA kernel launch failed with error ", err);
}

std::tuple<at::Tensor, at::Tensor> center_task_vectors_cuda(at::TensorList thetas, const at::Tensor& weights,
                                                            std::optional<at::ScalarType> out_dtype,
                                                            bool want_centered) {
  return center_functional(thetas, weights, out_dtype, want_centered, &center_contiguous_cuda);
}

void center_task_vectors_out_cuda(at::TensorList thetas, const at::Tensor& weights, at::Tensor avg,
                                  at::Tensor centered) {
  center_out(thetas, weights, std::move(avg), std::move(centered), &center_contiguous_cuda);
}

}  // namespace
}  // namespace center
}  // namespace pymerge

TORCH_LIBRARY_IMPL(pymerge, CUDA, m) {
  m.impl("center_task_vectors", &pymerge::center::center_task_vectors_cuda);
  m.impl("center_task_vectors_out", &pymerge::center::center_task_vectors_out_cuda);
}
#endif  // PYMERGE_WITH_CUDA
