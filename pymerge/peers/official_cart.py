"""The official CART merge (JH-GEECS/CART src/merging.py, StaticMergeModule._merge_weights("CART")), re-implemented
step by step: its code is a research repository (CLIP loading, ray, wandb), not an installable package.

Per selected key, in the official order of operations:
  tau_t = theta_t - theta_0                       (TaskVector)
  theta_avg = theta_0 + (1/T) sum_t tau_t         (_get_origin(1 / T))
  tau_bar_t = tau_t + theta_0 - theta_avg         (value + prev_origin - new_origin)
  a full thin torch.linalg.svd of every tau_bar_t, its rank-k part (U[:, :k] * s[:k]) @ Vh[:k] summed over t,
  theta = theta_avg + lam * sum                   (_merge_weights, prior = lam)
with k = max(1, int(rank_ratio * min(m, n))), or with energy_threshold the least k whose s_1..s_k carry >= rank_ratio
of sum s_i^2; rank_ratio 0 keeps nothing, 1 everything (the official special cases).
Computed in float32 (float64 for float64 inputs), as the official code computes on fp32 checkpoints; the result
is cast back to each key's dtype. Deviation, rounding only: keys not selected become theta_avg, where the official
code adds lam * sum_t tau_bar_t (zero up to rounding) to it.
The official key selection (CLIP ViT) is select_keys; other models pass their own (`selected`).
Nothing to install: plain torch.
"""
from typing import Dict, Iterable, List, Optional

import torch

from ..dtypes import accumulation_dtype

StateDict = Dict[str, torch.Tensor]


def select_keys(keys: Iterable[str]) -> List[str]:
    """The official selection: keys containing "attn" or "mlp" and neither "ln" nor "bias"."""
    return [k for k in keys if ("attn" in k or "mlp" in k) and not ("ln" in k or "bias" in k)]


def center(base: torch.Tensor, thetas: List[torch.Tensor]):
    """(theta_avg, [tau_bar_t]) of one key, in the official order of operations, float32 (float64 for float64)."""
    dtype = accumulation_dtype(base.dtype)
    b = base.to(dtype)
    tvs = [theta.to(dtype) - b for theta in thetas]                       # TaskVector: finetuned - pretrained
    avg = b + sum(tvs) * (1.0 / len(thetas))                              # _get_origin(1/T)
    return avg, [tv + b - avg for tv in tvs]                              # value + prev_origin - new_origin


def svd(centered: torch.Tensor):
    """The official factorisation of one tau_bar_t: a full thin SVD, (U, s, Vh)."""
    return torch.linalg.svd(centered, full_matrices=False)


def rank(s: torch.Tensor, rank_ratio: float, energy_threshold: bool = False) -> int:
    """k for singular values s (descending), the official rule (0 for rank_ratio 0)."""
    if rank_ratio == 0.0:
        return 0
    if rank_ratio == 1.0:
        return s.shape[0]
    if energy_threshold:
        energy = s ** 2
        return int((energy.cumsum(0) / energy.sum() >= rank_ratio).nonzero(as_tuple=True)[0].min()) + 1
    return max(1, int(rank_ratio * s.shape[0]))


def rank_k_part(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, k: int) -> torch.Tensor:
    """(U[:, :k] * s[:k]) @ Vh[:k, :], the official reconstruction."""
    return (U[:, :k] * s[:k]) @ Vh[:k, :]


def merge_key(base: torch.Tensor, thetas: List[torch.Tensor], *, rank_ratio: float, lam: float,
              energy_threshold: bool = False) -> torch.Tensor:
    """The official CART merge of one selected 2-D key, float32 (float64 for float64 inputs): [m, n]."""
    avg, cents = center(base, thetas)
    total = torch.zeros_like(avg)
    for cent in cents:
        U, s, Vh = svd(cent)
        total += rank_k_part(U, s, Vh, rank(s, rank_ratio, energy_threshold))
        del U, s, Vh
    return avg + lam * total


def merge(base: StateDict, models: List[StateDict], *, rank_ratio: float, lam: float,
          selected: Optional[Iterable[str]] = None, energy_threshold: bool = False) -> StateDict:
    """The official CART merge of a state dict, key by key (it streams: one key's T centered task vectors at a
    time). selected: the low-rank keys (default select_keys(base)); other float keys become theta_avg, integer
    keys stay theta_0's. Returns every key of base in its own dtype."""
    selected = set(select_keys(base) if selected is None else selected)
    out = {}
    for key, b in base.items():
        thetas = [m[key] for m in models]
        if not b.is_floating_point():
            out[key] = b
        elif key in selected:
            out[key] = merge_key(b, thetas, rank_ratio=rank_ratio, lam=lam,
                                 energy_threshold=energy_threshold).to(b.dtype)
        else:
            b_acc = b.to(accumulation_dtype(b.dtype))
            out[key] = (b_acc + sum(t.to(b_acc.dtype) - b_acc for t in thetas) / len(thetas)).to(b.dtype)
    return out
