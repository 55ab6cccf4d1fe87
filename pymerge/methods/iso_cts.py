"""Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025,
arXiv 2502.04959; docs/METHODS.md §Iso-CTS; official code danielm1405/iso-merging, FusionBench iso_cts).

Per 2-D key (m x n, r = min(m, n)) with task vectors tau_t = theta_t - theta_0, t = 1..T:

1. M = sum_t tau_t = U diag(sigma) V^T. Common space: the top k_c components, k_c = int(f r)
   (f = common_space_fraction, default 0.8 as the paper and both codes), then adjusted exactly as the official
   code does so that r - k_c is a multiple of T: k_c = r - round((r - k_c) / T) T (Python's round, half to
   even); n_t = (r - k_c) / T task-specific components per task.
2. Per task: w_t = (I - U_c U_c^T) tau_t (the common left space projected out); keep its top n_t singular
   triplets (U_t, s_t, V_t).
3. U' = [U_c, U_1 .. U_T], V' = [V_c, V_1 .. V_T] (m x r and n x r); orthogonalise each by its polar factor;
   all r singular values (sigma_1..sigma_kc, s_1..s_T) replaced by their mean sigma_bar.
4. theta = theta_0 + alpha * sigma_bar polar(U') polar(V')^T.
Non-matrix keys (not 2-D, or matching exclude_keys): theta_0 + alpha * mean_t tau_t. f = 1 (n_t = 0) is Iso-C.
alpha default 1.5: FusionBench's documented Iso-CTS setting for 8 CLIP ViT-B/32 / ViT-L/14 tasks (the paper
tunes alpha on validation data; its best values for 8 tasks are around 1.5 as well).

Cheapest route (all exact algebra; only step 2's truncated SVDs are optionally randomized):
- Step 1 needs the full thin SVD of M (k_c = 0.8 r: a randomized SVD would not be cheaper). One SVD per key,
  as the official code.
- Step 2 when m <= n (U from step 1 is square orthogonal): I - U_c U_c^T = U_p U_p^T with U_p = U[:, k_c:]
  (m x q, q = T n_t ~ 0.2 r), so w_t = U_p Z_t with the small Z_t = U_p^T tau_t (q x n) and
  SVD(w_t) = U_p SVD(Z_t): T small SVDs instead of T full m x n ones. When m > n: w_t is formed explicitly.
  svd="exact" takes torch.linalg.svd for these top-n_t SVDs, "randomized" pymerge.ops.randomized_svd (p =
  max(10, 3 n_t), q = 8 by default), "auto" (default) exact when m <= n (the Z_t are small: about 10% of the
  SVD of M); when m > n (w_t is a full m x n matrix) the route TSV-M's cost model (tsv_m.exact_svd_cheaper,
  l = n_t + p) says is cheaper: randomized on every key measured (MiniLM-L6, 7B-like). As for TSV-M, the
  orthogonalisation amplifies per-task subspace errors, and task vectors of real fine-tunes have flat spectra
  at the cut, hence the large p and q: on benchmarks/methods_svd.py's flat-tailed 5504 x 2048 key (the real
  experts' measured spectrum) q = 6 ended 2.0e-3 (relative Frobenius of the merged task vector) from
  FusionBench, q = 8 3.0e-4 for about 10% more time (that script's recorded runs; README).
- Step 3, left side: every task-specific U_t is orthogonal to U_c by construction, so polar(U') =
  [U_c, polar([U_1 .. U_T])] -- one polar factor of an m x q matrix (for m <= n: U_p polar(A) with A q x q).
  Right side: V_c is orthonormal, so V'^T V' = I + Z K Z^T with Z = blockdiag(Q_B, I_q) (B = V_c^T [V_1..V_T]
  = Q_B R_B) and a small (<= 2q) symmetric K; hence (V'^T V')^(-1/2) = I + Z ((I + K)^(-1/2) - I) Z^T and
  polar(V') = V' + (V' Z) F Z^T from one eigendecomposition of size <= 2q, computed in float64 (so the
  squared conditioning of the Gram costs nothing at float32 accuracy; a float32 V_c is first made
  orthonormal to float64 precision by one Newton-Schulz step, ~4 n k_c^2 float64 flops, since the identity
  block is exact only for an exactly orthonormal V_c). No r x r SVD on either side.
- Step 4: one GEMM of inner dimension r fused with theta_0 + alpha (.) by pymerge.ops.low_rank_sum.
Cost per key: one SVD of M + GEMM work (m <= n: O(m n q + n k_c^2); m > n: T projections of 4 m n k_c flops
and T randomized SVDs) + small problems, versus the official code's T + 3 SVDs of m x n size
(benchmarks/methods_svd.py: 6.3x on a 2048 x 2048 key, 4.2x on MiniLM-L6 whose 1536 x 384 keys are tall).

Deliberate deviations (pinned in tests/test_methods_peers_fusionbench.py):
- Task-specific components whose singular value is numerically zero for their own task (s_ti <= max(m, n)
  eps s_t1: w_t of rank < n_t, e.g. a task that left the key untouched) are dropped before the
  orthogonalisation (in the official code their singular vectors are an arbitrary LAPACK completion, which
  then receives the weight sigma_bar); sigma_bar is still the mean over all r values. Common-space
  directions are all kept, as in the official code.
- If the official rounding would give r - k_c > r (possible only for tiny r or f, where the official code
  indexes out of range), one block of T is removed from the task-specific part.
"""
from typing import List

import torch

from ..ops import low_rank_sum, randomized_svd
from .params import BACKEND_PARAM, Param, finite_number, number_in
from .spec import KeyGroup, MethodSpec, key_seed
from .iso_c import iso_c_matrix
from .tsv_m import (DEFAULT_EXCLUDE_KEYS, EXCLUDE_PARAM, POLAR_PARAM, drop_null_components, exact_svd_cheaper,
                    group_matrix_mask, mean_merge, polar_factor, prepare_matrix_keys, svd_params, task_vector_sum)


def common_split(r: int, T: int, fraction: float):
    """(k_c, n_t): common-space size and task-specific components per task, as the official code."""
    k_c = int(r * fraction)
    task_total = round((r - k_c) / T) * T
    if task_total > r:
        task_total -= T
    return r - task_total, task_total // T


def task_oversample(n_t: int, oversample=None) -> int:
    """The randomized per-task SVDs' oversampling: `oversample`, or max(10, 3 n_t) when it is None."""
    return max(10, 3 * n_t) if oversample is None else oversample


def task_svd_route(shape, n_t: int, oversample=None, power_iters: int = 8) -> str:
    """svd="auto"'s route for the per-task top-n_t SVDs of an m x n key (module doc): "exact" when m <= n (the
    small Z_t), else whichever of exact / randomized (l = n_t + task_oversample columns)
    tsv_m.exact_svd_cheaper says is cheaper."""
    m, n = shape
    l = min(n_t + task_oversample(n_t, oversample), min(shape))
    return "exact" if m <= n or exact_svd_cheaper(shape, l, power_iters) else "randomized"


# Per-task matrices of a key are batched into one [T, p, n] tensor up to this size, else made one at a time.
BATCH_BYTES = 256 << 20


def _top_svds(make, T, shape, k, acc, *, svd, oversample, power_iters, seed, key, backend):
    """Top-k triplets of the T matrices make(t) [p, n] (acc): U [T, p, k], S [T, k], V [T, n, k]."""
    p, n = shape
    per_batch = max(1, BATCH_BYTES // max(1, p * n * torch.empty(0, dtype=acc).element_size()))
    Us, Ss, Vs = [], [], []
    for start in range(0, T, per_batch):
        A = torch.stack([make(t) for t in range(start, min(T, start + per_batch))])
        if svd == "exact":
            U, S, Vh = torch.linalg.svd(A, full_matrices=False)
            U, S, V = U[..., :k], S[..., :k], Vh[..., :k, :].mT
        else:
            # One seed per task (key_seed(seed, key, t)): task t's test matrix is the same however the T
            # matrices are split into batches.
            U, S, V = randomized_svd(A, k, oversample=oversample, power_iters=power_iters,
                                     seed=[key_seed(seed, key, t) for t in range(start, start + A.shape[0])],
                                     backend=backend)
        del A
        Us.append(U.to(acc))
        Ss.append(S.to(acc))
        Vs.append(V.to(acc))
    return torch.cat(Us), torch.cat(Ss), torch.cat(Vs)


def polar_with_orthonormal_block(Vc: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    """polar([Vc, Vt]) for Vc [n, kc] with orthonormal columns and any Vt [n, q] (kc + q <= n).

    [Vc, Vt]^T [Vc, Vt] = I + Z K Z^T, Z = blockdiag(Q_B, I_q), B = Vc^T Vt = Q_B R_B, K = [[0, R_B], [R_B^T,
    Vt^T Vt - I]]: the inverse square root only needs the eigendecomposition of I + K (size <= kc + q, <= 2q),
    done in float64 (after one float64 Newton-Schulz re-orthonormalisation of a float32 Vc, ~4 n kc^2 flops),
    as are the products forming the result (~4 n kc q flops).
    Numerically zero eigenvalues give the partial isometry. Returns [n, kc + q] in Vc's dtype.
    """
    n, kc = Vc.shape
    q = Vt.shape[1]
    dt = Vc.dtype
    if kc == 0 or q == 0:
        return polar_factor(torch.cat([Vc, Vt], 1), "auto")[0]
    f64 = torch.float64
    Vc64, Vt64 = Vc.to(f64), Vt.to(f64)
    if dt != f64:
        # The identity block above is exact only for exactly orthonormal Vc, and any error E in Vc^T Vc = I + E
        # reaches the result amplified by cond([Vc, Vt])^2 (the Gram squares it). A float32 SVD's Vc has
        # ||E|| ~ n eps32; one float64 Newton-Schulz step Vc (3I - Vc^T Vc) / 2 leaves O(||E||^2), and moves Vc by
        # O(||E||) only, which the polar factor feels linearly (as any float32 rounding of the inputs).
        Vc64 = Vc64 - 0.5 * (Vc64 @ (Vc64.mT @ Vc64 - torch.eye(kc, dtype=f64, device=Vc.device)))
    B = Vc64.mT @ Vt64                                        # [kc, q]
    QB, RB = torch.linalg.qr(B)                               # [kc, j], [j, q], j = min(kc, q)
    j = QB.shape[1]
    # I + K = Z^T [Vc, Vt]^T [Vc, Vt] Z = [[I_j, R_B], [R_B^T, Vt^T Vt]]; its eigenvalues are those of the Gram
    # matrix on range(Z) (all others are 1).
    gram_z = torch.zeros(j + q, j + q, dtype=f64, device=Vc.device)
    gram_z[:j, :j] = torch.eye(j, dtype=f64, device=Vc.device)
    gram_z[:j, j:] = RB
    gram_z[j:, :j] = RB.mT
    gram_z[j:, j:] = Vt64.mT @ Vt64
    mu, W = torch.linalg.eigh(gram_z)
    # Only an exactly singular [Vc, Vt] (eigenvalues at float64 rounding level) gets the partial isometry.
    tol = float(mu[-1].clamp_min(0)) * (kc + q) * torch.finfo(f64).eps
    f = torch.where(mu > tol, mu.clamp_min(tol).rsqrt() - 1.0, torch.full_like(mu, -1.0))
    F = (W * f) @ W.mT                                        # (I + K)^(+1/2) - I on range(Z)
    # F has norm ~ cond([Vc, Vt]) and the sum below cancels to O(1): float64 keeps it at the SVD's accuracy.
    G = torch.cat([Vc64 @ QB, Vt64], 1) @ F                   # [n, j + q]
    return torch.cat([Vc64 + G[:, :j] @ QB.mT, Vt64 + G[:, j:]], 1).to(dt)


def iso_cts_matrix(key, base, thetas, *, alpha, common_space_fraction, svd, oversample, power_iters, seed, polar,
                   backend, acc):
    """Iso-CTS of one 2-D key (module doc). Returns [m, n] in acc."""
    m, n = base.shape
    T, r = len(thetas), min(m, n)
    k_c, n_t = common_split(r, T, common_space_fraction)
    if n_t == 0:                                              # the common space is everything: Iso-C
        return iso_c_matrix(base, thetas, alpha=alpha, polar=polar, backend=backend, acc=acc)
    b = base.to(acc)
    M = task_vector_sum(base, thetas, acc)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    del M
    Uc, Sc, Vc = U[:, :k_c], S[:k_c], Vh[:k_c].mT
    if svd == "auto":
        svd = task_svd_route((m, n), n_t, oversample, power_iters)
    kw = dict(svd=svd, oversample=task_oversample(n_t, oversample), power_iters=power_iters, seed=seed, key=key,
              backend=backend)
    if m <= n:
        # w_t = U_p Z_t exactly (U is square orthogonal): SVD(w_t) = U_p SVD(Z_t), Z_t = U_p^T tau_t [q, n].
        Up = U[:, k_c:]
        Uz, St, Vt = _top_svds(lambda t: Up.mT @ (thetas[t].to(acc) - b), T, (Up.shape[1], n), n_t, acc, **kw)
        A, st, Yt = drop_null_components(Uz, St, Vt, base.shape)
        PUt = Up @ polar_factor(A, polar)[0] if st.numel() else A.new_zeros(m, 0)
    else:
        def projected(t):
            w = thetas[t].to(acc) - b
            return w.sub_(Uc @ (Uc.mT @ w))
        Uw, St, Vt = _top_svds(projected, T, (m, n), n_t, acc, **kw)
        X, st, Yt = drop_null_components(Uw, St, Vt, base.shape)
        X = X - Uc @ (Uc.mT @ X)                              # rounding-level leakage into the common space
        PUt = polar_factor(X, polar)[0] if st.numel() else X
    sigma_bar = (float(Sc.sum()) + float(St.sum())) / r
    if sigma_bar == 0.0:
        return b.clone()
    PU = torch.cat([Uc, PUt], 1)
    PV = polar_with_orthonormal_block(Vc, Yt)
    return low_rank_sum(PU, torch.full((PU.shape[1],), sigma_bar, dtype=acc, device=b.device), PV, scale=alpha,
                        base=b, backend=backend)


def merge_group(group: KeyGroup, *, alpha=1.5, common_space_fraction=0.8, svd="auto", oversample=None,
                power_iters=8, seed=0, polar="auto", exclude_keys=DEFAULT_EXCLUDE_KEYS, backend="auto",
                _matrix=None) -> List[torch.Tensor]:
    acc = group.compute_dtype
    mask = group_matrix_mask("iso_cts", group, exclude_keys, _matrix)
    out = []
    for key, base, thetas, is_matrix in zip(group.keys, group.base, group.models, mask):
        if is_matrix:
            out.append(iso_cts_matrix(key, base, thetas, alpha=alpha, common_space_fraction=common_space_fraction,
                                      svd=svd, oversample=oversample, power_iters=power_iters, seed=seed,
                                      polar=polar, backend=backend, acc=acc))
        else:
            out.append(mean_merge(base, thetas, alpha, acc))
    return out


SPEC = MethodSpec(
    name="iso_cts",
    description="Iso-CTS: isotropic merge of the common subspace of sum_t tau_t plus each task's own top directions",
    merge_group=merge_group,
    prepare=prepare_matrix_keys("iso_cts"),
    params=(
        Param("alpha", 1.5, "scaling of the merged task vector (FusionBench's 8-task ViT setting; tune it)",
              check=finite_number),
        Param("common_space_fraction", 0.8, "fraction of min(m, n) kept from the summed task vectors' top "
              "singular directions (paper / official default 0.8)", check=number_in(0, 1)),
        *svd_params("auto", ("auto", "randomized", "exact"), 8, "max(10, 3 n_t)"),
        POLAR_PARAM,
        EXCLUDE_PARAM,
        BACKEND_PARAM,
    ),
)
