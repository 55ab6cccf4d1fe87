"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t (uniform by default; the base is not used).

SPEC "Relatives": theta_avg. Per-model weights follow mergekit's `linear` method with normalize=True.
"""
from typing import List

import torch

from ..ops import center_task_vectors
from .spec import BACKEND_PARAM, KeyGroup, MethodSpec, Param


def _finite(v):
    return None if isinstance(v, (int, float)) and abs(float(v)) < float("inf") else "must be a finite number"


def normalized_weights(weights, name="weight_average") -> List[float]:
    total = float(sum(weights))
    if total == 0.0:
        raise ValueError(f"{name}: weights {list(weights)} sum to 0; cannot normalise")
    return [float(w) / total for w in weights]


def merge_group(group: KeyGroup, weights, backend="auto") -> List[torch.Tensor]:
    w = normalized_weights(weights)
    return [center_task_vectors(thetas, w, out_dtype=group.compute_dtype, return_centered=False,
                                backend=backend)[0]
            for thetas in group.models]


SPEC = MethodSpec(
    name="weight_average",
    description="(weighted) average of the fine-tuned models, sum_t w_t theta_t / sum_t w_t",
    merge_group=merge_group,
    params=(
        Param("weights", 1.0, "relative weight of each model (normalised to sum 1)", per_model=True, check=_finite),
        BACKEND_PARAM,
    ),
)
