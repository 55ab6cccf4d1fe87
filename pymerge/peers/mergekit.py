"""mergekit 0.1.5's own merge code on in-memory state dicts: the merge method from its registry (the code
`mergekit-yaml` runs), called once with one TensorGroup per floating-point key.

Install: requirements-dev.txt (mergekit==0.1.5). mergekit is imported inside the functions.
"""
from typing import Dict, List, Optional

import torch

VERSION = "0.1.5"


def installed() -> bool:
    """Whether mergekit's merge-method registry imports here."""
    try:
        import mergekit.merge_methods.registry  # noqa: F401
    except ImportError:
        return False
    return True


def merge(method: str, base: Optional[Dict[str, torch.Tensor]], models: List[Dict[str, torch.Tensor]], *,
          dtype: Optional[torch.dtype] = None, **parameters) -> Dict[str, torch.Tensor]:
    """mergekit's `method` (a registry name: "task_arithmetic", "ties", "dare_linear", "dare_ties", "linear", ...)
    over every floating-point key of the models, with mergekit's parameter names (weight, density, lambda,
    normalize, rescale, ...; a list gives one value per model).

    base: theta_0, the group's base input (mergekit's base_model), first in each group; None for methods
    without one (linear). dtype: mergekit's compute dtype; None = its default, the inputs' promoted dtype (so
    bf16 inputs are merged in bf16). Returns {key: merged tensor} in the inputs' dtype.
    """
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    reference = base if base is not None else models[0]
    keys = [k for k, v in reference.items() if v.is_floating_point()]
    if base is None:
        groups = [TensorGroup.from_tensors([m[k] for m in models], name=k) for k in keys]
    else:
        groups = [TensorGroup.from_tensors([base[k], *[m[k] for m in models]], base_index=0, name=k)
                  for k in keys]
    outs = registry.get(method)(groups, parameters=parameters, dtype=dtype)
    return dict(zip(keys, outs))
