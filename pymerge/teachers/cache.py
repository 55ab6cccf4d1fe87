"""The on-disk teacher cache, the one place of the learned side that does IO.

One safetensors file per (model fingerprint, data hash, settings) under ``cache_dir()/teachers`` (env
PYMERGE_CACHE, default ~/.cache/pymerge), written atomically (temp file + os.replace), so a rerun loads the
targets and starts at the optimisation. The model fingerprint is cheap (names, shapes, dtypes, 64 sampled
values and a bit-pattern checksum per tensor; see model_fingerprint).

``cached_targets(module, examples, compute, kind=..., settings=...)`` caches any per-example targets and
returns a CachedTargets list (loaded_from_cache, cache_path); ``entry_path`` / ``read_entry`` /
``write_entry`` are the file-level steps (the causal-LM teachers store their own tensors through them).
"""
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Mapping

import torch

CACHE_FORMAT = 1  # bump when the layout of a cache file changes: old files are then simply not found


def cache_dir(path=None) -> Path:
    """pymerge's cache directory: `path` if given, else $PYMERGE_CACHE, else ~/.cache/pymerge."""
    if path is not None:
        return Path(path)
    env = os.environ.get("PYMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pymerge"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_checksum(flat: torch.Tensor) -> int:
    """Wrapping integer sum of a 1-D tensor's raw bit patterns: exact and independent of summation order,
    so the same on every device and thread count; any single changed element changes it."""
    size = flat.element_size()
    if size not in _INT_VIEW:  # complex: checksum the bytes
        return int(flat.contiguous().view(torch.uint8).sum(dtype=torch.int64))
    bits = flat.contiguous().view(_INT_VIEW[size])
    return int(bits.sum(dtype=torch.int64 if size < 4 else bits.dtype))


def model_fingerprint(model, samples: int = 64) -> str:
    """A cheap fingerprint (hex sha256) of a model's weights: for every state-dict entry in name order its
    name, shape, dtype, `samples` evenly spaced values and a checksum of all its values (_bit_checksum: the
    wrapping integer sum of the raw bit patterns, computed where the tensor lives).

    Only O(samples) values per tensor move to the host and the checksum is one integer reduction per tensor
    on its device (no copy of the model, no float rounding: the fingerprint of a model is the same on CPU
    and GPU, so the cache is shared). Not a cryptographic hash: models that differ only in entries that are
    not sampled and whose bit-pattern sums cancel modulo 2^32 (2^64 for 8-byte dtypes) collide; a single
    changed value, or a dense fine-tune, never does. Where it matters pass cache=False or a cache_key.
    `model`: an nn.Module or a state dict (name -> tensor).
    """
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    h.update(type(model).__name__.encode() if isinstance(model, torch.nn.Module) else b"state_dict")
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        # evenly spaced in integer arithmetic: a float32 linspace rounds indices above 2^24 (an embedding table
        # of 49152 x 576 rounded its last one out of range)
        count = min(samples, flat.numel())
        idx = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        h.update(_tensor_bytes(flat[idx]))
        h.update(repr(_bit_checksum(flat)).encode())
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """A hex sha256 of all the data (tensors byte for byte, strings, numbers, nested dicts/lists)."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(_tensor_bytes(x))
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(f"{k!s}:".encode())
                visit(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                visit(v)
            h.update(b"]")
        elif isinstance(x, str):
            h.update(b"S" + x.encode())
        else:
            h.update(("R" + repr(x)).encode())

    visit(data)
    return h.hexdigest()


def entry_path(directory, kind, parts) -> Path:
    """The file of one cache entry: `kind` and the JSON-able `parts` (model, data, settings) make its key."""
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "kind": kind, **parts}, sort_keys=True, default=repr)
                         .encode()).hexdigest()[:40]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(kind))
    return cache_dir(directory) / "teachers" / f"{safe}-{key}.safetensors"


def write_entry(path: Path, tensors, metadata):
    """Write a safetensors file so that readers see either no file or the complete one; metadata (str -> str)
    starts with the cache format."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": str(CACHE_FORMAT), **metadata})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_entry(path: Path):
    """(tensors, metadata) of a cache file, or None when it is absent or unreadable (then it is recomputed)."""
    if not path.exists():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged file is not fatal: the targets are recomputed and the file replaced
        warnings.warn(f"pymerge: ignoring unreadable teacher cache {path}: {e}")
        return None
    if meta.get("format") != str(CACHE_FORMAT):
        return None
    return tensors, meta


def _to(inputs, device):
    """Tensors (also inside dicts and lists) moved to device."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _flatten_targets(targets):
    """List of per-example tensors (or dicts of tensors) -> safetensors entries + the structure's name."""
    if not targets:
        raise ValueError("cached_targets: compute() returned no targets")
    is_dict = isinstance(targets[0], Mapping)
    fields = list(targets[0].keys()) if is_dict else [""]
    out = {}
    for f in fields:
        vals = [(e[f] if is_dict else e) for e in targets]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            raise ValueError("cached_targets: targets must be tensors or dicts of tensors")
        vals = [v.detach().cpu() for v in vals]
        if len({(tuple(v.shape), v.dtype) for v in vals}) == 1:
            out[f"{f}|stack"] = torch.stack(vals)
        else:
            out.update({f"{f}|{i}": v for i, v in enumerate(vals)})
    return out, ("dict" if is_dict else "tensor")


def _unflatten_targets(tensors, structure, n):
    fields = {}
    for name, t in tensors.items():
        f, _, where = name.rpartition("|")
        fields.setdefault(f, {})[where] = t
    per = {f: (list(d["stack"].unbind(0)) if "stack" in d else [d[str(i)] for i in range(n)])
           for f, d in fields.items()}
    if structure == "tensor":
        return per[""]
    return [{f: per[f][i] for f in per} for i in range(n)]


class CachedTargets(list):
    """Per-example targets (a list) with where they live on disk: cache_path (None when not cached) and
    loaded_from_cache (True on a cache hit)."""

    def __init__(self, items=(), cache_path=None, loaded_from_cache=False):
        super().__init__(items)
        self.cache_path = cache_path
        self.loaded_from_cache = loaded_from_cache


def cached_targets(module, examples, compute, *, kind, settings=None, cache=True, cache_dir=None, cache_key=None,
                   device=None) -> CachedTargets:
    """Per-example teacher targets, computed once by ``compute()`` and cached on disk.

    module: the fine-tuned model (fingerprinted with model_fingerprint unless cache_key is given); examples:
    its task's per-example inputs (hashed with data_fingerprint); compute(): -> list of per-example tensors
    (or dicts of tensors), e.g. pymerge.teachers.teacher_targets(...). kind and settings (a JSON-able dict:
    temperature, objective, ...) are part of the key. Returns a CachedTargets list (tensors on `device`,
    default CPU as loaded, or as computed). A cache hit skips compute() altogether.
    """
    path = None
    if cache:
        path = entry_path(cache_dir, kind, {"model": cache_key or model_fingerprint(module),
                                             "data": data_fingerprint(list(examples)), "settings": settings or {}})
        got = read_entry(path)
        if got is not None:
            out = _unflatten_targets(got[0], got[1].get("structure", "tensor"), int(got[1]["n"]))
            return CachedTargets(_to(out, device) if device is not None else out, path, True)
    out = list(compute())
    if path is not None:
        tensors, structure = _flatten_targets(out)
        write_entry(path, tensors, {"kind": kind, "structure": structure, "n": str(len(out))})
    return CachedTargets(out, path, False)

