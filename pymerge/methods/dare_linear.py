"""DARE + task arithmetic (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale, then TA.

docs/METHODS.md §DARE: drop each entry of tau_t with probability p, rescale the survivors by 1/(1 - p); then
theta = theta_0 + lam * sum_t w_t dropped(tau_t) (TA's lam, default 0.3, and per-model weights).
p = 0 is exactly task_arithmetic (same code path, bitwise equal).

Randomness: the keep mask of task t for key K is drawn from a torch.Generator seeded with
key_seed(seed, K, t), in fixed CHUNK-sized pieces of the flattened key, so a result depends only on (seed,
key name, shapes), not on how keys were grouped. seed=None draws a fresh seed (not reproducible).
Deviation from mergekit 0.1.5 `dare_linear` (pinned in tests/test_methods_peers_mergekit.py): mergekit
rescales the survivors so the L1 norm of tau_t is preserved (RescaleNorm.l1) instead of by 1/(1 - p), and
draws its mask from torch's global RNG.
"""
from typing import List, Sequence

import torch

from . import task_arithmetic
from .params import BACKEND_PARAM, Param, finite_number, integer, number_in
from .spec import KeyGroup, MethodSpec, key_seed
from .ties import CHUNK

# DARE's drop probability and the seed of its masks (dare_ties.py declares the same two).
DROP_PARAM = Param("p", 0.9, "drop probability of each task-vector entry, in [0, 1)", per_model=True,
                   check=number_in(0, 1, high_open=True))
DROP_SEED_PARAM = Param("seed", 0, "seed of the drop masks (per key and task); None = fresh randomness", type=int,
                        check=integer, optional=True)


class DareDrop:
    """Random drop-and-rescale of the T task vectors of one key, applied to consecutive [T, C] chunks."""

    def __init__(self, key: str, ps: Sequence[float], seed, device):
        self.keep = [1.0 - float(p) for p in ps]
        self.gens = []
        for t, p in enumerate(ps):
            if p > 0:
                g = torch.Generator(device=device)
                g.manual_seed(key_seed(seed, key, t))
                self.gens.append(g)
            else:
                self.gens.append(None)

    def apply_(self, tau, start=None):
        """tau: [T, C], the next chunk of the flattened key -> dropped and rescaled in place."""
        for t, g in enumerate(self.gens):
            if g is None:
                continue
            # float32 uniforms whatever the data dtype: the same seed drops the same entries for fp32 and fp64.
            u = torch.rand(tau.shape[1], generator=g, dtype=torch.float32, device=tau.device)
            tau[t].mul_(u < self.keep[t]).mul_(1.0 / self.keep[t])
        return tau


def dare_task_arithmetic(key, base, thetas, p, seed, lam, weights, acc) -> torch.Tensor:
    """theta_0 + lam * sum_t w_t drop_p(tau_t) for one key. base, thetas[t]: [*S]; returns [*S] in acc."""
    T = len(thetas)
    b = base.reshape(-1)
    ts = [theta.reshape(-1) for theta in thetas]
    n = b.numel()
    drop = DareDrop(key, p, seed, base.device)
    coef = torch.tensor([float(lam) * float(w) for w in weights], dtype=acc, device=base.device)
    out = torch.empty(n, dtype=acc, device=base.device)
    tau = torch.empty(T, min(CHUNK, n), dtype=acc, device=base.device)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        chunk = tau[:, :e - s]
        b32 = b[s:e].to(acc)
        for t in range(T):
            chunk[t].copy_(ts[t][s:e]).sub_(b32)
        drop.apply_(chunk, s)
        torch.addmv(b32, chunk.mT, coef, out=out[s:e])
    return out.reshape(base.shape)


def merge_group(group: KeyGroup, p, seed, lam, weights, backend="auto") -> List[torch.Tensor]:
    if all(float(x) == 0.0 for x in p):
        return task_arithmetic.merge_group(group, lam=lam, weights=weights, backend=backend)
    return [dare_task_arithmetic(key, base, thetas, p, seed, lam, weights, group.compute_dtype)
            for key, base, thetas in zip(group.keys, group.base, group.models)]


SPEC = MethodSpec(
    name="dare_linear",
    description="DARE: drop tau_t entries with prob p, rescale by 1/(1-p), then task arithmetic",
    merge_group=merge_group,
    params=(
        DROP_PARAM,
        DROP_SEED_PARAM,
        Param("lam", 0.3, "scaling of the summed task vectors (as task_arithmetic)", check=finite_number),
        Param("weights", 1.0, "per-model multiplier of each task vector", per_model=True, check=finite_number),
        BACKEND_PARAM,
    ),
)
