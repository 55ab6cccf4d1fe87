"""CART's per-key factorisations (pymerge/methods/cart.py merges with them; docs/METHODS.md §CART, "Fidelity"):
the rank-k factors U [.., m, k], S [.., k], V [.., n, k] of one key's T centered matrices tau_bar_t, by

  exact_factors       torch.linalg.svd, truncated (svd="exact"; energy ranks from the full spectrum)
  gram_factors        exact, from the eigendecomposition of the smaller Gram matrix ("exact where exact is cheap")
  randomized_factors  pymerge.ops.randomized_svd with a fixed number of power iterations (power_iters, energy)
  adaptive_factors    the fidelity control tol: subspace iteration (SubspaceIteration, on a materialised batch
                      or through the implicit Centered operator) stopped by an a-posteriori estimate,
                      within a cost budget (gram_passes / expected_passes: when to take the Gram route instead)
and low_rank_factors, the fixed-route entry point (svd="exact" or a fixed number of power iterations) for callers
that want one factorisation call (static CART's default route is chosen per key in cart.py, _factor_key).
"""
import math

import torch

from ..dtypes import accumulation_dtype
from ..ops import Centered, centered_matmul, randomized_svd

DEFAULT_RANK_RATIO = 0.08
# Fixed-iteration randomized SVD (power_iters given, energy mode, learned start="cart"): l = 1.5 k columns
# (oversample None = max(10, k // 2)) and, where no count is given, 2 power iterations.
DEFAULT_OVERSAMPLE = None
DEFAULT_POWER_ITERS = 2
# Fidelity control (svd="randomized", rank / rank_ratio): see adaptive_factors and docs/METHODS.md §CART.
START_ITERS = 0             # power iterations of the first, seeded call
ADAPTIVE_OVERSAMPLE = 1.0   # l - k = max(10, ADAPTIVE_OVERSAMPLE * k) when oversample is None
MAX_STEPS = 24              # subspace-iteration steps before exact factors take over
MAX_RATE = 0.9              # a contraction rate at or above this is "not converging" (no stop is trusted)
# Two guards on the stop test, because the change of the merged weights cannot see a top-k direction that has not
# yet entered the Ritz top k: while it grows in, the change shrinks, the error stays, and then it jumps in (a step
# with a change larger than the last). (1) No stop before step j with rate_ritz^j <= tol (rate_ritz = max_t
# (S_l / S_k)^2 of the Ritz values): a direction whose initial tangent is <= 1 has converged by then. (2) The
# geometric tail c rho / (1 - rho) is scaled by ESTIMATE_SAFETY. Measured on 369 keys (flat-tailed
# pymerge.synthetic.flat_tail_models 80 x 160, 160 x 80, 384 x 384, T = 4, 40 seeds, rank ratios 0.04-0.16; three
# real MiniLM-L6 keys, T = 6, rank ratios 0.02-0.08), tol 0.05 and 1e-2, 2 iteration seeds each: without either,
# 29 of 1,476 merges ended above tol (worst 4.3 tol); with (1) 1 (2.2 tol); with both none (worst 0.35 tol), for
# 3.67 steps on average instead of 2.45 (`python benchmarks/cart_stop_test.py` measures all four combinations).
ESTIMATE_SAFETY = 1.5
RITZ_STEP_GUARD = True      # guard (1); False only to measure the stop without it


def ratio_rank(ratio, m, n):
    """k = max(1, int(ratio * min(m, n))), the official code's rank of an m x n key at rank ratio `ratio`."""
    return max(1, int(ratio * min(m, n)))


def energy_ranks(S, total, e):
    """S [B, k] (descending), total [B] (||A_b||_F^2) -> k_b = smallest j with sum_{i<=j} S_i^2 >= e total_b, or
    None for batch entries where k columns do not reach it."""
    cum = S.square().cumsum(-1)
    reached = cum >= e * total.unsqueeze(-1)
    ok = reached[:, -1]
    ranks = reached.to(torch.int8).argmax(-1) + 1
    return ranks, ok


def mask_ranks(U, S, V, ranks):
    """Zero S beyond each entry's rank and trim the factors to the largest rank. U [B, m, k], S [B, k], V [B, n, k]."""
    kmax = int(ranks.max())
    keep = torch.arange(kmax, device=S.device).unsqueeze(0) < ranks.to(S.device).unsqueeze(-1)
    return U[..., :kmax], S[..., :kmax] * keep, V[..., :kmax]


def exact_factors(A, k=None, energy=None):
    """A: [B, m, n] materialised (fp32/fp64). Full thin SVD; truncated to k, or per-entry energy ranks."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    V = Vh.mT
    if energy is None:
        return U[..., :k], S[..., :k], V[..., :k]
    total = S.square().sum(-1)
    ranks, ok = energy_ranks(S, total, energy)
    # The full spectrum always reaches e up to rounding (official: cumulative / total >= e on the same S).
    ranks = torch.where(ok, ranks, torch.full_like(ranks, S.shape[-1]))
    return mask_ranks(U, S, V, ranks)


def gram_factors(A, k):
    """Exact rank-k factors of A [T, m, n] (materialised, fp32 / fp64) from the eigendecomposition of its smaller
    Gram matrix: for m >= n, G = A^T A = V diag(S^2) V^T (torch.linalg.eigh), V_k its top k eigenvectors,
    U S = A V_k; for m < n the same on A A^T. U S V^T is A V_k V_k^T (or U_k U_k^T A), the rank-k truncation
    of A, i.e. exact CART's term; S is taken as the column norms of A V_k (= sqrt of the eigenvalues). One GEMM
    of r = min(m, n) columns and one eigh of r x r per task, instead of a full SVD: on MiniLM-L6's 384-wide keys
    ~2x (384 x 384) to ~5x (384 x 1536) cheaper than torch.linalg.svd at 1 thread. Rounding: the Gram matrix
    squares the condition number, so the subspace error of a direction j is ~eps s_1^2 / (s_j^2 - s_(j+1)^2),
    a factor ~s_1 / (2 s_k) above the SVD's; the directions it blurs carry s_j <~ sqrt(eps) s_1 of the merged
    weights (tests/test_cart_fidelity.py checks the result against float64 exact CART)."""
    T, m, n = A.shape
    wide = m < n
    ev, W = torch.linalg.eigh(A @ A.mT if wide else A.mT @ A)
    top = W[..., -k:].flip(-1)                       # eigh is ascending: the top k, descending
    Y = A.mT @ top if wide else A @ top              # V S (wide) or U S (tall)
    S = Y.norm(dim=-2)
    Q = Y / S.clamp_min(torch.finfo(S.dtype).tiny).unsqueeze(-2)
    return (top, S, Q) if wide else (Q, S, top)


# The tol path's choice, per materialised key, between the subspace iteration and gram_factors, from a cost
# model in flops fitted to per-key CPU times at 1 thread (`python benchmarks/methods_cart.py --case keys`: T = 6
# flat-tailed MiniLM-L6-shaped keys at rank ratios 0.02 / 0.08 / 0.16; --case real gives the whole-model result):
# one pass of the iteration over an m x n matrix with l columns costs 2 m n l for the GEMM plus its share of the
# Rayleigh-Ritz / orthonormalisation / merge work, ~3.5 (m + n) l^2 + 12.5 l^3; the Gram route 2 m n r for the
# Gram matrix, GRAM_EIGH r^3 for torch.linalg.eigh and 2 m n k for U S, r = min(m, n). Measured by --case keys
# (ms, iteration to tol 0.05 / Gram / official): 384 x 384 at k 30: 35 / 49 / 94; 1536 x 384 at k 30: 112 / 70 /
# 205; 384 x 1536 at k 30: 129 / 74 / 420; 384 x 384 at k 61: 70 / 51 / 99; at k 7 the iteration (14-48 ms)
# wins; the default took the cheaper route on eight of the nine (384 x 384 at k 30: the Gram route, 48 ms).
GRAM_EIGH = 3.6
# The Gram route is taken up front when it costs no more than the passes the iteration is expected to need for
# tol: the start's 3 and 2 per step, the whole steps j with EXPECTED_RATE^j <= tol, EXPECTED_RATE being the contraction
# (s_l / s_k)^2 at l = 2 k of the spectrum measured on real MiniLM-L6 fine-tunes (0.40-0.43 at rank ratios
# 0.02-0.16; pymerge.synthetic.MINILM_CENTERED_SPECTRUM). Otherwise the iteration runs and hands over to the
# Gram route before it would pass that route's cost. Either way the result is within tol (or exact).
EXPECTED_RATE = 0.45


# The Gram route squares the condition number: in fp32 its merged weights were up to 2.4e-4 (flat spectrum, rank
# ratio 0.9; 5e-5 at 0.5, <= 3e-5 at 0.16) from float64 exact CART (tests/test_cart_fidelity.py), where the fp32
# SVD gave 1e-5 to 5e-4. Below this tol it runs in float64 (twice the GEMM, ~1.5x the eigh).
GRAM_FP64_BELOW = 1e-3


def expected_passes(tol):
    """Passes over A the iteration is expected to need for tol: the start's 3 and 2 per step, for the whole
    steps in which EXPECTED_RATE^j reaches tol (the stop test waits for that at the Ritz rate: ESTIMATE_SAFETY)."""
    return 3 + 2 * math.ceil(math.log(tol) / math.log(EXPECTED_RATE) - 1e-9)


def gram_passes(m, n, k, l):
    """gram_factors's cost per task in passes of the subspace iteration (both from the cost model above)."""
    r = min(m, n)
    gram = 2.0 * m * n * r + GRAM_EIGH * r ** 3 + 2.0 * m * n * k
    one_pass = 2.0 * m * n * l + 3.5 * (m + n) * l ** 2 + 12.5 * l ** 3
    return gram / one_pass


def oversampling(oversample, k):
    return max(10, k // 2) if oversample is None else oversample


def adaptive_oversampling(oversample, k):
    """l - k of the fidelity-controlled iteration: None = max(10, k) (l = 2 k), the fastest to tol 1e-2 on the
    MiniLM fine-tunes (benchmarks/methods_cart.py)."""
    return max(10, int(ADAPTIVE_OVERSAMPLE * k)) if oversample is None else oversample


def low_rank_factors(A, k, *, svd="randomized", oversample=DEFAULT_OVERSAMPLE, power_iters=DEFAULT_POWER_ITERS,
                     seed=None, backend="auto"):
    """CART's factorisation: rank-k factors U [.., m, k], S [.., k] (descending), V [.., n, k] of centered
    matrices A ([m, n] or [T, m, n], any float dtype; or a Centered for svd="randomized"), in fp32 (fp64 for
    fp64). svd="exact": torch.linalg.svd of A in fp32 / fp64, truncated. svd="randomized":
    pymerge.ops.randomized_svd with l = k + oversample columns (None: max(10, k // 2)), power_iters and
    seed. The static merge and the learned methods' start="cart" (pymerge.methods.learned_starts) use it."""
    if svd == "exact":
        return exact_factors(A.to(accumulation_dtype(A.dtype)), k)
    return randomized_svd(A, k, oversample=oversampling(oversample, k), power_iters=power_iters, seed=seed,
                          backend=backend)


def randomized_factors(A, total_sq, m, n, k, energy, oversample, power_iters, seed, backend, exact_fallback):
    """Rank-k (or energy) factors of one key's T centered matrices A ([T, m, n] tensor or Centered) via
    pymerge.ops.randomized_svd with a fixed number of power iterations. oversample None = max(10, k // 2)
    (l = 1.5 k columns for k >= 20)."""
    if energy is None:
        return low_rank_factors(A, k, svd="randomized", oversample=oversample, power_iters=power_iters, seed=seed,
                                backend=backend)
    k_try = ratio_rank(DEFAULT_RANK_RATIO, m, n)
    while k_try + oversampling(oversample, k_try) < min(m, n):
        U, S, V = randomized_svd(A, k_try, oversample=oversampling(oversample, k_try), power_iters=power_iters,
                                 seed=seed, backend=backend)
        ranks, ok = energy_ranks(S, total_sq(), energy)
        if bool(ok.all()):
            return mask_ranks(U, S, V, ranks)
        k_try *= 2
    return exact_fallback()


# ------------------------------------------------------------------------------------- fidelity control (tol)
class SubspaceIteration:
    """Subspace iteration with Rayleigh-Ritz on l columns over one key's T centered matrices A, seen only through
    its two products: a materialised [T, m, n] batch (plain torch GEMMs, for small keys: MiniLM-L6's 384 x 384,
    1536 x 384) or a Centered (pymerge.ops.centered_matmul: the fused centering GEMMs of the kernels, the T
    centered matrices never materialised). One step from orthonormal V [T, n, l]: Y = A V; Rayleigh-Ritz through
    the l x l Gram Y^T Y = W diag(S^2) W^T (eigh, fp64): U = Y W / S, V W, S; then the next V = orth(A^T U) by
    Cholesky QR (fp64 Gram; A^T U ~ V diag(S) is conditioned like S_1 / S_l, Householder QR where Cholesky
    fails). 2 passes over A per step, and O((m + n) l^2) of GEMM-shaped work besides (a step through the op's
    randomized_svd(start=V) would add Householder QRs of both l-column bases and an SVD: LAPACK work that took
    a third of the CPU time of a whole tol = 1e-2 merge of a 2048 x 2048 flat-tailed key, T = 8, l = 326, in
    torch.profiler). The start draws the key's seeded Gaussian test matrix as
    pymerge.ops.randomized_svd does and applies A^T A once (START_ITERS more times), 3 passes in all."""

    def __init__(self, A, l, seed, backend="auto"):
        self.A, self.l, self.seed, self.backend = A, l, seed, backend
        self.implicit = isinstance(A, Centered)
        self.acc = accumulation_dtype(A.dtype)

    def _fwd(self, V):
        return centered_matmul(self.A, V, backend=self.backend) if self.implicit else self.A @ V

    def _bwd(self, U):
        return centered_matmul(self.A, U, transpose=True, backend=self.backend) if self.implicit else self.A.mT @ U

    def _orth(self, Z):
        R, info = torch.linalg.cholesky_ex((Z.mT @ Z).double())
        if bool((info != 0).any()):
            return torch.linalg.qr(Z).Q
        return torch.linalg.solve_triangular(R.mT.to(Z.dtype), Z, upper=True, left=False)

    def _rayleigh_ritz(self, V):
        Y = self._fwd(V)
        ev, W = torch.linalg.eigh((Y.mT @ Y).double())
        S = ev.flip(-1).clamp_min(0).sqrt()
        W = W.flip(-1).to(Y.dtype)
        U = (Y @ W) / S.clamp_min(torch.finfo(S.dtype).tiny).to(Y.dtype).unsqueeze(-2)
        return U, S.to(Y.dtype), V @ W

    def start(self):
        T, m, n = self.A.shape
        gen = torch.Generator().manual_seed(self.seed)
        omega = torch.randn(T, self.l, n, generator=gen, dtype=torch.float32).to(self.acc).to(self.A.device).mT
        Z = self._bwd(self._fwd(omega))
        for _ in range(START_ITERS):
            Z = self._bwd(self._fwd(torch.linalg.qr(Z).Q))
        return self._rayleigh_ritz(torch.linalg.qr(Z).Q)

    def step(self, U, S, V):
        return self._rayleigh_ritz(self._orth(self._bwd(U)))


def adaptive_factors(iteration, k, lam, merge, theta0, exact_fallback, tol, max_passes=float("inf")):
    """The merged weights [m, n] of one key, from rank-k factors of its T centered matrices, within `tol` of exact
    CART's merged weights relative to the merged task vector, by an a-posteriori estimate (docs/METHODS.md
    §CART, "Fidelity"). Returns ((U, S, V) truncated to k, merged, info).

    iteration: a SubspaceIteration (Rayleigh-Ritz on l columns, 2 passes over A per step). After each step the
    merged weights M_j = theta_avg + lam sum_t U_t S_t V_t^T are formed (merge(U, S, V): one GEMM of inner dimension
    T k) and their change c_j = ||M_j - M_(j-1)||_F measured; the remaining error ||M_j - M_exact|| is estimated as
    ESTIMATE_SAFETY c_j rho / (1 - rho), the tail of a geometric series with a margin, rho the larger of the
    measured ratio c_j / c_(j-1) and the subspace-iteration rate rho_R = max_t (S_l / S_k)^2 of the Ritz values. It
    stops when est (1 + tol) <= tol ||M_j - theta_0||_F and rho_R^j <= tol (see ESTIMATE_SAFETY): then
    ||M_j - M_exact|| <= tol ||M_exact - theta_0|| whenever est bounds the error. When the iteration does not
    contract (rho >= MAX_RATE), runs MAX_STEPS steps, or another step would take it past max_passes passes over A
    (the start takes 3, each step 2), exact_fallback() (exact factors) is used."""
    info = {"steps": 0, "estimate": None, "exact": False}
    U, S, V = iteration.start()
    merged = merge(U[..., :k], S[..., :k], V[..., :k])
    change = None
    for step in range(1, MAX_STEPS + 1):
        if 3 + 2 * step > max_passes:
            break
        U, S, V = iteration.step(U, S, V)
        info["steps"] = step
        new = merge(U[..., :k], S[..., :k], V[..., :k])
        prev_change, change = change, float((new - merged).norm())
        merged = new
        Sd = S.double()
        ritz = float(torch.where(Sd[..., k - 1] > 0, (Sd[..., -1] / Sd[..., k - 1]).square(),
                                 torch.zeros_like(Sd[..., 0])).max())
        rate = ritz
        if prev_change is not None and prev_change > 0:
            rate = max(rate, change / prev_change)
        if change == 0.0:
            est = 0.0
        elif rate >= MAX_RATE or (RITZ_STEP_GUARD and ritz ** step > tol):
            continue
        else:
            est = ESTIMATE_SAFETY * change * rate / (1 - rate)
        d = float((merged - theta0).norm())
        if est * (1 + tol) <= tol * d:
            info["estimate"] = est / d if d > 0 else 0.0
            return (U[..., :k], S[..., :k], V[..., :k]), merged, info
    info.update(exact=True, estimate=0.0)
    final = exact_fallback()
    return final, merge(*final), info
