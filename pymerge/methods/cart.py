"""CART: centered task vectors + low-rank approximation (Choi et al. 2024, arXiv 2412.12153; docs/METHODS.md §CART).
The per-key factorisations (exact, Gram, fixed-iteration randomized, the fidelity control's subspace iteration and
its stopping rule) live in pymerge/methods/cart_factors.py; this file selects keys, runs the per-key merge loop and
declares the method.

    theta_avg  = (1/T) sum_t theta_t
    tau_bar_t  = theta_t - theta_avg                     (sum_t tau_bar_t = 0)
    theta      = theta_avg + lam * sum_t SVD_k(tau_bar_t)  on the keys selected for low rank,
    theta      = theta_avg                               on every other key (sum_t tau_bar_t = 0 there).

Rank (one of, mutually exclusive):
- rank_ratio (default 0.08 when neither rank nor energy is given, the paper's "about 8%"; the official 8-task
  ViT-B/32 config uses 0.12): k = max(1, int(rank_ratio * min(m, n))) as in the official code; 1.0 = full rank.
- rank = k: the same k for every selected key; must be < min(m, n) of each (k = min(m, n) is plain weight
  averaging, almost surely a mistake; use rank_ratio=1.0 if it is meant).
- energy = e in (0, 1]: per task and key, the smallest k_t whose top singular values carry a fraction e of
  ||tau_bar_t||_F^2 (the official `energy_threshold` mode). svd="exact": from the full spectrum, as the official
  code. svd="randomized": ||tau_bar_t||_F^2 is computed exactly, the singular values are the randomized
  estimates for k_try = max(1, int(0.08 min(m, n))) doubled until every task reaches e (a key whose k_try +
  oversample reaches min(m, n) falls back to the exact SVD). The estimates never exceed the true singular
  values, and the kept part U_k U_k^T tau_bar_t is an orthogonal projection, so the approximation actually used
  carries at least the fraction e (the chosen k_t may be larger than the exact one by the estimation error).
  Tasks of one key may get different k_t; the factors are zero-padded to the largest.

lam default 2.0: the official 8-task ViT-B/32 config (14 tasks: 1.5, 20 tasks: 1.9). Tune it on validation data.

SVD: svd="randomized" (default) with the fidelity control tol (default DEFAULT_TOL when power_iters is not
given): per key, subspace iteration with Rayleigh-Ritz on l = k + max(10, k) columns, stopped by an a-posteriori
estimate once theta is within tol of exact CART's merged weights relative to the merged task vector,
||theta - theta_exact||_F <= tol ||theta_exact - theta_0||_F (see adaptive_factors and docs/METHODS.md §CART,
"Fidelity"; the exact SVD takes over where the iteration does not contract or the sketch spans min(m, n)).
Keys small enough (T*m*n*4 bytes <= MATERIALIZE_BYTES) are centered explicitly and iterated with plain torch
GEMMs, or, where a cost model says it is cheaper (GRAM_EIGH, gram_passes), get exact factors from the
eigendecomposition of their small Gram matrices (gram_factors: "exact where exact is cheap"), which is also
their fallback once the iteration would cost more; larger ones iterate through the implicit Centered(thetas,
avg) operator (pymerge.ops.centered_matmul: the kernels' fused centering GEMMs), the centered matrices never
materialised; the same SubspaceIteration either way. Each key is seeded by key_seed(seed, key name): a key's
merged value is bitwise the same whatever keys are merged with it (max_group_bytes, key order, subsets;
tests/test_methods_seeding.py).
With power_iters = q given instead (and always with energy): one pymerge.ops.randomized_svd call per key
(Halko-Martinsson-Tropp, l = k + oversample columns, oversample None = max(10, k // 2), q power iterations), no
fidelity control: HMT 2011 (Thm 10.7/10.8, §9.4) bound the residual, E||A - Q Q^T A||_F <= (1 + k/(p-1))^(1/2)
(sum_{j>k} sigma_j^2)^(1/2) at q = 0, the excess shrinking like (sigma_{k+1}/sigma_l)^(2q), but the rank-k part
itself is far from the exact truncation where the spectrum has no gap at k: real fine-tunes have flat tails
(s_k / s_(k+1) ~ 1.01 at k = 8%), where q = 2 leaves ~25% of the merged task vector different from CART's.
bf16/fp16 keys are centered explicitly in fp32 if pymerge.ops.Centered ever rounds theta_avg to the inputs'
dtype (that rounding, ~eps*|theta_avg|, is as large as the centered task vectors of real fine-tunes; the current
Centered keeps fp32).
svd="exact": torch.linalg.svd of each centered matrix (the official route).

Key selection (low_rank_keys):
- None (default): every 2-D float key whose name matches none of exclude_keys (default DEFAULT_EXCLUDE_KEYS:
  embeddings and output heads, which are not "linear maps inside the network").
- "vit": the official ViT selection: names containing "attn" or "mlp" and neither "ln" nor "bias".
- a regex (re.search on the key name) or a list of regexes (a key is selected if any matches; each must match
  at least one eligible key), or a predicate key -> bool. Explicit selections may pick keys of >= 2 dims: conv
  kernels are treated as [shape[0], prod(shape[1:])] matrices. exclude_keys applies to the default only.
A selection that matches no eligible key raises ValueError (listing the eligible keys).
"""
import logging
import re
from typing import List

import torch

from ..ops import Centered, center_task_vectors, low_rank_sum
from . import cart_factors as factors
from .cart_factors import (DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_RANK_RATIO, GRAM_FP64_BELOW,  # noqa: F401
                           SubspaceIteration, adaptive_factors, adaptive_oversampling, exact_factors,
                           gram_factors, low_rank_factors, randomized_factors, ratio_rank)
from .params import BACKEND_PARAM, Param, finite_number, int_at_least, integer, number_in, regex_list
from .spec import KeyGroup, MethodSpec, key_seed

logger = logging.getLogger("pymerge.cart")

DEFAULT_TOL = 0.05          # used when neither tol nor power_iters is given
# Regexes (re.search) of 2-D keys the default selection leaves at theta_avg: embeddings, LM/classification heads
# and poolers. Change it per call with exclude_keys=[...].
DEFAULT_EXCLUDE_KEYS = (r"embed", r"(^|\.)(wte|wpe|shared)(\.|$)", r"lm_head", r"(^|\.)heads?(\.|$)",
                        r"classifier", r"(^|\.)score(\.|$)", r"pooler")
PRESETS = {
    # official CART (src/merging.py): ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)
    "vit": lambda key: ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key),
}
# Keys whose T centered fp32 matrices take at most this many bytes are centered explicitly (one buffer per key,
# one randomized_svd call per key); larger keys use Centered.
# 32 MB: MiniLM-L6's 8 x 1536 x 384 keys (19 MB) are then materialised, and their 2q + 2 = 6 passes read an
# L3-resident buffer instead of forming the centered blocks on every pass (benchmarks/methods_cart.py --quick,
# 1 thread, 32 MB L3: 11.0x the official merge at 32 MB, 10.3x at the former 8 MB).
MATERIALIZE_BYTES = 32 << 20


def _check_selection(v):
    if v is None or callable(v) or isinstance(v, str):
        return None
    if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        return None
    return "must be None, 'vit', a regex, a list of regexes or a predicate key -> bool"


def _compile(pattern, what):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"cart: {what} pattern {pattern!r} is not a valid regex: {e}") from None


def matrix_shape(shape):
    """[m, n] a key of >= 2 dims is treated as (conv kernels: [out, in * kh * kw])."""
    n = 1
    for s in shape[1:]:
        n *= s
    return int(shape[0]), n


def selects(key: str, shape, low_rank_keys=None, exclude_keys=DEFAULT_EXCLUDE_KEYS) -> bool:
    """Whether CART approximates `key` (of `shape`) in low rank: the rule select_low_rank_keys applies to every key
    (without its whole-model checks that the patterns compile and each selects a key). Callers that see one key at
    a time (pymerge/adapters/mergekit.py) use it directly."""
    dims = len(shape)
    if low_rank_keys is None:
        return dims == 2 and not any(re.search(p, key) for p in exclude_keys)
    if dims < 2:
        return False
    if isinstance(low_rank_keys, str) and low_rank_keys in PRESETS:
        return bool(PRESETS[low_rank_keys](key))
    if callable(low_rank_keys):
        return bool(low_rank_keys(key))
    patterns = [low_rank_keys] if isinstance(low_rank_keys, str) else list(low_rank_keys)
    return any(re.search(p, key) for p in patterns)


def select_low_rank_keys(keys: dict, low_rank_keys=None, exclude_keys=DEFAULT_EXCLUDE_KEYS) -> List[str]:
    """Names (in order) of the keys CART approximates in low rank (selects() on each). keys: {name: KeyInfo or
    Tensor}.

    Raises ValueError when a pattern is not a valid regex, or the selection (or one of its patterns) matches no
    eligible key.
    """
    if low_rank_keys is None:
        for p in exclude_keys:
            _compile(p, "exclude_keys")
        chosen = [k for k, v in keys.items() if selects(k, v.shape, None, exclude_keys)]
        if not chosen:
            two_d = [k for k, v in keys.items() if len(v.shape) == 2]
            raise ValueError(f"cart: the default selection (2-D keys not matching exclude_keys={list(exclude_keys)}) "
                             f"is empty; 2-D keys: {two_d[:10]}{' ...' if len(two_d) > 10 else ''}")
        return chosen
    eligible = [k for k, v in keys.items() if len(v.shape) >= 2]
    hint = f"keys with >= 2 dims: {eligible[:10]}{' ...' if len(eligible) > 10 else ''}"
    if not callable(low_rank_keys) and not (isinstance(low_rank_keys, str) and low_rank_keys in PRESETS):
        patterns = [low_rank_keys] if isinstance(low_rank_keys, str) else list(low_rank_keys)
        if not patterns:
            raise ValueError("cart: low_rank_keys is an empty list; pass None for the default selection")
        for p in patterns:
            c = _compile(p, "low_rank_keys")
            if not any(c.search(k) for k in eligible):
                raise ValueError(f"cart: low_rank_keys pattern {p!r} matches no key; {hint}")
    chosen = [k for k, v in keys.items() if selects(k, v.shape, low_rank_keys, exclude_keys)]
    if not chosen:
        raise ValueError(f"cart: low_rank_keys={low_rank_keys!r} matches no key; {hint}")
    return chosen


def _check_fidelity_options(svd, energy, tol, power_iters):
    if tol is None:
        return
    if power_iters is not None:
        raise ValueError(f"cart: tol ({tol}) and power_iters ({power_iters}) are mutually exclusive: tol adapts the "
                         "number of iterations, power_iters fixes it")
    if svd != "randomized":
        raise ValueError(f"cart: tol ({tol}) applies to svd='randomized' only; svd={svd!r} is exact")
    if energy is not None:
        raise ValueError(f"cart: tol ({tol}) applies to rank / rank_ratio; with energy ({energy}) the ranks come "
                         "from randomized estimates at power_iters iterations (or pass svd='exact')")


def prepare(params: dict, keys: dict) -> dict:
    """Whole-model checks: rank options exclusive, tol's companions, key selection non-empty, rank < min(m, n)
    per selected key."""
    given = [name for name in ("rank_ratio", "rank", "energy") if params[name] is not None]
    if len(given) > 1:
        raise ValueError(f"cart: rank_ratio, rank and energy are mutually exclusive; got {given}")
    _check_fidelity_options(params["svd"], params["energy"], params["tol"], params["power_iters"])
    selected = select_low_rank_keys(keys, params["low_rank_keys"], params["exclude_keys"])
    if params["rank"] is not None:
        for k in selected:
            m, n = matrix_shape(keys[k].shape)
            if params["rank"] >= min(m, n):
                raise ValueError(f"cart: rank = {params['rank']} >= min(m, n) = {min(m, n)} for key {k!r} of shape "
                                 f"{tuple(keys[k].shape)} (rank = min(m, n) is weight averaging; use "
                                 f"rank_ratio=1.0 if intended)")
    return {**params, "_selected": frozenset(selected)}


# ------------------------------------------------------------------------------------------------ merging
def fidelity_tol(svd, energy, tol, power_iters):
    """The tol a merge runs under: None (no fidelity control: svd="exact", energy, or a fixed power_iters),
    else tol, DEFAULT_TOL when tol is None."""
    if svd != "randomized" or energy is not None or power_iters is not None:
        return None
    return DEFAULT_TOL if tol is None else tol


def _merge_low_rank_keys(keys, bases, models, p, acc):
    """CART on selected same-shape keys, one key at a time. Returns {key: merged [*S] in acc}.

    Each key is one randomized_svd computation seeded by key_seed(seed, name), on buffers of its own: its result
    is bitwise the same whatever other keys share its group (max_group_bytes, key order, subsets). Batching
    several keys into one call would not keep that: LAPACK (MKL) rounds a matrix differently at another offset
    in a batched buffer. The batching saved little: ~0.7 ms of dispatch per key on 64 x 64 keys, nothing
    measurable on MiniLM-L6 (benchmarks/methods_cart.py --quick, 1 thread: 0.61-0.70 s batched, 0.62 s per key).
    """
    shape = bases[0].shape
    m, n = matrix_shape(shape)
    T = len(models[0])
    k = None
    if p["energy"] is None:
        k = p["rank"] if p["rank"] is not None else ratio_rank(p["rank_ratio"] or DEFAULT_RANK_RATIO, m, n)
    tol = fidelity_tol(p["svd"], p["energy"], p["tol"], p["power_iters"])
    out = {}
    elem = torch.empty(0, dtype=acc).element_size()
    per_key = T * m * n * elem
    implicit = p["svd"] == "randomized" and per_key > MATERIALIZE_BYTES
    if implicit and models[0][0].dtype not in (torch.float32, torch.float64) and not _centered_keeps_avg():
        # pymerge.ops.Centered rounds theta_avg to the inputs' dtype; for bf16/fp16 that rounding error
        # (~eps * |theta_avg|) is of the order of the centered task vectors themselves. Center in fp32 instead.
        implicit = False
    for name, thetas, base in zip(keys, models, bases):
        thetas2 = [t.reshape(m, n) for t in thetas]
        if implicit:
            # The T centered matrices of a large key are never materialised.
            avg = center_task_vectors(thetas2, out_dtype=acc, return_centered=False, backend=p["backend"])[0]
            A = Centered(thetas2, avg)

            def total_sq():
                return torch.stack([(t.to(acc) - avg).square().sum() for t in thetas2])

            def exact(k=None):
                cent = center_task_vectors(thetas2, out_dtype=acc, backend=p["backend"])[1]
                return exact_factors(cent, k, p["energy"])
            gram = None
        else:
            avg = torch.empty(m, n, dtype=acc, device=bases[0].device)
            A = torch.empty(T, m, n, dtype=acc, device=bases[0].device)
            center_task_vectors(thetas2, backend=p["backend"], out=(avg, A))

            def total_sq():
                return A.square().sum((-2, -1))

            def exact(k=None):
                return exact_factors(A, k, p["energy"])

            def gram(k):
                return _gram_route(A, k, tol)

        theta0 = base.reshape(m, n).to(acc)
        _, merged, _ = _factor_key(name, A, avg, theta0, k, p, tol, implicit, total_sq, exact, gram)
        del A
        out[name] = merged.reshape(shape)
        del avg
    return out


def _gram_route(A, k, tol):
    """gram_factors of a materialised batch, in float64 where tol is below the fp32 route's rounding."""
    if A.dtype == torch.float32 and tol is not None and tol < GRAM_FP64_BELOW:
        return tuple(f.to(A.dtype) for f in gram_factors(A.double(), k))
    return gram_factors(A, k)


def _factor_key(name, A, avg, theta0, k, p, tol, implicit, total_sq, exact, gram):
    """One key's rank-k factors by the route its options and size select, and its merged weights
    avg + lam sum_t U_t S_t V_t^T: ((U, S, V), merged [m, n], info). A: the centered batch [T, m, n] (a tensor, or
    a Centered when implicit); exact(k) / gram(k): that key's exact factors by SVD / Gram route; total_sq():
    ||A_t||_F^2 (energy mode)."""
    m, n = avg.shape

    def merge(U, S, V):
        return low_rank_sum(U.contiguous(), S.contiguous(), V.contiguous(), scale=p["lam"], base=avg,
                            backend=p["backend"])

    if p["svd"] == "exact":
        f = exact_factors(A, k, p["energy"])
        return f, merge(*f), {"steps": 0, "estimate": 0.0, "exact": True}
    if tol is None:
        f = randomized_factors(A, total_sq, m, n, k, p["energy"], p["oversample"], p["power_iters"],
                               key_seed(p["seed"], name), p["backend"], exact)
        return f, merge(*f), {"steps": 0, "estimate": None, "exact": False}
    l = min(k + adaptive_oversampling(p["oversample"], k), m, n)
    # Materialised keys: exact factors from the Gram matrix where the model says they are cheaper than the
    # iteration to tol, and as the iteration's fallback once it would cost more than them. Keys behind the
    # implicit operator (large ones) iterate and fall back to the exact SVD.
    budget = float("inf") if implicit else factors.gram_passes(m, n, k, l)
    if l >= min(m, n) or budget <= factors.expected_passes(tol):
        f = exact(k) if implicit else gram(k)
        result = f, merge(*f), {"steps": 0, "estimate": 0.0, "exact": True}
    else:
        seed = key_seed(p["seed"], name)
        iteration = SubspaceIteration(A, l, seed, p["backend"])
        result = adaptive_factors(iteration, k, p["lam"], merge, theta0, lambda: exact(k) if implicit else gram(k),
                                  tol, max_passes=budget)
    info = result[2]
    route = " (exact SVD)" if implicit else " (exact: Gram eigh)"
    logger.debug("cart %s %s: k %d, l %d, %d steps, estimate %.2e%s", name, (m, n), k, l, info["steps"],
                 info["estimate"], route if info["exact"] else "")
    return result


def centered_factors(name, A, avg, k, *, lam=2.0, svd="randomized", tol=None, oversample=DEFAULT_OVERSAMPLE,
                     power_iters=None, seed=0, backend="auto"):
    """CART's rank-k factors (U [T, m, k], S [T, k], V [T, n, k]) of one key's materialised centered matrices
    A [T, m, n] (fp32 / fp64), avg [m, n] their theta_avg relative to theta_0 (the merged task vector's mean
    part), by the route pymerge.merge("cart", ...) takes for a key of that size with these options: the exact SVD,
    a fixed number of power iterations, or the fidelity control (tol, default DEFAULT_TOL; the Gram route or the
    seeded subspace iteration), seeded by key_seed(seed, name). The learned methods' start="cart" uses it, so it
    starts where static CART with the same options ends (up to the rounding of centering task vectors instead
    of weights)."""
    p = dict(energy=None, lam=lam, svd=svd, oversample=oversample, power_iters=power_iters, seed=seed,
             backend=backend)
    tol_used = fidelity_tol(svd, None, tol, power_iters)
    theta0 = torch.zeros_like(avg)
    f, _, _ = _factor_key(name, A, avg, theta0, k, p, tol_used, False, lambda: A.square().sum((-2, -1)),
                          lambda k=None: exact_factors(A, k), lambda k: _gram_route(A, k, tol_used))
    return f


def _centered_keeps_avg() -> bool:
    """Whether pymerge.ops.Centered keeps an fp32 theta_avg next to bf16 thetas (instead of rounding it)."""
    probe = Centered([torch.zeros(1, 1, dtype=torch.bfloat16)], torch.full((1, 1), 1 + 2 ** -12))
    return probe.avg.dtype == torch.float32


def merge_group(group: KeyGroup, *, rank_ratio=None, rank=None, energy=None, lam=2.0, svd="randomized", tol=None,
                oversample=DEFAULT_OVERSAMPLE, power_iters=None, seed=0, low_rank_keys=None,
                exclude_keys=DEFAULT_EXCLUDE_KEYS, backend="auto", _selected=None) -> List[torch.Tensor]:
    acc = group.compute_dtype
    _check_fidelity_options(svd, energy, tol, power_iters)
    if energy is not None and power_iters is None:
        power_iters = DEFAULT_POWER_ITERS
    p = dict(rank_ratio=rank_ratio, rank=rank, energy=energy, lam=lam, svd=svd, tol=tol, oversample=oversample,
             power_iters=power_iters, seed=seed, backend=backend)
    if _selected is None:       # called outside pymerge.merge: select among this group's keys only
        _selected = frozenset(select_low_rank_keys({k: b for k, b in zip(group.keys, group.base)}, low_rank_keys,
                                                   exclude_keys))
    sel = [i for i, k in enumerate(group.keys) if k in _selected]
    merged = {}
    if sel:
        if rank is not None and rank >= min(matrix_shape(group.shape)):
            raise ValueError(f"cart: rank = {rank} >= min(m, n) for keys {[group.keys[i] for i in sel]} of shape "
                             f"{tuple(group.shape)}")
        merged = _merge_low_rank_keys([group.keys[i] for i in sel], [group.base[i] for i in sel],
                                      [group.models[i] for i in sel], p, acc)
    out = []
    for key, thetas in zip(group.keys, group.models):
        if key in merged:
            out.append(merged.pop(key))
        else:
            out.append(center_task_vectors(thetas, out_dtype=acc, return_centered=False, backend=backend)[0])
    return out


SPEC = MethodSpec(
    name="cart",
    description="CART: theta_avg + lam * sum_t SVD_k(theta_t - theta_avg) on the selected matrices, "
                "theta_avg elsewhere. Default fidelity: tol=0.05 (merged weights within 5% of exact CART's merged "
                "task vector by an a-posteriori estimate; small keys exact via the Gram matrix), checked on six real "
                "MiniLM-L6 fine-tunes (benchmarks/methods_cart.py --case real): 5.7e-3 / 8.2e-3 / 1.7e-4 / 1.2e-3 "
                "from exact CART at rank ratios 0.02 / 0.04 / 0.08 / 0.16, and ANP within 0.15 points of exact "
                "CART's at each of those ratios on every task subset of pymerge eval (2, 4, 6 tasks; "
                "benchmarks/cart_anp_subsets.py)",
    merge_group=merge_group,
    prepare=prepare,
    params=(
        Param("rank_ratio", None, f"k = max(1, int(rank_ratio * min(m, n))), in (0, 1]; {DEFAULT_RANK_RATIO} when "
              "neither rank nor energy is given", check=number_in(0, 1, low_open=True)),
        Param("rank", None, "fixed rank k for every selected key (< min(m, n))", type=int, check=int_at_least(1)),
        Param("energy", None, "per task and key: smallest k keeping this fraction of ||tau_bar_t||_F^2, in (0, 1]",
              check=number_in(0, 1, low_open=True)),
        Param("lam", 2.0, "scaling of the summed low-rank centered task vectors (official 8-task ViT-B/32: 2.0)",
              check=finite_number),
        Param("svd", "randomized", "randomized (pymerge.ops.randomized_svd) or exact (torch.linalg.svd)", type=str,
              choices=("randomized", "exact")),
        Param("tol", None, "fidelity: merged weights within tol of exact CART, relative to the merged task vector "
              "||merged_exact - theta_0||_F, by an a-posteriori estimate (iterations adapt to the spectrum), "
              "before the result is rounded to its output dtype (bf16 storage alone can exceed a small tol); in "
              f"(0, 1); None = {DEFAULT_TOL} unless power_iters is given (svd='randomized' with rank / rank_ratio)",
              check=number_in(0, 1, low_open=True, high_open=True)),
        Param("oversample", DEFAULT_OVERSAMPLE, "randomized SVD oversampling p (l = k + p columns); None = "
              "max(10, k) under tol, max(10, k // 2) with a fixed power_iters", type=int, check=int_at_least(0)),
        Param("power_iters", None, "fixed randomized SVD power iterations q, no fidelity control (exclusive with "
              f"tol); None = adaptive (tol); with energy None = {DEFAULT_POWER_ITERS}", type=int,
              check=int_at_least(0)),
        Param("seed", 0, "randomized SVD seed (per key); None = fresh randomness", type=int, check=integer,
              optional=True),
        Param("low_rank_keys", None, "keys approximated in low rank: None (2-D keys minus exclude_keys), 'vit', a "
              "regex, a list of regexes or a predicate", type=object, check=_check_selection),
        Param("exclude_keys", DEFAULT_EXCLUDE_KEYS, "regexes of 2-D keys the default selection leaves at theta_avg",
              type=tuple, check=regex_list),
        BACKEND_PARAM,
    ),
)
