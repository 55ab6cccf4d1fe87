"""One .safetensors file, read lazily: the header is validated when the file is opened, each tensor is a
zero-copy view of a private memory map of the file when asked for, and its pages can be released after use.

The file is untrusted: before any tensor is made, the header must be an 8-byte little-endian length N
(at most MAX_HEADER_BYTES, with 8 + N inside the file) followed by N bytes of UTF-8 JSON holding an object
whose keys are unique; each entry names a known dtype, a shape of non-negative ints and data_offsets
[begin, end] with begin <= end inside the data section, end - begin equal to the shape's byte size, and no
two non-empty tensors overlapping. Anything else is a ModelFileError naming the file (and the key). The map is
copy-on-write (MAP_PRIVATE): nothing done to a tensor can reach the file.
"""
import json
import mmap
import os
import struct
from collections import OrderedDict

import torch

from .errors import ModelFileError
from .tensor_info import TensorInfo, tensor_nbytes

# safetensors' own limit on the header (the Rust reader refuses larger ones).
MAX_HEADER_BYTES = 100_000_000

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _unique_object(pairs):
    seen = OrderedDict()
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def read_header(path):
    """(entries, data_start, metadata) of a safetensors file after every check of the module doc; entries:
    OrderedDict key -> (TensorInfo, begin, end) with offsets relative to the data section."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a safetensors file (truncated: {size} bytes, the header length "
                                     f"alone takes 8)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ModelFileError(f"{path}: corrupt safetensors header (claims {n} bytes of JSON, the limit is "
                                     f"{MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise ModelFileError(f"{path}: truncated safetensors file (the header claims {n} bytes of JSON "
                                     f"but the file has {size} bytes)")
            raw = f.read(n)
    except ModelFileError:
        raise
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an object)")
    data_start, data_size = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise ModelFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = OrderedDict()
    for key, entry in header.items():
        entries[key] = _check_entry(path, key, entry, data_size)
    spans = sorted((b, e, k) for k, (_, b, e) in entries.items() if e > b)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFileError(f"{path}: corrupt safetensors header (tensors {k0!r} [{b0}, {e0}) and {k1!r} "
                                 f"[{b1}, {e1}) overlap)")
    return entries, data_start, metadata or {}


def _check_entry(path, key, entry, data_size):
    where = f"{path}: corrupt safetensors header: tensor {key!r}"
    if not isinstance(entry, dict):
        raise ModelFileError(f"{where} is a JSON {type(entry).__name__}, expected an object")
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ModelFileError(f"{where} has dtype {entry.get('dtype')!r}, not one of {sorted(DTYPES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise ModelFileError(f"{where} has shape {shape!r}, expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ModelFileError(f"{where} has data_offsets {offsets!r}, expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelFileError(f"{where} has data_offsets [{begin}, {end}], expected 0 <= begin <= end")
    if end > data_size:
        raise ModelFileError(f"{path}: truncated safetensors file (or a corrupt header): tensor {key!r} has "
                             f"data_offsets [{begin}, {end}], past the end of the data ({data_size} bytes)")
    nbytes = tensor_nbytes(shape, dtype)
    if end - begin != nbytes:
        raise ModelFileError(f"{where} takes {end - begin} bytes but its shape {shape} of {entry['dtype']} needs "
                             f"{nbytes}")
    return TensorInfo(torch.Size(shape), dtype, nbytes), begin, end


class SafetensorsFile:
    """A lazy read-only mapping key -> tensor over one validated safetensors file.

    key_info(key) answers from the header; self[key] is a view of the file's private memory map (copied only
    when the file places it at an address not aligned to its element size); release(keys) drops the pages of
    those keys from this process (they are read again from the file if used again)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._entries, self._data_start, self.metadata = read_header(self.path)
        self._map = None
        self.bytes_read = 0

    # mapping
    def keys(self):
        return self._entries.keys()

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def key_info(self, key) -> TensorInfo:
        return self._entries[key][0]

    def aliases(self):
        """A safetensors file cannot hold one tensor under two names (their offsets would overlap)."""
        return {}

    def _mm(self):
        if self._map is None:
            try:
                with open(self.path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    expected = self._data_start + max((e for _, _, e in self._entries.values()), default=0)
                    if size < expected:
                        raise ModelFileError(f"{self.path}: the file shrank to {size} bytes since it was checked "
                                             f"({expected} needed)")
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
            except OSError as e:
                raise ModelFileError(f"{self.path}: cannot map ({e.strerror or e})") from None
        return self._map

    def __getitem__(self, key):
        info, begin, end = self._entries[key]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        offset = self._data_start + begin
        flat = torch.frombuffer(self._mm(), dtype=info.dtype, count=(end - begin) // info.dtype.itemsize,
                                offset=offset)
        if offset % info.dtype.itemsize:
            flat = flat.clone()  # misaligned in the file: an aligned copy
        self.bytes_read += info.nbytes
        return flat.reshape(info.shape)

    def release(self, keys):
        """Drop the mapped pages of `keys` from this process (madvise DONTNEED on the private clean pages)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            _, begin, end = self._entries[key]
            if end <= begin:
                continue
            start = (self._data_start + begin) // page * page
            stop = min(len(self._map), -(-(self._data_start + end) // page) * page)
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self):
        if self._map is not None and not isinstance(self._map, bytes):
            try:
                self._map.close()
            except BufferError:
                pass  # a tensor still views it: the map goes when the last one does
        self._map = None

    def __repr__(self):
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"
