"""pymerge.merge: merge T fine-tuned state dicts that share one base, with any registered method.

merge() does the bookkeeping every method shares (validation, key grouping, dtypes, output order); the
math lives in pymerge/methods/<name>.py (a MethodSpec, see pymerge/methods/spec.py for the contract).
"""
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch

from . import methods as _methods
from .methods.spec import KeyGroup, KeyInfo, MethodSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Inputs (theta_0..theta_T) of one KeyGroup are at most this many bytes (a single larger key is a group of
# its own). It bounds what a method may stack at once; same-shape keys beyond it go to the next group.
DEFAULT_MAX_GROUP_BYTES = 512 << 20


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
          max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES, **params) -> "OrderedDict[str, torch.Tensor]":
    """Merge fine-tuned models theta_1..theta_T that share the pretrained base theta_0.

    method: a name from pymerge.methods.available() or a MethodSpec. base: a state dict {key: Tensor}
    (or any mapping with keys() and __getitem__; a lazy reader may also offer key_info(key) -> KeyInfo so
    nothing is read before its group is merged). models: a sequence of T such mappings with exactly the
    base's keys. params: the method's parameters (see pymerge.methods.get(method).describe()); per-model
    parameters take a scalar or a list of T values.

    Float keys (fp16/bf16/fp32/fp64) are grouped by (shape, dtype) into KeyGroups of at most
    max_group_bytes of inputs and merged by the method in fp32 (fp64 for fp64 inputs). Non-float keys
    (integer/bool buffers such as position_ids or num_batches_tracked) are not merged: the base's value is
    returned as is (no cast). Zero-element float keys are returned as the base's (empty) value.
    Returns an OrderedDict in the base's key order; float keys in out_dtype if given, else in their input
    dtype. Raises ValueError naming the offending keys/shapes for: T = 0, different key sets, shape, dtype
    or device mismatches between base and models, non-tensor values, bad parameters.
    """
    spec = _methods.get(method) if isinstance(method, str) else method
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
    keys = _check_key_sets(base, models)
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

    merged = {}
    for key in passthrough:
        value = base[key]
        merged[key] = value.to(out_dtype) if out_dtype is not None and value.dtype in FLOAT_DTYPES else value
    for group_keys in _plan_groups(float_keys, infos, T, max_group_bytes):
        group = _load_group(spec, group_keys, base, models)
        outputs = spec.merge_group(group, **params)
        if len(outputs) != len(group_keys):
            raise RuntimeError(f"merge({spec.name}): merge_group returned {len(outputs)} tensors for "
                               f"{len(group_keys)} keys")
        for key, out in zip(group_keys, outputs):
            if out.shape != infos[key].shape:
                raise RuntimeError(f"merge({spec.name}): merged key {key!r} has shape {tuple(out.shape)}, "
                                   f"expected {tuple(infos[key].shape)}")
            merged[key] = out.to(out_dtype or infos[key].dtype)
        del group, outputs
    return OrderedDict((key, merged[key]) for key in keys)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _load_group(spec, keys, base, models):
    bases, groups = [], []
    for key in keys:
        b = base[key]
        thetas = [sd[key] for sd in models]
        for t, theta in enumerate(thetas):
            if theta.device != b.device:
                raise ValueError(f"merge({spec.name}): key {key!r} is on {theta.device} in models[{t}] but on "
                                 f"{b.device} in base")
        bases.append(b)
        groups.append(thetas)
    return KeyGroup(keys=list(keys), base=bases, models=groups)
