"""Hugging Face-compatible output: sharded safetensors + index json, and the model's config / tokenizer files.

Shards are planned before any tensor exists (plan_shards, from the keys' shapes and dtypes): greedy in the
given key order, a new shard when the next tensor would take the current one past max_shard_size (a tensor
larger than the limit gets a shard of its own), named as mergekit 0.1.5 and transformers name them:
model.safetensors when there is one shard, else model-00001-of-0000N.safetensors + model.safetensors.index.json
({"metadata": {"total_size": ...}, "weight_map": {key: file}}). Since every header is known up front, each
shard file is created at its final size with its header written, and ShardWriter.write(key, tensor) writes a
tensor's bytes straight at its offset, in whatever order the merge produces them: no shard is buffered in
memory, and separate processes could fill separate shards. Within a shard, tensors are laid out by
decreasing alignment (then in the given order) after a header padded to 8 bytes, so every tensor is aligned.
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .errors import ModelFileError
from .safetensors_file import DTYPE_NAMES
from .tensor_info import tensor_nbytes
from .write_behind import WriteBehind, pwrite_all

DEFAULT_MAX_SHARD_SIZE = "5GB"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The files of a model directory that are not weights, copied from the base (or a chosen model).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text) -> int:
    """Bytes of a size as transformers' max_shard_size spells it: an int, or "5GB" (10^9), "500MiB" (2^20)..."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise ValueError(f"size {text!r}: expected bytes or a number with a unit (KB, MB, GB, KiB, MiB, GiB)")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size {text!r}: must be positive")
    return value


@dataclass
class Shard:
    name: str
    header: bytes                                   # 8-byte length + padded JSON
    offsets: Dict[str, Tuple[int, int]] = field(default_factory=dict)   # key -> absolute [begin, end)
    size: int = 0


@dataclass
class ShardPlan:
    shards: List[Shard]
    key_shard: Dict[str, int]
    total_size: int                                 # tensor bytes (the index's total_size)

    @property
    def file_names(self):
        return [s.name for s in self.shards]

    def weight_map(self):
        return {k: self.shards[i].name for k, i in sorted(self.key_shard.items())}


def plan_shards(entries, max_shard_size, metadata=None) -> ShardPlan:
    """entries: [(key, shape, dtype)] in the order to pack them. See the module doc."""
    limit = parse_size(max_shard_size)
    groups, current, current_size = [], [], 0
    for key, shape, dtype in entries:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"key {key!r}: dtype {dtype} cannot be stored in safetensors")
        n = tensor_nbytes(shape, dtype)
        if current and current_size + n > limit:
            groups.append(current)
            current, current_size = [], 0
        current.append((key, tuple(shape), dtype, n))
        current_size += n
    if current or not groups:
        groups.append(current)
    total = len(groups)
    shards, key_shard = [], {}
    for i, group in enumerate(groups):
        name = SINGLE_NAME if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        order = sorted(range(len(group)), key=lambda j: (-group[j][2].itemsize, j))
        header, pos, spans = {"__metadata__": dict(metadata or {"format": "pt"})}, 0, {}
        for j in order:
            key, shape, dtype, n = group[j]
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            spans[key] = (pos, pos + n)
            pos += n
            key_shard[key] = i
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-(8 + len(text)) % 8)
        head = len(text).to_bytes(8, "little") + text
        shards.append(Shard(name, head, {k: (len(head) + b, len(head) + e) for k, (b, e) in spans.items()},
                            len(head) + pos))
    return ShardPlan(shards, key_shard, sum(n for g in groups for *_, n in g))


class ShardWriter:
    """Writes the tensors of a ShardPlan into `directory` (see the module doc): open() creates every shard file
    at its final size with its header, write(key, tensor) puts one tensor in place, finish() checks that every
    key was written, fsyncs and closes the shards and writes the index json (when there are several shards).

    keys: the keys this writer writes (default: all of the plan's). Several writers (processes) can fill one
    set of shard files, each its own keys: one calls open(), the others open(create=False) once the files
    exist, and once all have finished (finish(write_index=False)) one calls write_index().

    write_behind=True: write() queues the tensor for a background thread (pymerge/io/write_behind.py) and returns,
    so the caller merges the next group while this one reaches the file; the tensor must not be modified
    afterwards. finish() waits for it; close() drops what was not written."""

    def __init__(self, directory, plan: ShardPlan, keys=None, write_behind=False):
        self.directory = Path(directory)
        self.plan = plan
        self._pending = set(plan.key_shard) if keys is None else set(keys)
        unknown = self._pending - set(plan.key_shard)
        if unknown:
            raise KeyError(f"ShardWriter: key {sorted(unknown)[0]!r} is not in the plan")
        self._fds = {}
        self.bytes_written = 0
        self._write_behind = write_behind
        self._behind = None

    def open(self, create=True):
        for i, shard in enumerate(self.plan.shards):
            path = self.directory / shard.name
            if create:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds[i] = fd
                os.ftruncate(fd, shard.size)
                self._pwrite(fd, memoryview(shard.header), 0)
                self.bytes_written += len(shard.header)
            else:
                self._fds[i] = os.open(path, os.O_WRONLY)
        if self._write_behind:
            self._behind = WriteBehind()
        return self

    _pwrite = staticmethod(pwrite_all)

    def write(self, key, tensor: torch.Tensor):
        if key not in self._pending:
            raise KeyError(f"ShardWriter: key {key!r} is not this writer's to write (not planned, or written twice)")
        i = self.plan.key_shard[key]
        begin, end = self.plan.shards[i].offsets[key]
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel() * t.element_size() != end - begin:
            raise ValueError(f"ShardWriter: key {key!r} holds {t.numel() * t.element_size()} bytes "
                             f"({tuple(t.shape)}, {t.dtype}), the plan {end - begin}")
        if end > begin:
            raw = t.reshape(-1).view(torch.uint8).numpy()
            if self._behind is not None:
                self._behind.submit(self._fds[i], raw, begin)
            else:
                self._pwrite(self._fds[i], memoryview(raw), begin)
        self._pending.discard(key)
        self.bytes_written += end - begin

    def finish(self, write_index=True):
        if self._pending:
            raise RuntimeError(f"ShardWriter: {len(self._pending)} key(s) were never written, e.g. "
                               f"{sorted(self._pending)[0]!r}")
        if self._behind is not None:
            self._behind.drain()
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()
        if write_index:
            self.bytes_written += self.write_index()

    def write_index(self) -> int:
        """Write the index json (when the plan has several shards; a single model.safetensors has none) and
        return its bytes: finish() does it, or one writer of several once all have finished (write_index=False)."""
        if len(self.plan.shards) <= 1:
            return 0
        index = {"metadata": {"total_size": self.plan.total_size}, "weight_map": self.plan.weight_map()}
        return write_file(self.directory / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode("utf-8"))

    def close(self):
        if self._behind is not None:
            self._behind.abort()
            self._behind = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def write_file(path, data: bytes) -> int:
    """Create `path` (it must not exist) holding `data`, fsynced; returns len(data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        ShardWriter._pwrite(fd, memoryview(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def copy_model_files(sources, directory, dtype=None):
    """Copy the non-weight files of Hugging Face model directories into `directory`: sources is
    [(source_dir, names)], each name copied when the source has it (a later source does not replace an
    earlier one's file). config.json's dtype ("dtype" / "torch_dtype") is set to `dtype` when given.
    Files are read through the same containment rule as weights (model_dir.resolve_inside). Returns
    (copied file names, bytes written)."""
    from .model_dir import resolve_inside
    copied, written = [], 0
    for source, names in sources:
        for name in names:
            if name in copied or not (Path(source) / name).exists():
                continue
            real = resolve_inside(source, name, str(source))
            if not real.is_file():
                raise ModelFileError(f"{Path(source) / name}: not a regular file")
            try:
                data = real.read_bytes()
            except OSError as e:
                raise ModelFileError(f"{Path(source) / name}: cannot read ({e.strerror or e})") from None
            if name == "config.json" and dtype is not None:
                data = _config_with_dtype(Path(source) / name, data, dtype)
            written += write_file(Path(directory) / name, data)
            copied.append(name)
    return copied, written


def _config_with_dtype(path, data, dtype):
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    name = str(dtype).replace("torch.", "")
    present = [k for k in ("dtype", "torch_dtype") if k in config]
    for k in present or ["dtype"]:
        config[k] = name
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
