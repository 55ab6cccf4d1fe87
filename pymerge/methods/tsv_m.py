"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081; docs/METHODS.md §TSV-M).

Per 2-D key ("matrix key", m x n, r = min(m, n)) with task vectors tau_t = theta_t - theta_0, t = 1..T:

    tau_t ~= U_t diag(s_t) V_t^T        top d = int(r / T) singular triplets of each task vector
    X = [U_1 .. U_T]  (m x T d),  Y = [V_1 .. V_T]  (n x T d),  s = [s_1 .. s_T]
    Delta = polar(X) diag(s) polar(Y)^T     polar(A) = P Q^T for A = P Sigma Q^T (the orthonormal polar factor)
    theta = theta_0 + alpha * Delta         (alpha default 1.0, the official / FusionBench default)

Non-matrix keys (not 2-D, or 2-D keys matching exclude_keys): theta_0 + alpha * mean_t tau_t.

Cheapest route, and why it is correct:
- Per-task truncated SVDs, svd="auto" (default): per key, whichever of the two routes below a cost model fitted
  on a CPU (EXACT_SVD_NS, EXACT_TALL_SHARE, RANDOMIZED_SVD_NS, exact_svd_cheaper) says is cheaper. Both give
  TSV-M's result: the randomized route at its defaults is <= 1e-2 from the exact one on every measured input
  (below), the exact route is the official one.
  svd="exact": torch.linalg.svd of each tau_t (the official route, what FusionBench does), of its tall
  orientation (a wide tau_t is decomposed as tau_t^T: MKL is 2-3x faster there, 0.034 vs 0.066 s at 384 x 1536).
  svd="randomized": pymerge.ops.randomized_svd on the implicit batch Centered(thetas, avg=theta_0) = [tau_1 ..
  tau_T] (never materialised), rank d, range finder l = d + p columns, q power iterations: about (2q + 2) m n l
  flops per task instead of a full SVD (~4 m n^2 + 22 n^3). Each singular subspace converges like
  (sigma_(l+1) / sigma_i)^(2q+1) (Halko-Martinsson-Tropp 2011, Sec. 9.4), and TSV-M needs more than a good rank-d
  approximation: the orthogonalisation below amplifies per-task subspace errors by about cond(X), 1e3..1e5
  on real fine-tunes (the short-side factor, T d ~ r columns, is nearly square). Real task vectors have flat
  spectra at the cut: on the six all-MiniLM-L6-v2 fine-tunes of benchmarks/methods_svd.py --case real,
  median s_(d+1) / s_d 0.99 and s_(2d+1) / s_d 0.57 (0.46-0.72), so a power iteration at l = 2d gains ~0.35.
  Hence the defaults p = max(10, d) (l = 2d) and q = 8. Measured (relative Frobenius difference of the merged
  task vector from svd="exact", which is FusionBench's result up to float32 rounding: 2.9e-5 from it on the real
  experts, where FusionBench's own float32 result is 2.3e-5 from its float64 one; 6.5e-6 on the flat keys):
      q                     4        6        8        12
      real MiniLM, T = 6    4.3e-2   3.6e-2   8.9e-4   3.2e-4   (one 1536 x 384 key: 0.18 / 0.19 / 9e-4 / 4e-5)
      flat 2048^2, T = 8    1.9e-2   2.6e-3   3.9e-4   5.1e-5   (CPU s: 8.8 / 10.1 / 11.5 / 14.3; exact 20.3)
      flat 5504 x 2048      4.8e-2   1.6e-3   2.3e-4   2.2e-5   (CPU s: 16.1 / 19.9 / 23.6 / 31.0; exact 30.8)
      flat 4096^2           1.7e-2            3.5e-4   7.2e-5   (CPU s: 63 / - / 84 / 105; exact 148)
  ("flat": pymerge.synthetic.flat_task_vector_models, every tau_t with the spectrum measured on those experts'
  tau_t, T = 8; benchmarks/methods_svd.py --case flat [--full], where FusionBench is 6.5e-6 from exact.) So q = 8
  is what both real and flat inputs need, at every size measured. Spending the same flops on a wider range
  finder instead (p = 2d, q = 5; p = 3d, q = 3-4; on 2048^2) is as accurate but 10-40% slower (its QRs grow
  with l^2). On the power-law spectra of benchmarks/methods_svd.py's synthetic case (with a gap at the cut)
  q = 4 was already 1e-3..6e-3: those spectra hid the flat-tail problem. tests/test_methods_tsv_iso.py holds
  the default within 2e-3 of exact on flat spectra (where q = 4 is 8e-3..2e-2 off) and svd="randomized" within
  1e-3 on sigma_i ~ 0.8^i ones.
  The cost model (1 thread, float32, torch 2.13 + MKL; benchmarks/methods_svd.py --case flat prints the routes):
  exact ~ EXACT_SVD_NS r^2 (r + EXACT_TALL_SHARE (M - r)) ns per task (M = max(m, n)), randomized ~
  RANDOMIZED_SVD_NS (2q + 2) M r l ns. For a square key at the defaults (l = 2r / T, q = 8) this picks exact
  for T <= 4; for a 4:1 key (MLP) for T <= 7. Where the two costs are close (MiniLM, T = 6: 0.016 s exact vs
  0.012 s randomized per task on a 384 x 384 key) either choice costs about the same; where they are not (T = 8
  on 2048 x 2048: 2.2 s vs 1.0 s per task) the randomized route is ~2x faster per task and 1.8x on the key (the
  polar SVDs below are shared by both routes): on the flat keys above the default is 1.81x / 1.30x / 1.77x
  faster than svd="exact" (and FusionBench, as fast as exact there). On the real MiniLM fine-tunes (T = 6) it
  takes the exact SVDs on the 1536 x 384 / 384 x 1536 keys and q = 8 on the 384 x 384 ones: 1.37x FusionBench's
  speed at 7.6e-5 from it, equal accuracy (benchmarks/methods_svd.py --case real; the former default, q = 4
  everywhere, was 4.3e-2 from it). On the power-law MiniLM-shaped synthetic deltas of --case synthetic (T = 8,
  every key randomized) it is 1.30x at 4.2e-5 (the former default claimed 2.4x at 1.1e-3 there).
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

# svd="auto"'s cost model (module doc), CPU seconds * 1e9 per unit, measured at 1 thread in float32 (torch 2.13,
# MKL, AVX-512): torch.linalg.svd of a square r x r matrix takes 0.25-0.29 ns * r^3 at r = 384, 1024, 2048 (per
# task, thin U and V); of a tall M x r one 0.27 ns * r^2 (r + 0.37 (M - r)) (1536 x 384: 0.032 s, 2048 x 512:
# 0.073 s); pymerge.ops.randomized_svd on the Centered batch of T tasks 0.025-0.036 ns per (2q + 2) M r l and task
# (r = 384..2048, l = 2d, q = 4..12; up to 0.05 when l = r, where the exact route wins anyway).
EXACT_SVD_NS = 0.27
EXACT_TALL_SHARE = 0.37
RANDOMIZED_SVD_NS = 0.03


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


def exact_svd_cheaper(shape, l: int, power_iters: int) -> bool:
    """svd="auto"'s route for a key of `shape`: True when T exact per-task SVDs cost no more than the randomized
    route with a range finder of l columns and power_iters iterations (the cost model of the module doc; the
    constants EXACT_SVD_NS, EXACT_TALL_SHARE, RANDOMIZED_SVD_NS). Both costs are per task, so T only enters
    through l (= 2 int(r / T) at the default oversampling)."""
    r, M = min(shape), max(shape)
    exact = EXACT_SVD_NS * r * r * (r + EXACT_TALL_SHARE * (M - r))
    randomized = RANDOMIZED_SVD_NS * (2 * power_iters + 2) * M * r * l
    return exact <= randomized * (1 + 1e-9)     # a tie (a square key at T = 4) takes the exact route


def top_task_svds(base: torch.Tensor, thetas: Sequence[torch.Tensor], k: int, acc: torch.dtype, *, svd: str,
                  oversample: int, power_iters: int, seed: Optional[int], key: str, backend: str):
    """Top-k singular triplets of every task vector tau_t = theta_t - theta_0 of one key.

    Returns U [T, m, k], S [T, k], V [T, n, k] in acc. svd="exact": full thin SVD of each, one at a time (of
    tau_t^T for a wide key, the faster orientation); svd="randomized": pymerge.ops.randomized_svd of the implicit
    batch Centered(thetas, theta_0), seeded per key.
    """
    if svd == "exact":
        # One task at a time: peak memory one tau_t and its SVD, not T of them.
        b = base.to(acc)
        wide = b.shape[0] < b.shape[1]
        Us, Ss, Vs = [], [], []
        for theta in thetas:
            A = theta.to(acc) - b
            # MKL's SVD of a row-major wide matrix is 2-3x slower than of its (tall) transpose: tau^T = V S U^T.
            U, S, Vh = torch.linalg.svd(A.mT if wide else A, full_matrices=False)
            if wide:
                U, Vh = Vh.mT, U.mT
            del A
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
    if svd == "auto":
        svd = "exact" if exact_svd_cheaper(base.shape, min(d + oversample, r), power_iters) else "randomized"
    U, S, V = top_task_svds(base, thetas, d, acc, svd=svd, oversample=oversample, power_iters=power_iters,
                            seed=seed, key=key, backend=backend)
    X, s, Y = drop_null_components(U, S, V, base.shape)
    del U, S, V
    if s.numel() == 0:
        return base.to(acc).clone()
    PX, _ = polar_factor(X, polar)
    PY, _ = polar_factor(Y, polar)
    return low_rank_sum(PX, s, PY, scale=alpha, base=base.to(acc), backend=backend)


def merge_group(group: KeyGroup, *, alpha=1.0, svd="auto", oversample=None, power_iters=8, seed=0,
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
        *svd_params("auto", ("auto", "randomized", "exact"), 8, "max(10, d): the range finder holds 2d columns"),
        POLAR_PARAM,
        EXCLUDE_PARAM,
        BACKEND_PARAM,
    ),
)
