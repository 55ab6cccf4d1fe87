"""FusionBench 0.2.33's own merge code on in-memory state dicts, as its algorithm classes run it (minus model
loading): the lowest-level functions those classes call, with FusionBench's parameter names.

  merge("tsv_m" | "iso_c" | "iso_cts")  TaskSingularVectorMerging / IsotropicMergingInCommon(AndTaskSubspace).run:
        task vectors by state_dict_sub, then TSVM_utils.compute_and_sum_svd_mem_reduction /
        iso_utils.iso_c / iso_utils.iso_cts (accelerator="cpu"), then theta_0 + scaling_factor * merged
  ties             TiesMergingAlgorithm.run: state_dict_to_vector of every model, ties_merging, vector_to_state_dict
  task_arithmetic  task_arithmetic_merge: state_dict_sub / state_dict_add / state_dict_mul
Install: `make install` (fusion-bench==0.2.33 --no-deps). fusion_bench is imported inside the functions; its
per-key prints are swallowed.
"""
import contextlib
import io
from typing import Dict, List, Optional

import torch

VERSION = "0.2.33"
StateDict = Dict[str, torch.Tensor]


def installed() -> bool:
    """Whether the FusionBench modules these wrappers call import here."""
    try:
        import fusion_bench.method.isotropic_merging.iso_utils  # noqa: F401
        import fusion_bench.method.task_singular_vector.utils.TSVM_utils  # noqa: F401
        import fusion_bench.method.ties_merging.ties_merging_utils  # noqa: F401
        import fusion_bench.utils.state_dict_arithmetic  # noqa: F401
    except ImportError:
        return False
    return True


def merge(method: str, base: StateDict, models: List[StateDict], *, scaling_factor: float,
          exclude_keys: Optional[List[str]] = None, common_space_fraction: float = 0.8) -> StateDict:
    """TSV-M, Iso-C or Iso-CTS (method "tsv_m" / "iso_c" / "iso_cts") over every key of `base`.

    FusionBench merges every 2-D key as a matrix unless its exact name is in exclude_keys, and averages the rest.
    scaling_factor: TSVM's alpha, Iso's scaling_factor. common_space_fraction: Iso-CTS only.
    """
    from fusion_bench.method.isotropic_merging import iso_utils
    from fusion_bench.method.task_singular_vector.utils import TSVM_utils
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    with contextlib.redirect_stdout(io.StringIO()):          # FusionBench prints a line per key
        tvs = [state_dict_sub(m, base) for m in models]
        if method == "tsv_m":
            merged = TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, exclude_keys=exclude_keys, accelerator="cpu")
        elif method == "iso_c":
            merged = iso_utils.iso_c(tvs, accelerator="cpu", exclude_keys=exclude_keys)
        elif method == "iso_cts":
            merged = iso_utils.iso_cts(tvs, common_space_fraction=common_space_fraction, accelerator="cpu",
                                       exclude_keys=exclude_keys)
        else:
            raise ValueError(f"fusionbench.merge: method {method!r} is not one of 'tsv_m', 'iso_c', 'iso_cts'")
        return state_dict_add(base, state_dict_mul(merged, scaling_factor))


def ties(base: StateDict, models: List[StateDict], *, threshold: float, scaling_factor: float = 1.0,
         merge_func: str = "mean") -> StateDict:
    """TIES over the floating-point keys, flattened into one vector per model (FusionBench, like the TIES authors'
    code, trims over the whole model, not per tensor). threshold: the fraction of entries kept (FusionBench's
    reset_thresh; it keeps every entry >= the k-th largest |tau|, ties included)."""
    from fusion_bench.method.ties_merging.ties_merging_utils import (state_dict_to_vector, ties_merging,
                                                                      vector_to_state_dict)
    remove = [k for k, v in base.items() if not v.is_floating_point()]
    with contextlib.redirect_stdout(io.StringIO()):
        flat_ft = torch.vstack([state_dict_to_vector(m, remove) for m in models])
        flat_ptm = state_dict_to_vector(base, remove)
        merged_tv = ties_merging(flat_ft - flat_ptm, reset_thresh=threshold, merge_func=merge_func)
        return vector_to_state_dict(flat_ptm + scaling_factor * merged_tv, base, remove)


def task_arithmetic(base: StateDict, models: List[StateDict], *, scaling_factor: float) -> StateDict:
    """theta_0 + scaling_factor * sum_t (theta_t - theta_0) over the floating-point keys, by FusionBench's
    state-dict arithmetic (in the inputs' dtype)."""
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    tv = None
    for m in models:
        d = state_dict_sub({k: m[k] for k in floats}, floats)
        tv = d if tv is None else state_dict_add(tv, d)
    return state_dict_add(floats, state_dict_mul(tv, scaling_factor))
