"""The caller's module run without weights of its own: a skeleton copy whose parameters and persistent buffers
live on the meta device, fed the merged tensors by torch.func.functional_call; per task, or every task in one
forward through an all-tasks skeleton whose heads dispatch each task's rows to that task's own head.
"""
import copy
from typing import List, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def skeleton(module):
    """A copy of module whose parameters and persistent buffers live on the meta device (no storage): every
    one of them is supplied by functional_call. Non-persistent buffers (e.g. rotary tables) stay real.
    Returns (skeleton, is_copy); a module that cannot be deep-copied is used as is (is_copy False)."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for mod in module.modules():
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        skel = copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - any failure to copy falls back to the module itself
        return module, False
    skel.eval()
    return skel, True


def functional_forward(module, params, batch):
    """module(**batch) / module(*batch) / module(batch) with `params` as its parameters and buffers."""
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (list, tuple)):
        args, kwargs = tuple(batch), None
    else:
        args, kwargs = (batch,), None
    return torch.func.functional_call(module, params, args, kwargs, tie_weights=True, strict=False)


class TaskDispatch(nn.Module):
    """Stands in for a task-specific submodule (a head) in the all-tasks skeleton: rows [o_t, o_t + n_t) of
    every batched tensor argument go to task t's own head. Outputs are concatenated along dim 0, the last
    dim right-padded with zeros where the heads' widths differ (the caller slices it back)."""

    def __init__(self, subs, params):
        super().__init__()
        object.__setattr__(self, "_subs", subs)          # not registered: their names never reach state_dict
        object.__setattr__(self, "_params", params)
        self.sizes: List[int] = []
        self.widths: List[int] = []

    def forward(self, *args, **kwargs):
        N = sum(self.sizes)

        def rows(x, a, b):
            return x[a:b] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == N else x
        outs, o = [], 0
        for t, n in enumerate(self.sizes):
            if n:
                a = tuple(rows(x, o, o + n) for x in args)
                kw = {k: rows(v, o, o + n) for k, v in kwargs.items()}
                out = torch.func.functional_call(self._subs[t], self._params[t], a, kw, strict=False)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"task head returned a {type(out).__name__}, not a tensor")
                outs.append(out)
            o += n
        self.widths = [x.shape[-1] for x in outs]
        width = max(self.widths)
        outs = [F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] != width else x for x in outs]
        return torch.cat(outs, 0)



def all_tasks_skeleton(skeletons, task_specific_keys, heads):
    """The all-tasks skeleton for MergedModel.forward_tasks: one module run on every task's rows at once.
    skeletons: one per task; heads[t]: task t's task-specific entries {key: tensor}. Without task-specific
    keys it is task 0's skeleton; otherwise a meta copy of it whose head submodules (the largest submodules
    holding only task-specific entries) dispatch rows to each task's own head. Returns (module, [TaskDispatch])
    or (None, []) where the module tree allows no such copy."""
    if not task_specific_keys:
        return skeletons[0], []
    skel0 = skeletons[0]
    ts = set(task_specific_keys)
    head_paths = []
    for path, mod in skel0.named_modules():
        if not path or any(path == h or path.startswith(h + ".") for h in head_paths):
            continue
        keys = [f"{path}.{k}" for k in mod.state_dict(keep_vars=True)]
        if keys and all(k in ts for k in keys):
            head_paths.append(path)
    covered = [k for k in task_specific_keys if any(k.startswith(h + ".") for h in head_paths)]
    if len(covered) != len(task_specific_keys):
        return None, []  # a task-specific entry outside any submodule (e.g. a bare root parameter)
    dispatch = []
    try:
        batched = copy.deepcopy(skel0)
        for h in head_paths:
            subs = [s.get_submodule(h) for s in skeletons]
            params = [{k[len(h) + 1:]: v for k, v in heads[t].items() if k.startswith(h + ".")}
                      for t in range(len(skeletons))]
            parent, _, leaf = h.rpartition(".")
            d = TaskDispatch(subs, params)
            setattr(batched.get_submodule(parent) if parent else batched, leaf, d)
            dispatch.append(d)
    except Exception:  # noqa: BLE001 - an unusual module tree: keep the per-task path
        return None, []
    return batched, dispatch
