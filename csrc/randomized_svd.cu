// CUDA kernels of randomized_svd / randomized_svd_centered / low_rank_sum: raw kernels behind a C-ABI
// launcher, no torch headers (the glue is in csrc/randomized_svd.cpp under PYMERGE_WITH_CUDA). The element
// math (centered operand, LU basis, epilogue, storage conversions) is pymerge/randomized_svd.h, shared with
// the CPU code the tests check.
//
// One tiled GEMM kernel serves every product: C[M, N] = sum_k a(m, k) x(k, n) with the operands given as
// loaders, so the centering (theta - avg, widened to fp32 / fp64 before the subtraction) happens in the
// operand load and A^T is a swap of strides: the centered matrices are never materialised and each product is
// one GEMM per task. 64 x 64 output tile per 256-thread block, 16-deep k-steps through shared memory, 4 x 4
// register block per thread, fp32 (fp64) FMA accumulation: exact-arithmetic SIMT, no TF32 rounding.
#include <cuda_runtime.h>
#include <stdint.h>

#include "pymerge/randomized_svd.h"

namespace {

using pymerge::rsvd::Bf16;
using pymerge::rsvd::Fp16;

constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kRowsPerThreadGroup = kBM / kTM;       // 16: thread rows interleave for conflict-free reads
constexpr int kColsPerThreadGroup = kBN / kTN;       // 16

// --------------------------------------------------------------------------------------------- loaders
// (theta - avg)(r, c) in Acc, or theta(r, c) widened when there is no avg.
template <class Acc, class T, bool kCenter>
struct CenteredLoader {
  const T* a;
  int64_t s_am, s_ak;
  const Acc* v;
  int64_t s_vm, s_vk;
  __device__ __forceinline__ Acc operator()(int64_t r, int64_t c) const {
    const T x = a[r * s_am + c * s_ak];
    if (kCenter) return pymerge::rsvd::centered_value<Acc>(x, v[r * s_vm + c * s_vk]);
    return static_cast<Acc>(pymerge::rsvd::widen(x));
  }
  __device__ __forceinline__ bool k_contiguous() const { return s_ak == 1; }
};

template <class Acc>
struct StridedLoader {  // x(k, n)
  const Acc* x;
  int64_t s_xk, s_xn;
  __device__ __forceinline__ Acc operator()(int64_t k, int64_t n) const { return x[k * s_xk + n * s_xn]; }
  __device__ __forceinline__ bool k_contiguous() const { return s_xk == 1; }
};

// low_rank_sum: the inner index kk = b * k + r runs over the B stacked rank-k factors.
template <class Acc>
struct LowRankLeft {  // U[b, i, r] * S[b, r]
  const Acc* u;
  int64_t s_ub, s_um, s_uk;
  const Acc* s;
  int64_t s_sb, s_sk, k;
  __device__ __forceinline__ Acc operator()(int64_t i, int64_t kk) const {
    const int64_t b = kk / k, r = kk - b * k;
    return u[b * s_ub + i * s_um + r * s_uk] * s[b * s_sb + r * s_sk];
  }
  __device__ __forceinline__ bool k_contiguous() const { return s_uk == 1; }
};

template <class Acc>
struct LowRankRight {  // V[b, j, r] as x(kk, j)
  const Acc* v;
  int64_t s_vb, s_vn, s_vk, k;
  __device__ __forceinline__ Acc operator()(int64_t kk, int64_t j) const {
    const int64_t b = kk / k, r = kk - b * k;
    return v[b * s_vb + j * s_vn + r * s_vk];
  }
  __device__ __forceinline__ bool k_contiguous() const { return s_vk == 1; }
};

// ------------------------------------------------------------------------------------------ epilogues
template <class Acc>
struct StoreStrided {
  Acc* c;
  int64_t s_cm, s_cn;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, Acc acc) const { c[i * s_cm + j * s_cn] = acc; }
};

template <class Acc>
__device__ __forceinline__ void narrow_store(float* p, Acc v) { *p = static_cast<float>(v); }
template <class Acc>
__device__ __forceinline__ void narrow_store(double* p, Acc v) { *p = static_cast<double>(v); }
template <class Acc>
__device__ __forceinline__ void narrow_store(Bf16* p, Acc v) {
  p->x = pymerge::center::float_to_bf16_bits(static_cast<float>(v));  // fp64 rounds through fp32, as torch
}
template <class Acc>
__device__ __forceinline__ void narrow_store(Fp16* p, Acc v) {
  p->x = pymerge::center::float_to_half_bits(static_cast<float>(v));
}

template <class Acc, class TO, bool kBase>
struct StoreLowRank {  // out[i, j] = base[i, j] + scale * acc, out row-major [m, n]
  const TO* base;
  int64_t s_bm, s_bn;
  TO* out;
  int64_t n;
  Acc scale;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, Acc acc) const {
    const Acc b = kBase ? static_cast<Acc>(pymerge::rsvd::widen(base[i * s_bm + j * s_bn])) : Acc(0);
    narrow_store(out + i * n + j, pymerge::rsvd::low_rank_epilogue<Acc>(b, acc, scale));
  }
};

// -------------------------------------------------------------------------------------------- the GEMM
// Block (blockIdx.x, blockIdx.y) computes C[m0 : m0 + 64, n0 : n0 + 64]. Tiles are staged k-major in shared
// memory (As[k][m], Xs[k][n]); global loads walk the operand's unit-stride dimension when it has one.
template <class Acc, class LA, class LX, class ST>
__global__ void __launch_bounds__(kThreads) gemm_kernel(LA la, LX lx, ST st, int64_t M, int64_t N, int64_t K) {
  __shared__ Acc As[kBK][kBM + 1];
  __shared__ Acc Xs[kBK][kBN + 1];
  const int tid = threadIdx.x;
  const int tr = tid / kColsPerThreadGroup, tc = tid % kColsPerThreadGroup;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const bool a_k = la.k_contiguous(), x_k = lx.k_contiguous();

  Acc acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = Acc(0);

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int e0 = 0; e0 < kBM * kBK; e0 += kThreads) {
      const int e = e0 + tid;
      const int mm = a_k ? e / kBK : e % kBM, kk = a_k ? e % kBK : e / kBM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      As[kk][mm] = (gm < M && gk < K) ? la(gm, gk) : Acc(0);
    }
#pragma unroll
    for (int e0 = 0; e0 < kBN * kBK; e0 += kThreads) {
      const int e = e0 + tid;
      const int nn = x_k ? e / kBK : e % kBN, kk = x_k ? e % kBK : e / kBN;
      const int64_t gn = n0 + nn, gk = k0 + kk;
      Xs[kk][nn] = (gn < N && gk < K) ? lx(gk, gn) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      Acc a[kTM], x[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = As[kk][tr + i * kRowsPerThreadGroup];
#pragma unroll
      for (int j = 0; j < kTN; ++j) x[j] = Xs[kk][tc + j * kColsPerThreadGroup];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fma(a[i], x[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t gm = m0 + tr + i * kRowsPerThreadGroup;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t gn = n0 + tc + j * kColsPerThreadGroup;
      if (gm < M && gn < N) st(gm, gn, acc[i][j]);
    }
  }
}

template <class Acc, class LA, class LX, class ST>
int launch_gemm(const LA& la, const LX& lx, const ST& st, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>((N + kBN - 1) / kBN));
  if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
  gemm_kernel<Acc><<<grid, kThreads, 0, stream>>>(la, lx, st, M, N, K);
  return static_cast<int>(cudaGetLastError());
}

template <class Acc, class T>
int centered_gemm(const void* a, int64_t s_am, int64_t s_ak, const void* avg, int64_t s_vm, int64_t s_vk,
                  const void* x, int64_t s_xk, int64_t s_xn, void* c, int64_t s_cm, int64_t s_cn, int64_t M,
                  int64_t N, int64_t K, cudaStream_t stream) {
  const StridedLoader<Acc> lx{static_cast<const Acc*>(x), s_xk, s_xn};
  const StoreStrided<Acc> st{static_cast<Acc*>(c), s_cm, s_cn};
  const T* at = static_cast<const T*>(a);
  const Acc* vt = static_cast<const Acc*>(avg);
  if (avg != nullptr)
    return launch_gemm<Acc>(CenteredLoader<Acc, T, true>{at, s_am, s_ak, vt, s_vm, s_vk}, lx, st, M, N, K, stream);
  return launch_gemm<Acc>(CenteredLoader<Acc, T, false>{at, s_am, s_ak, vt, 0, 0}, lx, st, M, N, K, stream);
}

// ------------------------------------------------------------------------------------------- LU basis
__global__ void perm_identity_kernel(int64_t* perm, int64_t B, int64_t m) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * m;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    perm[e] = e % m;
}

__global__ void perm_pivots_kernel(const int32_t* piv, int64_t* perm, int64_t B, int64_t l, int64_t m) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < B) pymerge::rsvd::apply_pivots(piv + b * l, l, perm + b * m);  // sequential swaps: one thread per item
}

template <class Acc>
__global__ void lu_basis_kernel(const Acc* lut, const int64_t* perm, Acc* out, int64_t B, int64_t l, int64_t m) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * l * m;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % m, bj = e / m, j = bj % l, b = bj / l;
    out[bj * m + perm[b * m + i]] = pymerge::rsvd::lu_basis_value<Acc>(lut[e], i, j);
  }
}

unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

// ------------------------------------------------------------------------------------------ low_rank_sum
template <class Acc, class TO>
int low_rank_sum_typed(const void* u, int64_t s_ub, int64_t s_um, int64_t s_uk, const void* s, int64_t s_sb,
                       int64_t s_sk, const void* v, int64_t s_vb, int64_t s_vn, int64_t s_vk, const void* base,
                       int64_t s_bm, int64_t s_bn, void* out, int64_t Bn, int64_t m, int64_t n, int64_t k,
                       double scale, cudaStream_t stream) {
  const LowRankLeft<Acc> la{static_cast<const Acc*>(u), s_ub, s_um, s_uk, static_cast<const Acc*>(s), s_sb, s_sk,
                            k > 0 ? k : 1};
  const LowRankRight<Acc> lx{static_cast<const Acc*>(v), s_vb, s_vn, s_vk, k > 0 ? k : 1};
  const TO* bt = static_cast<const TO*>(base);
  TO* ot = static_cast<TO*>(out);
  if (base != nullptr)
    return launch_gemm<Acc>(la, lx, StoreLowRank<Acc, TO, true>{bt, s_bm, s_bn, ot, n, static_cast<Acc>(scale)}, m,
                            n, Bn * k, stream);
  return launch_gemm<Acc>(la, lx, StoreLowRank<Acc, TO, false>{bt, 0, 0, ot, n, static_cast<Acc>(scale)}, m, n,
                          Bn * k, stream);
}

template <class Acc>
int low_rank_sum_acc(int out_dtype, const void* u, int64_t s_ub, int64_t s_um, int64_t s_uk, const void* s,
                     int64_t s_sb, int64_t s_sk, const void* v, int64_t s_vb, int64_t s_vn, int64_t s_vk,
                     const void* base, int64_t s_bm, int64_t s_bn, void* out, int64_t Bn, int64_t m, int64_t n,
                     int64_t k, double scale, cudaStream_t stream) {
  switch (out_dtype) {
    case 0: return low_rank_sum_typed<Acc, float>(u, s_ub, s_um, s_uk, s, s_sb, s_sk, v, s_vb, s_vn, s_vk, base,
                                                  s_bm, s_bn, out, Bn, m, n, k, scale, stream);
    case 1: return low_rank_sum_typed<Acc, double>(u, s_ub, s_um, s_uk, s, s_sb, s_sk, v, s_vb, s_vn, s_vk, base,
                                                   s_bm, s_bn, out, Bn, m, n, k, scale, stream);
    case 2: return low_rank_sum_typed<Acc, Fp16>(u, s_ub, s_um, s_uk, s, s_sb, s_sk, v, s_vb, s_vn, s_vk, base,
                                                 s_bm, s_bn, out, Bn, m, n, k, scale, stream);
    case 3: return low_rank_sum_typed<Acc, Bf16>(u, s_ub, s_um, s_uk, s, s_sb, s_sk, v, s_vb, s_vn, s_vk, base,
                                                 s_bm, s_bn, out, Bn, m, n, k, scale, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

extern "C" {

// dtype codes: 0 fp32, 1 fp64, 2 fp16, 3 bf16. Strides in elements. avg / x / c in the accumulation type
// (fp64 iff acc_double). Returns a cudaError_t.
int pymerge_rsvd_gemm(const void* a, int a_dtype, int64_t s_am, int64_t s_ak, const void* avg, int64_t s_vm,
                      int64_t s_vk, const void* x, int64_t s_xk, int64_t s_xn, void* c, int64_t s_cm, int64_t s_cn,
                      int64_t M, int64_t N, int64_t K, int acc_double, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (acc_double) {
    if (a_dtype != 1) return static_cast<int>(cudaErrorInvalidValue);
    return centered_gemm<double, double>(a, s_am, s_ak, avg, s_vm, s_vk, x, s_xk, s_xn, c, s_cm, s_cn, M, N, K, st);
  }
  switch (a_dtype) {
    case 0: return centered_gemm<float, float>(a, s_am, s_ak, avg, s_vm, s_vk, x, s_xk, s_xn, c, s_cm, s_cn, M, N,
                                               K, st);
    case 2: return centered_gemm<float, Fp16>(a, s_am, s_ak, avg, s_vm, s_vk, x, s_xk, s_xn, c, s_cm, s_cn, M, N,
                                              K, st);
    case 3: return centered_gemm<float, Bf16>(a, s_am, s_ak, avg, s_vm, s_vk, x, s_xk, s_xn, c, s_cm, s_cn, M, N,
                                              K, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// out[b, j, perm_b[i]] = lu_basis_value(lut[b, j, i], i, j): the basis P L of Y = P L U, transposed like lut.
int pymerge_rsvd_lu_basis(const void* lut, const int32_t* piv, int64_t* perm, void* out, int64_t B, int64_t l,
                          int64_t m, int acc_double, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (B * l * m == 0) return 0;
  perm_identity_kernel<<<grid_for(B * m, 256), 256, 0, st>>>(perm, B, m);
  perm_pivots_kernel<<<grid_for(B, 64), 64, 0, st>>>(piv, perm, B, l, m);
  if (acc_double)
    lu_basis_kernel<double><<<grid_for(B * l * m, 256), 256, 0, st>>>(static_cast<const double*>(lut), perm,
                                                                      static_cast<double*>(out), B, l, m);
  else
    lu_basis_kernel<float><<<grid_for(B * l * m, 256), 256, 0, st>>>(static_cast<const float*>(lut), perm,
                                                                    static_cast<float*>(out), B, l, m);
  return static_cast<int>(cudaGetLastError());
}

// out[i, j] = base[i, j] + scale * sum_{b, r} U[b, i, r] S[b, r] V[b, j, r]; base (may be null) has the output
// dtype out_dtype; U, S, V in the accumulation type.
int pymerge_low_rank_sum(const void* u, int64_t s_ub, int64_t s_um, int64_t s_uk, const void* s, int64_t s_sb,
                         int64_t s_sk, const void* v, int64_t s_vb, int64_t s_vn, int64_t s_vk, const void* base,
                         int base_dtype, int64_t s_bm, int64_t s_bn, void* out, int out_dtype, int64_t Bn,
                         int64_t m, int64_t n, int64_t k, double scale, int acc_double, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (base != nullptr && base_dtype != out_dtype) return static_cast<int>(cudaErrorInvalidValue);
  if (acc_double)
    return low_rank_sum_acc<double>(out_dtype, u, s_ub, s_um, s_uk, s, s_sb, s_sk, v, s_vb, s_vn, s_vk, base, s_bm,
                                    s_bn, out, Bn, m, n, k, scale, st);
  return low_rank_sum_acc<float>(out_dtype, u, s_ub, s_um, s_uk, s, s_sb, s_sk, v, s_vb, s_vn, s_vk, base, s_bm,
                                 s_bn, out, Bn, m, n, k, scale, st);
}

}  // extern "C"
