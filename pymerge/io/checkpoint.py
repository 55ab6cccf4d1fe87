"""A PyTorch checkpoint (.bin / .pt, torch.save's zip format) read as a lazy mapping.

Only ``torch.load(weights_only=True, mmap=True)`` is used: the restricted unpickler refuses any pickle that
would build an arbitrary object or call a function (a checkpoint is untrusted code otherwise), and the
tensors' storages are memory-mapped from the file, so only the pickle (the key names and metadata) is read
when the file is opened. The checkpoint must hold a flat {str: Tensor} state dict (or {"state_dict": ...}).
Tensors saved sharing one storage at the same offset, shape and strides (tied weights such as an LM head
tied to the embeddings) are reported by aliases() so that they are merged and written once.
"""
import os
import pickle
import zipfile
from collections import OrderedDict

import torch

from .errors import ModelFileError
from .tensor_info import TensorInfo


def _load(path):
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a torch.save zip checkpoint (a legacy or corrupt file cannot be "
                             f"memory-mapped safely); re-save it with a current torch or convert it to safetensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: refused: the checkpoint holds more than tensors (torch.load weights_only=True "
                             f"rejected it: {first}); pymerge never runs a checkpoint's pickle code") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first})") from None


class TorchCheckpoint:
    """A lazy read-only mapping key -> tensor over one .bin / .pt checkpoint (see the module doc)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        obj = _load(self.path)
        if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelFileError(f"{self.path}: holds a {type(obj).__name__}, expected a state dict "
                                 f"{{name: tensor}}")
        self._tensors = OrderedDict()
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise ModelFileError(f"{self.path}: entry {key!r} is a {type(value).__name__}, expected a "
                                     f"str -> torch.Tensor state dict")
            if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
                raise ModelFileError(f"{self.path}: tensor {key!r} is not a plain dense CPU tensor "
                                     f"({value.layout}, {value.device})")
            self._tensors[key] = value
        self.bytes_read = 0

    def keys(self):
        return self._tensors.keys()

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __contains__(self, key):
        return key in self._tensors

    def key_info(self, key) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(t.shape, t.dtype, t.numel() * t.element_size())

    def __getitem__(self, key):
        t = self._tensors[key]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def aliases(self):
        """{key: the first key holding the very same tensor} for tensors stored once under several names."""
        first, out = {}, {}
        for key, t in self._tensors.items():
            if t.numel() == 0:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in first:
                out[key] = first[ident]
            else:
                first[ident] = key
        return out

    def release(self, keys):
        """Nothing to do: torch owns these maps (the pages are clean and file-backed)."""

    def close(self):
        self._tensors.clear()

    def __repr__(self):
        return f"TorchCheckpoint({self.path!r}, {len(self)} tensors)"
