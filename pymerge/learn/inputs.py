"""Checks of a learned merge's inputs at the boundary: the base, the fine-tuned models (or their loaders), one
data source per task, and the regular expressions naming keys. Every error is a ValueError naming the input."""
import re
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn


def format_keys(keys, limit=6):
    """"['a', 'b', ...] (n keys)": the first `limit` keys of a list, for error messages."""
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


def align_base_keys(base_sd, keys, what="learned merge"):
    """base_sd re-keyed by one prefix when that makes it hold every one of `keys` (the merged keys of the
    models) and it does not as it is: a bare body as the base of models that wrap it ("embeddings.x" ->
    "bert.embeddings.x"), or a wrapped base of bare models (the prefix removed). Returns (state dict, prefix
    note or None); base_sd itself when no single prefix fits."""
    missing = [k for k in keys if k not in base_sd]
    if not missing:
        return base_sd, None
    k = missing[0]
    for i, c in enumerate(k):          # the models' keys carry a prefix the base lacks
        if c == "." and k[i + 1:] in base_sd:
            prefix = k[:i + 1]
            if all(m.startswith(prefix) and m[len(prefix):] in base_sd for m in missing):
                out = OrderedDict((prefix + b, v) for b, v in base_sd.items())
                out.update((b, v) for b, v in base_sd.items() if b not in out and b in keys)
                return out, f"added the prefix {prefix!r} to the base's keys"
    for b in base_sd:                  # the base's keys carry a prefix the models lack
        if b.endswith("." + k):
            prefix = b[:-len(k)]
            out = OrderedDict((b2[len(prefix):], v) for b2, v in base_sd.items() if b2.startswith(prefix))
            if all(m in out or m in base_sd for m in keys):
                out.update((b2, v) for b2, v in base_sd.items() if b2 in keys and b2 not in out)
                return out, f"removed the prefix {prefix!r} from the base's keys"
    return base_sd, None


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


def compile_regex(pattern, name, what):
    """re.compile(pattern), None for None; a ValueError naming the option `name` for an invalid one."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"{what}: {name} = {pattern!r} is not a valid regular expression ({e})")
