// randomized_svd (explicit batch and implicit centered batch) and low_rank_sum on CPU, and, when built with
// CUDA, the glue to the raw CUDA kernels in csrc/randomized_svd.cu. Schemas in csrc/ops.cpp.
//
// Halko-Martinsson-Tropp with q power iterations, l = omega.size(-1) sketch columns:
//   Y = A Omega;  q times { Z = A^T basis(Y);  Y = A basis(Z) };  Q = orth(Y);  B^T = A^T Q = Z2 R (QR);
//   R^T = Ur S Vr^T (l x l SVD);  U = Q Ur[:, :k], V = Z2 Vr[:, :k].
// Cost: (2q + 2) GEMMs of m x n x l (the whole bill at CART sizes) plus O((m + n) l^2) small factorisations.
//
// Design choices (measured on the 1-core AVX-512 target, 4096 x 4096, l = 337, fp32):
//  * GEMM engine. The fp32 products go through oneDNN's inner product (torch.ops.mkldnn._linear_pointwise,
//    reached through the dispatcher: libtorch exports no oneDNN symbols): on AMD CPUs MKL's sgemm runs its
//    AVX2 kernels (~95 GFLOP/s here) while oneDNN's JIT uses AVX-512 (~200 GFLOP/s). fp64, and builds without
//    oneDNN, use at::mm (MKL). Every product is written as out[M, N] = x[M, K] w[N, K]^T ("NT"), oneDNN's
//    natural form, and the iterates are kept transposed (Yt [l, m], Zt [l, n], row-major) which is exactly the
//    column-major layout LAPACK wants for Y [m, l] and Z [n, l]: no transposing copies anywhere.
//  * Fused centering / upcast. For the implicit batch A_t = theta_t - avg (and for fp16 / bf16 or strided
//    explicit A) the operand is never materialised: row blocks (for A Z) or column blocks (for A^T Y) of
//    theta_t - avg are formed in fp32 in a cache-sized buffer (~1 MiB) and multiplied right away. One GEMM per
//    task per product (no theta X - avg X doubling, no cancellation), no T x m x n temporary. The T tasks run in
//    lockstep, block outer / task inner, so each block of avg is read from memory once per product.
//  * Between power iterations the basis is re-normalised by LU with partial pivoting (Y = P L U -> P L), as in
//    sklearn / fbpca: it spans exactly range(Y), keeps |L| <= 1 (no blow-up from (sigma_1 / sigma_l)^(2q+1)),
//    and costs ~10 ms against ~31 ms for Householder QR (geqrf + orgqr). CholeskyQR2 was measured slower here
//    (36 ms in fp32, 66 ms in fp64 for the two passes) and breaks down for cond(Y) > ~1e3 in fp32, which a
//    decaying spectrum after power iterations easily exceeds; so the two bases that must be orthonormal (Q and
//    Z2) use Householder QR (LAPACK), unconditionally stable.
//  * Final small SVD through the QR of B^T (n x l, already column-major) and an l x l SVD: ~53 ms against
//    ~119 ms for gesdd on the wide l x n matrix that torch.svd_lowrank factors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pymerge/randomized_svd.h"

#ifdef PYMERGE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

extern "C" {
// csrc/randomized_svd.cu. dtype codes: 0 fp32, 1 fp64, 2 fp16, 3 bf16. Strides in elements.
// C[M, N] = sum_k (A[m, k] - avg[m, k]) X[k, n]   (avg may be null; A of dtype a_dtype, avg / X / C of acc)
int pymerge_rsvd_gemm(const void* a, int a_dtype, int64_t s_am, int64_t s_ak, const void* avg, int64_t s_vm,
                      int64_t s_vk, const void* x, int64_t s_xk, int64_t s_xn, void* c, int64_t s_cm,
                      int64_t s_cn, int64_t M, int64_t N, int64_t K, int acc_double, void* stream);
// out[b, j, perm_b[i]] = lu_basis_value(lut[b, j, i], i, j); perm_b from the pivots; perm: B * m scratch.
int pymerge_rsvd_lu_basis(const void* lut, const int32_t* piv, int64_t* perm, void* out, int64_t B, int64_t l,
                          int64_t m, int acc_double, void* stream);
// out[i, j] = base[i, j] + scale * sum_{b, r} U[b, i, r] S[b, r] V[b, j, r]; base may be null.
int pymerge_low_rank_sum(const void* u, int64_t s_ub, int64_t s_um, int64_t s_uk, const void* s, int64_t s_sb,
                         int64_t s_sk, const void* v, int64_t s_vb, int64_t s_vn, int64_t s_vk, const void* base,
                         int base_dtype, int64_t s_bm, int64_t s_bn, void* out, int out_dtype, int64_t Bn,
                         int64_t m, int64_t n, int64_t k, double scale, int acc_double, void* stream);
}
#endif

namespace pymerge {
namespace rsvd {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------------------------------------ GEMM
// oneDNN inner product through the dispatcher, if this torch has it (looked up once).
const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> handle =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  static const bool usable = handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU);
  return usable ? &*handle : nullptr;
}

bool unit_stride_2d(const Tensor& w) { return w.stride(0) == 1 || w.stride(1) == 1; }

// oneDNN honours torch.backends.mkldnn.matmul.fp32_precision; when a user lowered it (bf16 / tf32 math) the
// products go to MKL instead, so the results keep full fp32 accuracy whatever the global setting.
bool onednn_fp32_exact() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  const auto p = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return p == at::Float32Precision::NONE || p == at::Float32Precision::IEEE;
#else
  return true;
#endif
}

// out[M, N] = x[M, K] w[N, K]^T, contiguous, in x's dtype (fp32 / fp64). x contiguous; w any 2-d strides.
Tensor gemm_nt(const Tensor& x, const Tensor& w) {
  const bool empty = x.size(0) == 0 || w.size(0) == 0 || x.size(1) == 0;
  if (x.is_cpu() && x.scalar_type() == at::kFloat && !empty && unit_stride_2d(w) && onednn_fp32_exact()) {
    if (const c10::OperatorHandle* op = onednn_linear()) {
      std::vector<c10::IValue> stack{x, w, c10::IValue(), std::string("none"),
                                     c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
      op->callBoxed(&stack);
      return stack[0].toTensor();
    }
  }
  return at::mm(x, w.t());
}

// Batched a[b] @ b[b] for the final small products (a: [B, p, l] any strides, c: [B, l, r]); contiguous.
Tensor small_bmm(const Tensor& a, const Tensor& c) {
  if (!a.is_cpu()) return at::bmm(a, c);
  Tensor out = at::empty({a.size(0), a.size(1), c.size(2)}, c.options());
  for (int64_t b = 0; b < a.size(0); ++b)  // (a c)^T = c^T a^T: x = c^T [r, l] contiguous, w = a [p, l]
    out[b].copy_(gemm_nt(c[b].t().contiguous(), a[b]).t());
  return out;
}

// ------------------------------------------------------------------------------------- block formation
// dst[r, c] (ld) = centered_value(src[r, c], avg[r, c]) for a rows x cols block; src strided (elements), avg
// (accumulation type) row-major with leading dimension ld_avg or null (then plain upcast). Memory-bound; the
// loops vectorise (AVX2 baseline, AVX-512 clone chosen at load time by the loader's ifunc). The inner loop
// runs along a row: unit stride for row-major inputs (the layout checkpoints come in); other layouts are
// correct but gather.
template <class Acc, class T>
inline __attribute__((always_inline)) void form_block_impl(const T* src, int64_t s_r, int64_t s_c,
                                                          const Acc* avg, int64_t ld_avg, int64_t rows,
                                                          int64_t cols, Acc* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * s_r;
    Acc* d = dst + r * ld;
    if (avg != nullptr) {
      const Acc* a = avg + r * ld_avg;
      if (s_c == 1) {
        for (int64_t c = 0; c < cols; ++c) d[c] = centered_value<Acc>(s[c], a[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = centered_value<Acc>(s[c * s_c], a[c]);
      }
    } else if (s_c == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<Acc>(widen(s[c]));
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<Acc>(widen(s[c * s_c]));
    }
  }
}

// fp16 has no branch-free scalar widening the compiler can vectorise: use the F16C conversion (exact, as is
// the shared scalar path that finishes the row).
template <int W>
inline __attribute__((always_inline)) void form_block_f16(const Fp16* src, int64_t s_r, int64_t s_c,
                                                         const float* avg, int64_t ld_avg, int64_t rows,
                                                         int64_t cols, float* dst, int64_t ld) {
  if (s_c != 1) return form_block_impl<float>(src, s_r, s_c, avg, ld_avg, rows, cols, dst, ld);
  for (int64_t r = 0; r < rows; ++r) {
    const Fp16* s = src + r * s_r;
    float* d = dst + r * ld;
    const float* a = avg != nullptr ? avg + r * ld_avg : nullptr;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + c)));
      if (a != nullptr) v = _mm256_sub_ps(v, _mm256_loadu_ps(a + c));
      _mm256_storeu_ps(d + c, v);
    }
    for (; c < cols; ++c) d[c] = a != nullptr ? centered_value<float>(s[c], a[c]) : widen(s[c]);
  }
}

#define PM_FORM_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
PM_FORM_CLONES void form_f32(const float* s, int64_t sr, int64_t sc, const float* a, int64_t la, int64_t rows,
                             int64_t cols, float* d, int64_t ld) {
  form_block_impl<float>(s, sr, sc, a, la, rows, cols, d, ld);
}
PM_FORM_CLONES void form_f64(const double* s, int64_t sr, int64_t sc, const double* a, int64_t la,
                             int64_t rows, int64_t cols, double* d, int64_t ld) {
  form_block_impl<double>(s, sr, sc, a, la, rows, cols, d, ld);
}
PM_FORM_CLONES void form_bf16(const Bf16* s, int64_t sr, int64_t sc, const float* a, int64_t la, int64_t rows,
                              int64_t cols, float* d, int64_t ld) {
  form_block_impl<float>(s, sr, sc, a, la, rows, cols, d, ld);
}
void form_f16(const Fp16* s, int64_t sr, int64_t sc, const float* a, int64_t la, int64_t rows, int64_t cols,
              float* d, int64_t ld) {
  form_block_f16<8>(s, sr, sc, a, la, rows, cols, d, ld);
}
#undef PM_FORM_CLONES

// Block [r0, r0 + rows) x [c0, c0 + cols) of (theta - avg) (or of theta when avg is undefined) into dst, a
// contiguous [rows, cols] tensor of the accumulation type. Rows split over at::parallel_for.
void form_block(const Tensor& theta, const Tensor& avg, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                Tensor& dst) {
  const int64_t sr = theta.stride(0), sc = theta.stride(1);
  const bool centered = avg.defined();
  const int64_t la = centered ? avg.stride(0) : 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    const int64_t off = (r0 + lo) * sr + c0 * sc;
    const int64_t aoff = centered ? (r0 + lo) * la + c0 : 0;
    switch (theta.scalar_type()) {
      case at::kFloat:
        form_f32(theta.const_data_ptr<float>() + off, sr, sc,
                 centered ? avg.const_data_ptr<float>() + aoff : nullptr, la, hi - lo, cols,
                 dst.data_ptr<float>() + lo * cols, cols);
        break;
      case at::kDouble:
        form_f64(theta.const_data_ptr<double>() + off, sr, sc,
                 centered ? avg.const_data_ptr<double>() + aoff : nullptr, la, hi - lo, cols,
                 dst.data_ptr<double>() + lo * cols, cols);
        break;
      case at::kBFloat16:
        form_bf16(reinterpret_cast<const Bf16*>(theta.const_data_ptr<c10::BFloat16>()) + off, sr, sc,
                  centered ? avg.const_data_ptr<float>() + aoff : nullptr, la, hi - lo, cols,
                  dst.data_ptr<float>() + lo * cols, cols);
        break;
      case at::kHalf:
        form_f16(reinterpret_cast<const Fp16*>(theta.const_data_ptr<c10::Half>()) + off, sr, sc,
                 centered ? avg.const_data_ptr<float>() + aoff : nullptr, la, hi - lo, cols,
                 dst.data_ptr<float>() + lo * cols, cols);
        break;
      default:
        TORCH_CHECK_VALUE(false, "randomized_svd: unsupported dtype ", theta.scalar_type());
    }
  });
}

// ------------------------------------------------------------------------------------------ operands
// The batch A[b] ([m, n] each), explicit or implicit, seen only through its two products:
//   fwd: Yt[b] = Zt[b] A[b]^T   (Y = A Z, kept transposed: Zt [l, n] -> Yt [l, m])
//   bwd: Zt[b] = Yt[b] A[b]     (Z = A^T Y: Yt [l, m] -> Zt [l, n])
struct Operand {
  virtual ~Operand() = default;
  virtual void fwd(const Tensor& Zt, Tensor& Yt) = 0;
  virtual void bwd(const Tensor& Yt, Tensor& Zt) = 0;
  int64_t B = 0, m = 0, n = 0;
  at::ScalarType acc = at::kFloat;
};

// Block sizes: ~1 MiB of fp32 per formed block (L2 is 2 MiB here), at least 16 rows / columns.
// (Measured on 4096 x 4096, T = 2: 512 KiB - 8 MiB all within noise of each other, 256 KiB 20% slower.)
constexpr int64_t kBlockBytes = int64_t(1) << 20;
int64_t block_len(int64_t other, int64_t total, int64_t elem) {
  const int64_t len = std::max<int64_t>(16, kBlockBytes / std::max<int64_t>(1, other * elem));
  return std::min(total, (len + 15) / 16 * 16);
}

// CPU operand: thetas [B] of [m, n] (any float dtype / strides) and, for the centered batch, avg [m, n] in the
// accumulation type. Direct GEMMs on A when it already is in the accumulation type with a unit stride;
// otherwise (centered, fp16 / bf16, fully strided) blocks formed on the fly.
struct CpuOperand final : Operand {
  std::vector<Tensor> thetas;
  Tensor avg;  // undefined for an explicit batch
  bool direct = false;

  CpuOperand(std::vector<Tensor> th, Tensor av) : thetas(std::move(th)), avg(std::move(av)) {
    B = static_cast<int64_t>(thetas.size());
    m = thetas[0].size(0);
    n = thetas[0].size(1);
    acc = acc_type(thetas[0].scalar_type());
    direct = !avg.defined() && thetas[0].scalar_type() == acc;
    for (const Tensor& t : thetas) direct = direct && unit_stride_2d(t);
  }

  void fwd(const Tensor& Zt, Tensor& Yt) override {
    if (direct) {
      for (int64_t b = 0; b < B; ++b) Yt[b].copy_(gemm_nt(Zt[b], thetas[b]));
      return;
    }
    const int64_t rb = block_len(n, m, 4);
    Tensor buf = at::empty({rb, n}, Zt.options());
    for (int64_t r0 = 0; r0 < m; r0 += rb) {
      const int64_t rows = std::min(rb, m - r0);
      Tensor blk = buf.narrow(0, 0, rows);
      for (int64_t b = 0; b < B; ++b) {  // task inner: avg's block stays in cache across tasks
        form_block(thetas[b], avg, r0, rows, 0, n, blk);
        Yt[b].narrow(1, r0, rows).copy_(gemm_nt(Zt[b], blk));
      }
    }
  }

  void bwd(const Tensor& Yt, Tensor& Zt) override {
    if (direct) {
      for (int64_t b = 0; b < B; ++b) Zt[b].copy_(gemm_nt(Yt[b], thetas[b].t()));
      return;
    }
    const int64_t cb = block_len(m, n, 4);
    Tensor buf = at::empty({m * cb}, Yt.options());
    for (int64_t c0 = 0; c0 < n; c0 += cb) {
      const int64_t cols = std::min(cb, n - c0);
      Tensor blk = buf.narrow(0, 0, m * cols).view({m, cols});
      for (int64_t b = 0; b < B; ++b) {
        form_block(thetas[b], avg, 0, m, c0, cols, blk);
        Zt[b].narrow(1, c0, cols).copy_(gemm_nt(Yt[b], blk.t()));
      }
    }
  }
};

// ------------------------------------------------------------------------------------------ LU basis
// P L of Y = P L U (partial pivoting), returned transposed like its input: Yt [B, l, m] -> [B, l, m].
void lu_basis_cpu(const Tensor& LUt, const Tensor& piv, Tensor& out) {
  const int64_t B = LUt.size(0), l = LUt.size(1), m = LUt.size(2);
  out.zero_();
  AT_DISPATCH_FLOATING_TYPES(LUt.scalar_type(), "lu_basis", [&] {
    const scalar_t* lu = LUt.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int32_t* pv = piv.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int64_t> perm(m);
      for (int64_t i = 0; i < m; ++i) perm[i] = i;
      apply_pivots(pv + b * l, l, perm.data());
      at::parallel_for(0, l, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t* src = lu + (b * l + j) * m;
          scalar_t* dst = o + (b * l + j) * m;
          for (int64_t i = j; i < m; ++i) dst[perm[i]] = lu_basis_value<scalar_t>(src[i], i, j);
        }
      });
    }
  });
}

#ifdef PYMERGE_WITH_CUDA
void lu_basis_cuda(const Tensor& LUt, const Tensor& piv, Tensor& out);
#endif

// LAPACK getrf of each Y_b [m, l] (column-major = Yt[b] row-major) into LUt [B, l, m] (same layout) and
// piv [B, l], one matrix per call: torch 2.13's batched CPU linalg_lu_factor_ex returns garbage pivots with
// 2+ threads (MKL "Parameter 6 was incorrect on entry to SLASWP", then a crash) while the same call on one
// matrix is correct. At 1 thread the batched call is the same getrf per matrix: no measurable cost.
std::tuple<Tensor, Tensor> lu_factor_cpu(const Tensor& Yt) {
  const int64_t B = Yt.size(0), l = Yt.size(1);
  Tensor LUt = at::empty_like(Yt, at::MemoryFormat::Contiguous);
  Tensor piv = at::empty({B, l}, Yt.options().dtype(at::kInt));
  Tensor info = at::empty({B}, Yt.options().dtype(at::kInt));
  for (int64_t b = 0; b < B; ++b) {
    Tensor lu_b = LUt[b].mT(), piv_b = piv[b], info_b = info[b];  // lu_b column-major: written in place
    at::linalg_lu_factor_ex_out(lu_b, piv_b, info_b, Yt[b].mT(), /*pivot=*/true, /*check_errors=*/false);
  }
  return {LUt, piv};
}

Tensor lu_basis(const Tensor& Yt) {
  if (Yt.is_cpu()) {  // (a zero pivot, info > 0, still leaves L unit lower-trapezoidal: a valid basis)
    auto [LUt, piv] = lu_factor_cpu(Yt);
    Tensor out = at::empty_like(LUt);
    lu_basis_cpu(LUt, piv, out);
    return out;
  }
  // LAPACK / cuSOLVER getrf on Y [m, l], column-major = Yt row-major: no transposition.
  auto [LU, piv, info] = at::linalg_lu_factor_ex(Yt.mT(), /*pivot=*/true, /*check_errors=*/false);
  (void)info;  // a zero pivot (rank-deficient Y) still leaves L unit lower-trapezoidal, i.e. a valid basis
  Tensor LUt = LU.mT().contiguous();
  Tensor out = at::empty_like(LUt);
#ifdef PYMERGE_WITH_CUDA
  if (LUt.is_cuda()) {
    lu_basis_cuda(LUt, piv.contiguous(), out);
    return out;
  }
#endif
  lu_basis_cpu(LUt, piv.contiguous(), out);
  return out;
}

// Orthonormal basis (Householder QR, LAPACK geqrf + orgqr) of Y given as Yt [B, l, m]; returns Qt [B, l, m].
Tensor orthonormal_t(const Tensor& Yt) {
  auto [a, tau] = at::geqrf(Yt.mT());
  return at::linalg_householder_product(a, tau).mT().contiguous();
}

// ---------------------------------------------------------------------------------------------- driver
std::tuple<Tensor, Tensor, Tensor> run(Operand& op, const Tensor& omega, int64_t k, int64_t q) {
  const int64_t B = op.B, m = op.m, n = op.n, l = omega.size(2);
  const auto opts = omega.options().dtype(op.acc);
  // Working set: a few [B, l, max(m, n)] iterates; each is released as soon as its successor exists. The
  // wrapper draws omega as a transposed view of a [B, l, n] tensor, so Zt below is that storage (read only).
  Tensor Zt = omega.to(op.acc).transpose(1, 2).contiguous();  // [B, l, n]
  Tensor Yt = at::empty({B, l, m}, opts);
  op.fwd(Zt, Yt);
  // Every entry of A reaches a row of Y = A Omega through a non-zero Gaussian weight: NaN / Inf anywhere in A
  // shows up here, and is refused before LAPACK sees it.
  TORCH_CHECK_VALUE(at::isfinite(Yt).all().item<bool>(), "randomized_svd: A contains NaN or Inf (shape [", B,
                    ", ", m, ", ", n, "])");
  for (int64_t it = 0; it < q; ++it) {
    Yt = lu_basis(Yt);
    Zt = at::empty({B, l, n}, opts);
    op.bwd(Yt, Zt);
    Zt = lu_basis(Zt);
    Yt = at::empty({B, l, m}, opts);
    op.fwd(Zt, Yt);
  }
  Zt.reset();
  Tensor Qt = orthonormal_t(Yt);  // [B, l, m]
  Yt.reset();
  Tensor Bt = at::empty({B, l, n}, opts);
  op.bwd(Qt, Bt);  // Bt = Q^T A [B, l, n]: column-major storage of B^T [n, l]
  auto [a, tau] = at::geqrf(Bt.mT());  // B^T = Z2 R
  Bt.reset();
  Tensor R = a.narrow(1, 0, l).triu();  // [B, l, l]
  Tensor Z2 = at::linalg_householder_product(a, tau);  // [B, n, l]
  a.reset();
  auto [Ur, S, Vrh] = at::linalg_svd(R.mT(), /*full_matrices=*/false);  // R^T = Ur S Vr^T
  Tensor U = small_bmm(Qt.mT(), Ur.narrow(2, 0, k));
  Qt.reset();
  Tensor V = small_bmm(Z2, Vrh.narrow(1, 0, k).mT());
  return {U, S.narrow(1, 0, k).contiguous(), V};
}

void check_omega(const Tensor& omega, int64_t B, int64_t n, int64_t k, const at::Device& dev) {
  TORCH_CHECK_VALUE(omega.dim() == 3 && omega.size(0) == B && omega.size(1) == n,
                    "randomized_svd: omega must be [B, n, l] = [", B, ", ", n, ", l], got ", omega.sizes());
  TORCH_CHECK_VALUE(omega.device() == dev, "randomized_svd: omega is on ", omega.device(), ", A on ", dev);
  TORCH_CHECK_VALUE(at::isFloatingType(omega.scalar_type()), "randomized_svd: omega must be floating point");
  TORCH_CHECK_VALUE(k >= 1 && k <= omega.size(2), "randomized_svd: k = ", k, " must be in [1, l = ",
                    omega.size(2), "]");
}

void check_float(const Tensor& t, const char* what) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                    "randomized_svd: ", what, " has dtype ", s, "; expected float16/bfloat16/float32/float64");
}

std::tuple<Tensor, Tensor, Tensor> empty_result(int64_t B, int64_t m, int64_t n, int64_t k,
                                                const at::TensorOptions& o) {
  return {at::empty({B, m, k}, o), at::empty({B, k}, o), at::empty({B, n, k}, o)};
}

std::unique_ptr<Operand> make_operand(std::vector<Tensor> thetas, Tensor avg);

std::tuple<Tensor, Tensor, Tensor> randomized_svd_impl(const Tensor& A, const Tensor& omega, int64_t k,
                                                       int64_t power_iters) {
  TORCH_CHECK_VALUE(A.dim() == 3, "randomized_svd: A must be [B, m, n], got ", A.sizes());
  check_float(A, "A");
  const int64_t B = A.size(0), m = A.size(1), n = A.size(2);
  check_omega(omega, B, n, k, A.device());
  TORCH_CHECK_VALUE(omega.size(2) <= std::min(m, n), "randomized_svd: l = ", omega.size(2),
                    " exceeds min(m, n) = ", std::min(m, n));
  TORCH_CHECK_VALUE(power_iters >= 0, "randomized_svd: power_iters must be >= 0");
  if (B == 0) return empty_result(0, m, n, k, A.options().dtype(acc_type(A.scalar_type())));
  auto op = make_operand(A.unbind(0), Tensor());
  return run(*op, omega, k, power_iters);
}

// The implicit batch thetas[t] - avg: T >= 1 float [m, n] matrices of one dtype on avg's device.
void check_centered(at::TensorList thetas, const Tensor& avg, const char* op) {
  TORCH_CHECK_VALUE(!thetas.empty(), op, ": thetas is empty (T = 0)");
  TORCH_CHECK_VALUE(avg.dim() == 2, op, ": avg must be [m, n], got ", avg.sizes());
  for (size_t t = 0; t < thetas.size(); ++t) {
    check_float(thetas[t], "thetas[t]");
    TORCH_CHECK_VALUE(thetas[t].sizes() == avg.sizes() && thetas[t].scalar_type() == thetas[0].scalar_type() &&
                          thetas[t].device() == avg.device(),
                      op, ": thetas[", t, "] is ", thetas[t].sizes(), " ", thetas[t].scalar_type(), " on ",
                      thetas[t].device(), "; expected ", avg.sizes(), " ", thetas[0].scalar_type(), " on ",
                      avg.device());
  }
}

std::tuple<Tensor, Tensor, Tensor> randomized_svd_centered_impl(at::TensorList thetas, const Tensor& avg,
                                                                const Tensor& omega, int64_t k,
                                                                int64_t power_iters) {
  check_centered(thetas, avg, "randomized_svd_centered");
  const auto acc = acc_type(thetas[0].scalar_type());
  const int64_t T = static_cast<int64_t>(thetas.size()), m = avg.size(0), n = avg.size(1);
  check_omega(omega, T, n, k, avg.device());
  TORCH_CHECK_VALUE(omega.size(2) <= std::min(m, n), "randomized_svd_centered: l = ", omega.size(2),
                    " exceeds min(m, n) = ", std::min(m, n));
  TORCH_CHECK_VALUE(power_iters >= 0, "randomized_svd_centered: power_iters must be >= 0");
  // avg in the accumulation type (fp32 for fp16 / bf16 thetas): rounding the mean to 8 or 11 bits would
  // perturb theta - avg by eps * |avg|, large next to small centered task vectors.
  auto op = make_operand(thetas.vec(), avg.to(acc).contiguous());
  return run(*op, omega, k, power_iters);
}

// The implicit batch's two products alone (the same fused, blocked GEMMs as run() uses), for callers that run
// their own iteration on it: Xt [T, l, n] -> Yt [T, l, m] = (A[t] X[t])^T, or with transpose
// Xt [T, l, m] -> Zt [T, l, n] = (A[t]^T X[t])^T; in the accumulation type.
Tensor centered_matmul_impl(at::TensorList thetas, const Tensor& avg, const Tensor& Xt, bool transpose) {
  check_centered(thetas, avg, "centered_matmul");
  const auto acc = acc_type(thetas[0].scalar_type());
  const int64_t T = static_cast<int64_t>(thetas.size()), m = avg.size(0), n = avg.size(1);
  const int64_t in = transpose ? m : n, out_len = transpose ? n : m;
  TORCH_CHECK_VALUE(Xt.dim() == 3 && Xt.size(0) == T && Xt.size(2) == in, "centered_matmul: Xt must be [T = ", T,
                    ", l, ", in, "], got ", Xt.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(Xt.scalar_type()) && Xt.device() == avg.device(),
                    "centered_matmul: Xt must be floating point on ", avg.device(), ", got ", Xt.scalar_type(),
                    " on ", Xt.device());
  const Tensor X = Xt.to(acc).contiguous();
  Tensor out = at::empty({T, Xt.size(1), out_len}, X.options());
  if (Xt.size(1) == 0) return out;
  auto op = make_operand(thetas.vec(), avg.to(acc).contiguous());
  if (transpose) {
    op->bwd(X, out);
  } else {
    op->fwd(X, out);
  }
  return out;
}

// ------------------------------------------------------------------------------------------ low_rank_sum
void check_low_rank(const Tensor& U, const Tensor& S, const Tensor& V, const std::optional<Tensor>& base) {
  TORCH_CHECK_VALUE(U.dim() == 3 && S.dim() == 2 && V.dim() == 3 && U.size(0) == S.size(0) &&
                        V.size(0) == S.size(0) && U.size(2) == S.size(1) && V.size(2) == S.size(1),
                    "low_rank_sum: expected U [B, m, k], S [B, k], V [B, n, k]; got ", U.sizes(), ", ", S.sizes(),
                    ", ", V.sizes());
  for (const Tensor* t : {&U, &S, &V})
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()) && t->device() == U.device(),
                      "low_rank_sum: U, S, V must be floating point on one device");
  if (base.has_value()) {
    TORCH_CHECK_VALUE(base->dim() == 2 && base->size(0) == U.size(1) && base->size(1) == V.size(1),
                      "low_rank_sum: base has shape ", base->sizes(), ", expected [", U.size(1), ", ", V.size(1),
                      "]");
    TORCH_CHECK_VALUE(at::isFloatingType(base->scalar_type()) && base->device() == U.device(),
                      "low_rank_sum: base must be floating point on U's device");
  }
}

// out = base + scale * acc (PM_HD epilogue), one fused pass over [m, n], in out's dtype.
template <class Acc, class TB, class TO>
void epilogue_loop(const Acc* acc, const TB* base, int64_t s_bm, int64_t s_bn, TO* out, int64_t m, int64_t n,
                   Acc scale) {
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Acc* a = acc + i * n;
      TO* o = out + i * n;
      for (int64_t j = 0; j < n; ++j) {
        const Acc b = base != nullptr ? static_cast<Acc>(base[i * s_bm + j * s_bn]) : Acc(0);
        o[j] = static_cast<TO>(low_rank_epilogue<Acc>(b, a[j], scale));
      }
    }
  });
}

Tensor low_rank_sum_cpu(const Tensor& U, const Tensor& S, const Tensor& V, double scale,
                        const std::optional<Tensor>& base) {
  check_low_rank(U, S, V, base);
  const int64_t B = U.size(0), m = U.size(1), n = V.size(1), k = U.size(2);
  const auto acc = acc_type(U.scalar_type());
  const auto out_dtype = base.has_value() ? base->scalar_type() : U.scalar_type();
  // Left factor [m, B k] with S folded in (U_b diag(S_b) side by side), right factor [n, B k]: one GEMM with
  // inner dimension B k.
  Tensor L = (U.to(acc) * S.to(acc).unsqueeze(1)).permute({1, 0, 2}).reshape({m, B * k}).contiguous();
  Tensor R = V.to(acc).permute({1, 0, 2}).reshape({n, B * k});
  Tensor prod = gemm_nt(L, R).contiguous();  // [m, n]
  Tensor out = at::empty({m, n}, U.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "low_rank_sum_out", [&] {
    using TO = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "low_rank_sum_acc", [&] {
      using Acc = scalar_t;
      if (!base.has_value()) {
        epilogue_loop<Acc, Acc, TO>(prod.const_data_ptr<Acc>(), nullptr, 0, 0, out.data_ptr<TO>(), m, n,
                                    static_cast<Acc>(scale));
        return;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base->scalar_type(), "low_rank_sum_base", [&] {
        epilogue_loop<Acc, scalar_t, TO>(prod.const_data_ptr<Acc>(), base->const_data_ptr<scalar_t>(),
                                         base->stride(0), base->stride(1), out.data_ptr<TO>(), m, n,
                                         static_cast<Acc>(scale));
      });
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ CUDA
#ifdef PYMERGE_WITH_CUDA
int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK_VALUE(false, "randomized_svd: unsupported dtype ", s);
  }
  return -1;
}

void cuda_check(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA launch failed (", err, ")");
}

// CUDA operand: the same two products, each one launch of the fused tiled GEMM per task (the centered
// subtraction and the fp16 / bf16 upcast happen in the kernel's operand load; nothing is materialised).
struct CudaOperand final : Operand {
  std::vector<Tensor> thetas;
  Tensor avg;

  CudaOperand(std::vector<Tensor> th, Tensor av) : thetas(std::move(th)), avg(std::move(av)) {
    B = static_cast<int64_t>(thetas.size());
    m = thetas[0].size(0);
    n = thetas[0].size(1);
    acc = acc_type(thetas[0].scalar_type());
  }

  // C[M, N] = (A - avg)[M, K] X[K, N]; transpose = use A^T (M = n, K = m).
  void product(const Tensor& theta, bool transpose, const Tensor& X, int64_t s_xk, int64_t s_xn, Tensor& C,
               int64_t s_cm, int64_t s_cn, int64_t M, int64_t N, int64_t K) {
    const int64_t s_am = transpose ? theta.stride(1) : theta.stride(0);
    const int64_t s_ak = transpose ? theta.stride(0) : theta.stride(1);
    const int64_t s_vm = avg.defined() ? (transpose ? avg.stride(1) : avg.stride(0)) : 0;
    const int64_t s_vk = avg.defined() ? (transpose ? avg.stride(0) : avg.stride(1)) : 0;
    cuda_check(pymerge_rsvd_gemm(theta.const_data_ptr(), dtype_code(theta.scalar_type()), s_am, s_ak,
                                 avg.defined() ? avg.const_data_ptr() : nullptr, s_vm, s_vk, X.const_data_ptr(),
                                 s_xk, s_xn, C.data_ptr(), s_cm, s_cn, M, N, K, acc == at::kDouble,
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "randomized_svd");
  }

  void fwd(const Tensor& Zt, Tensor& Yt) override {
    const int64_t l = Zt.size(1);
    for (int64_t b = 0; b < B; ++b) {  // Y [m, l] = (A - avg) Z, Z [n, l] = Zt^T, Y stored as Yt [l, m]
      Tensor z = Zt[b], y = Yt[b];
      product(thetas[b], false, z, z.stride(1), z.stride(0), y, y.stride(1), y.stride(0), m, l, n);
    }
  }

  void bwd(const Tensor& Yt, Tensor& Zt) override {
    const int64_t l = Yt.size(1);
    for (int64_t b = 0; b < B; ++b) {  // Z [n, l] = (A - avg)^T Y
      Tensor y = Yt[b], z = Zt[b];
      product(thetas[b], true, y, y.stride(1), y.stride(0), z, z.stride(1), z.stride(0), n, l, m);
    }
  }
};

void lu_basis_cuda(const Tensor& LUt, const Tensor& piv, Tensor& out) {
  const int64_t B = LUt.size(0), l = LUt.size(1), m = LUt.size(2);
  Tensor perm = at::empty({B, m}, LUt.options().dtype(at::kLong));
  cuda_check(pymerge_rsvd_lu_basis(LUt.const_data_ptr(), piv.const_data_ptr<int32_t>(), perm.data_ptr<int64_t>(),
                                   out.data_ptr(), B, l, m, LUt.scalar_type() == at::kDouble,
                                   c10::cuda::getCurrentCUDAStream().stream()),
             "randomized_svd (LU basis)");
}

std::tuple<Tensor, Tensor, Tensor> randomized_svd_cuda(const Tensor& A, const Tensor& omega, int64_t k,
                                                       int64_t power_iters) {
  const c10::cuda::CUDAGuard guard(A.device());
  return randomized_svd_impl(A, omega, k, power_iters);
}

std::tuple<Tensor, Tensor, Tensor> randomized_svd_centered_cuda(at::TensorList thetas, const Tensor& avg,
                                                                const Tensor& omega, int64_t k,
                                                                int64_t power_iters) {
  const c10::cuda::CUDAGuard guard(avg.device());
  return randomized_svd_centered_impl(thetas, avg, omega, k, power_iters);
}

Tensor centered_matmul_cuda(at::TensorList thetas, const Tensor& avg, const Tensor& Xt, bool transpose) {
  const c10::cuda::CUDAGuard guard(avg.device());
  return centered_matmul_impl(thetas, avg, Xt, transpose);
}

Tensor low_rank_sum_cuda(const Tensor& U, const Tensor& S, const Tensor& V, double scale,
                         const std::optional<Tensor>& base) {
  check_low_rank(U, S, V, base);
  const c10::cuda::CUDAGuard guard(U.device());
  const int64_t B = U.size(0), m = U.size(1), n = V.size(1), k = U.size(2);
  const auto acc = acc_type(U.scalar_type());
  Tensor u = U.to(acc), s = S.to(acc), v = V.to(acc);
  const auto out_dtype = base.has_value() ? base->scalar_type() : U.scalar_type();
  Tensor out = at::empty({m, n}, U.options().dtype(out_dtype));
  cuda_check(pymerge_low_rank_sum(u.const_data_ptr(), u.stride(0), u.stride(1), u.stride(2), s.const_data_ptr(),
                                  s.stride(0), s.stride(1), v.const_data_ptr(), v.stride(0), v.stride(1),
                                  v.stride(2), base.has_value() ? base->const_data_ptr() : nullptr,
                                  base.has_value() ? dtype_code(base->scalar_type()) : 0,
                                  base.has_value() ? base->stride(0) : 0, base.has_value() ? base->stride(1) : 0,
                                  out.data_ptr(), dtype_code(out_dtype), B, m, n, k, scale, acc == at::kDouble,
                                  c10::cuda::getCurrentCUDAStream().stream()),
             "low_rank_sum");
  return out;
}
#endif  // PYMERGE_WITH_CUDA

std::unique_ptr<Operand> make_operand(std::vector<Tensor> thetas, Tensor avg) {
#ifdef PYMERGE_WITH_CUDA
  if (thetas[0].is_cuda()) return std::make_unique<CudaOperand>(std::move(thetas), std::move(avg));
#endif
  return std::make_unique<CpuOperand>(std::move(thetas), std::move(avg));
}

}  // namespace
}  // namespace rsvd
}  // namespace pymerge

TORCH_LIBRARY_IMPL(pymerge, CPU, m) {
  m.impl("randomized_svd", &pymerge::rsvd::randomized_svd_impl);
  m.impl("randomized_svd_centered", &pymerge::rsvd::randomized_svd_centered_impl);
  m.impl("centered_matmul", &pymerge::rsvd::centered_matmul_impl);
  m.impl("low_rank_sum", &pymerge::rsvd::low_rank_sum_cpu);
}

#ifdef PYMERGE_WITH_CUDA
TORCH_LIBRARY_IMPL(pymerge, CUDA, m) {
  m.impl("randomized_svd", &pymerge::rsvd::randomized_svd_cuda);
  m.impl("randomized_svd_centered", &pymerge::rsvd::randomized_svd_centered_cuda);
  m.impl("centered_matmul", &pymerge::rsvd::centered_matmul_cuda);
  m.impl("low_rank_sum", &pymerge::rsvd::low_rank_sum_cuda);
}
#endif
