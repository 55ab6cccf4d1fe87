// pymerge::divergence on CPU (AVX2 baseline, AVX-512 chosen at run time) and, when built with CUDA, the glue
// to the raw CUDA kernel in csrc/divergence.cu. Schema and semantics: csrc/ops.cpp, pymerge/reference.py;
// per-element math: csrc/pymerge/divergence.h (shared with CUDA).
//
// Rows are independent (at::parallel_for over rows). One row is swept over the vocabulary in chunks of kChunk
// elements, in up to three passes, so no intermediate larger than one chunk per thread ever exists:
//   1. online max / sum-exp of the student (and of the teacher when it is given as logits): log-sum-exps;
//   2. the loss terms and the row sums the gradient needs (S = sum q g for JS, sum p for KL, H for entropy);
//   3. only when compute_grad: d loss_row / d student, written in the student's dtype.
// q, p and log m are recomputed from the inputs in each pass rather than stored: a 152k-vocabulary row of
// fp32 student + teacher (1.2 MB) no longer fits in L2, so rereading the inputs costs less than writing and
// rereading row-sized buffers would, and memory stays at O(chunk). One exception: with an fp32 gradient,
// pass 2 already writes the row-sum-independent part of the gradient (JS: q g, KL: p) into the output row,
// which pass 3 finishes with one exp per element instead of 2 exp + 1 log.
//
// Vectorisation: the kernel is written once with GCC vector extensions and our own exp/log (Cephes
// polynomials, ~1 ulp), as templates over the vector type. It is inlined into two entry points: 8 x fp32
// compiled for the build's baseline (x86-64-v3: AVX2 + FMA) and 16 x fp32 under target("avx512*"), picked at
// run time (PYMERGE_CPU_ISA=avx2 forces the baseline). No intrinsics are used, so the same inline code compiles
// for either target. fp64 students run a scalar path in double with libm exp/log (the precision path: it is
// what gradcheck checks); fp32/bf16/fp16 students accumulate in fp32 and sum chunk totals in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

// Returning a 64-byte vector from an always-inline helper compiled for the baseline draws GCC's "ABI changes
// with AVX-512" warning; no such value ever crosses a real call boundary. (Vector parameters are passed by
// const reference for the same reason: GCC's note about their alignment cannot be silenced by this pragma.)
#pragma GCC diagnostic ignored "-Wpsabi"
#include "pymerge/cpu_isa.h"
#include "pymerge/divergence.h"

namespace pymerge {
namespace divergence {
namespace {

#define PM_AI __attribute__((always_inline)) inline

// Elements per chunk: 1024 fp32 = 4 KiB per converted input / gradient buffer; three of them stay in L1.
// Chunks are padded to kPad (a multiple of every vector width) with -inf.
constexpr int64_t kChunk = 1024;
constexpr int64_t kPad = 16;

// Vectors of the native width of each path: 8 x fp32 (AVX2) and 16 x fp32 (AVX-512). (A 64-byte vector in the
// AVX2 build would be split in two, but GCC scalarises its comparisons, so each path gets its own width.)
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));

template <class VF> struct VT;
template <> struct VT<vf8> { using I = vi8; using U = vu8; using H = vh8; static constexpr int W = 8; };
template <> struct VT<vf16> { using I = vi16; using U = vu16; using H = vh16; static constexpr int W = 16; };

// dtype codes shared with csrc/divergence.cu.
enum Dtype : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "divergence: unsupported dtype ", s);
  }
}

// ------------------------------------------------------------------------------------ vector helpers
// Every select below tests one comparison, and no two successive selects pick the same value: GCC merges
// those into one select on a combined mask (a | b, a & b), and scalarises that for 64-byte vectors when the
// helper is compiled for the baseline and only later inlined into the AVX-512 entry point.
template <class VF> PM_AI VF splat(float x) { return VF{} + x; }
template <class VF> PM_AI VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class VF> PM_AI void vstore(float* p, const VF& v) { std::memcpy(p, &v, sizeof(v)); }
template <class VF> PM_AI VF vmax(const VF& a, const VF& b) { return a > b ? a : b; }
template <class VF> PM_AI float hmax(const VF& v) {
  float m = v[0];
  for (int i = 1; i < VT<VF>::W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <class VF> PM_AI double hsum(const VF& v) {
  double s = 0.0;
  for (int i = 0; i < VT<VF>::W; ++i) s += v[i];
  return s;
}
// 2^n for integer n in [-126, 127], built in the exponent field.
template <class VF> PM_AI VF pow2i(const typename VT<VF>::I& n) { return (VF)((n + 127) << 23); }

// exp(x), Cephes expf polynomial after Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2 (about 1 ulp).
// exp(-inf) = 0, exp(+inf) = +inf, NaN -> NaN; results below the smallest subnormal are 0, and subnormal
// results are produced gradually (2^n is applied as two normal factors).
template <class VF> PM_AI VF vexp(const VF& x) {
  using VI = typename VT<VF>::I;
  const VF hi = splat<VF>(88.72283935546875f), lo = splat<VF>(-103.97207708f);
  const VF magic = splat<VF>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  VF xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const VF t = xc * splat<VF>(1.44269504088896341f) + magic;
  const VI n = (VI)t - (VI)magic;
  const VF fn = t - magic;
  VF r = xc - fn * splat<VF>(0.693359375f);
  r = r - fn * splat<VF>(-2.12194440e-4f);
  VF y = splat<VF>(1.9875691500e-4f);
  y = y * r + splat<VF>(1.3981999507e-3f);
  y = y * r + splat<VF>(8.3334519073e-3f);
  y = y * r + splat<VF>(4.1665795894e-2f);
  y = y * r + splat<VF>(1.6666665459e-1f);
  y = y * r + splat<VF>(5.0000001201e-1f);
  y = y * (r * r) + r + splat<VF>(1.0f);
  const VI n1 = n >> 1;  // n in [-150, 128]: both halves stay normal exponents
  y = y * pow2i<VF>(n1) * pow2i<VF>(n - n1);
  y = x > hi ? splat<VF>(INFINITY) : y;
  y = x < lo ? splat<VF>(0.0f) : y;
  return y;  // x NaN: xc, r and y are NaN
}

// log(x), Cephes logf (about 1 ulp); subnormals are rescaled first. log(0) = -inf, log(<0) = NaN, log(inf) = inf.
template <class VF> PM_AI VF vlog(const VF& x) {
  using VI = typename VT<VF>::I;
  const VI sub = x < splat<VF>(1.17549435e-38f);
  const VF xs = sub ? x * splat<VF>(8388608.0f) : x;  // * 2^23
  const VI bits = (VI)xs;
  VI e = ((bits >> 23) & 0xff) - 126;
  e = sub ? e - 23 : e;
  VF m = (VF)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  VF fe = __builtin_convertvector(e, VF);
  const VI small = m < splat<VF>(0.707106781186547524f);
  fe = small ? fe - splat<VF>(1.0f) : fe;
  m = small ? m + m - splat<VF>(1.0f) : m - splat<VF>(1.0f);
  const VF z = m * m;
  VF y = splat<VF>(7.0376836292e-2f);
  y = y * m + splat<VF>(-1.1514610310e-1f);
  y = y * m + splat<VF>(1.1676998740e-1f);
  y = y * m + splat<VF>(-1.2420140846e-1f);
  y = y * m + splat<VF>(1.4249322787e-1f);
  y = y * m + splat<VF>(-1.6668057665e-1f);
  y = y * m + splat<VF>(2.0000714765e-1f);
  y = y * m + splat<VF>(-2.4999993993e-1f);
  y = y * m + splat<VF>(3.3333331174e-1f);
  y = y * m * z;
  y = y + fe * splat<VF>(-2.12194440e-4f);
  y = y - splat<VF>(0.5f) * z;
  VF r = m + y;
  r = r + fe * splat<VF>(0.693359375f);
  r = x == splat<VF>(0.0f) ? splat<VF>(-INFINITY) : r;
  r = x < splat<VF>(0.0f) ? splat<VF>(std::numeric_limits<float>::quiet_NaN()) : r;
  r = x < splat<VF>(INFINITY) ? r : x + x;  // +inf -> +inf, NaN -> NaN
  return r;
}

// The math policy of pymerge/divergence.h for the vectors.
template <class VF> struct VecMath {
  static PM_AI VF exp(const VF& x) { return vexp(x); }
  static PM_AI VF log(const VF& x) { return vlog(x); }
  static PM_AI VF where_nz(const VF& x, const VF& v) { return x == splat<VF>(0.0f) ? splat<VF>(0.0f) : v; }
};

// bf16 / fp16 <-> fp32, one vector of lanes.
template <class VF> PM_AI VF bf16_to_f32(const uint16_t* p) {
  using VU = typename VT<VF>::U;
  typename VT<VF>::H h;
  std::memcpy(&h, p, sizeof(h));
  return (VF)(__builtin_convertvector(h, VU) << 16);
}
// Exact for normals, subnormals, inf and NaN: the exponent is rebiased by a multiplication with 2^112, which
// also normalises subnormal halves (assumes the CPU does not treat subnormal inputs as zero).
template <class VF> PM_AI VF f16_to_f32(const uint16_t* p) {
  using VU = typename VT<VF>::U;
  typename VT<VF>::H h;
  std::memcpy(&h, p, sizeof(h));
  const VU u = __builtin_convertvector(h, VU);
  const VU em = u & 0x7fff, sign = (u & 0x8000) << 16;
  const VF f = (VF)(em << 13) * splat<VF>(5.192296858534828e+33f);  // 2^112
  const VU bits = em >= 0x7c00 ? ((em << 13) | 0x7f800000u) : (VU)f;  // inf / NaN keep their payload
  return (VF)(bits | sign);
}
// Round to nearest even, NaN -> quiet NaN (as c10::BFloat16).
template <class VF> PM_AI void f32_to_bf16(uint16_t* p, const VF& v) {
  using VU = typename VT<VF>::U;
  const VU u = (VU)v;
  VU r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = v != v ? (VU{} + 0x7fc0u) : r;
  const typename VT<VF>::H h = __builtin_convertvector(r, typename VT<VF>::H);
  std::memcpy(p, &h, sizeof(h));
}

// ------------------------------------------------------------------------------------ row arguments
struct Args {
  const void* s;  // student [N, V], row stride s_stride, unit column stride
  int s_dt;
  int64_t s_stride;
  const void* t;  // teacher (unused for entropy)
  int t_dt;
  int64_t t_stride;
  const bool* mask;  // [N] or nullptr
  int64_t V;
  int kind;
  bool t_logits;
  bool grad;
  double beta, inv_t;
  void* rows;  // [N] float (double for fp64 students)
  void* g;     // [N, V] contiguous, student dtype, or nullptr
};

int64_t dtype_size(int dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

// A chunk of `len` elements as fp32, padded with -inf up to a multiple of kPad (padded lanes then give
// p = q = 0 and drop out of every sum). fp32 chunks of whole vectors are used in place.
template <class VF>
PM_AI const float* load_chunk(const void* base, int dt, int64_t off, int64_t len, float* buf) {
  constexpr int W = VT<VF>::W;
  const int64_t full = len / W * W, padded = (len + kPad - 1) / kPad * kPad;
  switch (dt) {
    case kF32: {
      const float* p = static_cast<const float*>(base) + off;
      if (padded == len) return p;
      std::memcpy(buf, p, sizeof(float) * len);
      break;
    }
    case kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int64_t i = 0; i < full; i += W) vstore(buf + i, bf16_to_f32<VF>(p + i));
      for (int64_t i = full; i < len; ++i) buf[i] = static_cast<float>(c10::BFloat16(p[i], c10::BFloat16::from_bits()));
      break;
    }
    case kF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int64_t i = 0; i < full; i += W) vstore(buf + i, f16_to_f32<VF>(p + i));
      for (int64_t i = full; i < len; ++i) buf[i] = static_cast<float>(c10::Half(p[i], c10::Half::from_bits()));
      break;
    }
    default: {  // fp64 teacher with a lower-precision student: rounded to fp32 like the reference's .to()
      const double* p = static_cast<const double*>(base) + off;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<float>(p[i]);
      break;
    }
  }
  for (int64_t i = len; i < padded; ++i) buf[i] = -INFINITY;
  return buf;
}

// Gradient chunk (fp32, `len` valid elements) into the student-dtype output.
template <class VF>
PM_AI void store_chunk(void* base, int dt, int64_t off, int64_t len, const float* src) {
  constexpr int W = VT<VF>::W;
  switch (dt) {
    case kF32:
      std::memcpy(static_cast<float*>(base) + off, src, sizeof(float) * len);
      break;
    case kBF16: {
      uint16_t* p = static_cast<uint16_t*>(base) + off;
      const int64_t full = len / W * W;
      for (int64_t i = 0; i < full; i += W) f32_to_bf16<VF>(p + i, vload<VF>(src + i));
      for (int64_t i = full; i < len; ++i) p[i] = c10::BFloat16(src[i]).x;
      break;
    }
    default: {  // fp16 (scalar conversion: not on the hot path of the fp32/bf16 models this serves)
      uint16_t* p = static_cast<uint16_t*>(base) + off;
      for (int64_t i = 0; i < len; ++i) p[i] = c10::Half(src[i]).x;
      break;
    }
  }
}

struct Scratch {
  alignas(64) float s[kChunk];
  alignas(64) float t[kChunk];
  alignas(64) float g[kChunk];
};

// One chunk's log-sum-exp of x * inv_t (n floats, a multiple of kPad), merged into (mx, sum).
// x * inv_t <= max(x) * inv_t exactly (rounding is monotonic), so the chunk's exps never overflow.
template <class VF>
PM_AI void lse_chunk(const float* x, int64_t n, float inv_t, float& mx, float& sum) {
  constexpr int W = VT<VF>::W;
  VF vm = splat<VF>(-INFINITY);
  for (int64_t i = 0; i < n; i += W) vm = vmax(vm, vload<VF>(x + i));
  const float cm = hmax(vm) * inv_t;
  if (cm == -INFINITY) return;  // an all -inf chunk adds nothing (and would give NaN below)
  const VF vcm = splat<VF>(cm), vinv = splat<VF>(inv_t);
  VF acc{};
  for (int64_t i = 0; i < n; i += W) acc += vexp(vload<VF>(x + i) * vinv - vcm);
  lse_merge<float>(mx, sum, cm, static_cast<float>(hsum(acc)));
}

// One row in fp32 with vectors VF. KIND / TLOGITS are template parameters so the inner loops carry no branches.
template <class VF, int KIND, bool TLOGITS>
PM_AI void row_f32(const Args& a, int64_t n, Scratch& sc) {
  using M = VecMath<VF>;
  constexpr int W = VT<VF>::W;
  const int64_t V = a.V;
  const void* srow = static_cast<const char*>(a.s) + n * a.s_stride * dtype_size(a.s_dt);
  const void* trow = KIND == kEntropy ? nullptr : static_cast<const char*>(a.t) + n * a.t_stride * dtype_size(a.t_dt);
  const float inv_t_s = static_cast<float>(a.inv_t);
  const VF inv_t = splat<VF>(inv_t_s);
  const VF beta = splat<VF>(static_cast<float>(a.beta)), omb = splat<VF>(static_cast<float>(1.0 - a.beta));

  // Pass 1: log-sum-exps.
  float ms = -INFINITY, ss = 0.0f, mt = -INFINITY, st = 0.0f;
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t len = std::min(kChunk, V - off), np = (len + kPad - 1) / kPad * kPad;
    lse_chunk<VF>(load_chunk<VF>(srow, a.s_dt, off, len, sc.s), np, inv_t_s, ms, ss);
    if (KIND != kEntropy && TLOGITS) lse_chunk<VF>(load_chunk<VF>(trow, a.t_dt, off, len, sc.t), np, inv_t_s, mt, st);
  }
  const VF lse_s = splat<VF>(lse_finish<float>(ms, ss));
  const VF lse_t = splat<VF>(TLOGITS ? lse_finish<float>(mt, st) : 0.0f);

  // Pass 2: loss and the row sum for the gradient (JS: sum q g; KL: sum p; entropy: H = the loss).
  // With an fp32 gradient output, pass 2 also stashes the part of the gradient that does not depend on the row
  // sum (JS: q g, KL: p) in the output row, so pass 3 only recomputes q (1 exp instead of 2 exp + 1 log).
  const bool stash = a.grad && a.s_dt == kF32 && KIND != kEntropy;
  float* const grow = a.grad ? reinterpret_cast<float*>(static_cast<char*>(a.g) + n * V * dtype_size(a.s_dt)) : nullptr;
  double loss = 0.0, rsum = 0.0;
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t len = std::min(kChunk, V - off), np = (len + kPad - 1) / kPad * kPad;
    const float* xs = load_chunk<VF>(srow, a.s_dt, off, len, sc.s);
    const float* xt = KIND == kEntropy ? nullptr : load_chunk<VF>(trow, a.t_dt, off, len, sc.t);
    float* st = stash && np == len ? grow + off : sc.g;
    VF vloss{}, vsum{};
    for (int64_t i = 0; i < np; i += W) {
      const VF logq = vload<VF>(xs + i) * inv_t - lse_s;
      const VF q = vexp(logq);
      if (KIND == kEntropy) {
        vloss += entropy_term<M>(q, logq);
      } else {
        const VF logp = TLOGITS ? vload<VF>(xt + i) * inv_t - lse_t : vload<VF>(xt + i);
        const VF p = vexp(logp);
        if (KIND == kJS) {
          VF logm, qg;
          vloss += js_term<M>(p, logp, q, logq, beta, omb, logm, qg);
          vsum += qg;
          if (stash) vstore<VF>(st + i, qg);
        } else {
          vloss += kl_term<M>(p, logp, logq);
          vsum += p;
          if (stash) vstore<VF>(st + i, p);
        }
      }
    }
    if (stash && st == sc.g) std::memcpy(grow + off, sc.g, sizeof(float) * len);
    loss += hsum(vloss);
    rsum += hsum(vsum);
  }
  static_cast<float*>(a.rows)[n] = static_cast<float>(loss);
  if (!a.grad) return;

  // Pass 3: the gradient.
  const VF S = splat<VF>(static_cast<float>(KIND == kEntropy ? loss : rsum));
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t len = std::min(kChunk, V - off), np = (len + kPad - 1) / kPad * kPad;
    const float* xs = load_chunk<VF>(srow, a.s_dt, off, len, sc.s);
    // fp32 output of whole kPad blocks is written in place; anything else goes through sc.g
    float* out = (a.s_dt == kF32 && np == len) ? grow + off : sc.g;
    if (stash) {
      if (out == sc.g) std::memcpy(sc.g, grow + off, sizeof(float) * len);
      for (int64_t i = 0; i < np; i += W) {
        const VF q = vexp(vload<VF>(xs + i) * inv_t - lse_s);
        const VF part = vload<VF>(out + i);  // JS: q g, KL: p
        vstore<VF>(out + i, KIND == kJS ? js_grad<M>(q, part, S, inv_t) : kl_grad<M>(part, q, S, inv_t));
      }
    } else {
      const float* xt = KIND == kEntropy ? nullptr : load_chunk<VF>(trow, a.t_dt, off, len, sc.t);
      for (int64_t i = 0; i < np; i += W) {
        const VF logq = vload<VF>(xs + i) * inv_t - lse_s;
        const VF q = vexp(logq);
        VF g;
        if (KIND == kEntropy) {
          g = entropy_grad<M>(q, logq, S, inv_t);
        } else {
          const VF logp = TLOGITS ? vload<VF>(xt + i) * inv_t - lse_t : vload<VF>(xt + i);
          const VF p = vexp(logp);
          if (KIND == kJS) {
            VF logm, qg;
            js_term<M>(p, logp, q, logq, beta, omb, logm, qg);
            g = js_grad<M>(q, qg, S, inv_t);
          } else {
            g = kl_grad<M>(p, q, S, inv_t);
          }
        }
        vstore<VF>(out + i, g);
      }
    }
    if (out == sc.g) store_chunk<VF>(grow, a.s_dt, off, len, sc.g);
  }
}

// One row of an fp64 student, scalar, double precision throughout (the precision path).
template <class T>
PM_AI double load1(const void* base, int64_t i) {
  return static_cast<double>(static_cast<const T*>(base)[i]);
}
PM_AI double load_any(const void* base, int dt, int64_t i) {
  switch (dt) {
    case kF64: return load1<double>(base, i);
    case kF32: return load1<float>(base, i);
    case kBF16: return load1<c10::BFloat16>(base, i);
    default: return load1<c10::Half>(base, i);
  }
}

void row_f64(const Args& a, int64_t n) {
  using M = ScalarMath;
  const int64_t V = a.V;
  const double* z = static_cast<const double*>(a.s) + n * a.s_stride;
  const void* trow = a.kind == kEntropy ? nullptr : static_cast<const char*>(a.t) + n * a.t_stride * dtype_size(a.t_dt);
  const double inv_t = a.inv_t, beta = a.beta, omb = 1.0 - a.beta;
  const bool tl = a.t_logits && a.kind != kEntropy;
  double ms = -INFINITY, ss = 0.0, mt = -INFINITY, st = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    lse_push<double>(ms, ss, z[i] * inv_t);
    if (tl) lse_push<double>(mt, st, load_any(trow, a.t_dt, i) * inv_t);
  }
  const double lse_s = lse_finish<double>(ms, ss), lse_t = tl ? lse_finish<double>(mt, st) : 0.0;
  // p, log p, q, log q of element i
  auto probs = [&](int64_t i, double& p, double& logp, double& q, double& logq) {
    logq = z[i] * inv_t - lse_s;
    q = M::exp(logq);
    if (a.kind != kEntropy) {
      const double t = load_any(trow, a.t_dt, i);
      logp = tl ? t * inv_t - lse_t : t;
      p = M::exp(logp);
    }
  };
  double loss = 0.0, rsum = 0.0, p = 0.0, logp = 0.0, q, logq, logm, qg;
  for (int64_t i = 0; i < V; ++i) {
    probs(i, p, logp, q, logq);
    if (a.kind == kJS) {
      loss += js_term<M>(p, logp, q, logq, beta, omb, logm, qg);
      rsum += qg;
    } else if (a.kind == kKL) {
      loss += kl_term<M>(p, logp, logq);
      rsum += p;
    } else {
      loss += entropy_term<M>(q, logq);
    }
  }
  static_cast<double*>(a.rows)[n] = loss;
  if (!a.grad) return;
  double* g = static_cast<double*>(a.g) + n * V;
  const double S = a.kind == kEntropy ? loss : rsum;
  for (int64_t i = 0; i < V; ++i) {
    probs(i, p, logp, q, logq);
    if (a.kind == kJS) {
      js_term<M>(p, logp, q, logq, beta, omb, logm, qg);
      g[i] = js_grad<M>(q, qg, S, inv_t);
    } else if (a.kind == kKL) {
      g[i] = kl_grad<M>(p, q, S, inv_t);
    } else {
      g[i] = entropy_grad<M>(q, logq, S, inv_t);
    }
  }
}

// Masked-out rows: loss 0 and a zero gradient, nothing else is read.
void row_masked(const Args& a, int64_t n) {
  const int64_t esize = dtype_size(a.s_dt);
  if (a.s_dt == kF64) static_cast<double*>(a.rows)[n] = 0.0;
  else static_cast<float*>(a.rows)[n] = 0.0f;
  if (a.grad) std::memset(static_cast<char*>(a.g) + n * a.V * esize, 0, a.V * esize);
}

template <class VF, int KIND, bool TLOGITS>
PM_AI void rows_f32(const Args& a, int64_t begin, int64_t end) {
  Scratch sc;
  for (int64_t n = begin; n < end; ++n) {
    if (a.mask != nullptr && !a.mask[n]) row_masked(a, n);
    else row_f32<VF, KIND, TLOGITS>(a, n, sc);
  }
}

template <class VF>
PM_AI void rows_f32_dispatch(const Args& a, int64_t begin, int64_t end) {
  switch (a.kind) {
    case kJS: return a.t_logits ? rows_f32<VF, kJS, true>(a, begin, end) : rows_f32<VF, kJS, false>(a, begin, end);
    case kKL: return a.t_logits ? rows_f32<VF, kKL, true>(a, begin, end) : rows_f32<VF, kKL, false>(a, begin, end);
    default: return rows_f32<VF, kEntropy, false>(a, begin, end);
  }
}

// The two compilations of the same inline kernel.
void rows_f32_avx2(const Args& a, int64_t begin, int64_t end) { rows_f32_dispatch<vf8>(a, begin, end); }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void rows_f32_avx512(const Args& a, int64_t begin,
                                                                                  int64_t end) {
  rows_f32_dispatch<vf16>(a, begin, end);
}

// ------------------------------------------------------------------------------------ op
bool is_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// Shared checks of the CPU and CUDA implementations (the Python wrappers raise ValueError before this).
// Returns the student and teacher with a unit column stride (a copy only where that is not already so).
std::tuple<at::Tensor, at::Tensor> check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& mask, int64_t kind,
                                                double beta, double temperature) {
  TORCH_CHECK(student.dim() == 2, "divergence: student must be [N, V], got ", student.sizes());
  TORCH_CHECK(is_float(student.scalar_type()), "divergence: student dtype ", student.scalar_type(),
              " is not a float dtype");
  TORCH_CHECK(kind == kJS || kind == kKL || kind == kEntropy, "divergence: unknown kind ", kind);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "divergence: temperature must be > 0, got ",
              temperature);
  TORCH_CHECK(kind != kJS || (beta > 0 && beta < 1), "divergence: beta must lie in (0, 1), got ", beta);
  if (kind != kEntropy) {
    TORCH_CHECK(teacher.sizes() == student.sizes(), "divergence: teacher ", teacher.sizes(),
                " and student ", student.sizes(), " differ in shape");
    TORCH_CHECK(is_float(teacher.scalar_type()), "divergence: teacher dtype ", teacher.scalar_type(),
                " is not a float dtype");
    TORCH_CHECK(teacher.device() == student.device(), "divergence: teacher and student on different devices");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == student.size(0),
                "divergence: mask must be bool [", student.size(0), "], got ", mask->scalar_type(), " ",
                mask->sizes());
    TORCH_CHECK(mask->device() == student.device(), "divergence: mask and student on different devices");
  }
  auto unit = [](const at::Tensor& x) { return x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous(); };
  return {unit(student), kind == kEntropy ? teacher : unit(teacher)};
}

// The outputs of one call, for every device: per-row values (fp32; fp64 for fp64 inputs) and the gradient w.r.t.
// the student in its dtype ([0] when not asked for). Refuses an empty vocabulary when there are rows.
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& student, bool compute_grad) {
  const int64_t N = student.size(0), V = student.size(1);
  const bool f64 = student.scalar_type() == at::kDouble;
  at::Tensor rows = at::empty({N}, student.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor grad = at::empty(compute_grad ? at::IntArrayRef{N, V} : at::IntArrayRef{0}, student.options());
  TORCH_CHECK(N == 0 || V > 0, "divergence: empty vocabulary dim");
  return {rows, grad};
}

std::tuple<at::Tensor, at::Tensor> divergence_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                  const std::optional<at::Tensor>& mask_in, int64_t kind,
                                                  double beta, double temperature, bool teacher_is_logits,
                                                  bool compute_grad) {
  auto [student, teacher] = check_inputs(student_in, teacher_in, mask_in, kind, beta, temperature);
  TORCH_CHECK(student.device().is_cpu(), "divergence: the CPU kernel got a ", student.device(), " tensor");
  const int64_t N = student.size(0), V = student.size(1);
  const bool f64 = student.scalar_type() == at::kDouble;
  auto [rows, grad] = allocate_outputs(student, compute_grad);
  if (N == 0) return {rows, grad};
  at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();

  Args a{};
  a.s = student.data_ptr();
  a.s_dt = dtype_code(student.scalar_type());
  a.s_stride = N > 1 ? student.stride(0) : V;
  if (kind != kEntropy) {
    a.t = teacher.data_ptr();
    a.t_dt = dtype_code(teacher.scalar_type());
    a.t_stride = N > 1 ? teacher.stride(0) : V;
  }
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.V = V;
  a.kind = static_cast<int>(kind);
  a.t_logits = teacher_is_logits && kind != kEntropy;
  a.grad = compute_grad;
  a.beta = beta;
  a.inv_t = 1.0 / temperature;
  a.rows = rows.data_ptr();
  a.g = compute_grad ? grad.data_ptr() : nullptr;

  // A row is 3 passes over V elements: a few rows per task are plenty of work.
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  if (f64) {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (a.mask != nullptr && !a.mask[n]) row_masked(a, n);
        else row_f64(a, n);
      }
    });
  } else {
    const bool wide = use_avx512();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      if (wide) rows_f32_avx512(a, b, e);
      else rows_f32_avx2(a, b, e);
    });
  }
  return {rows, grad};
}

}  // namespace
}  // namespace divergence
}  // namespace pymerge

TORCH_LIBRARY_IMPL(pymerge, CPU, m) { m.impl("divergence", &pymerge::divergence::divergence_cpu); }

// ------------------------------------------------------------------------------------------- CUDA glue
#ifdef PYMERGE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// csrc/divergence.cu. dtype codes: 0 fp16, 1 bf16, 2 fp32, 3 fp64; rows: float (double for an fp64 student);
// grad: [N, V] contiguous in the student's dtype, or nullptr. Returns 0 or a cudaError_t.
extern "C" int pymerge_divergence_cuda(const void* student, int s_dtype, int64_t s_stride, const void* teacher,
                                       int t_dtype, int64_t t_stride, const bool* mask, int64_t N, int64_t V,
                                       int kind, double beta, double inv_t, int teacher_is_logits, void* rows,
                                       void* grad, void* stream);

namespace pymerge {
namespace divergence {
namespace {

std::tuple<at::Tensor, at::Tensor> divergence_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                   const std::optional<at::Tensor>& mask_in, int64_t kind,
                                                   double beta, double temperature, bool teacher_is_logits,
                                                   bool compute_grad) {
  auto [student, teacher] = check_inputs(student_in, teacher_in, mask_in, kind, beta, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  auto [rows, grad] = allocate_outputs(student, compute_grad);
  if (N == 0) return {rows, grad};
  at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const bool ent = kind == kEntropy;
  const int err = pymerge_divergence_cuda(
      student.data_ptr(), dtype_code(student.scalar_type()), N > 1 ? student.stride(0) : V,
      ent ? nullptr : teacher.data_ptr(), ent ? dtype_code(student.scalar_type()) : dtype_code(teacher.scalar_type()),
      ent ? 0 : (N > 1 ? teacher.stride(0) : V), mask.defined() ? mask.data_ptr<bool>() : nullptr, N, V,
      static_cast<int>(kind), beta, 1.0 / temperature, teacher_is_logits && !ent ? 1 : 0, rows.data_ptr(),
      compute_grad ? grad.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "divergence: CUDA kernel launch failed with error ", err);
  return {rows, grad};
}

}  // namespace
}  // namespace divergence
}  // namespace pymerge

TORCH_LIBRARY_IMPL(pymerge, CUDA, m) { m.impl("divergence", &pymerge::divergence::divergence_cuda); }
#endif  // PYMERGE_WITH_CUDA
