// Per-element math of center_task_vectors, shared by the C++ CPU kernel (csrc/center.cpp) and the CUDA
// kernel (csrc/center.cu): avg = sum_t w_t * theta_t accumulated in order t = 0..T-1 (first term a plain
// product, then one fused multiply-add per term), centered_t = theta_t - avg, and the storage conversions
// (fp16 / bf16 bits <-> fp32, round to nearest even). The CPU SIMD paths use instructions with exactly these
// roundings (vmulps / vfmadd / vcvtps2ph), so every path agrees bit for bit up to NaN payloads.
#pragma once
#include <stdint.h>
#include <string.h>

#include <cmath>

#include "hd.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace pymerge {
namespace center {

// ------------------------------------------------------------------------------------------ the math
// Accumulator type: fp32 for fp16 / bf16 / fp32 storage, fp64 for fp64 storage.
PM_HD float first_term(float w, float x) { return w * x; }
PM_HD double first_term(double w, double x) { return w * x; }
PM_HD float accumulate(float acc, float w, float x) { return fmaf(w, x, acc); }
PM_HD double accumulate(double acc, double w, double x) { return fma(w, x, acc); }
PM_HD float deviation(float x, float avg) { return x - avg; }
PM_HD double deviation(double x, double avg) { return x - avg; }

// --------------------------------------------------------------------------------------- bit casts
PM_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// ------------------------------------------------------------------------------------------- bf16
PM_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Round to nearest even; NaN -> quiet NaN 0x7fc0 (what torch's c10::BFloat16 does).
PM_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  // cvt.rn.bf16.f32: the same rounding in one instruction (NaN payload may differ, still a NaN).
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
#endif
}

// ------------------------------------------------------------------------------------------- fp16
PM_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return bits_to_float(sign | 0x7f800000u | (m << 13));   // inf / NaN
  if (e != 0) return bits_to_float(sign | ((e + 112u) << 23) | (m << 13));  // normal: rebias 15 -> 127
  const float v = static_cast<float>(m) * 5.9604644775390625e-08f;         // subnormal: m * 2^-24, exact
  return sign ? -v : v;
#endif
}

// IEEE binary16, round to nearest even (what F16C vcvtps2ph and CUDA cvt.rn.f16.f32 do).
PM_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);       // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);      // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                                    // normal half: >= 2^-14
    uint32_t r = a - 0x38000000u;                                            // rebias exponent 127 -> 15
    r += 0x0fffu + ((r >> 13) & 1u);                                         // round 23 -> 10 mantissa bits
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);                 // <= 2^-25 rounds to zero
  // Subnormal half: m = round(|f| * 2^24); |f| = mant * 2^(e - 150) so m = mant >> (126 - e).
  const uint32_t e = a >> 23;
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;                                           // 14..24
  const uint32_t half_ulp = 1u << (shift - 1);
  const uint32_t rem = mant & ((1u << shift) - 1u);
  uint32_t m = mant >> shift;
  if (rem > half_ulp || (rem == half_ulp && (m & 1u))) m += 1;              // may carry into 0x400: correct
  return static_cast<uint16_t>(sign | m);
#endif
}

}  // namespace center
}  // namespace pymerge
