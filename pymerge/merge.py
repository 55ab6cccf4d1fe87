"""pymerge.merge: merge T fine-tuned state dicts that share one base, with any registered method.

merge() does the bookkeeping every method shares (validation, key grouping, dtypes, output order, the checks
on the inputs' values); the math lives in pymerge/methods/<name>.py (a MethodSpec, see
pymerge/methods/spec.py for the contract). plan_merge() is merge() split in two for merges from disk
(`pymerge merge`): every check that needs no tensor data, then a MergePlan whose groups are merged one at a
time (MergePlan.merge_group), so the caller can stream each group's output away and release its inputs, or
hand disjoint groups to separate processes.
"""
import re
import warnings
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch

from . import methods as _methods
from .dtypes import FLOAT_DTYPES
from .methods.spec import KeyGroup, KeyInfo, LearnedMethodSpec, MethodSpec

# Inputs (theta_0..theta_T) of one KeyGroup are at most this many bytes (a single larger key is a group of
# its own). It bounds what a method may stack at once; same-shape keys beyond it go to the next group.
DEFAULT_MAX_GROUP_BYTES = 512 << 20

# LoRA factor keys as peft names them: `...lora_A.weight`, `...lora_B.default.weight`, `...lora_embedding_A`.
LORA_FACTOR_KEY = re.compile(r"(?:^|\.)lora_(?:embedding_)?[AB](?:\.|$)")


def key_info(state_dict, key) -> KeyInfo:
    """Shape and dtype of state_dict[key] without reading it when the container can say (a lazy reader
    exposing key_info(key)); for a plain dict of tensors, the tensor's own."""
    info = getattr(state_dict, "key_info", None)
    if callable(info):
        got = info(key)
        return got if isinstance(got, KeyInfo) else KeyInfo(torch.Size(got[0]), got[1])
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"merge: key {key!r} holds a {type(value).__name__}, expected a torch.Tensor")
    return KeyInfo(value.shape, value.dtype)


def _fmt_keys(keys, limit=8):
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def _check_key_sets(base, models):
    base_keys = list(base.keys())
    base_set = set(base_keys)
    for t, sd in enumerate(models):
        keys = set(sd.keys())
        missing = [k for k in base_keys if k not in keys]
        extra = sorted(keys - base_set)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_fmt_keys(missing)}")
            if extra:
                parts.append(f"extra {_fmt_keys(extra)}")
            raise ValueError(f"merge: models[{t}] does not have the base's keys: " + "; ".join(parts))
    return base_keys


def _refuse_lora_factors(spec, keys):
    """LoRA adapters are merged through their product: merging the A and B factors one by one is not merging
    the adapters (B_1 A_1 + B_2 A_2 != (B_1 + B_2)(A_1 + A_2)), so no method may see them."""
    lora = [k for k in keys if LORA_FACTOR_KEY.search(k)]
    if lora:
        raise ValueError(f"merge({spec.name}): key {lora[0]!r} is a LoRA factor ({len(lora)} lora_A/lora_B keys): "
                         f"merging the A and B factors separately does not merge the adapters. Materialise each "
                         f"adapter's update delta_W = B @ A (times its scaling alpha / r) onto the base weights "
                         f"first and merge those full state dicts instead")


def _plan_groups(keys, infos, T, max_group_bytes):
    """Float keys -> KeyGroup key lists: one bucket per (shape, dtype) in base order, split so that the
    inputs of a group stay within max_group_bytes."""
    buckets = OrderedDict()
    for key in keys:
        info = infos[key]
        buckets.setdefault((tuple(info.shape), info.dtype), []).append(key)
    plans = []
    for (shape, dtype), bucket in buckets.items():
        per_key = max(1, (T + 1) * _numel(shape) * torch.empty(0, dtype=dtype).element_size())
        per_group = max(1, int(max_group_bytes // per_key))
        for i in range(0, len(bucket), per_group):
            plans.append(bucket[i:i + per_group])
    return plans


def merge(method: Union[str, MethodSpec], base: Mapping[str, torch.Tensor],
          models: Sequence[Mapping[str, torch.Tensor]], *, out_dtype: Optional[torch.dtype] = None,
          max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES, check_finite: bool = True,
          **params) -> "OrderedDict[str, torch.Tensor]":
    """Merge fine-tuned models theta_1..theta_T that share the pretrained base theta_0.

    method: a name from pymerge.methods.available() or a MethodSpec. base: a state dict {key: Tensor}
    (or any mapping with keys() and __getitem__; a lazy reader may also offer key_info(key) -> KeyInfo so
    nothing is read before its group is merged). models: a sequence of T such mappings with exactly the
    base's keys. params: the method's parameters (see pymerge.methods.get(method).describe()); per-model
    parameters take a scalar or a list of T values.

    Float keys (fp16/bf16/fp32/fp64) are grouped by (shape, dtype) into KeyGroups of at most
    max_group_bytes of inputs and merged by the method in fp32 (fp64 for fp64 inputs). Non-float keys
    (integer/bool buffers such as position_ids or num_batches_tracked) are not merged: the base's value is
    returned as is (no cast), with a UserWarning naming the key and models where a model's value differs.
    Zero-element float keys are returned as the base's (empty) value.
    The merge runs under torch.no_grad(): inputs may require grad (dict(model.named_parameters())), the
    returned tensors never do.

    check_finite: True (default) raises ValueError when a float key of the base or of models[t] holds NaN or
    +-Inf (naming the key, base / models[t], the counts and the first position), and when a merged key comes
    out non-finite although its inputs are finite (an overflow, e.g. of a float16 output). False skips both
    checks: non-finite values then propagate as each method's arithmetic makes them (the SVD-based methods
    may raise torch's own errors instead). The check reads every input once more (one sum per tensor),
    except for methods whose output provably turns non-finite with any non-finite input
    (MethodSpec.nonfinite_propagates: only their output is checked, and the inputs on a failure).

    Returns an OrderedDict in the base's key order; float keys in out_dtype if given, else in their input
    dtype. Raises ValueError naming the offending keys/shapes for: T = 0, different key sets, shape, dtype
    or device mismatches between base and models, non-tensor values, tensors on the meta device (no values
    to merge; there is no shape-only plan), LoRA factor keys (lora_A / lora_B), non-finite values (above),
    bad parameters.
    """
    plan = plan_merge(method, base, models, out_dtype=out_dtype, max_group_bytes=max_group_bytes,
                      check_finite=check_finite, **params)
    merged = plan.merge_passthrough(stacklevel=3)
    for group_keys in plan.groups:
        merged.update(plan.merge_group(group_keys))
    return OrderedDict((key, merged[key]) for key in plan.keys)


class MergePlan:
    """What a merge will do, decided from the keys' shapes and dtypes alone (key_info) before any tensor is
    read: the checked parameters, the keys (base order), the non-float keys passed through, and `groups`, the
    float keys' KeyGroups in the order merge() runs them. merge_passthrough() and merge_group(keys) compute
    the output of those keys; each group reads only its own keys, so a caller can stream the groups to disk
    one at a time (never holding the whole output), or hand disjoint groups to separate processes: a key's
    result does not depend on which group or process merges it (see methods/spec.py).

    Built by plan_merge (the checks of merge()); merge() is plan_merge + every group, collected."""

    def __init__(self, spec, base, models, params, keys, infos, float_keys, passthrough, groups, out_dtype,
                 check_finite):
        self.spec, self.base, self.models, self.params = spec, base, models, params
        self.keys, self.infos, self.float_keys, self.passthrough = keys, infos, float_keys, passthrough
        self.groups, self.out_dtype, self.check_finite = groups, out_dtype, check_finite

    @property
    def num_models(self):
        return len(self.models)

    def output_info(self, key) -> KeyInfo:
        """Shape and dtype of the merged key: its own, in out_dtype when that is given and the key is float."""
        info = self.infos[key]
        cast = self.out_dtype is not None and info.dtype in FLOAT_DTYPES
        return KeyInfo(info.shape, self.out_dtype if cast else info.dtype)

    def input_bytes(self, keys) -> int:
        """Bytes the base and the T models hold for `keys` (what merging them reads)."""
        return (self.num_models + 1) * sum(_nbytes(self.infos[k]) for k in keys)

    def output_bytes(self, keys) -> int:
        return sum(_nbytes(self.output_info(k)) for k in keys)

    def merge_passthrough(self, stacklevel=2) -> dict:
        """{key: base's value} of the non-float and empty keys (cast to out_dtype where float), with a
        UserWarning per non-float key a model holds differently."""
        out = {}
        with torch.no_grad():
            for key in self.passthrough:
                value = _passthrough_value(self.spec, key, self.base, self.models, stacklevel=stacklevel + 1)
                cast = self.out_dtype is not None and value.dtype in FLOAT_DTYPES
                out[key] = value.to(self.out_dtype) if cast else value
        return out

    def merge_group(self, group_keys) -> dict:
        """{key: merged tensor} of one group of self.groups (or any list of float keys of one shape and
        dtype), in the output dtype; the inputs are checked as merge() documents."""
        spec, infos, out_dtype = self.spec, self.infos, self.out_dtype
        # Merging never builds an autograd graph, whatever the inputs require.
        with torch.no_grad():
            group = _load_group(spec, group_keys, self.base, self.models, out_dtype)
            if self.check_finite and not spec.nonfinite_propagates:
                _check_inputs_finite(spec, group)
            outputs = spec.merge_group(group, **self.params)
            if len(outputs) != len(group_keys):
                raise RuntimeError(f"merge({spec.name}): merge_group returned {len(outputs)} tensors for "
                                   f"{len(group_keys)} keys")
            results = []
            for key, out in zip(group_keys, outputs):
                if out.shape != infos[key].shape:
                    raise RuntimeError(f"merge({spec.name}): merged key {key!r} has shape {tuple(out.shape)}, "
                                       f"expected {tuple(infos[key].shape)}")
                results.append(out.to(out_dtype or infos[key].dtype))
            if self.check_finite:
                _check_outputs_finite(spec, group, results)
            return dict(zip(group_keys, results))


def plan_merge(method: Union[str, MethodSpec], base: Mapping[str, torch.Tensor],
               models: Sequence[Mapping[str, torch.Tensor]], *, out_dtype: Optional[torch.dtype] = None,
               max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES, check_finite: bool = True,
               **params) -> MergePlan:
    """Every check of merge() that needs no tensor data (method, models, key sets, shapes, dtypes,
    parameters, the method's prepare step), and the plan of the merge: see MergePlan. Same arguments and
    errors as merge()."""
    spec = _methods.get(method) if isinstance(method, str) else method
    if isinstance(spec, LearnedMethodSpec):
        raise ValueError(f"merge: {spec.name} is a learned method: it trains merge coefficients on the fine-tuned "
                         f"models and unlabelled data of each task; call {spec.run}(base, models, data, ...) "
                         f"(or `pymerge {spec.name}`)")
    if not isinstance(spec, MethodSpec):
        raise ValueError(f"merge: method must be a method name or a MethodSpec, got {type(method).__name__}")
    if isinstance(models, Mapping) or isinstance(models, torch.Tensor):
        raise ValueError("merge: models must be a sequence of state dicts (one per fine-tuned model)")
    models = list(models)
    T = len(models)
    if T == 0:
        raise ValueError(f"merge({spec.name}): no models to merge (T = 0); pass at least one fine-tuned state dict")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"merge({spec.name}): out_dtype {out_dtype} is not one of {FLOAT_DTYPES}")
    if max_group_bytes <= 0:
        raise ValueError(f"merge({spec.name}): max_group_bytes must be > 0, got {max_group_bytes}")
    if not isinstance(check_finite, bool):
        raise ValueError(f"merge({spec.name}): check_finite must be True or False, got {check_finite!r}")
    keys = _check_key_sets(base, models)
    _refuse_lora_factors(spec, keys)
    params = spec.resolve_params(params, T)

    infos, float_keys, passthrough = {}, [], []
    for key in keys:
        info = key_info(base, key)
        for t, sd in enumerate(models):
            other = key_info(sd, key)
            if other.shape != info.shape:
                raise ValueError(f"merge({spec.name}): key {key!r} has shape {tuple(other.shape)} in models[{t}] "
                                 f"but {tuple(info.shape)} in base")
            if other.dtype != info.dtype:
                raise ValueError(f"merge({spec.name}): key {key!r} has dtype {other.dtype} in models[{t}] but "
                                 f"{info.dtype} in base (shape {tuple(info.shape)}); cast the models to one dtype")
        infos[key] = info
        if info.dtype in FLOAT_DTYPES and _numel(info.shape) > 0:
            float_keys.append(key)
        else:
            passthrough.append(key)

    if spec.prepare is not None:
        params = spec.prepare(params, {k: infos[k] for k in float_keys})
    groups = _plan_groups(float_keys, infos, T, max_group_bytes)
    return MergePlan(spec, base, models, params, keys, infos, float_keys, passthrough, groups, out_dtype,
                     check_finite)


def _nbytes(info):
    return _numel(info.shape) * torch.empty(0, dtype=info.dtype).element_size()


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _fetch(spec, state_dict, key, where):
    """state_dict[key], refused when it lives on the meta device (a shape without values)."""
    value = state_dict[key]
    if value.is_meta:
        raise ValueError(f"merge({spec.name}): key {key!r} of {where} is on the meta device (a shape without "
                         f"values); load the weights before merging (merge has no shape-only mode)")
    return value


def _passthrough_value(spec, key, base, models, stacklevel=3):
    """The base's value of a key merge() does not merge, with a warning when a model's non-float value differs
    (its own value is dropped)."""
    value = _fetch(spec, base, key, "base").detach()
    if value.dtype in FLOAT_DTYPES or value.numel() == 0:
        return value
    differ = [t for t, sd in enumerate(models)
              if not torch.equal(value, _fetch(spec, sd, key, f"models[{t}]").to(value.device))]
    if differ:
        warnings.warn(f"merge({spec.name}): non-float key {key!r} ({value.dtype}) differs from the base's in "
                      f"{', '.join(f'models[{t}]' for t in differ)}; non-float keys are not merged, the base's "
                      f"value is kept", UserWarning, stacklevel=stacklevel)
    return value


def _load_group(spec, keys, base, models, out_dtype=None):
    bases, groups = [], []
    for key in keys:
        b = _fetch(spec, base, key, "base")
        thetas = [_fetch(spec, sd, key, f"models[{t}]") for t, sd in enumerate(models)]
        for t, theta in enumerate(thetas):
            if theta.device != b.device:
                raise ValueError(f"merge({spec.name}): key {key!r} is on {theta.device} in models[{t}] but on "
                                 f"{b.device} in base")
        bases.append(b)
        groups.append(thetas)
    return KeyGroup(keys=list(keys), base=bases, models=groups, out_dtype=out_dtype)


def _nonfinite_at(tensors):
    """Indices of the tensors (same dtype and device) holding NaN or +-Inf.

    One sum per tensor (a read pass without temporaries: NaN/Inf make it non-finite); only a tensor whose sum
    is non-finite gets the exact isfinite() pass, since finite entries can overflow their sum."""
    sums = torch.stack([x.sum() for x in tensors])
    suspects = torch.isfinite(sums).logical_not_().nonzero().reshape(-1).tolist()
    return [i for i in suspects if not bool(torch.isfinite(tensors[i]).all())]


def _describe_nonfinite(x):
    bad = torch.isfinite(x).logical_not_()
    n_nan = int(torch.isnan(x).sum())
    first = bad.nonzero()[0].tolist()
    return f"{n_nan} NaN and {int(bad.sum()) - n_nan} +-Inf of its {x.numel()} entries (the first at index {first})"


def _check_inputs_finite(spec, group):
    """ValueError naming the first key of the group and base / models[t] that holds NaN or +-Inf."""
    T = group.num_models
    tensors = [x for b, thetas in zip(group.base, group.models) for x in (b, *thetas)]
    bad = _nonfinite_at(tensors)
    if bad:
        i, j = divmod(bad[0], T + 1)
        where = "base" if j == 0 else f"models[{j - 1}]"
        raise ValueError(f"merge({spec.name}): key {group.keys[i]!r} of {where} holds "
                         f"{_describe_nonfinite(tensors[bad[0]])}; repair or drop that model "
                         f"(check_finite=False lets non-finite values through)")


def _check_outputs_finite(spec, group, results):
    """A non-finite merged key: its non-finite input when there is one (methods that propagate non-finite
    values skip the input check), else an overflow of the computation or of the output dtype."""
    bad = _nonfinite_at(results)
    if bad:
        _check_inputs_finite(spec, group)
        key, out = group.keys[bad[0]], results[bad[0]]
        raise ValueError(f"merge({spec.name}): merged key {key!r} holds {_describe_nonfinite(out)} although "
                         f"every input is finite: an overflow of {out.dtype}; use smaller scaling parameters or a "
                         f"wider out_dtype")
