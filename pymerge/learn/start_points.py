"""Where a learned merge starts. The merged model is Phi_Gamma = theta_s + sum_t Gamma_t delta_t; while the
fine-tuned models are read, MergedModel stacks theta_s = theta_0 and delta_t = tau_t = theta_t - theta_0 (the
papers' start). A StartPoint then rewrites theta_s and delta_t once, before the optimisation:

    name                 what LearnedMerge.config["start"] records
    gamma_starts_at_zero True: Gamma starts at 0 (the optimisation starts exactly at theta_s)
    initial_gamma        Gamma's start when the caller gives no init (None: the method's default, 1/T)
    apply(merged, what)  rewrite merged.stacks in place (TaskVectorStack.start may be rebound: it can be the
                         base's own tensor, which is never written; delta is the model's own buffer)
    config()             options recorded in LearnedMerge.config

StartPoint() is the pretrained start; StaticMergeStart starts at a static merge (``init_from=`` a merged
state dict or a callable). The start points built from pymerge's static methods (CART's low-rank start,
init_from=<method name>) live with the methods: pymerge.methods.learned_starts.
"""
from collections import OrderedDict
from typing import Mapping

import torch

from .inputs import format_keys


class StartPoint:
    """The pretrained start: theta_s = theta_0, delta_t = tau_t, Gamma at the method's default."""
    name = "pretrained"
    gamma_starts_at_zero = False
    initial_gamma = None

    def apply(self, merged, what):
        pass

    def config(self):
        return {"start": self.name}


class _FineTunedView(Mapping):
    """theta_t = theta_0 + tau_t for the merged keys, reconstructed on access from the stacks (for static
    merges run as init_from, before the start point changes)."""

    def __init__(self, merged, t):
        self._m, self._t = merged, t

    def __getitem__(self, key):
        return self._m.start_of(key) + self._m.delta_of(key, self._t)

    def __iter__(self):
        return iter(self._m.merged_keys)

    def __len__(self):
        return len(self._m.merged_keys)

    def key_info(self, key):
        """(shape, dtype) without materialising the key (pymerge.merge reads it)."""
        return self._m.shape_of[key], self._m.dtype_of[key]


class StaticMergeStart(StartPoint):
    """theta_s = a static merge of theta_0, theta_1..theta_T; delta_t = tau_t; Gamma starts at 0.

    init_from: a merged state dict, or f(base_sd, model_sds, **init_from_params) -> state dict, called with
    theta_0 and lazy views of theta_1..theta_T over the merged keys. label: the name recorded in
    LearnedMerge.config["init_from"] (a static method's name), else None."""
    gamma_starts_at_zero = True

    def __init__(self, init_from, init_from_params=None, what="learned merge", label=None):
        if isinstance(init_from, Mapping):
            if init_from_params:
                raise ValueError(f"{what}: init_from_params only applies to a method name or a callable")
        elif not callable(init_from):
            raise ValueError(f"{what}: init_from must be a method name, a state dict or a callable, "
                             f"got {type(init_from).__name__}")
        self.init_from, self.params, self.label = init_from, dict(init_from_params or {}), label

    def config(self):
        return {"start": self.name, "init_from": self.label}

    def apply(self, merged, what):
        merged_keys = merged.merged_keys
        if isinstance(self.init_from, Mapping):
            out = self.init_from
        else:
            out = self.init_from(OrderedDict((k, merged.start_of(k)) for k in merged_keys),
                                 [_FineTunedView(merged, t) for t in range(len(merged.tasks))], **self.params)
        if not isinstance(out, Mapping):
            raise ValueError(f"{what}: init_from returned a {type(out).__name__}, expected a state dict")
        missing = [k for k in merged_keys if k not in out]
        if missing:
            raise ValueError(f"{what}: the init_from merge lacks merged key(s) {format_keys(missing)}")
        for k in merged_keys:
            v = out[k]
            if not isinstance(v, torch.Tensor) or v.shape != merged.shape_of[k]:
                raise ValueError(f"{what}: init_from key {k!r} has shape {tuple(getattr(v, 'shape', ()))}, "
                                 f"expected {tuple(merged.shape_of[k])}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{what}: init_from key {k!r} contains NaN or Inf")
        with torch.no_grad():
            for g in merged.stacks:
                g.start = torch.stack([out[k].detach().reshape(1, -1).to(g.delta.dtype) for k in g.keys]) \
                    .to(merged.device)
