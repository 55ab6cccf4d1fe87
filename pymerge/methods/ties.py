"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

docs/METHODS.md §TIES: per task keep the top-density fraction (default 0.2) of |tau_t| entries; elected sign per
entry = sign(sum_t trimmed tau_t); disjoint mean over the entries agreeing with the elected sign;
theta = theta_0 + lam * merged (lam default 1.0).

Conventions (chosen to match mergekit 0.1.5's `ties`, checked in tests/test_methods_peers_mergekit.py):
- Trimming is per tensor (mergekit, peft), not over the whole flattened model as in the TIES authors' code.
  Exactly k = max(1, int(density * numel)) entries are kept per task (mergekit's count); among entries tied
  at the threshold magnitude the lowest flat indices are kept (mergekit's argsort breaks such ties
  arbitrarily; the TIES authors' kthvalue code keeps all of them). density = 1 keeps everything.
- Per-model weights w_t multiply the trimmed task vectors before the sign election; the disjoint mean is
  weighted: sum_t w_t tau_t [agree] / sum_t w_t [agree] (mergekit's normalize=True; with unit weights this is
  the plain disjoint mean of docs/METHODS.md §TIES). peft's `ties` instead divides by the count of agreeing
  entries; the two agree for unit weights.
- An entry whose trimmed sum is exactly 0 elects the + sign (mergekit: sign_weight >= 0); zero entries
  never agree with either sign; an entry where no task agrees stays at theta_0.

Vectorised over the T tasks of a key in chunks of the flattened key (bounded memory: T x CHUNK fp32); the
threshold per task is found with a radix select (one bincount over the high bits of |tau_t|, then kthvalue
over one bucket), no Python loop over elements.
"""
import sys
from typing import List, Optional, Sequence

import torch

from .params import Param, finite_number, number_in
from .spec import KeyGroup, MethodSpec
from .weight_average import weight_scale

# Elements of one key processed per step (per task): T * CHUNK * 4 bytes of fp32 scratch (2 MiB at T = 8), so
# the ~10 elementwise passes of a step run in cache rather than at memory bandwidth.
CHUNK = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """Entries kept by magnitude trimming at this density (mergekit's count: at least one)."""
    return numel if density >= 1.0 else max(1, int(density * numel))


def _top_half_words(a: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each element of a flat non-negative float32/float64 tensor, as a strided int16 view
    (no copy; little-endian layout: the high half-word is the last of each element)."""
    words = a.element_size() // 2
    if sys.byteorder == "little":
        return a.view(torch.int16)[words - 1::words]
    return a.view(torch.int16)[::words]


def kth_largest(a: torch.Tensor, k: int):
    """For a flat non-negative float32/float64 tensor a and 1 <= k <= a.numel(): (thr, n_greater, n_equal, cand_at)
    with thr the k-th largest value, n_greater = #(a > thr), n_equal = #(a == thr), and cand_at() the flat
    positions of the entries equal to thr (computed on demand).

    Radix select: for non-negative IEEE floats the bit pattern is monotonic in the value (sign bit 0, so the top
    16 bits lie in [0, 32768)), so one bincount over the top 16 bits finds the bucket holding the k-th largest;
    kthvalue then runs on that bucket only.
    """
    top = _top_half_words(a)
    hist = torch.bincount(top, minlength=1 << 15)
    at_or_above = hist.flip(0).cumsum(0).flip(0)            # at_or_above[b] = #(bucket >= b)
    bucket = int((at_or_above >= k).nonzero()[-1])
    above = int(at_or_above[bucket]) - int(hist[bucket])
    in_bucket = top == bucket
    cand = a[in_bucket]
    thr = torch.kthvalue(cand, cand.numel() - (k - above - 1)).values
    n_greater = above + int((cand > thr).sum())
    n_equal = int((cand == thr).sum())

    def cand_at():
        return in_bucket.nonzero().reshape(-1)[cand == thr]
    return thr, n_greater, n_equal, cand_at


class MagnitudeTrim:
    """Per-task top-k magnitude masks of one key, applied chunk by chunk.

    Entry i of task t is kept iff |tau_t[i]| >= thr[t] (the k_t-th largest |tau_t|), except that where more
    entries tie at thr[t] than are needed, the tied entries past the needed ones (in flat index order) are
    dropped too: their positions are listed once, in `drop_at[t]`.
    """

    def __init__(self, base_flat, thetas_flat, densities, acc):
        self.T = len(thetas_flat)
        # hardshrink keeps |x| > lambd: lambd = the float just below thr keeps |x| >= thr. None: keep all.
        self.lambd = [None] * self.T
        self.drop_at = [None] * self.T
        n = base_flat.numel()
        if all(d >= 1.0 for d in densities):
            return
        base32 = base_flat.to(acc)
        for t, (theta, d) in enumerate(zip(thetas_flat, densities)):
            if d >= 1.0:
                continue
            # A fresh buffer: never the caller's tensor, and dense with stride 1 (kth_largest views its bits; a
            # strided copy would keep e.g. a one-element view's stride 2).
            a = theta.to(acc, copy=True, memory_format=torch.contiguous_format).sub_(base32).abs_()
            k = keep_count(d, n)
            thr, n_greater, n_equal, tied_at = kth_largest(a, k)
            del a
            self.lambd[t] = float(torch.nextafter(thr, torch.zeros_like(thr)))
            if n_greater + n_equal > k:
                self.drop_at[t] = tied_at()[k - n_greater:]

    @property
    def active(self):
        return any(x is not None for x in self.lambd)

    def apply_(self, tau, start):
        """tau: [T, C], the chunk of the flattened key starting at `start` -> trimmed entries zeroed, in place."""
        end = start + tau.shape[1]
        for t, lambd in enumerate(self.lambd):
            if lambd is None:
                continue
            torch.ops.aten.hardshrink.out(tau[t], lambd, out=tau[t])
            drop = self.drop_at[t]
            if drop is not None:
                lo, hi = torch.searchsorted(drop, torch.tensor([start, end], device=drop.device)).tolist()
                if hi > lo:
                    tau[t, drop[lo:hi] - start] = 0
        return tau


def sign_consensus_merge(base: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float], lam: float,
                         acc: torch.dtype, densities: Optional[Sequence[float]] = None, drop=None) -> torch.Tensor:
    """theta_0 + lam * weighted disjoint mean of the (trimmed or dropped) task vectors, for one key.

    base: [*S], thetas: T tensors [*S] (any float dtype). densities: per-task magnitude-trim density (None: no
    trim). drop: an object with apply_(tau_chunk, start) masking/rescaling a [T, C] chunk (DARE), or None.
    Returns [*S] in acc (float32, or float64 for float64 inputs).

    Per chunk, with sgn = +1 where sum_t tau_t >= 0 else -1 and P_t = max(sgn * tau_t, 0) (tau_t after trim/drop
    and weighting): the agreeing entries are those with P_t > 0, sum_t tau_t [agree] = sgn * sum_t P_t, and the
    divisor sum_t w_t [agree] = w . sign(P); all float arithmetic (boolean masks take slow paths in torch CPU)
    over a cache-sized [T, CHUNK] block.
    """
    T = len(thetas)
    b = base.reshape(-1)
    ts = [theta.reshape(-1) for theta in thetas]
    n = b.numel()
    trim = MagnitudeTrim(b, ts, densities, acc) if densities is not None else None
    if trim is not None and not trim.active:
        trim = None
    # Equal positive weights elect the same signs and give the same disjoint mean as unit weights; the unit path
    # keeps an exactly zero sum_t tau_t exactly zero (w * tau rounded in acc could tip it either way).
    unit = len({float(x) for x in weights}) == 1 and float(weights[0]) > 0
    # The elected sign and the weighted disjoint mean do not change when every w_t is scaled by one c > 0: the
    # exact rescaling keeps weights such as 1e-40 or 1e39 from under- or overflowing acc (weights in a usual range
    # are left as they are).
    scale = weight_scale(weights)
    w = torch.tensor([float(x) / scale for x in weights], dtype=acc, device=base.device)
    out = torch.empty(n, dtype=acc, device=base.device)
    step = max(1, CHUNK)
    tau = torch.empty(T, min(step, n), dtype=acc, device=base.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        chunk = tau[:, :e - s]
        b32 = b[s:e].to(acc)
        for t in range(T):
            chunk[t].copy_(ts[t][s:e]).sub_(b32)        # (a mixed-dtype torch.sub takes a slow path)
        if trim is not None:
            trim.apply_(chunk, s)
        if drop is not None:
            drop.apply_(chunk, s)
        if not unit:
            chunk.mul_(w.unsqueeze(1))
        sgn = chunk.sum(0).sign_().add_(0.5).sign_()     # +1 where the sum is >= 0 (mergekit), else -1
        P = torch.mul(chunk, sgn).clamp_min_(0)
        mixed = P.sum(0).mul_(sgn)
        agree = P.sign_()                                # 1 where task t agrees with the elected sign, else 0
        if unit:
            divisor = agree.sum(0).clamp_min_(1)
        else:
            divisor = w @ agree
            divisor.masked_fill_(divisor == 0, 1.0)
        torch.addcdiv(b32, mixed, divisor, value=float(lam), out=out[s:e])
    return out.reshape(base.shape)


def merge_group(group: KeyGroup, density, lam, weights) -> List[torch.Tensor]:
    return [sign_consensus_merge(base, thetas, weights, lam, group.compute_dtype, densities=density)
            for base, thetas in zip(group.base, group.models)]


SPEC = MethodSpec(
    name="ties",
    description="TIES: per-task top-density magnitude trim, sign election, disjoint mean; theta_0 + lam * merged",
    merge_group=merge_group,
    params=(
        Param("density", 0.2, "fraction of each task vector's entries kept (largest |tau|), in (0, 1]",
              per_model=True, check=number_in(0, 1, low_open=True)),
        Param("lam", 1.0, "scaling of the merged task vector", check=finite_number),
        Param("weights", 1.0, "per-model weight: scales tau_t before the election; weighted disjoint mean",
              per_model=True, check=finite_number),
    ),
)
