"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081; docs/METHODS.md §TSV-M).

Per 2-D key ("matrix key", m x n, r = min(m, n)) with task vectors tau_t = theta_t - theta_0, t = 1..T:

    tau_t ~= U_t diag(s_t) V_t^T        top d = int(r / T) singular triplets of each task vector
    X = [U_1 .. U_T]  (m x T d),  Y = [V_1 .. V_T]  (n x T d),  s = [s_1 .. s_T]
    Delta = polar(X) diag(s) polar(Y)^T     polar(A) = P Q^T for A = P Sigma Q^T (the orthonormal polar factor)
    theta = theta_0 + alpha * Delta         (alpha default 1.0, the official / FusionBench default)

Non-matrix keys (not 2-D, or 2-D keys matching exclude_keys): theta_0 + alpha * mean_t tau_t.

Cheapest route, and why it is correct:
- Per-task truncated SVDs: svd="randomized" (default) runs pymerge.ops.randomized_svd on the implicit batch
  Centered(thetas, avg=theta_0) = [tau_1 .. tau_T] (never materialised), rank d, oversample p, power_iters q:
  about (2q + 2) m n (d + p) flops per task instead of a full SVD (~4 m n^2 + 22 n^3). Halko-Martinsson-Tropp
  (2011, Thm 10.7/10.8, Sec. 9.4): E||tau - Q Q^T tau||_F <= (1 + d/(p - 1))^(1/2) (sum_{j>d} sigma_j^2)^(1/2) at
  q = 0, and each singular subspace converges like (sigma_{d+p+1}/sigma_i)^(2q+1). TSV-M needs more than a good
  rank-d approximation: the orthogonalisation below amplifies per-task subspace errors by about cond(X), which
  is 1e4..1e5 when tasks share directions (measured on benchmarks/methods_svd.py's synthetic deltas). Hence the
  defaults p = max(10, d) (a 2d-column range finder) and q = 4. Measured there (relative Frobenius difference
  of the merged task vector from FusionBench's exact result; CPU-time speed-up over it): defaults 1.5e-3 at
  2.2x on MiniLM-L6 shapes, 4.9e-3 at 2.4x on a 2048 x 2048 key; q = 6: 8e-5 at 2.0x; the usual p = 10, q = 2:
  0.17 at 3.4x. tests/test_methods_tsv_iso.py holds the default to 1e-3 on sigma_i ~ 0.8^i spectra.
  svd="exact": torch.linalg.svd of each tau_t (the official route, what FusionBench does).
- Orthogonalisation: Delta needs polar(X) and polar(Y) only (FusionBench: an SVD of each, then U V^T). The
  cheaper candidate is polar(X) = X (X^T X)^(-1/2) from the eigendecomposition of the small Gram matrix
  (m k^2 + O(k^3) flops instead of an SVD's ~4 m k^2 + 22 k^3), but the Gram squares the condition number
  (relative error ~ eps cond(X)^2), and cond(X) is large: on the short side of a key T d ~ r, so that factor
  is (nearly) square, with cond ~1e3 even for independent random tasks (r = 384, T = 8), and on either side
  cond reaches 1e4..1e5 when tasks share directions (measured). polar="auto" therefore uses the float32 SVD
  (error ~ eps cond, as FusionBench) for float32/bf16/fp16 weights and the Gram route only for float64 ones
  (eps64 cond^2 is still far below float32 rounding; a float64 Gram + eigh costs about a float32 SVD, so it
  is no shortcut for float32 data). polar="gram" tries the Gram route first and falls back to the SVD
  when eps cond(X)^2 > GRAM_MAX_ERROR (worth it only for nearly orthogonal task subspaces). Both
  implementations thus spend two SVDs of ~r x r per key here, which caps the speed-up over the official
  route at (T + 2) / 2 = 5x for T = 8 even with free per-task SVDs. An SVD-free scaled Newton iteration
  (one inverse per step) needs 6-8 steps to float32 accuracy on these factors, slower than the SVD on a CPU
  (benchmarks/polar.py measures every route).
- Reconstruction: one GEMM with inner dimension T d, fused with theta_0 + alpha * (...) through
  pymerge.ops.low_rank_sum.
Deliberate deviation (pinned in tests/test_methods_peers_fusionbench.py): components whose singular value
is numerically zero for their own task (s_ti <= max(m, n) eps s_t1: a task vector of rank < d, e.g. a LoRA
delta, or a task that left the key untouched) are dropped before orthogonalisation. They multiply s_ti = 0,
so they add nothing themselves, but in the official code their arbitrary (LAPACK-chosen) singular vectors
still rotate the polar factor of all the other tasks' directions.
Per-task d = int(r / T) >= 1 is required (T <= r); a key with r < T raises ValueError (exclude it).

Helpers shared with iso_c.py and iso_cts.py live here: key selection, the mean/sum of task vectors, and
polar_factor.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..ops import Centered, low_rank_sum, randomized_svd
from .cart import DEFAULT_EXCLUDE_KEYS
from .params import BACKEND_PARAM, Param, finite_number, int_at_least, regex_list
from .spec import KeyGroup, KeyInfo, MethodSpec, key_seed

# polar via the Gram matrix is accepted when eps * cond(X)^2 stays below this (see the module doc).
GRAM_MAX_ERROR = 1e-6


# ------------------------------------------------------------------------------------ shared helpers
def is_matrix_key(key: str, shape, exclude_keys: Sequence[str]) -> bool:
    """Whether `key` (of `shape`) is merged as a matrix: 2-D and matching none of exclude_keys (re.search). The rule
    matrix_keys applies to every key, without its whole-model checks; callers that see one key at a time
    (pymerge/adapters/mergekit.py) use it directly."""
    return len(shape) == 2 and not any(re.search(p, key) for p in exclude_keys)


def matrix_keys(method: str, keys: Dict[str, KeyInfo], exclude_keys: Sequence[str]) -> List[str]:
    """Names of the 2-D keys merged as matrices: every 2-D key matching none of exclude_keys (regexes,
    re.search). Conv kernels and other >2-D keys are not matrices (as in the official code and FusionBench).
    A user-given pattern (anything but DEFAULT_EXCLUDE_KEYS) that matches no 2-D key raises ValueError."""
    compiled = []
    for p in exclude_keys:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{method}: exclude_keys pattern {p!r} is not a valid regex: {e}") from None
    two_d = [k for k, v in keys.items() if len(v.shape) == 2]
    if tuple(exclude_keys) != tuple(DEFAULT_EXCLUDE_KEYS):
        for p, c in zip(exclude_keys, compiled):
            if not any(c.search(k) for k in two_d):
                raise ValueError(f"{method}: exclude_keys pattern {p!r} matches no 2-D key; 2-D keys: "
                                 f"{two_d[:10]}{' ...' if len(two_d) > 10 else ''}")
    return [k for k in two_d if is_matrix_key(k, keys[k].shape, exclude_keys)]


def prepare_matrix_keys(method: str):
    """MethodSpec.prepare: resolve which keys are matrices once for the whole model."""
    def prepare(params: dict, keys: Dict[str, KeyInfo]) -> dict:
        return {**params, "_matrix": frozenset(matrix_keys(method, keys, params["exclude_keys"]))}
    return prepare


def group_matrix_mask(method: str, group: KeyGroup, exclude_keys, _matrix) -> List[bool]:
    """Which keys of the group are matrices (from prepare(), or from this group alone outside pymerge.merge)."""
    if _matrix is None:
        infos = {k: KeyInfo(b.shape, b.dtype) for k, b in zip(group.keys, group.base)}
        _matrix = frozenset(matrix_keys(method, infos, exclude_keys))
    return [k in _matrix for k in group.keys]


def task_vector_sum(base: torch.Tensor, thetas: Sequence[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """sum_t (theta_t - theta_0) in acc. Each difference is formed first (exact for nearby floats, Sterbenz),
    so the sum is accurate relative to the task vectors, not to the much larger weights."""
    b = base.to(acc)
    total = thetas[0].to(acc) - b
    for theta in thetas[1:]:
        total.add_(theta.to(acc) - b)
    return total


def mean_merge(base: torch.Tensor, thetas: Sequence[torch.Tensor], alpha: float, acc: torch.dtype) -> torch.Tensor:
    """theta_0 + alpha * mean_t tau_t (non-matrix keys of TSV-M / Iso-C / Iso-CTS)."""
    return base.to(acc) + task_vector_sum(base, thetas, acc).mul_(alpha / len(thetas))


def polar_factor(X: torch.Tensor, route: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal polar factor of X [p, k] and its singular values.

    Returns (P [p, k], sigma [min(p, k)]) in X's dtype: X = P H with P = U V^T for the thin SVD X = U S V^T
    (P^T P = I for k <= p, P P^T = I for p < k). As in the official codes, every singular direction is kept,
    however small its singular value: ill-conditioned factors are the norm here (cond ~ 1e3..1e6) and their
    polar factor is still determined to ~ eps cond in float32. (For an exactly rank-deficient X the polar
    factor is not unique and the SVD's completion is used, as the official codes do.)
    route: "svd" (torch.linalg.svd, backward stable), "gram" (eigh of the smaller Gram matrix; error ~ eps
    cond(X)^2; falls back to the SVD when that exceeds GRAM_MAX_ERROR), "auto" (gram for float64, svd
    otherwise: in float32 the Gram route is only accepted for cond(X) <~ 3, which merging factors rarely have,
    and a rejected attempt costs ~1/3 of the SVD). sigma is unordered on the gram route.
    """
    p, k = X.shape
    if min(p, k) == 0:
        return torch.zeros_like(X), X.new_zeros(0)
    if route not in ("auto", "svd", "gram"):
        raise ValueError(f"polar_factor: route must be 'auto', 'svd' or 'gram', got {route!r}")
    if route == "auto":
        route = "gram" if X.dtype == torch.float64 else "svd"
    if route == "gram":
        got = _polar_gram(X)
        if got is not None:
            return got
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh, S


def _polar_gram(X):
    tall = X.shape[0] >= X.shape[1]
    A = X if tall else X.mT
    lam, Q = torch.linalg.eigh(A.mT @ A)            # ascending
    lmax = float(lam[-1])
    if lmax <= 0.0 or float(lam[0]) <= 0.0:
        return None
    eps = torch.finfo(X.dtype).eps
    if eps * lmax / float(lam[0]) > GRAM_MAX_ERROR:
        return None
    P = A @ ((Q * lam.rsqrt()) @ Q.mT)
    return (P if tall else P.mT), lam.sqrt()


def top_task_svds(base: torch.Tensor, thetas: Sequence[torch.Tensor], k: int, acc: torch.dtype, *, svd: str,
                  oversample: int, power_iters: int, seed: Optional[int], key: str, backend: str):
    """Top-k singular triplets of every task vector tau_t = theta_t - theta_0 of one key.

    Returns U [T, m, k], S [T, k], V [T, n, k] in acc. svd="exact": full thin SVD of each, one at a time;
    svd="randomized": pymerge.ops.randomized_svd of the implicit batch Centered(thetas, theta_0), seeded per key.
    """
    if svd == "exact":
        # One task at a time: peak memory one tau_t and its SVD, not T of them.
        b = base.to(acc)
        Us, Ss, Vs = [], [], []
        for theta in thetas:
            U, S, Vh = torch.linalg.svd(theta.to(acc) - b, full_matrices=False)
            Us.append(U[:, :k])
            Ss.append(S[:k])
            Vs.append(Vh[:k].mT)
            del U, S, Vh
        return torch.stack(Us), torch.stack(Ss), torch.stack(Vs)
    U, S, V = randomized_svd(Centered(list(thetas), base), k, oversample=oversample, power_iters=power_iters,
                             seed=key_seed(seed, key), backend=backend)
    return U.to(acc), S.to(acc), V.to(acc)


def drop_null_components(U, S, V, shape):
    """Flatten per-task factors [T, *, d] to [*, T d] and drop numerically zero components (S <= tolerance)."""
    T, m, d = U.shape
    n = V.shape[1]
    X = U.transpose(0, 1).reshape(m, T * d)
    Y = V.transpose(0, 1).reshape(n, T * d)
    s = S.reshape(T * d)
    if s.numel() == 0:
        return X, s, Y
    # Relative to each task's own largest singular value: the numerical rank of tau_t itself.
    eps = torch.finfo(S.dtype).eps * max(shape)
    keep = (S > eps * S[:, :1]).reshape(T * d)
    if bool(keep.all()):
        return X, s, Y
    return X[:, keep], s[keep], Y[:, keep]


# ------------------------------------------------------------------------------------------ TSV-M
def tsv_m_matrix(key, base, thetas, *, alpha, svd, oversample, power_iters, seed, polar, backend, acc):
    """TSV-M of one 2-D key: theta_0 + alpha * polar(X) diag(s) polar(Y)^T (module doc). Returns [m, n] in acc."""
    m, n = base.shape
    T, r = len(thetas), min(base.shape)
    d = r // T
    if d < 1:
        raise ValueError(f"tsv_m: key {key!r} of shape {tuple(base.shape)} has min(m, n) = {r} < T = {T} models, "
                         f"so int(r / T) = 0 singular vectors per task; add it to exclude_keys (merged by the mean)")
    if oversample is None:
        oversample = max(10, d)
    U, S, V = top_task_svds(base, thetas, d, acc, svd=svd, oversample=oversample, power_iters=power_iters,
                            seed=seed, key=key, backend=backend)
    X, s, Y = drop_null_components(U, S, V, base.shape)
    del U, S, V
    if s.numel() == 0:
        return base.to(acc).clone()
    PX, _ = polar_factor(X, polar)
    PY, _ = polar_factor(Y, polar)
    return low_rank_sum(PX, s, PY, scale=alpha, base=base.to(acc), backend=backend)


def merge_group(group: KeyGroup, *, alpha=1.0, svd="randomized", oversample=None, power_iters=4, seed=0,
                polar="auto", exclude_keys=DEFAULT_EXCLUDE_KEYS, backend="auto", _matrix=None) -> List[torch.Tensor]:
    acc = group.compute_dtype
    mask = group_matrix_mask("tsv_m", group, exclude_keys, _matrix)
    out = []
    for key, base, thetas, is_matrix in zip(group.keys, group.base, group.models, mask):
        if is_matrix:
            out.append(tsv_m_matrix(key, base, thetas, alpha=alpha, svd=svd, oversample=oversample,
                                    power_iters=power_iters, seed=seed, polar=polar, backend=backend, acc=acc))
        else:
            out.append(mean_merge(base, thetas, alpha, acc))
    return out


def svd_params(default_svd, svd_choices, power_iters, oversample_help):
    """svd / oversample / power_iters / seed parameters (shared with iso_cts.py)."""
    return (
        Param("svd", default_svd, "per-task truncated SVDs: randomized (pymerge.ops.randomized_svd) or exact "
              "(torch.linalg.svd, the official route)" + (", auto (see the method's doc)" if "auto" in svd_choices
                                                          else ""), type=str, choices=svd_choices),
        Param("oversample", None, "randomized SVD oversampling p; None = " + oversample_help, type=int,
              check=int_at_least(0)),
        Param("power_iters", power_iters, "randomized SVD power iterations q", type=int, check=int_at_least(0)),
        Param("seed", 0, "randomized SVD seed (mixed with each key name); None = fresh randomness", type=int,
              check=int_at_least(-(1 << 62)), optional=True),
    )


POLAR_PARAM = Param("polar", "auto", "how polar factors are computed: auto (SVD; Gram eigendecomposition for "
                    "float64 weights), svd, gram (with SVD fallback when ill-conditioned)", type=str,
                    choices=("auto", "svd", "gram"))
EXCLUDE_PARAM = Param("exclude_keys", DEFAULT_EXCLUDE_KEYS, "regexes of 2-D keys merged by the mean of task "
                      "vectors instead (default: embeddings and heads; () = every 2-D key, as FusionBench)",
                      type=tuple, check=regex_list)

SPEC = MethodSpec(
    name="tsv_m",
    description="TSV-M: theta_0 + alpha * orthogonalised sum of each task's top int(r/T) singular components",
    merge_group=merge_group,
    prepare=prepare_matrix_keys("tsv_m"),
    params=(
        Param("alpha", 1.0, "scaling of the merged task vector (official / FusionBench default 1.0)",
              check=finite_number),
        *svd_params("randomized", ("randomized", "exact"), 4, "max(10, d): the range finder holds 2d columns"),
        POLAR_PARAM,
        EXCLUDE_PARAM,
        BACKEND_PARAM,
    ),
)
