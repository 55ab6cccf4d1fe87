"""What a merging method is: a small declarative spec (named, typed, documented parameters) plus one
function that merges a group of same-shape keys (the mergekit MergeMethodSpec / BatchedMergeMethod idea).

The CLI, the docs and the adapters all read the same MethodSpec.

Contract between pymerge.merge and a method (pymerge/methods/<name>.py defines SPEC = MethodSpec(...)):

1. merge() resolves the user's parameters once: ``params = spec.resolve_params(given, T)`` (defaults filled
   in, values checked, per-model values expanded to lists of length T).
2. If the spec has ``prepare``, merge() calls ``params = spec.prepare(params, keys)`` once, where ``keys`` is
   ``{name: KeyInfo(shape, dtype)}`` of every float key in the base's order. It returns the params dict
   (possibly with derived entries, e.g. the set of keys selected for low rank) and raises ValueError for
   problems that need the whole model (a key pattern matching nothing, a rank too large for a key).
3. For each KeyGroup (keys of one shape and dtype, at most a bounded number of bytes), merge() calls
   ``spec.merge_group(group, **params)`` under torch.no_grad(), with inputs it has checked to be finite (unless
   the spec sets ``nonfinite_propagates`` or the caller passed check_finite=False); merge_group returns one
   merged tensor per key of the group, in float32 (float64 for float64 inputs); merge() casts them to the
   output dtype. merge_group must not modify its inputs and must not depend on which other keys share its
   group except through batching (results may differ by floating-point rounding only; randomized methods
   derive their randomness from the seed and the key names, see ``key_seed``).
"""
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..ops.backend import BACKENDS


@dataclass(frozen=True)
class Param:
    """One method parameter. per_model: accepts a scalar or a list of T values (one per fine-tuned model)."""
    name: str
    default: Any
    help: str
    type: type = float
    per_model: bool = False
    choices: Optional[Sequence[Any]] = None
    # Returns an error message for a bad value (one value; each element for per_model lists), or None.
    check: Optional[Callable[[Any], Optional[str]]] = None


# The op backend a method passes to pymerge.ops ("auto" = the fastest available for the tensors' device).
BACKEND_PARAM = Param("backend", "auto", "pymerge.ops backend for the heavy math", type=str, choices=BACKENDS)


@dataclass(frozen=True)
class KeyInfo:
    """Shape and dtype of one key, known before its tensors are read (what prepare() sees)."""
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class KeyGroup:
    """Keys of one shape and dtype, merged together so batched kernels see them at once.

    keys[i] names base[i] (theta_0, [*S]) and models[i] (the T fine-tuned tensors theta_1..theta_T of that key).
    All tensors of a group share shape, dtype (fp16/bf16/fp32/fp64) and device; they are the caller's
    tensors (never modify them in place).
    """
    keys: List[str]
    base: List[torch.Tensor]
    models: List[List[torch.Tensor]]

    @property
    def num_models(self):
        return len(self.models[0])

    @property
    def shape(self):
        return self.base[0].shape

    @property
    def dtype(self):
        return self.base[0].dtype

    @property
    def device(self):
        return self.base[0].device

    @property
    def compute_dtype(self):
        """float64 for float64 inputs, else float32: the dtype merge_group returns."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def __len__(self):
        return len(self.keys)


def key_seed(seed: Optional[int], key: str, salt: int = 0) -> int:
    """A 63-bit seed for one key derived from the user's seed and the key name, so that a randomized method
    gives the same result for a key whatever group it was batched in. seed None -> a fresh random seed."""
    if seed is None:
        return int(torch.seed()) & ((1 << 63) - 1)
    mixed = zlib.crc32(f"{int(seed)}\0{key}\0{int(salt)}".encode())
    return (int(seed) * 0x9E3779B97F4A7C15 + mixed) & ((1 << 63) - 1)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merging method. merge_group(group: KeyGroup, **params) -> list of merged tensors, one
    per key of the group, computed in fp32 (fp64 for fp64 inputs); pymerge.merge casts them to the output dtype.
    prepare(params, keys: {name: KeyInfo}) -> params: optional whole-model check/planning step (see module doc).
    nonfinite_propagates: a promise that a NaN/Inf entry of any input the method reads makes the merged key
    non-finite, for every parameter value (a linear combination of FMAs that skips no term: 0 * NaN = NaN).
    pymerge.merge then checks only the T + 1 times smaller output for finiteness, and the inputs when that
    fails; otherwise it checks the inputs before merge_group. tests/test_merge_fuzz.py holds every method to it.
    """
    name: str
    description: str
    merge_group: Callable[..., List[torch.Tensor]]
    params: Sequence[Param] = field(default_factory=tuple)
    prepare: Optional[Callable[[dict, Dict[str, KeyInfo]], dict]] = None
    nonfinite_propagates: bool = False

    def resolve_params(self, given: dict, num_models: int) -> dict:
        """Defaults filled in, names and values checked; per-model values expanded to lists of length T."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; known: {sorted(known)}")
        out = {}
        for name, p in known.items():
            value = given.get(name, p.default)
            if p.per_model:
                if isinstance(value, torch.Tensor):
                    value = value.tolist()
                values = list(value) if isinstance(value, (list, tuple)) else [value] * num_models
                if len(values) != num_models:
                    raise ValueError(f"{self.name}: {name} has {len(values)} values for {num_models} models")
                for v in values:
                    self._check_value(p, v)
                out[name] = values
            else:
                self._check_value(p, value)
                out[name] = value
        return out

    def _check_value(self, p: Param, value):
        if p.choices is not None and value not in p.choices:
            raise ValueError(f"{self.name}: {p.name} = {value!r}; expected one of {list(p.choices)}")
        if value is None:
            # None means something only for a parameter whose default is None, and for a seed (key_seed(None)
            # draws fresh randomness); anywhere else it would reach the method's arithmetic.
            if p.default is None or p.name == "seed":
                return
            raise ValueError(f"{self.name}: {p.name} = None; pass a value (default {p.default!r})")
        if p.check is not None:
            msg = p.check(value)
            if msg:
                raise ValueError(f"{self.name}: {p.name} = {value!r}: {msg}")

    def describe(self) -> str:
        lines = [f"{self.name}: {self.description}"]
        for p in self.params:
            per = " (scalar or one per model)" if p.per_model else ""
            lines.append(f"  {p.name} = {p.default!r}{per}: {p.help}")
        return "\n".join(lines)
