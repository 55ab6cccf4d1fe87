// Per-element math of pymerge::divergence, shared by the C++ CPU kernel (csrc/divergence.cpp) and the CUDA
// kernel (csrc/divergence.cu): one definition of every loss term and gradient, so the GPU runs the math the
// CPU tests check.
//
// Notation for one row (vocabulary index i, temperature T):
//   q_i = softmax(z / T)_i                       student distribution, logq_i = z_i / T - lse(z / T)
//   p_i = softmax(t / T)_i   or  p_i = exp(t_i)  teacher distribution (logits, or log-probabilities as given)
//   m_i = beta p_i + (1 - beta) q_i              the generalised-JS mixture
// Losses:
//   JS      L = beta sum_i p_i log(p_i / m_i) + (1 - beta) sum_i q_i log(q_i / m_i)
//   KL      L = sum_i p_i log(p_i / q_i)         (teacher || student)
//   entropy H = -sum_i q_i log q_i
// Gradient. With g_i = dL/dq_i, the softmax Jacobian gives
//   dL/dz_j = (1 / T) q_j (g_j - sum_i q_i g_i).
//   JS:      g_i = (1 - beta) log(q_i / m_i)  (the beta-terms' derivatives cancel: d/dq_i of
//            beta p log(p/m) + (1-beta) q log(q/m) is (1-beta)(log(q/m) + 1 - m/m)); no normalisation of p
//            is assumed, so this also holds for teacher log-probabilities that do not sum to one.
//   KL:      g_i = -p_i / q_i, sum_i q_i g_i = -sum_i p_i  =>  dL/dz_j = (q_j sum_i p_i - p_j) / T
//            (closed form: stays right where q_j underflows to 0 while p_j > 0).
//   entropy: g_i = -(log q_i + 1), sum_i q_i g_i = H - 1  =>  dH/dz_j = -q_j (log q_j + H) / T.
// Zeros: 0 log 0 = 0. A term is dropped where its probability is exactly 0 (underflow or a -inf logit) and,
// for JS, where the mixture m is 0 too (see js_term).
// The test is `x == 0`, not `x > 0`, so a NaN anywhere in the inputs propagates to the row's loss.
//
// Every function is a template over the value type F (float / double scalars, or the CPU kernel's SIMD
// vectors, hence the const references) and a math policy M providing exp, log and where_nz(x, v) =
// (x == 0 ? 0 : v).
#pragma once

#include <math.h>

#include "hd.h"

namespace pymerge {
namespace divergence {

enum Kind : int { kJS = 0, kKL = 1, kEntropy = 2 };

// Scalar math policy: libm on the host, CUDA's full-precision expf/logf (not the __expf intrinsics) on device.
struct ScalarMath {
  PM_HD static float exp(float x) { return expf(x); }
  PM_HD static double exp(double x) { return ::exp(x); }
  PM_HD static float log(float x) { return logf(x); }
  PM_HD static double log(double x) { return ::log(x); }
  template <class F>
  PM_HD static F where_nz(F x, F v) { return x == F(0) ? F(0) : v; }
};

// ---------------------------------------------------------------------- online log-sum-exp (pass 1)
// A partial sum is (mx, s) = (max of the values seen, sum of exp(value - mx)); (-inf, 0) is empty.
// Merge (mx2, s2) into (mx, s). An empty side never produces exp(-inf - -inf) = NaN; a NaN side propagates.
template <class F, class M = ScalarMath>
PM_HD void lse_merge(F& mx, F& s, F mx2, F s2) {
  if (mx2 > mx) {
    s = s * M::exp(mx - mx2) + s2;  // mx = -inf (empty so far): s = 0 * 0 + s2
    mx = mx2;
  } else if (mx2 != -F(INFINITY)) {
    s = s + s2 * M::exp(mx2 - mx);
  }
}

// Add one value x to a partial sum (CUDA threads do this per element: one exp per element).
template <class F, class M = ScalarMath>
PM_HD void lse_push(F& mx, F& s, F x) {
  if (x > mx) {
    s = s * M::exp(mx - x) + F(1);
    mx = x;
  } else if (x != -F(INFINITY)) {
    s = s + M::exp(x - mx);  // x NaN: s becomes NaN and the row's loss is NaN, as in the reference
  }
}

// log-sum-exp of a finished partial sum; an all -inf row gives -inf, and then logq = -inf - -inf = NaN.
template <class F, class M = ScalarMath>
PM_HD F lse_finish(F mx, F s) {
  return mx + M::log(s);
}

// ---------------------------------------------------------------------- loss terms (pass 2)
// Generalised JS at one element. Returns the element's loss and sets
//   logm = log m_i,   qg = q_i g_i = (1 - beta) q_i log(q_i / m_i)
// (qg is also the (1 - beta) part of the loss; its row sum S feeds the gradient).
// A side is dropped where q m (p m) is 0: q = 0, m = 0 (then log m = -inf), or q m below the smallest
// subnormal, where |q log(q / m)| < 1e-17 for fp32 (1e-150 for fp64) anyway. One test on the product, not
// two nested ones, also keeps GCC's vector code free of combined masks.
template <class M, class F>
PM_HD F js_term(const F& p, const F& logp, const F& q, const F& logq, const F& beta, const F& omb, F& logm,
                F& qg) {
  const F m = beta * p + omb * q;
  logm = M::log(m);
  qg = M::where_nz(q * m, omb * q * (logq - logm));
  return M::where_nz(p * m, beta * p * (logp - logm)) + qg;
}

// KL(p || q) at one element: p_i (log p_i - log q_i); +inf where q_i = 0 < p_i.
template <class M, class F>
PM_HD F kl_term(const F& p, const F& logp, const F& logq) {
  return M::where_nz(p, p * (logp - logq));
}

// Entropy at one element: -q_i log q_i.
template <class M, class F>
PM_HD F entropy_term(const F& q, const F& logq) {
  return M::where_nz(q, -(q * logq));
}

// ---------------------------------------------------------------------- gradients (pass 3)
// d loss_row / d z_j given the row sums of pass 2. inv_t = 1 / T.
// JS: (q_j g_j - q_j S) / T with S = sum_i q_i g_i; qg from js_term (0 where q_j = 0).
template <class M, class F>
PM_HD F js_grad(const F& q, const F& qg, const F& S, const F& inv_t) {
  return (qg - q * S) * inv_t;
}

// KL: (q_j sum_p - p_j) / T with sum_p = sum_i p_i (1 up to rounding for teacher logits).
template <class M, class F>
PM_HD F kl_grad(const F& p, const F& q, const F& sum_p, const F& inv_t) {
  return (q * sum_p - p) * inv_t;
}

// Entropy: -q_j (log q_j + H) / T; 0 where q_j = 0 (log q_j = -inf).
template <class M, class F>
PM_HD F entropy_grad(const F& q, const F& logq, const F& H, const F& inv_t) {
  return M::where_nz(q, -(q * (logq + H))) * inv_t;
}

}  // namespace divergence
}  // namespace pymerge
