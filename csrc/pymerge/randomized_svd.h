// Per-element math of randomized_svd / randomized_svd_centered / low_rank_sum, shared by the C++ CPU code
// (csrc/randomized_svd.cpp) and the CUDA kernels (csrc/randomized_svd.cu), so the GPU runs what the CPU
// tests check:
//   * the operand element of the (implicitly) centered matrix: float(theta) - avg, upcast before subtracting
//     (bf16 / fp16 storage is widened exactly, the subtraction happens in fp32, fp64 for fp64 storage);
//   * the LU basis used between power iterations: for Y = P L U (LAPACK getrf, partial pivoting) the next
//     basis is P L, i.e. row perm[i] of the basis is row i of the unit lower-trapezoidal L;
//   * the low_rank_sum epilogue: out = base + scale * acc, rounded once to the output dtype.
#pragma once
#include <stdint.h>

#include "center.h"  // storage conversions (fp16 / bf16 bits <-> fp32), shared with center_task_vectors
#include "hd.h"

namespace pymerge {
namespace rsvd {

// Storage tags with no torch / CUDA types, so one template serves both compilers.
struct Bf16 {
  uint16_t x;
};
struct Fp16 {
  uint16_t x;
};

PM_HD float widen(float v) { return v; }
PM_HD double widen(double v) { return v; }
PM_HD float widen(Bf16 v) { return center::bf16_bits_to_float(v.x); }
PM_HD float widen(Fp16 v) { return center::half_bits_to_float(v.x); }

// One element of theta - avg in the accumulation type Acc (float, or double for fp64 storage).
template <class Acc, class T>
PM_HD Acc centered_value(T theta, Acc avg) {
  return static_cast<Acc>(widen(theta)) - avg;
}

// Element (i, j) of the unit lower-trapezoidal factor L of a packed LAPACK LU factorisation: strictly below
// the diagonal the stored multiplier, 1 on it, 0 above.
template <class Acc>
PM_HD Acc lu_basis_value(Acc lu_ij, int64_t i, int64_t j) {
  return i > j ? lu_ij : (i == j ? Acc(1) : Acc(0));
}

// LAPACK pivots (1-based; row j was swapped with row piv[j] - 1, in order j = 0..l-1) applied to the identity
// permutation perm[0..m): afterwards row i of L U is row perm[i] of the factored matrix. Sequential by nature.
PM_HD void apply_pivots(const int32_t* piv, int64_t l, int64_t* perm) {
  for (int64_t j = 0; j < l; ++j) {
    const int64_t p = static_cast<int64_t>(piv[j]) - 1;
    const int64_t a = perm[j];
    perm[j] = perm[p];
    perm[p] = a;
  }
}

// low_rank_sum epilogue in the accumulation type: base + scale * acc (base = 0 without a base).
template <class Acc>
PM_HD Acc low_rank_epilogue(Acc base, Acc acc, Acc scale) {
  return base + scale * acc;
}

}  // namespace rsvd
}  // namespace pymerge
