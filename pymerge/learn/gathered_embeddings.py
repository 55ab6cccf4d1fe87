"""Merged nn.Embedding tables that are never materialised. An untied, merged embedding table leaves the stacks
of MergedModel: every lookup of the task skeletons' nn.Embedding gathers the used rows of theta_s [V, d] and of
delta_t [T, V, d] instead of building theta_s + sum_t Gamma_t delta_t for the whole vocabulary each step.
MergedModel.verify compares this path with dense tables once and switches it off where a model disagrees.
"""
import types
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import accumulation_dtype


def _gathered_embedding_forward(self, input):
    """nn.Embedding.forward over theta_s + sum_t Gamma_t delta_t, gathering only the looked-up rows.

    d Gamma includes rows at padding_idx: the exact derivative of the loss (F.embedding's padding_idx
    convention, which zeroes those rows' weight gradient, would drop them; verify() compares values only)."""
    out = F.embedding(input, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
    if self._pm_gamma.numel() == 0:
        return out  # dense mode (shared_params(full=True)): self.weight is the merged table itself
    rows = self._pm_delta.index_select(1, input.reshape(-1))                  # [T, n, d]
    delta = torch.einsum("t,tnd->nd", self._pm_gamma.to(rows.dtype), rows)
    return out + delta.view(*input.shape, rows.shape[-1]).to(out.dtype)


@dataclass
class GatheredTable:
    """An nn.Embedding table merged lazily: start [V, d], delta [T, V, d], coefficient group."""
    key: str
    path: str                 # the nn.Embedding's module path (the same in every task's skeleton)
    start: torch.Tensor
    delta: torch.Tensor
    group: int

    @property
    def gamma_name(self):
        """The name under which functional_call hands the patched modules their row of Gamma."""
        return f"{self.path}._pm_gamma" if self.path else "_pm_gamma"

    def params(self, row, full=False):
        """{key: table, gamma_name: coefficients} for functional_call, row: Gamma [T] of the table's group.
        full=False: theta_s and Gamma (each lookup gathers); full=True: the dense merged table and an empty
        Gamma (the patched forward then reads the table as is)."""
        if full:
            table = self.start + torch.einsum("t,t...->...", row.to(self.delta.dtype), self.delta)
            coef = row.new_empty(0, dtype=self.delta.dtype)   # tells the patched forward: dense table
        else:
            table = self.start
            coef = row.to(self.delta.dtype)
        return {self.key: table, self.gamma_name: coef}

    def dense(self, row):
        """The merged table [V, d] for Gamma row [T], fp32 accumulation (fp64 for fp64), in start's dtype."""
        acc = accumulation_dtype(self.delta.dtype)
        v = self.start.to(acc) + torch.einsum("t,t...->...", row.to(acc), self.delta.to(acc))
        return v.to(self.start.dtype)


def embedding_modules(skeletons, path) -> Optional[List[nn.Module]]:
    """The nn.Embedding at `path` of every skeleton, or None unless each is a plain nn.Embedding on meta."""
    mods = []
    for skel in skeletons:
        try:
            mod = skel.get_submodule(path)
        except AttributeError:
            return None
        if type(mod) is not nn.Embedding or mod.weight.device.type != "meta":
            return None
        mods.append(mod)
    return mods


def install(table: GatheredTable, mods, num_tasks, device):
    """Patch the nn.Embedding modules `mods` to gather rows of `table` (see _gathered_embedding_forward)."""
    for mod in mods:
        mod.register_buffer("_pm_gamma", torch.zeros(num_tasks, dtype=table.delta.dtype, device=device),
                            persistent=False)
        mod._pm_delta = table.delta
        mod.forward = types.MethodType(_gathered_embedding_forward, mod)


def uninstall(table: GatheredTable, skeletons):
    """Undo install() on every skeleton's module at table.path: plain nn.Embedding again."""
    for skel in skeletons:
        mod = skel.get_submodule(table.path)
        del mod.forward, mod._pm_delta
        mod._buffers.pop("_pm_gamma", None)
