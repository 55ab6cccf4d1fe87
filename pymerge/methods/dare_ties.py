"""DARE + TIES: drop tau_t entries with probability p and rescale by 1/(1 - p) (DARE), then TIES' sign
election and (weighted) disjoint mean; theta = theta_0 + lam * merged. No magnitude trimming: DARE's random
drop replaces it (as in mergekit's dare_ties). p = 0 is exactly ties with density = 1 (same code path).

Randomness as in dare_linear (per key and task generators from the seed; reproducible for a seed).
Deviations from mergekit 0.1.5 `dare_ties` (pinned in tests/test_methods_peers_mergekit.py): mergekit's default
normalize=False sums the agreeing entries instead of averaging them (we follow the disjoint mean of docs/METHODS.md §TIES, i.e.
mergekit with normalize=True), and it rescales survivors to keep the L1 norm instead of by 1/(1 - p).
"""
from typing import List

from .dare_linear import DROP_PARAM, DROP_SEED_PARAM, DareDrop
from .params import Param, finite_number
from .spec import KeyGroup, MethodSpec
from .ties import sign_consensus_merge


def merge_group(group: KeyGroup, p, seed, lam, weights) -> List:
    out = []
    for key, base, thetas in zip(group.keys, group.base, group.models):
        drop = None if all(float(x) == 0.0 for x in p) else DareDrop(key, p, seed, base.device)
        out.append(sign_consensus_merge(base, thetas, weights, lam, group.compute_dtype, densities=None, drop=drop))
    return out


SPEC = MethodSpec(
    name="dare_ties",
    description="DARE drop-and-rescale (prob p), then TIES sign election and disjoint mean; theta_0 + lam * merged",
    merge_group=merge_group,
    params=(
        DROP_PARAM,
        DROP_SEED_PARAM,
        Param("lam", 1.0, "scaling of the merged task vector", check=finite_number),
        Param("weights", 1.0, "per-model weight: scales tau_t before the election; weighted disjoint mean",
              per_model=True, check=finite_number),
    ),
)
