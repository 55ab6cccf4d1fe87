"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t (uniform by default; the base is not used).

docs/METHODS.md §Weight averaging: theta_avg. Per-model weights follow mergekit's `linear` method with normalize=True.
"""
import math
from typing import List

import torch

from ..ops import center_task_vectors
from .params import BACKEND_PARAM, Param, finite_number
from .spec import KeyGroup, MethodSpec


def weight_scale(weights) -> float:
    """1.0 when max_t |w_t| lies in [2^-64, 2^64] (or is 0), else a power of two near it: dividing the weights
    by it is exact and keeps their sums, and their products with task vectors in float32, in range."""
    largest = max(abs(float(w)) for w in weights)
    exponent = math.frexp(largest)[1]
    return 1.0 if largest == 0 or -64 <= exponent <= 64 else 2.0 ** exponent


def normalized_weights(weights, name="weight_average") -> List[float]:
    """w_t / sum_t w_t, summed exactly (fsum) after an exact rescaling (weight_scale), so that the sum neither
    overflows nor reads 0 when it is not."""
    scale = weight_scale(weights)
    scaled = [float(w) / scale for w in weights]
    total = math.fsum(scaled)
    if total == 0.0:
        raise ValueError(f"{name}: weights {list(weights)} sum to 0; cannot normalise")
    return [w / total for w in scaled]


def prepare(params, keys):
    """Weights that cannot be normalised are refused before any key is read."""
    normalized_weights(params["weights"])
    return params


def merge_group(group: KeyGroup, weights, backend="auto") -> List[torch.Tensor]:
    w = normalized_weights(weights)
    return [center_task_vectors(thetas, w, out_dtype=group.result_dtype, return_centered=False,
                                backend=backend)[0]
            for thetas in group.models]


SPEC = MethodSpec(
    name="weight_average",
    description="(weighted) average of the fine-tuned models, sum_t w_t theta_t / sum_t w_t",
    merge_group=merge_group,
    prepare=prepare,
    # One fused weighted sum (center_task_vectors) over every input: NaN/Inf always reach the output.
    nonfinite_propagates=True,
    params=(
        Param("weights", 1.0, "relative weight of each model (normalised to sum 1)", per_model=True,
              check=finite_number),
        BACKEND_PARAM,
    ),
)
