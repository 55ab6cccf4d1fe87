r"""Learned merge coefficients: the machinery shared by DivMerge, AdaMerging and their relatives.

A data-driven merge learns coefficients Gamma for the model

    Phi_Gamma = theta_s + sum_t Gamma_t * delta_t                                    (per merged key)

where, by the starting point (``start=`` / ``init_from=``):
  - "pretrained" (the papers): theta_s = theta_0 and delta_t = tau_t = theta_t - theta_0;
  - "cart": theta_s = theta_avg and delta_t = lowrank_k(theta_t - theta_avg) (CART's centered low-rank task
    vectors, docs/METHODS.md §CART; non-selected keys keep the full centered vector);
  - init_from=<static merge>: theta_s = that merge's result and delta_t = tau_t, Gamma initialised to 0, so the
    optimisation starts exactly at the static merge and refines it.
Only Gamma is trained. The merged parameters are a differentiable function of Gamma and are fed to the
caller's own nn.Module with torch.func.functional_call: no model copy per step, no autograd graph over the
delta_t (they are constants), works with any torch model.

Public API (stable; other modules such as the generative DivMerge path build on it):

``MergedModel.build(base, models, *, task_names=None, task_specific_keys=None, granularity="layer",
layer_groups=None, init=None, start="pretrained", cart_rank_ratio=None, cart_keys=None, cart_svd="exact",
init_from=None, init_from_params=None, gather_embeddings=True, batch_tasks=True, on_model=None, backend="auto")``
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
    [G, T]; default 1/T (0 with init_from).

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
    All tasks in ONE forward (batch_tasks=True): examples[t] (per-example inputs) are collated together and
    run through an all-tasks skeleton whose head submodules dispatch each task's rows to its own head
    (heads of different widths are zero-padded, then sliced back); one forward per task otherwise.
    extract(outputs) must return a tensor whose dim 0 is the batch (it is split by rows).
``merged.verify(examples_per_task) -> {"gathered": bool, "batched": bool}``: run once before optimising:
    compares the fast paths (gathered embeddings, all-tasks forward) with the plain per-task dense path on a
    few examples and switches off any that disagrees (e.g. a model that reads an embedding's weight outside
    its forward, or heads that are not row-wise). learn() does this.
``merged.state_dicts(gamma=None) -> (shared, per_task)``: final merged tensors (fp32 accumulation, cast to
    each key's dtype); per_task[t] = shared + task t's own task-specific entries.

Data: ``collect_examples(batches, task, limit)`` splits an iterable of batches into per-example inputs (first
``limit``); ``collate(examples, pad_value=0)`` stacks them back (right-padding along every dim when lengths
differ). ``TaskExamples(name, inputs, targets)`` holds one task's examples and cached per-example targets.

Objective protocol (DivMerge's DivergenceObjective and GenerativeObjective, AdaMerging's EntropyObjective):
    needs_teacher: bool                               whether prepare() needs the fine-tuned model's outputs
    examples(task, source, limit) -> list             per-example items of one task's data (default:
                                                      collect_examples; the causal-LM objective: prompts)
    prepare(t, module, examples, options) -> (inputs, targets)
                                                      called once per task with fine-tuned model t (under
                                                      no_grad, while MergedModel.build visits it): the
                                                      per-example model inputs and cached targets (or None).
                                                      Default: the examples themselves and, when needs_teacher,
                                                      teacher(t, outputs) of the model on them through the
                                                      disk cache (pymerge.teachers.objective_targets).
    teacher(t, outputs) -> Tensor [B, ...] | None     per-example targets from fine-tuned model t's outputs
    teacher_settings() -> dict | None                 what teacher() depends on besides the model and the
                                                      data (the cache key); None: never cached
    loss(t, outputs, targets) -> scalar Tensor         mean over the batch of task t, differentiable
    pad_value: None, or the pad value its inputs need when collated (set by prepare; else learn's pad_value)
``outputs`` is what ``logits_of`` returns for the batch (override ``Objective.extract`` to use raw outputs).
``TeacherOptions(batch_size, pad_value, cache, cache_dir, progress)``: learn()'s settings handed to prepare().

``CoefficientOptimizer(merged, tasks, objective, *, lr, batch_size, clamp=None, seed=0)``: Adam on Gamma.
    Each step draws batch_size examples mixed across tasks (batch_size // T per task, the remainder to the
    first tasks; each task's examples reshuffled every pass), runs every task once on ONE shared merged
    parameter set and minimises sum_t loss_t (docs/METHODS.md §Learned coefficients: tasks summed unweighted). ``step() -> float``,
    ``run(steps, progress=True, desc=...) -> [float]`` (tqdm bar with the running loss), ``loss(gamma=None,
    indices=None)`` the objective on given examples (used by the gradient checks).

``learn(base, models, data, objective, *, method, ...) -> LearnedMerge``: the whole pipeline (validation,
data, objective.prepare per model while the task vectors are read, verification of the fast paths,
optimisation, merged state dicts); pymerge.divmerge (both kinds) and pymerge.adamerging call it.
``method_options(method, defaults, opts, granularity)``: a method's options over its defaults, with the
errors every method raises alike.

Helpers other modules share: ``op_backend(backend, device, op)`` (the backend to hand a pymerge op),
``module_device(module)``, ``evaluating(module)`` (a context: eval mode and no_grad, training mode restored),
``teacher_targets(module, examples, objective, t)`` (objective.teacher on the module's outputs, uncached).

Result ``LearnedMerge``:
    state_dict: the merged shared entries (every key except the task-specific ones). Without
        task-specific keys this is the complete merged model.
    task_state_dicts: {task: complete state dict for task t} = state_dict + task t's own head (the shared
        tensors are the same objects, not copies). Load with module.load_state_dict(...).
    heads: {task: {key: tensor}} the task-specific entries.
    coefficients: Gamma, [T] at task granularity, [G, T] at layer granularity (detached, float32/64).
    losses: the objective after every step. save_coefficients(path) writes Gamma as JSON.
    config: the options used (scalars saved in the JSON); teacher_cache_hits: how many tasks' targets came
        from the disk cache (objectives with targets only).
"""
import contextlib
import copy
import importlib
import json
import math
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GRANULARITIES = ("task", "layer")
STARTS = ("pretrained", "cart")


# ------------------------------------------------------------------------------------------------- inputs
def _fmt(keys, limit=6):
    keys = list(keys)
    return "[" + ", ".join(repr(k) for k in keys[:limit]) + (", ..." if len(keys) > limit else "") + \
        f"] ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def as_state_dict(obj, what) -> "OrderedDict[str, torch.Tensor]":
    """nn.Module -> its state dict (the module's own tensors, detached, no copy); mapping -> an OrderedDict."""
    if isinstance(obj, nn.Module):
        return OrderedDict((k, v.detach()) for k, v in obj.state_dict(keep_vars=True).items())
    if isinstance(obj, Mapping):
        out = OrderedDict()
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{what}: key {k!r} holds a {type(v).__name__}, expected a torch.Tensor")
            out[k] = v.detach()
        return out
    raise ValueError(f"{what} must be an nn.Module or a state dict, got {type(obj).__name__}")


def task_names_and_models(models, task_names=None, what="models"):
    """(names, entries): models as a sequence or {name: module}; entries are modules or loaders."""
    if isinstance(models, (nn.Module, torch.Tensor)) or models is None:
        raise ValueError(f"{what} must be a sequence of fine-tuned nn.Modules (or a {{task: module}} mapping), "
                         f"got {type(models).__name__}")
    if isinstance(models, Mapping):
        names, entries = [str(k) for k in models.keys()], list(models.values())
        if task_names is not None and list(task_names) != names:
            raise ValueError(f"{what}: task_names {list(task_names)} differ from the mapping's keys {names}")
    else:
        entries = list(models)
        names = [str(n) for n in task_names] if task_names is not None else [f"task{t}" for t in range(len(entries))]
    if len(entries) == 0:
        raise ValueError(f"{what}: no fine-tuned models (T = 0)")
    if len(names) != len(entries):
        raise ValueError(f"{what}: {len(names)} task names for {len(entries)} models")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicate task names {names}")
    for name, m in zip(names, entries):
        if not isinstance(m, nn.Module) and not callable(m):
            raise ValueError(f"{what}[{name!r}] must be an nn.Module (or a callable returning one), "
                             f"got {type(m).__name__}")
    return names, entries


def data_per_task(data, names, what="data"):
    """data as {task name: iterable} (keys must match the models' names) or a sequence of T iterables."""
    if data is None:
        raise ValueError(f"{what}: no data given; pass one iterable of unlabelled batches per task")
    if isinstance(data, Mapping):
        keys = [str(k) for k in data.keys()]
        unknown = [k for k in keys if k not in names]
        if unknown:
            raise ValueError(f"{what}: data for unknown task(s) {unknown}; the models are {names}")
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(f"{what}: task(s) {missing} have no data; every task needs unlabelled batches")
        lookup = {str(k): v for k, v in data.items()}
        out = [lookup[n] for n in names]
    elif isinstance(data, (torch.Tensor, str, bytes)):
        raise ValueError(f"{what} must be a sequence (one iterable per task) or a {{task: iterable}} mapping")
    else:
        out = list(data)
        if len(out) != len(names):
            raise ValueError(f"{what}: {len(out)} data sources for {len(names)} tasks {names}")
    for name, d in zip(names, out):
        if d is None:
            raise ValueError(f"{what}: task {name!r} has no data")
    return out


def _batch_size_of(batch):
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


def split_batch(batch, task="?") -> list:
    """One batch -> a list of per-example inputs (tensor rows; dict/tuple entries split alike; non-tensor
    dict values and 0-d tensors are shared by every example)."""
    if not isinstance(batch, (torch.Tensor, Mapping, list, tuple)):
        raise ValueError(f"data for task {task!r}: a batch must be a Tensor, a dict or a tuple of tensors, "
                         f"got {type(batch).__name__}")
    B = _batch_size_of(batch)
    if B is None:
        raise ValueError(f"data for task {task!r}: a batch holds no tensor with a batch dimension")

    def row(v, i):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] != B:
                raise ValueError(f"data for task {task!r}: batch entries disagree on the batch size "
                                 f"({v.shape[0]} vs {B})")
            return v[i]
        return v
    if isinstance(batch, torch.Tensor):
        return list(batch.unbind(0))
    if isinstance(batch, Mapping):
        return [{k: row(v, i) for k, v in batch.items()} for i in range(B)]
    return [type(batch)(row(v, i) for v in batch) if isinstance(batch, tuple) else [row(v, i) for v in batch]
            for i in range(B)]


def collect_examples(batches, task="?", limit=None) -> list:
    """The first `limit` examples (all when None) of an iterable of batches, as per-example inputs."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    try:
        it = iter(batches)
    except TypeError:
        raise ValueError(f"data for task {task!r} must be an iterable of batches, got {type(batches).__name__}")
    out = []
    for batch in it:
        out.extend(split_batch(batch, task))
        if limit is not None and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        raise ValueError(f"data for task {task!r} is empty (no examples)")
    return out


def _pad_stack(tensors, pad_value):
    shape = tensors[0].shape
    if all(t.shape == shape for t in tensors):
        return torch.stack(tensors)
    if any(t.dim() != len(shape) for t in tensors):
        raise ValueError(f"collate: examples have different numbers of dims {sorted({t.dim() for t in tensors})}")
    size = [max(t.shape[d] for t in tensors) for d in range(len(shape))]
    out = tensors[0].new_full((len(tensors), *size), pad_value)
    for i, t in enumerate(tensors):
        out[(i, *[slice(0, s) for s in t.shape])] = t
    return out


def collate(examples, pad_value=0, device=None):
    """Per-example inputs -> one batch (inverse of split_batch). Tensors of different shapes are right-padded
    with pad_value (an int/float, or {dict key: value}) along every dim: 0 suits input_ids/attention_mask
    (masked positions). device: move tensors there."""
    first = examples[0]

    def pad_for(key):
        return pad_value.get(key, 0) if isinstance(pad_value, Mapping) else pad_value

    def one(values, key):
        v0 = values[0]
        if isinstance(v0, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
            if v0.dim() == 0 and all(v is v0 for v in values):
                out = v0
            else:
                out = _pad_stack(list(values), pad_for(key))
            return out.to(device, non_blocking=True) if device is not None else out
        return v0
    if isinstance(first, torch.Tensor):
        return one(examples, None)
    if isinstance(first, Mapping):
        return {k: one([e[k] for e in examples], k) for k in first}
    if isinstance(first, (list, tuple)):
        cols = [one([e[i] for e in examples], i) for i in range(len(first))]
        return tuple(cols) if isinstance(first, tuple) else cols
    raise ValueError(f"collate: unsupported example type {type(first).__name__}")


def call_model(module, batch):
    """module(**batch) for a dict, module(*batch) for a tuple/list, module(batch) for a tensor."""
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (list, tuple)):
        return module(*batch)
    return module(batch)


def logits_of(outputs):
    """outputs.logits, outputs["logits"], outputs[0] of a tuple, or the tensor itself."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in the model's output of type {type(outputs).__name__}")


# --------------------------------------------------------------------------------------- parameterisation
def _skeleton(module):
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


class _MergeGroup(torch.autograd.Function):
    """K same-numel keys at once: out[k] = start[k] + coef[k] @ delta[k] as one baddbmm, returned as K views.

    coef [K, T] (the only input with a gradient), start [K, 1, S] or [1, 1, S], delta [K, T, S].
    backward: d coef[k] = delta[k] @ grad[k] (one GEMV per key, reading delta once; no stacking of the K
    gradients and no autograd graph over delta).
    """

    @staticmethod
    def forward(ctx, coef, start, delta, shapes):
        out = torch.baddbmm(start, coef.unsqueeze(1).to(delta.dtype), delta)      # [K, 1, S]
        ctx.save_for_backward(delta)
        ctx.coef_dtype = coef.dtype
        return tuple(out[k, 0].view(shape) for k, shape in enumerate(shapes))

    @staticmethod
    def backward(ctx, *grads):
        (delta,) = ctx.saved_tensors
        K, T = delta.shape[0], delta.shape[1]
        dcoef = torch.zeros(K, T, dtype=delta.dtype, device=delta.device)
        for k, g in enumerate(grads):
            if g is not None:
                torch.mv(delta[k], g.reshape(-1).to(delta.dtype), out=dcoef[k])
        return dcoef.to(ctx.coef_dtype), None, None, None


@dataclass
class _Group:
    """Merged keys of one (numel, dtype): start [K, 1, S], delta [K, T, S], coefficient-group index [K]."""
    keys: List[str]
    shapes: List[torch.Size]
    start: torch.Tensor
    delta: torch.Tensor
    index: torch.Tensor


@dataclass
class _Gathered:
    """An nn.Embedding table merged lazily: start [V, d], delta [T, V, d], coefficient group."""
    key: str
    path: str                 # the nn.Embedding's module path (the same in every task's skeleton)
    start: torch.Tensor
    delta: torch.Tensor
    group: int


class _FineTunedView(Mapping):
    """theta_t = theta_0 + tau_t for the merged keys, reconstructed on access from the stacks (for static
    merges run as init_from, before the start point changes)."""

    def __init__(self, merged, t):
        self._m, self._t = merged, t

    def __getitem__(self, key):
        return self._m._start_of(key) + self._m._delta_of(key, self._t)

    def __iter__(self):
        return iter(self._m.merged_keys)

    def __len__(self):
        return len(self._m.merged_keys)

    def key_info(self, key):
        from .methods.spec import KeyInfo
        return KeyInfo(self._m.shape_of[key], self._m.dtype_of[key])


class _TaskDispatch(nn.Module):
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
        self._dispatch: List[_TaskDispatch] = []
        self._skeleton_is_copy: List[bool] = []
        self._groups: List[_Group] = []
        self._gathered: List[_Gathered] = []
        self._where: Dict[str, tuple] = {}
        self._from_model0: Dict[str, torch.Tensor] = {}
        self._ts_re = None
        self.device = torch.device("cpu")

    # ---------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, base, models, *, task_names=None, task_specific_keys=None, granularity="layer",
              layer_groups=None, init=None, start="pretrained", cart_rank_ratio=None, cart_keys=None,
              cart_svd="exact", init_from=None, init_from_params=None, gather_embeddings=True, batch_tasks=True,
              on_model: Optional[Callable[[int, nn.Module], Any]] = None, backend="auto", what="learned merge"):
        if granularity not in GRANULARITIES:
            raise ValueError(f"{what}: granularity = {granularity!r}; expected one of {GRANULARITIES}")
        if start not in STARTS:
            raise ValueError(f"{what}: start = {start!r}; expected one of {STARTS}")
        if start == "cart" and init_from is not None:
            raise ValueError(f"{what}: start='cart' and init_from are exclusive (both set the starting point)")
        if cart_rank_ratio is None:
            cart_rank_ratio = _cart_default("DEFAULT_RANK_RATIO", 0.08)
        if start == "cart" and not (0.0 < float(cart_rank_ratio) <= 1.0):
            raise ValueError(f"{what}: cart_rank_ratio = {cart_rank_ratio} must lie in (0, 1]")
        if cart_svd not in ("exact", "randomized"):
            raise ValueError(f"{what}: cart_svd = {cart_svd!r}; expected 'exact' or 'randomized'")
        ts_re = _compile(task_specific_keys, "task_specific_keys", what)
        lg_re = _compile(layer_groups, "layer_groups", what)
        names, entries = task_names_and_models(models, task_names, f"{what}: models")
        base_sd = as_state_dict(base, f"{what}: base")
        self = cls()
        self.tasks, self.granularity, self.start = names, granularity, start
        T = len(names)
        embedding_keys = {}
        for t, entry in enumerate(entries):
            module = entry if isinstance(entry, nn.Module) else entry()
            if not isinstance(module, nn.Module):
                raise ValueError(f"{what}: the loader of task {names[t]!r} returned a {type(module).__name__}, "
                                 "expected an nn.Module")
            sd = module.state_dict(keep_vars=True)
            if t == 0:
                embedding_keys = self._plan(module, sd, base_sd, ts_re, lg_re, what)
            else:
                self._check_model(t, sd, what)
            self._absorb(t, sd, base_sd, what)
            skel, is_copy = _skeleton(module)
            self.skeletons.append(skel)
            self._skeleton_is_copy.append(is_copy)
            if on_model is not None:
                with torch.no_grad():
                    on_model(t, module)
            del module, sd
        self._finish_constants(base_sd)
        if start == "cart":
            self._to_cart(cart_rank_ratio, cart_keys, cart_svd, embedding_keys, backend, what)
        elif init_from is not None:
            self._to_static(init_from, init_from_params, what)
        del base_sd
        self._drop_zero_groups()
        if batch_tasks:
            self._make_batched()
        if gather_embeddings:
            self._gather_embeddings(embedding_keys)
        dtype = torch.float64 if any(d == torch.float64 for d in self.dtype_of.values()) else torch.float32
        G = 1 if granularity == "task" else len(self.groups)
        default = 0.0 if init_from is not None else 1.0 / T
        self.gamma = nn.Parameter(_init_gamma(init, default, G, T, dtype, self.device, what))
        return self

    def _plan(self, module, sd, base_sd, ts_re, lg_re, what):
        """From model 0: canonical keys (ties merged), task-specific keys, merged keys, groups, stacks."""
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
                             f"(keys: {_fmt(canonical)})")
        ts = set(self.task_specific_keys)
        merged = [k for k in canonical if k not in ts and sd[k].dtype in FLOAT_DTYPES and sd[k].numel() > 0]
        missing = [k for k in merged if k not in base_sd]
        if missing:
            raise ValueError(f"{what}: base lacks merged key(s) {_fmt(missing)} of the fine-tuned models; "
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
                self._where[k] = (len(self._groups), i)
            self._groups.append(_Group(keys, [sd[k].shape for k in keys], start,
                                       torch.empty(len(keys), T, S, dtype=dt, device=self.device), idx))
        return emb

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
            raise ValueError(f"{what}: model {name!r} lacks key(s) {_fmt(missing)} of model {self.tasks[0]!r}: "
                             "mismatched architectures")
        extra = sorted(set(shared) - set(expected))
        if extra:
            raise ValueError(f"{what}: model {name!r} has key(s) {_fmt(extra)} that model {self.tasks[0]!r} lacks: "
                             "mismatched architectures (or heads not named by task_specific_keys)")
        for k in self.merged_keys:
            if sd[k].shape != self.shape_of[k] or sd[k].dtype != self.dtype_of[k]:
                raise ValueError(f"{what}: key {k!r} is {tuple(sd[k].shape)} {sd[k].dtype} in model {name!r} but "
                                 f"{tuple(self.shape_of[k])} {self.dtype_of[k]} in model {self.tasks[0]!r}; "
                                 "mismatched architectures or heads (name per-task heads with task_specific_keys)")
        if self.task_specific_keys and len(keys) == len(shared):
            raise ValueError(f"{what}: model {name!r} has no key matching task_specific_keys="
                             f"{self._ts_re.pattern!r} but model {self.tasks[0]!r} has "
                             f"{_fmt(self.task_specific_keys)}: mismatched heads")

    def _is_task_specific(self, key):
        return self._ts_re is not None and self._ts_re.search(key) is not None

    def _absorb(self, t, sd, base_sd, what):
        """tau_t = theta_t - theta_0 into the stacks; task t's own task-specific entries into heads[t]."""
        with torch.no_grad():
            for g in self._groups:
                for i, k in enumerate(g.keys):
                    theta = sd[k].detach().reshape(-1)
                    if not torch.isfinite(theta).all():
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

    # ------------------------------------------------------------------------------- starting points
    def _start_of(self, key):
        gi, i = self._where[key]
        return self._groups[gi].start[i, 0].view(self.shape_of[key])

    def _delta_of(self, key, t):
        gi, i = self._where[key]
        return self._groups[gi].delta[i, t].view(self.shape_of[key])

    def _to_cart(self, ratio, cart_keys, svd, embedding_keys, backend, what):
        """theta_s = theta_avg, delta_t = rank-k approximation of theta_t - theta_avg (selected 2-D keys) or
        the full centered vector (others), k = max(1, int(ratio * min(m, n))). svd="randomized": each key's
        test matrix is seeded by key_seed(0, key), whatever group the key is stacked in."""
        sel_re = _compile(cart_keys, "cart_keys", what)
        exclude = [re.compile(p) for p in _cart_default("DEFAULT_EXCLUDE_KEYS", (r"embed", r"classifier", r"pooler",
                                                                                 r"lm_head"))]
        with torch.no_grad():
            for g in self._groups:
                mean = g.delta.mean(dim=1, keepdim=True)                       # [K, 1, S]
                g.start = g.start + mean                                       # new tensor: base is not written
                g.delta.sub_(mean)
                del mean
                for i, (k, shape) in enumerate(zip(g.keys, g.shapes)):
                    chosen = sel_re.search(k) is not None if sel_re is not None else \
                        (len(shape) == 2 and k not in embedding_keys and not any(e.search(k) for e in exclude))
                    if not chosen or len(shape) != 2:
                        continue
                    m, n = shape
                    rank = max(1, int(ratio * min(m, n)))
                    A = g.delta[i].view(-1, m, n)
                    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
                    if svd == "exact":
                        U, S, Vh = torch.linalg.svd(A.to(acc), full_matrices=False)
                        U, S, V = U[..., :rank], S[..., :rank], Vh[..., :rank, :].mT
                    else:
                        from .methods.spec import key_seed
                        from .ops import randomized_svd
                        # Seeded per key (as pymerge.merge("cart", seed=0)): not one test matrix for every key.
                        U, S, V = randomized_svd(A, rank, seed=key_seed(0, k), backend=op_backend(
                            backend, A.device, "pymerge::randomized_svd"))
                    A.copy_((U * S.unsqueeze(-2)) @ V.mT)

    def _to_static(self, init_from, init_from_params, what):
        """theta_s = a static merge of theta_0, theta_1..theta_T (method name, state dict or callable)."""
        merged_keys = self.merged_keys
        if isinstance(init_from, str):
            from .merge import merge
            base_view = OrderedDict((k, self._start_of(k)) for k in merged_keys)
            out = merge(init_from, base_view, [_FineTunedView(self, t) for t in range(len(self.tasks))],
                        **(init_from_params or {}))
        elif isinstance(init_from, Mapping):
            if init_from_params:
                raise ValueError(f"{what}: init_from_params only applies to a method name or a callable")
            out = init_from
        elif callable(init_from):
            out = init_from(OrderedDict((k, self._start_of(k)) for k in merged_keys),
                            [_FineTunedView(self, t) for t in range(len(self.tasks))], **(init_from_params or {}))
        else:
            raise ValueError(f"{what}: init_from must be a method name, a state dict or a callable, "
                             f"got {type(init_from).__name__}")
        if not isinstance(out, Mapping):
            raise ValueError(f"{what}: init_from returned a {type(out).__name__}, expected a state dict")
        missing = [k for k in merged_keys if k not in out]
        if missing:
            raise ValueError(f"{what}: the init_from merge lacks merged key(s) {_fmt(missing)}")
        for k in merged_keys:
            v = out[k]
            if not isinstance(v, torch.Tensor) or v.shape != self.shape_of[k]:
                raise ValueError(f"{what}: init_from key {k!r} has shape {tuple(getattr(v, 'shape', ()))}, "
                                 f"expected {tuple(self.shape_of[k])}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{what}: init_from key {k!r} contains NaN or Inf")
        with torch.no_grad():
            for g in self._groups:
                g.start = torch.stack([out[k].detach().reshape(1, -1).to(g.delta.dtype) for k in g.keys]) \
                    .to(self.device)

    def _drop_zero_groups(self):
        """Keys whose delta_t are all zero (frozen during fine-tuning) become constants: nothing to compute."""
        keep = []
        for g in self._groups:
            nz = g.delta.reshape(len(g.keys), -1).ne(0).any(dim=1).tolist()
            if all(nz):
                keep.append(g)
                continue
            for i, k in enumerate(g.keys):
                if not nz[i]:
                    self.constants[k] = g.start[i, 0].view(g.shapes[i]).clone()
            sel = [i for i in range(len(g.keys)) if nz[i]]
            if sel:
                idx = torch.tensor(sel, device=g.start.device)
                keep.append(_Group([g.keys[i] for i in sel], [g.shapes[i] for i in sel], g.start.index_select(0, idx),
                                   g.delta.index_select(0, idx), g.index.index_select(0, idx)))
        self._groups = keep
        self._reindex()

    def _reindex(self):
        self._where = {}
        for gi, g in enumerate(self._groups):
            for i, k in enumerate(g.keys):
                self._where[k] = (gi, i)

    def _all_skeletons(self):
        return self.skeletons + ([self.batched] if self.batched is not None and self.batched not in self.skeletons
                                 else [])

    def _gather_embeddings(self, embedding_keys):
        """Untied nn.Embedding tables leave the stacks: lookups gather rows instead (see the module doc)."""
        if not embedding_keys or not all(self._skeleton_is_copy):
            return
        for key, path in embedding_keys.items():
            if key not in self._where:
                continue  # constant (zero task vectors)
            gi, i = self._where[key]
            g = self._groups[gi]
            if len(g.keys) != 1:
                continue
            mods = []
            for skel in self._all_skeletons():
                try:
                    mod = skel.get_submodule(path)
                except AttributeError:
                    break
                if type(mod) is not nn.Embedding or mod.weight.device.type != "meta":
                    break
                mods.append(mod)
            else:
                shape = g.shapes[0]
                item = _Gathered(key, path, g.start.view(shape), g.delta.view(-1, *shape), int(g.index[0]))
                self._groups.pop(gi)
                self._reindex()
                for mod in mods:
                    mod.register_buffer("_pm_gamma", torch.zeros(len(self.tasks), dtype=item.delta.dtype,
                                                                  device=self.device), persistent=False)
                    mod._pm_delta = item.delta
                    mod.forward = types.MethodType(_gathered_embedding_forward, mod)
                self._gathered.append(item)

    @property
    def gathered_keys(self):
        return [g.key for g in self._gathered]

    def disable_gathered(self):
        """Go back to dense embedding tables (merged like every other key)."""
        T = len(self.tasks)
        for item in self._gathered:
            S = item.start.numel()
            self._groups.append(_Group([item.key], [item.start.shape], item.start.reshape(1, 1, S),
                                       item.delta.reshape(1, T, S), torch.tensor([item.group], device=self.device)))
            for skel in self._all_skeletons():
                mod = skel.get_submodule(item.path)
                del mod.forward, mod._pm_delta
                mod._buffers.pop("_pm_gamma", None)
        self._gathered = []
        self._reindex()

    def _make_batched(self):
        """The all-tasks skeleton for forward_tasks: one module run on every task's rows at once. Without
        task-specific keys it is task 0's skeleton; otherwise a meta copy of it whose head submodules (the
        largest submodules holding only task-specific entries) dispatch rows to each task's own head."""
        if not all(self._skeleton_is_copy):
            return
        if not self.task_specific_keys:
            self.batched = self.skeletons[0]
            return
        skel0 = self.skeletons[0]
        ts = set(self.task_specific_keys)
        heads = []
        for path, mod in skel0.named_modules():
            if not path or any(path == h or path.startswith(h + ".") for h in heads):
                continue
            keys = [f"{path}.{k}" for k in mod.state_dict(keep_vars=True)]
            if keys and all(k in ts for k in keys):
                heads.append(path)
        covered = [k for k in self.task_specific_keys if any(k.startswith(h + ".") for h in heads)]
        if len(covered) != len(self.task_specific_keys):
            return  # a task-specific entry outside any submodule (e.g. a bare root parameter)
        try:
            batched = copy.deepcopy(skel0)
            for h in heads:
                subs = [s.get_submodule(h) for s in self.skeletons]
                params = [{k[len(h) + 1:]: v for k, v in self.heads[t].items() if k.startswith(h + ".")}
                          for t in range(len(self.tasks))]
                parent, _, leaf = h.rpartition(".")
                d = _TaskDispatch(subs, params)
                setattr(batched.get_submodule(parent) if parent else batched, leaf, d)
                self._dispatch.append(d)
        except Exception:  # noqa: BLE001 - an unusual module tree: keep the per-task path
            self._dispatch = []
            return
        self.batched = batched

    def verify(self, examples, pad_value=0, rtol=1e-4, atol=1e-5):
        """Check once, on a few examples per task (a list per task), that the fast paths give the plain
        path's logits: gathered embedding lookups vs dense tables (a model may read an embedding's weight
        outside its forward) and the all-tasks forward vs one forward per task. A fast path that disagrees
        or fails is switched off for good. Returns {"gathered": bool, "batched": bool} (what stays on)."""
        def close(a, b):
            return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)
        with torch.no_grad():
            dense = self.shared_params(full=True)
            batches = [collate(ex, pad_value, self.device) for ex in examples]
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
        for g in self._groups:
            coef = gam.expand(len(g.keys), -1) if task_level else gam.index_select(0, g.index)     # [K, T]
            for key, value in zip(g.keys, _MergeGroup.apply(coef, g.start, g.delta, g.shapes)):
                out[key] = value
        for item in self._gathered:
            row = gam[0 if task_level else item.group]
            if full:
                out[item.key] = item.start + torch.einsum("t,t...->...", row.to(item.delta.dtype), item.delta)
                coef = row.new_empty(0, dtype=item.delta.dtype)   # tells the patched forward: dense table
            else:
                out[item.key] = item.start
                coef = row.to(item.delta.dtype)
            out[f"{item.path}._pm_gamma" if item.path else "_pm_gamma"] = coef
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
        return _functional(self.skeletons[t], self.task_params(t, shared), batch)

    def logits(self, t, batch, shared=None):
        return logits_of(self.forward(t, batch, shared))

    def forward_tasks(self, examples, shared=None, pad_value=0, extract=logits_of):
        """Every task at once: examples[t] (a list of per-example inputs, possibly empty) collated into ONE
        batch, one forward of the all-tasks skeleton, extract(outputs) split back by rows (and, where the
        heads' widths differ, sliced back to task t's width). Falls back to one forward per task when the
        all-tasks path is off. Returns a list of T tensors (None for a task without examples)."""
        if shared is None:
            shared = self.shared_params()
        sizes = [len(ex) for ex in examples]
        if self.batched is None:
            return [extract(self.forward(t, collate(ex, pad_value, self.device), shared)) if ex else None
                    for t, ex in enumerate(examples)]
        for d in self._dispatch:
            d.sizes = sizes
        batch = collate([e for ex in examples for e in ex], pad_value, self.device)
        out = extract(_functional(self.batched, shared, batch))
        widths = self._dispatch[-1].widths if self._dispatch else None
        res, o, w = [], 0, 0
        for t, n in enumerate(sizes):
            if not n:
                res.append(None)
                continue
            part = out[o:o + n]
            if widths is not None and widths[w] != out.shape[-1]:
                part = part[..., :widths[w]]
            res.append(part)
            o, w = o + n, w + 1
        return res

    # ------------------------------------------------------------------------------------------ result
    def merged_tensor(self, key, gamma=None):
        """One merged key, dense, fp32 accumulation (fp64 for fp64), cast to the key's dtype."""
        gam = self.coefficient_matrix(gamma).detach()
        for item in self._gathered:
            if item.key == key:
                row = gam[0 if gam.shape[0] == 1 else item.group]
                acc = torch.float64 if item.delta.dtype == torch.float64 else torch.float32
                v = item.start.to(acc) + torch.einsum("t,t...->...", row.to(acc), item.delta.to(acc))
                return v.to(item.start.dtype)
        gi, i = self._where[key]
        g = self._groups[gi]
        row = gam[0 if gam.shape[0] == 1 else int(g.index[i])]
        acc = torch.float64 if g.delta.dtype == torch.float64 else torch.float32
        v = g.start[i, 0].to(acc) + row.to(acc) @ g.delta[i].to(acc)
        return v.to(g.delta.dtype).view(g.shapes[i])

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


def _functional(module, params, batch):
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (list, tuple)):
        args, kwargs = tuple(batch), None
    else:
        args, kwargs = (batch,), None
    return torch.func.functional_call(module, params, args, kwargs, tie_weights=True, strict=False)


def _compile(pattern, name, what):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"{what}: {name} = {pattern!r} is not a valid regular expression ({e})")


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


def _cart_default(name, fallback):
    """A default of pymerge's static CART (pymerge.methods.cart), so both CART paths select keys alike."""
    try:
        from .methods import cart
    except ImportError:
        return fallback
    return getattr(cart, name, fallback)


def op_backend(backend, device, op):
    """The backend to pass to a pymerge op (op: "pymerge::<name>"). "auto" stays "auto" where a compiled
    kernel for the device is registered; otherwise the Triton kernel on CUDA if it exists, else "reference":
    an op whose kernels are still being written works (slowly) instead of failing."""
    if backend != "auto":
        return backend
    from .ops.backend import extension_loaded, triton_available
    device = torch.device(device)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is not None and extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
        return "auto"
    if device.type == "cuda" and triton_available():
        try:
            importlib.import_module(f"pymerge.kernels.{op.split('::')[-1]}")
            return "triton"
        except ImportError:
            pass
    return "reference"


def module_device(module):
    """The device of a module's first parameter (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(module):
    """Eval mode and no_grad for the block; the module's training mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


# ------------------------------------------------------------------------------------------- optimisation
@dataclass
class TaskExamples:
    """One task's unlabelled examples (per-example model inputs) and cached per-example targets (or None)."""
    name: str
    inputs: list
    targets: Optional[list] = None

    def __len__(self):
        return len(self.inputs)


@dataclass
class TeacherOptions:
    """learn()'s settings that Objective.prepare may use: teacher_batch_size, pad_value, the disk cache
    (teacher_cache, cache_dir) and progress."""
    batch_size: int = 32
    pad_value: Any = 0
    cache: bool = False
    cache_dir: Any = None
    progress: bool = False


class Objective:
    """Base class of an objective over the merged model's outputs (see the module docstring)."""
    needs_teacher = False
    pad_value = None

    def examples(self, task, source, limit):
        """Per-example items of one task's data: the first `limit` examples of its batches."""
        return collect_examples(source, task, limit)

    def prepare(self, t, module, examples, options: TeacherOptions):
        """(inputs, targets) of task t, computed once with fine-tuned model t: the examples themselves, and
        with needs_teacher the per-example teacher(t, outputs) through the disk cache (when options.cache
        and teacher_settings() is not None)."""
        if not self.needs_teacher:
            return examples, None
        from .teachers import objective_targets
        return examples, objective_targets(module, examples, self, t, batch_size=options.batch_size,
                                           pad_value=options.pad_value, cache=options.cache,
                                           cache_dir=options.cache_dir)

    def extract(self, outputs):
        return logits_of(outputs)

    def teacher(self, t, outputs):
        return None

    def teacher_settings(self):
        """JSON-able settings teacher() depends on (with the model and the data: the cache key); None: the
        targets are not cached."""
        return None

    def loss(self, t, outputs, targets):
        raise NotImplementedError


def teacher_targets(module, examples, objective, t, *, batch_size=32, pad_value=0, device=None):
    """objective.teacher(t, outputs) of `module` on the examples, in chunks, computed once under no_grad and
    returned per example (on `device`)."""
    out = []
    with evaluating(module):
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_value, device)
            target = objective.teacher(t, objective.extract(call_model(module, batch)))
            out.extend(target.detach().to(device).unbind(0))
    return out


class CoefficientOptimizer:
    """Adam on merged.gamma over mixed-task batches (see the module docstring)."""

    def __init__(self, merged: MergedModel, tasks: Sequence[TaskExamples], objective: Objective, *, lr=1e-2,
                 batch_size=None, clamp=None, seed=0, pad_value=0, what="learned merge"):
        T = len(merged.tasks)
        if len(tasks) != T:
            raise ValueError(f"{what}: {len(tasks)} task example sets for {T} tasks")
        batch_size = 4 * T if batch_size is None else int(batch_size)
        if batch_size < T:
            raise ValueError(f"{what}: batch_size = {batch_size} is smaller than the number of tasks T = {T} "
                             "(each step draws at least one example of every task)")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{what}: lr = {lr} must be a positive finite number")
        if clamp is not None and (len(clamp) != 2 or not clamp[0] <= clamp[1]):
            raise ValueError(f"{what}: clamp = {clamp} must be a (low, high) pair with low <= high")
        self.merged, self.tasks, self.objective = merged, list(tasks), objective
        self.sizes = [batch_size // T + (1 if t < batch_size % T else 0) for t in range(T)]
        self.clamp, self.pad_value = clamp, pad_value
        self.optimizer = torch.optim.Adam([merged.gamma], lr=lr)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._order = [torch.empty(0, dtype=torch.long) for _ in range(T)]
        self._pos = [0] * T
        self.losses: List[float] = []

    def steps_per_epoch(self):
        return max(math.ceil(len(task) / size) for task, size in zip(self.tasks, self.sizes))

    def _next_indices(self, t):
        n, size = len(self.tasks[t]), self.sizes[t]
        out = []
        while len(out) < size:
            if self._pos[t] >= len(self._order[t]):
                self._order[t] = torch.randperm(n, generator=self.generator)
                self._pos[t] = 0
            take = min(size - len(out), len(self._order[t]) - self._pos[t])
            out.extend(self._order[t][self._pos[t]:self._pos[t] + take].tolist())
            self._pos[t] += take
        return out

    def loss(self, gamma=None, indices=None):
        """sum_t objective.loss over task t's examples `indices[t]` (default: all), for Gamma (default the
        parameter). Differentiable w.r.t. gamma. One merged parameter set per call, shared by every task;
        all tasks in one forward where MergedModel.batched allows it."""
        T = len(self.tasks)
        if indices is None:
            indices = [range(len(task)) for task in self.tasks]
        shared = self.merged.shared_params(gamma)
        examples = [[self.tasks[t].inputs[i] for i in indices[t]] for t in range(T)]
        outputs = self.merged.forward_tasks(examples, shared, self.pad_value, extract=self.objective.extract)
        total = 0
        for t in range(T):
            if outputs[t] is None:
                continue
            targets = None
            if self.tasks[t].targets is not None:
                targets = collate([self.tasks[t].targets[i] for i in indices[t]], 0, self.merged.device)
            total = total + self.objective.loss(t, outputs[t], targets)
        return total

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(indices=[self._next_indices(t) for t in range(len(self.tasks))])
        loss.backward()
        self.optimizer.step()
        if self.clamp is not None:
            with torch.no_grad():
                self.merged.gamma.clamp_(self.clamp[0], self.clamp[1])
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def run(self, steps, progress=True, desc="merge"):
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=steps, desc=desc, leave=False)
            except ImportError:
                bar = None
        running = None
        for _ in range(steps):
            value = self.step()
            running = value if running is None else 0.9 * running + 0.1 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4g}")
        if bar is not None:
            bar.close()
        return self.losses


# ------------------------------------------------------------------------------------------------- result
@dataclass
class LearnedMerge:
    """Result of a learned merge (see the module docstring for every field)."""
    method: str
    tasks: List[str]
    granularity: str
    groups: List[str]
    group_of: Dict[str, str]
    coefficients: torch.Tensor
    losses: List[float]
    state_dict: "OrderedDict[str, torch.Tensor]"
    task_state_dicts: Dict[str, "OrderedDict[str, torch.Tensor]"]
    heads: Dict[str, Dict[str, torch.Tensor]]
    config: Dict[str, Any] = field(default_factory=dict)

    def coefficient_table(self):
        """{task: value} (task granularity) or {task: {group: value}} (layer granularity)."""
        gam = self.coefficients.double().cpu()
        if self.granularity == "task":
            return {name: float(gam[t]) for t, name in enumerate(self.tasks)}
        return {name: {grp: float(gam[g, t]) for g, grp in enumerate(self.groups)} for t, name in enumerate(self.tasks)}

    def to_json(self):
        return {"method": self.method, "granularity": self.granularity, "tasks": list(self.tasks),
                "groups": list(self.groups) if self.granularity == "layer" else ["*"],
                "group_of": dict(self.group_of) if self.granularity == "layer" else {},
                "coefficients": self.coefficient_table(), "losses": list(self.losses),
                "config": {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool, type(None)))}}

    def save_coefficients(self, path):
        """Write Gamma (per task, per group at layer level), the key -> group map, the loss curve and the
        scalar options as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return path


# ------------------------------------------------------------------------------------------------- driver
def method_options(method, defaults, opts, granularity):
    """dict(defaults, **opts) after the checks every learned method makes: unknown options, granularity."""
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; known: {sorted(defaults)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{method}: granularity = {granularity!r}; expected one of {GRANULARITIES}")
    return dict(defaults, **opts)


def learn(base, models, data, objective: Objective, *, method, task_names=None, task_specific_keys=None,
          granularity="layer", layer_groups=None, init=None, default_init=None, start="pretrained",
          cart_rank_ratio=None, cart_keys=None, cart_svd="exact", init_from=None, init_from_params=None,
          lr=1e-2, batch_size=None, epochs=4, steps=None, examples_per_task=None, clamp=None, seed=0,
          teacher_batch_size=32, pad_value=0, teacher_cache=False, cache_dir=None, gather_embeddings=True,
          batch_tasks=True, progress=True, backend="auto"):
    """The whole pipeline; divmerge() (classification and causal LM) and adamerging() call it with their
    objective and defaults. The objective turns each task's data into examples (objective.examples) and,
    while the fine-tuned model is read, into inputs and cached targets (objective.prepare); teacher_cache /
    cache_dir: the disk cache of those targets (pymerge.teachers)."""
    what = method
    names, entries = task_names_and_models(models, task_names, f"{what}: models")
    sources = data_per_task(data, names, f"{what}: data")
    if examples_per_task is not None and (isinstance(examples_per_task, bool) or int(examples_per_task) < 1):
        raise ValueError(f"{what}: examples_per_task = {examples_per_task} must be a positive int (or None: all)")
    if steps is None and not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"{what}: epochs = {epochs} must be a positive int")
    if steps is not None and (isinstance(steps, bool) or int(steps) < 0):
        raise ValueError(f"{what}: steps = {steps} must be a non-negative int")
    # Data first: a bad data source fails before any model is touched.
    examples = [objective.examples(name, src, examples_per_task) for src, name in zip(sources, names)]
    options = TeacherOptions(batch_size=teacher_batch_size, pad_value=pad_value, cache=teacher_cache,
                             cache_dir=cache_dir, progress=progress)
    prepared: List[Optional[tuple]] = [None] * len(names)

    def on_model(t, module):
        prepared[t] = objective.prepare(t, module, examples[t], options)

    if init is None and default_init is not None and init_from is None:
        init = default_init
    merged = MergedModel.build(base, dict(zip(names, entries)), task_specific_keys=task_specific_keys,
                               granularity=granularity, layer_groups=layer_groups, init=init, start=start,
                               cart_rank_ratio=cart_rank_ratio, cart_keys=cart_keys, cart_svd=cart_svd,
                               init_from=init_from, init_from_params=init_from_params,
                               gather_embeddings=gather_embeddings, batch_tasks=batch_tasks, on_model=on_model,
                               backend=backend, what=what)
    del entries, examples
    if objective.pad_value is not None:
        pad_value = objective.pad_value
    tasks = [TaskExamples(n, inputs, targets) for n, (inputs, targets) in zip(names, prepared)]
    merged.verify([task.inputs[:2] for task in tasks], pad_value)
    opt = CoefficientOptimizer(merged, tasks, objective, lr=lr, batch_size=batch_size, clamp=clamp, seed=seed,
                               pad_value=pad_value, what=what)
    total = int(steps) if steps is not None else epochs * opt.steps_per_epoch()
    opt.run(total, progress=progress, desc=method)
    shared, per_task = merged.state_dicts()
    gam = merged.gamma.detach().clone()
    coefficients = gam[0] if granularity == "task" else gam
    config = dict(granularity=granularity, start=start, lr=lr, batch_size=sum(opt.sizes), epochs=epochs,
                  steps=total, examples_per_task=examples_per_task, seed=seed, layer_groups=layer_groups,
                  task_specific_keys=task_specific_keys, init=init if isinstance(init, (int, float)) else None,
                  init_from=init_from if isinstance(init_from, str) else None)
    if start == "cart":
        config["cart_rank_ratio"] = cart_rank_ratio if cart_rank_ratio is not None else \
            _cart_default("DEFAULT_RANK_RATIO", 0.08)
    if any(task.targets is not None for task in tasks):
        # targets read from the disk cache carry loaded_from_cache (pymerge.teachers.CachedTargets)
        config["teacher_cache_hits"] = sum(bool(getattr(task.targets, "loaded_from_cache", False)) for task in tasks)
    return LearnedMerge(method=method, tasks=names, granularity=granularity, groups=list(merged.groups),
                        group_of=dict(merged.group_of), coefficients=coefficients, losses=list(opt.losses),
                        state_dict=shared, task_state_dicts=dict(zip(names, per_task)),
                        heads=dict(zip(names, merged.heads)), config=config)
