// The one place where pymerge's operator schemas are defined (pytorch/extension-cpp pattern).
// Each csrc/<op>.cpp adds TORCH_LIBRARY_IMPL(pymerge, CPU) and, when built with CUDA, (pymerge, CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pymerge, m) {
  // avg = sum_t weights[t] * thetas[t]; centered[t] = thetas[t] - avg. One pass over the inputs.
  // weights: float32 (float64 for float64 inputs) [T]. With centered=False the second output is empty.
  m.def("center_task_vectors(Tensor[] thetas, Tensor weights, ScalarType? out_dtype=None, "
        "bool centered=True) -> (Tensor, Tensor)");
  // Same into caller buffers; a centered buffer with numel 0 skips the centered output.
  m.def("center_task_vectors_out(Tensor[] thetas, Tensor weights, Tensor(a!) avg, Tensor(b!) centered) -> ()");

  // Halko-Martinsson-Tropp randomized SVD of a batch A [B, m, n] with test matrix omega [B, n, l]:
  // returns U [B, m, k], S [B, k], V [B, n, k] with A[b] ~= U[b] diag(S[b]) V[b]^T.
  m.def("randomized_svd(Tensor A, Tensor omega, int k, int power_iters) -> (Tensor, Tensor, Tensor)");
  // Same for the implicit batch A[t] = thetas[t] - avg (never materialised); omega [T, n, l].
  m.def("randomized_svd_centered(Tensor[] thetas, Tensor avg, Tensor omega, int k, int power_iters) "
        "-> (Tensor, Tensor, Tensor)");
  // The implicit batch's products alone: Xt [T, l, n] -> (A[t] X[t])^T [T, l, m], or with transpose
  // Xt [T, l, m] -> (A[t]^T X[t])^T [T, l, n], A[t] = thetas[t] - avg, in fp32 (fp64 for fp64 thetas).
  m.def("centered_matmul(Tensor[] thetas, Tensor avg, Tensor Xt, bool transpose) -> Tensor");
  // base + scale * sum_b U[b] diag(S[b]) V[b]^T as one GEMM with inner dimension B*k.
  m.def("low_rank_sum(Tensor U, Tensor S, Tensor V, float scale, Tensor? base) -> Tensor");

  // Row-wise divergence between distributions over the last dim of student [N, V] and teacher [N, V].
  // kind: 0 = generalised Jensen-Shannon (beta), 1 = KL(teacher || student), 2 = entropy(student).
  // Returns per-row loss [N] (float32, float64 for float64 student; 0 on masked rows) and, if compute_grad, d loss[n] / d student[n]
  // [N, V] in student's dtype (empty otherwise).
  m.def("divergence(Tensor student, Tensor teacher, Tensor? mask, int kind, float beta, float temperature, "
        "bool teacher_is_logits, bool compute_grad) -> (Tensor, Tensor)");
}

// Importing pymerge._C registers the operators above; the module itself exports nothing.
static struct PyModuleDef pymerge_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pymerge_C_module); }
