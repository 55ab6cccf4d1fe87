r"""The merged functional model of a learned merge: Phi_Gamma = theta_s + sum_t Gamma_t delta_t (per merged key)
over the caller's own nn.Module, with Gamma the only trained tensor. theta_s and delta_t are stacked once per
group of keys with equal numel and dtype; where they start is a StartPoint (pymerge.learn.start_points). The
merged parameters are a differentiable function of Gamma, fed to skeletons of the caller's module with
torch.func.functional_call (pymerge.learn.skeletons): no model copy per step, no autograd graph over the
delta_t (they are constants), any torch model.

``MergedModel.build(base, models, *, task_names=None, task_specific_keys=None, granularity="layer",
layer_groups=None, init=None, start=None, gather_embeddings=True, batch_tasks=True, on_model=None)``
    base: nn.Module or state dict (theta_0; its tensors are referenced, not copied, where possible: do not
    modify them meanwhile). models: a sequence of T fine-tuned nn.Modules, or a mapping {task name: module};
    an entry may also be a zero-argument callable returning the module (a loader), so at most one fine-tuned
    model is in memory at a time. Each model is visited exactly once, in order: its task vector is written
    into the stacked buffers, ``on_model(t, module)`` is called under no_grad (compute teacher outputs there)
    and the reference is dropped. What stays in memory: theta_s, the stacked delta_t, the task-specific
    tensors (heads) and, per task, a skeleton of the module whose parameters live on the meta device (no
    storage; non-persistent buffers are kept).
    Keys: task_specific_keys (regex, re.search) selects keys that are NOT merged: task t uses model t's own
    (classifier heads; shapes may differ between tasks). All other floating-point state-dict entries
    (parameters and persistent buffers) are merged; they must exist with one shape and dtype in every model
    and in base. Non-float entries come from base (or model 0 when base lacks them). Tied parameters are
    merged once (under the first name) and stay tied. Keys whose task vectors are all zero are constants.
    Coefficients: ``merged.gamma`` is an nn.Parameter [G, T] (float32; float64 for float64 models);
    granularity "task": G = 1; "layer": one group per merged key, or per match of ``layer_groups`` (a regex;
    the first capture group, or else the whole match, names the group, e.g. r"layer\.\d+\." gives one Gamma
    per task and transformer block; keys that do not match keep a group of their own). ``merged.groups``
    names the G groups, ``merged.group_of[key]`` the group of a key. init: a float, or a tensor [T] or
    [G, T]; default 1/T (0 when start.gamma_starts_at_zero). start: a pymerge.learn.start_points.StartPoint
    (None: theta_s = theta_0, delta_t = tau_t), applied once every model has been read; it rewrites
    ``merged.stacks`` (TaskVectorStack: keys of equal numel and dtype, start [K, 1, S], delta [K, T, S]).

``merged.shared_params(gamma=None, full=False) -> {key: Tensor}``
    The merged shared tensors for the current (or the given) Gamma, differentiable w.r.t. it. Built per
    group of keys with equal numel and dtype by one baddbmm, theta_s[K, 1, S] + Gamma[K, 1, T] @ delta[K, T, S]
    (an autograd.Function: no graph over delta, d Gamma = one GEMV per key; the delta stacks are built once
    at setup). Call once per optimisation step and reuse for every task. nn.Embedding tables (untied, merged)
    are not materialised: each lookup gathers the used rows of theta_s and delta_t (gather_embeddings=True);
    full=True returns dense tables instead.
``merged.forward(t, batch, shared) -> outputs``, ``merged.logits(t, batch, shared) -> Tensor``
    Run task t's module (merged body + head t) on one batch: a dict is passed as model(**batch), a tuple/list
    as model(*batch), a tensor as model(batch). logits: outputs.logits, outputs["logits"], outputs[0] of a
    tuple, or the tensor itself.
``merged.forward_tasks(examples, shared, pad_value=0, extract=logits_of) -> [Tensor | None] * T``
    examples[t] (per-example inputs) collated per task (padded to that task's longest example, never to
    another task's; the trailing columns every row masks dropped: batching.trim_padding, so rows of a padded
    batch cost their own length); with batch_tasks=True the tasks whose batches have equal shapes run as ONE
    forward of an all-tasks skeleton whose head submodules dispatch each task's rows to its own head (heads of
    different widths are zero-padded, then sliced back); one forward per task otherwise.
    extract(outputs) must return a tensor whose dim 0 is the batch (it is split by rows).
``merged.verify(examples_per_task) -> {"gathered": bool, "batched": bool}``: run once before optimising:
    compares the fast paths (gathered embeddings, all-tasks forward) with the plain per-task dense path on a
    few examples and switches off any that disagrees (e.g. a model that reads an embedding's weight outside
    its forward, or heads that are not row-wise). learn() does this.
``merged.state_dicts(gamma=None) -> (shared, per_task)``: final merged tensors (fp32 accumulation, cast to
    each key's dtype); per_task[t] = shared + task t's own task-specific entries.
"""
import logging
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from . import gathered_embeddings
from .batching import batch_signature, collate, concat_batches, logits_of, trim_padding
from .gathered_embeddings import GatheredTable
from .inputs import align_base_keys, as_state_dict, compile_regex, format_keys, task_names_and_models
from .skeletons import TaskDispatch, all_tasks_skeleton, functional_forward, skeleton
from .stacks import TaskVectorStack
from .start_points import StartPoint

GRANULARITIES = ("task", "layer")
logger = logging.getLogger("pymerge.learn")


class MergedModel:
    """theta_s + sum_t Gamma_t delta_t over the caller's module (see the module docstring). Build with
    MergedModel.build(...)."""

    def __init__(self):
        self.tasks: List[str] = []
        self.granularity = "layer"
        self.start = "pretrained"
        self.merged_keys: List[str] = []
        self.shape_of: Dict[str, torch.Size] = {}
        self.dtype_of: Dict[str, torch.dtype] = {}
        self.groups: List[str] = []
        self.group_of: Dict[str, str] = {}
        self.gamma: Optional[nn.Parameter] = None
        self.task_specific_keys: List[str] = []
        self.heads: List[Dict[str, torch.Tensor]] = []
        self.constants: Dict[str, torch.Tensor] = OrderedDict()
        self.key_order: List[str] = []
        self.skeletons: List[nn.Module] = []
        self.batched: Optional[nn.Module] = None        # all-tasks skeleton (see forward_tasks), or None
        self._dispatch: List[TaskDispatch] = []
        self._skeleton_is_copy: List[bool] = []
        self.stacks: List[TaskVectorStack] = []
        self._gathered: List[GatheredTable] = []
        self.embedding_keys: Dict[str, str] = {}       # untied nn.Embedding tables: {key: module path}
        self._where: Dict[str, tuple] = {}
        self._from_model0: Dict[str, torch.Tensor] = {}
        self._ts_re = None
        self.device = torch.device("cpu")

    # ---------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, base, models, *, task_names=None, task_specific_keys=None, granularity="layer",
              layer_groups=None, init=None, start: Optional[StartPoint] = None, gather_embeddings=True,
              batch_tasks=True, on_model: Optional[Callable[[int, nn.Module], Any]] = None, what="learned merge"):
        if granularity not in GRANULARITIES:
            raise ValueError(f"{what}: granularity = {granularity!r}; expected one of {GRANULARITIES}")
        start = StartPoint() if start is None else start
        ts_re = compile_regex(task_specific_keys, "task_specific_keys", what)
        lg_re = compile_regex(layer_groups, "layer_groups", what)
        names, entries = task_names_and_models(models, task_names, f"{what}: models")
        base_sd = as_state_dict(base, f"{what}: base")
        self = cls()
        self.tasks, self.granularity, self.start = names, granularity, start.name
        T = len(names)
        for t, entry in enumerate(entries):
            module = entry if isinstance(entry, nn.Module) else entry()
            if not isinstance(module, nn.Module):
                raise ValueError(f"{what}: the loader of task {names[t]!r} returned a {type(module).__name__}, "
                                 "expected an nn.Module")
            sd = module.state_dict(keep_vars=True)
            if t == 0:
                base_sd = self._aligned_base(sd, base_sd, ts_re, what)
                self._plan(module, sd, base_sd, ts_re, lg_re, what)
            else:
                self._check_model(t, sd, what)
            self._absorb(t, sd, base_sd, what)
            skel, is_copy = skeleton(module)
            self.skeletons.append(skel)
            self._skeleton_is_copy.append(is_copy)
            if on_model is not None:
                with torch.no_grad():
                    on_model(t, module)
            del module, sd
        self._finish_constants(base_sd)
        start.apply(self, what)
        del base_sd
        self._drop_zero_groups()
        if batch_tasks and all(self._skeleton_is_copy):
            self.batched, self._dispatch = all_tasks_skeleton(self.skeletons, self.task_specific_keys, self.heads)
        if gather_embeddings:
            self._gather_embeddings()
        dtype = torch.float64 if any(d == torch.float64 for d in self.dtype_of.values()) else torch.float32
        G = 1 if granularity == "task" else len(self.groups)
        default = 0.0 if start.gamma_starts_at_zero else 1.0 / T
        self.gamma = nn.Parameter(_init_gamma(init, default, G, T, dtype, self.device, what))
        return self

    @staticmethod
    def _aligned_base(sd, base_sd, ts_re, what):
        """base_sd re-keyed when its keys and model 0's merged keys differ by one prefix (align_base_keys)."""
        wanted = [k for k, v in sd.items() if (ts_re is None or ts_re.search(k) is None) and
                  v.dtype in FLOAT_DTYPES and v.numel() > 0]
        aligned, note = align_base_keys(base_sd, wanted, what)
        if note is not None:
            logger.info("%s: %s (they now match the fine-tuned models')", what, note)
        return aligned

    def _plan(self, module, sd, base_sd, ts_re, lg_re, what):
        """From model 0: canonical keys (ties merged), task-specific keys, merged keys, groups, stacks and the
        untied nn.Embedding tables among the merged keys (embedding_keys: {key: module path})."""
        seen, canonical = {}, []
        for k, v in sd.items():
            if id(v) not in seen:
                seen[id(v)] = k
                canonical.append(k)
        self.key_order = canonical
        self._ts_re = ts_re
        self.task_specific_keys = [k for k in canonical if self._is_task_specific(k)]
        if ts_re is not None and not self.task_specific_keys:
            raise ValueError(f"{what}: task_specific_keys={ts_re.pattern!r} matches no key of the models "
                             f"(keys: {format_keys(canonical)})")
        ts = set(self.task_specific_keys)
        merged = [k for k in canonical if k not in ts and sd[k].dtype in FLOAT_DTYPES and sd[k].numel() > 0]
        missing = [k for k in merged if k not in base_sd]
        if missing:
            raise ValueError(f"{what}: base lacks merged key(s) {format_keys(missing)} of the fine-tuned models; "
                             "different architectures? (keys that exist only in the fine-tuned models, such as "
                             "classifier heads, must be named by task_specific_keys)")
        for k in merged:
            if base_sd[k].shape != sd[k].shape:
                raise ValueError(f"{what}: key {k!r} has shape {tuple(sd[k].shape)} in model {self.tasks[0]!r} "
                                 f"but {tuple(base_sd[k].shape)} in base; mismatched architectures or heads "
                                 "(name per-task heads with task_specific_keys)")
        self.merged_keys = merged
        self.device = sd[merged[0]].device if merged else torch.device("cpu")
        for k in merged:
            self.shape_of[k], self.dtype_of[k] = sd[k].shape, sd[k].dtype
            if sd[k].device != self.device:
                raise ValueError(f"{what}: key {k!r} is on {sd[k].device} but {merged[0]!r} on {self.device}")
        # Coefficient groups (layer granularity): per key, or per layer_groups match.
        group_ids, self.groups = {}, []
        for k in merged:
            m = lg_re.search(k) if lg_re is not None else None
            g = (m.group(1) if m.groups() and m.group(1) is not None else m.group(0)) if m else k
            if g not in group_ids:
                group_ids[g] = len(self.groups)
                self.groups.append(g)
            self.group_of[k] = g
        # Untied nn.Embedding tables among the merged keys (candidates for gathered lookups).
        counts = {}
        for _, p in module.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        emb = {}
        for path, mod in module.named_modules():
            if type(mod) is nn.Embedding and mod.max_norm is None:
                key = f"{path}.weight" if path else "weight"
                if key in self.shape_of and counts.get(id(mod.weight), 0) == 1:
                    emb[key] = path
        self.embedding_keys = emb
        # Stacks: keys of equal (numel, dtype) share one [K, T, S] buffer; an embedding table gets its own.
        # A single-key group references base's tensor as its start point (no copy; replaced, never written).
        T = len(self.tasks)
        buckets = OrderedDict()
        for k in merged:
            buckets.setdefault((sd[k].numel(), sd[k].dtype, k if k in emb else None), []).append(k)
        for (S, dt, _), keys in buckets.items():
            idx = torch.tensor([group_ids[self.group_of[k]] for k in keys], dtype=torch.long, device=self.device)
            if len(keys) == 1 and base_sd[keys[0]].dtype == dt and base_sd[keys[0]].device == self.device:
                start = base_sd[keys[0]].reshape(1, 1, S)
            else:
                start = torch.empty(len(keys), 1, S, dtype=dt, device=self.device)
                for i, k in enumerate(keys):
                    start[i, 0].copy_(base_sd[k].reshape(-1))
            for i, k in enumerate(keys):
                self._where[k] = (len(self.stacks), i)
            self.stacks.append(TaskVectorStack(keys, [sd[k].shape for k in keys], start,
                                               torch.empty(len(keys), T, S, dtype=dt, device=self.device), idx))

    def _check_model(self, t, sd, what):
        name = self.tasks[t]
        seen, keys = set(), []
        for k, v in sd.items():
            if id(v) not in seen:
                seen.add(id(v))
                keys.append(k)
        shared = [k for k in keys if not self._is_task_specific(k)]
        expected = [k for k in self.key_order if k not in set(self.task_specific_keys)]
        missing = sorted(set(expected) - set(shared))
        if missing:
            raise ValueError(f"{what}: model {name!r} lacks key(s) {format_keys(missing)} of model {self.tasks[0]!r}: "
                             "mismatched architectures")
        extra = sorted(set(shared) - set(expected))
        if extra:
            raise ValueError(f"{what}: model {name!r} has key(s) {format_keys(extra)} that model {self.tasks[0]!r} "
                             "lacks: mismatched architectures (or heads not named by task_specific_keys)")
        for k in self.merged_keys:
            if sd[k].shape != self.shape_of[k] or sd[k].dtype != self.dtype_of[k]:
                raise ValueError(f"{what}: key {k!r} is {tuple(sd[k].shape)} {sd[k].dtype} in model {name!r} but "
                                 f"{tuple(self.shape_of[k])} {self.dtype_of[k]} in model {self.tasks[0]!r}; "
                                 "mismatched architectures or heads (name per-task heads with task_specific_keys)")
        if self.task_specific_keys and len(keys) == len(shared):
            raise ValueError(f"{what}: model {name!r} has no key matching task_specific_keys="
                             f"{self._ts_re.pattern!r} but model {self.tasks[0]!r} has "
                             f"{format_keys(self.task_specific_keys)}: mismatched heads")

    def _is_task_specific(self, key):
        return self._ts_re is not None and self._ts_re.search(key) is not None

    def _absorb(self, t, sd, base_sd, what):
        """tau_t = theta_t - theta_0 into the stacks; task t's own task-specific entries into heads[t]."""
        with torch.no_grad():
            for g in self.stacks:
                for i, k in enumerate(g.keys):
                    theta = sd[k].detach().reshape(-1)
                    # a finite sum means every element is finite (NaN and Inf propagate through a sum); only a
                    # sum that is not (an overflow, or a real NaN / Inf) needs the element-wise check
                    if not torch.isfinite(theta.sum()) and not torch.isfinite(theta).all():
                        raise ValueError(f"{what}: key {k!r} of model {self.tasks[t]!r} contains NaN or Inf")
                    torch.sub(theta, g.start[i, 0], out=g.delta[i, t])
        seen, head = set(), OrderedDict()
        for k, v in sd.items():
            if id(v) not in seen:
                seen.add(id(v))
                if self._is_task_specific(k):
                    head[k] = v.detach()
        self.heads.append(head)
        if t == 0:
            ts = set(self.task_specific_keys)
            self._from_model0 = {k: sd[k].detach() for k in self.key_order
                                 if k not in self.shape_of and k not in ts and k not in base_sd}

    def _finish_constants(self, base_sd):
        # Shared entries that are not merged (integer/bool buffers, empty tensors) come from base, else from
        # model 0 (read in _absorb: the skeletons hold them on the meta device only).
        ts = set(self.task_specific_keys)
        for k in self.key_order:
            if k not in self.shape_of and k not in ts and k in base_sd:
                self.constants[k] = base_sd[k]
        self.constants.update(self._from_model0)
        self._from_model0 = {}

    # --------------------------------------------------------------------- stacks (for start points)
    def start_of(self, key):
        """theta_s of one merged key (a view into its stack)."""
        gi, i = self._where[key]
        return self.stacks[gi].start[i, 0].view(self.shape_of[key])

    def delta_of(self, key, t):
        """delta_t of one merged key (a view into its stack)."""
        gi, i = self._where[key]
        return self.stacks[gi].delta[i, t].view(self.shape_of[key])

    def _drop_zero_groups(self):
        """Keys whose delta_t are all zero (frozen during fine-tuning) become constants: nothing to compute."""
        keep = []
        for g in self.stacks:
            nz = g.delta.reshape(len(g.keys), -1).any(dim=1).tolist()     # nonzero (NaN counts) anywhere
            if all(nz):
                keep.append(g)
                continue
            for i, k in enumerate(g.keys):
                if not nz[i]:
                    self.constants[k] = g.start[i, 0].view(g.shapes[i]).clone()
            sel = [i for i in range(len(g.keys)) if nz[i]]
            if sel:
                idx = torch.tensor(sel, device=g.start.device)
                keep.append(TaskVectorStack([g.keys[i] for i in sel], [g.shapes[i] for i in sel],
                                            g.start.index_select(0, idx), g.delta.index_select(0, idx),
                                            g.index.index_select(0, idx)))
        self.stacks = keep
        self._reindex()

    def _reindex(self):
        self._where = {}
        for gi, g in enumerate(self.stacks):
            for i, k in enumerate(g.keys):
                self._where[k] = (gi, i)

    def _all_skeletons(self):
        return self.skeletons + ([self.batched] if self.batched is not None and self.batched not in self.skeletons
                                 else [])

    def _gather_embeddings(self):
        """Untied nn.Embedding tables leave the stacks: lookups gather rows instead (gathered_embeddings)."""
        if not self.embedding_keys or not all(self._skeleton_is_copy):
            return
        for key, path in self.embedding_keys.items():
            if key not in self._where:
                continue  # constant (zero task vectors)
            gi, i = self._where[key]
            g = self.stacks[gi]
            if len(g.keys) != 1:
                continue
            mods = gathered_embeddings.embedding_modules(self._all_skeletons(), path)
            if mods is None:
                continue
            shape = g.shapes[0]
            table = GatheredTable(key, path, g.start.view(shape), g.delta.view(-1, *shape), int(g.index[0]))
            self.stacks.pop(gi)
            self._reindex()
            gathered_embeddings.install(table, mods, len(self.tasks), self.device)
            self._gathered.append(table)

    @property
    def gathered_keys(self):
        return [g.key for g in self._gathered]

    def disable_gathered(self):
        """Go back to dense embedding tables (merged like every other key)."""
        T = len(self.tasks)
        for item in self._gathered:
            S = item.start.numel()
            self.stacks.append(TaskVectorStack([item.key], [item.start.shape], item.start.reshape(1, 1, S),
                                               item.delta.reshape(1, T, S),
                                               torch.tensor([item.group], device=self.device)))
            gathered_embeddings.uninstall(item, self._all_skeletons())
        self._gathered = []
        self._reindex()

    def verify(self, examples, pad_value=0, rtol=1e-4, atol=1e-5):
        """Check once, on a few examples per task (a list per task), that the fast paths give the plain
        path's logits: gathered embedding lookups vs dense tables (a model may read an embedding's weight
        outside its forward) and the all-tasks forward vs one forward per task. A fast path that disagrees
        or fails is switched off for good. Returns {"gathered": bool, "batched": bool} (what stays on)."""
        def close(a, b):
            return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)
        with torch.no_grad():
            dense = self.shared_params(full=True)
            batches = [trim_padding(collate(ex, pad_value, self.device)) for ex in examples]
            ref = [logits_of(self.forward(t, b, dense)) for t, b in enumerate(batches)]
            if self._gathered:
                shared = self.shared_params()
                fast = [logits_of(self.forward(t, b, shared)) for t, b in enumerate(batches)]
                if not all(close(a, b) for a, b in zip(fast, ref)):
                    self.disable_gathered()
            if self.batched is not None:
                try:
                    got = self.forward_tasks(examples, self.shared_params(), pad_value=pad_value)
                    ok = all(close(a, b) for a, b in zip(got, ref))
                except Exception:  # noqa: BLE001 - any failure means: run the tasks one by one
                    ok = False
                if not ok:
                    self.batched, self._dispatch = None, []
        return {"gathered": bool(self._gathered), "batched": self.batched is not None}

    # -------------------------------------------------------------------------------------- per step
    def coefficient_matrix(self, gamma=None):
        """Gamma as [G, T] (task granularity: [1, T])."""
        g = self.gamma if gamma is None else gamma
        return g if g.dim() == 2 else g.view(1, -1)

    def shared_params(self, gamma=None, full=False) -> Dict[str, torch.Tensor]:
        """Merged shared tensors for Gamma (see the module docstring); differentiable w.r.t. gamma."""
        gam = self.coefficient_matrix(gamma)
        task_level = gam.shape[0] == 1
        out = dict(self.constants)
        for g in self.stacks:
            coef = gam.expand(len(g.keys), -1) if task_level else gam.index_select(0, g.index)     # [K, T]
            for key, value in zip(g.keys, g.merged(coef)):
                out[key] = value
        for item in self._gathered:
            out.update(item.params(gam[0 if task_level else item.group], full))
        return out

    def task_params(self, t, shared):
        """shared + task t's own task-specific entries: what functional_call gets for task t."""
        if not self.heads[t]:
            return shared
        p = dict(shared)
        p.update(self.heads[t])
        return p

    def forward(self, t, batch, shared=None):
        """Task t's module (merged body, own head) on one batch; outputs as the module returns them."""
        if shared is None:
            shared = self.shared_params()
        return functional_forward(self.skeletons[t], self.task_params(t, shared), batch)

    def logits(self, t, batch, shared=None):
        return logits_of(self.forward(t, batch, shared))

    def forward_tasks(self, examples, shared=None, pad_value=0, extract=logits_of):
        """Every task on one merged parameter set: examples[t] (a list of per-example inputs, possibly empty)
        collated per task, so each task is padded to its own longest example only; tasks whose batches then
        have the same shapes run as ONE forward of the all-tasks skeleton (all of them when every task has the
        same length), extract(outputs) split back by rows (and, where the heads' widths differ, sliced back to
        task t's width). One forward per task when the all-tasks path is off. Returns a list of T tensors (None
        for a task without examples)."""
        if shared is None:
            shared = self.shared_params()
        batches = [trim_padding(collate(ex, pad_value, self.device)) if ex else None for ex in examples]
        if self.batched is None:
            return [extract(self.forward(t, b, shared)) if b is not None else None for t, b in enumerate(batches)]
        buckets = OrderedDict()     # tasks whose per-task batches have equal shapes share one forward
        for t, b in enumerate(batches):
            if b is not None:
                buckets.setdefault(batch_signature(b), []).append(t)
        res = [None] * len(examples)
        for tasks in buckets.values():
            sizes = [len(examples[t]) if t in tasks else 0 for t in range(len(examples))]
            for d in self._dispatch:
                d.sizes = sizes
            batch = batches[tasks[0]] if len(tasks) == 1 else concat_batches([batches[t] for t in tasks])
            out = extract(functional_forward(self.batched, shared, batch))
            widths = self._dispatch[-1].widths if self._dispatch else None
            o = 0
            for w, t in enumerate(tasks):
                part = out[o:o + sizes[t]]
                if widths is not None and widths[w] != out.shape[-1]:
                    part = part[..., :widths[w]]
                res[t] = part
                o += sizes[t]
        return res

    # ------------------------------------------------------------------------------------------ result
    def merged_tensor(self, key, gamma=None):
        """One merged key, dense, fp32 accumulation (fp64 for fp64), cast to the key's dtype."""
        gam = self.coefficient_matrix(gamma).detach()
        for item in self._gathered:
            if item.key == key:
                return item.dense(gam[0 if gam.shape[0] == 1 else item.group])
        gi, i = self._where[key]
        g = self.stacks[gi]
        return g.dense(i, gam[0 if gam.shape[0] == 1 else int(g.index[i])])

    def state_dicts(self, gamma=None):
        """(shared, per_task): the merged state dict without task-specific keys, and per task the complete one
        (shared tensors by reference + task t's own head), in the models' key order."""
        with torch.no_grad():
            shared = OrderedDict()
            for k in self.key_order:
                if k in self.constants:
                    shared[k] = self.constants[k]
                elif k in self.shape_of:
                    shared[k] = self.merged_tensor(k, gamma)
            per_task = []
            for t in range(len(self.tasks)):
                sd = OrderedDict(shared)
                sd.update(self.heads[t])
                per_task.append(sd)
        return shared, per_task

    def coefficient_table(self, gamma=None):
        """{task: value} (task granularity) or {task: {group: value}} (layer granularity)."""
        gam = self.coefficient_matrix(gamma).detach().double().cpu()
        if self.granularity == "task":
            return {name: float(gam[0, t]) for t, name in enumerate(self.tasks)}
        return {name: {grp: float(gam[g, t]) for g, grp in enumerate(self.groups)} for t, name in enumerate(self.tasks)}


def _init_gamma(init, default, G, T, dtype, device, what):
    if init is None:
        init = default
    if isinstance(init, (int, float)) and not isinstance(init, bool):
        if not math.isfinite(float(init)):
            raise ValueError(f"{what}: init = {init} must be finite")
        return torch.full((G, T), float(init), dtype=dtype, device=device)
    t = torch.as_tensor(init, dtype=dtype).to(device)
    if t.shape == (T,):
        t = t.expand(G, T)
    if t.shape != (G, T):
        raise ValueError(f"{what}: init has shape {tuple(t.shape)}; expected a scalar, [T={T}] or [G={G}, T={T}]")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: init contains NaN or Inf")
    return t.clone()

