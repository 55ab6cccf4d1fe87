"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lam * sum_t w_t tau_t, tau_t = theta_t - theta_0.

docs/METHODS.md §Task arithmetic: theta_0 + lam sum_t tau_t, lam default 0.3. Per-model weights w_t (default 1)
multiply each task vector, as mergekit's task_arithmetic does (mergekit has no separate lam: its `lambda` = our
lam, its per-model `weight` = our weights, normalize=False). lam = 1/T with unit weights is weight averaging.
"""
from typing import List

import torch

from ..ops import center_task_vectors
from .params import BACKEND_PARAM, Param, finite_number
from .spec import KeyGroup, MethodSpec


def task_arithmetic_coefficients(lam, weights) -> List[float]:
    """theta_0 + lam sum_t w_t (theta_t - theta_0) = c_0 theta_0 + sum_t c_t theta_t with these c (length T+1):
    one fused weighted sum over [theta_0, theta_1..theta_T]."""
    scaled = [float(lam) * float(w) for w in weights]
    return [1.0 - sum(scaled)] + scaled


def merge_group(group: KeyGroup, lam, weights, backend="auto") -> List[torch.Tensor]:
    c = task_arithmetic_coefficients(lam, weights)
    # center_task_vectors with return_centered=False is exactly a one-pass weighted sum accumulated in fp32.
    return [center_task_vectors([base, *thetas], c, out_dtype=group.result_dtype, return_centered=False,
                                backend=backend)[0]
            for base, thetas in zip(group.base, group.models)]


SPEC = MethodSpec(
    name="task_arithmetic",
    description="theta_0 + lam * sum_t w_t (theta_t - theta_0)",
    merge_group=merge_group,
    # One fused weighted sum (center_task_vectors) over every input: NaN/Inf always reach the output.
    nonfinite_propagates=True,
    params=(
        Param("lam", 0.3, "scaling of the summed task vectors (searched on validation data in the papers)",
              check=finite_number),
        Param("weights", 1.0, "per-model multiplier of each task vector", per_model=True, check=finite_number),
        BACKEND_PARAM,
    ),
)
