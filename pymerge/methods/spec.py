"""What a merging method is: a small declarative spec, named, typed, documented parameters (Param, see
pymerge/methods/params.py) plus how it runs. Two kinds, both registered in pymerge.methods:
  - MethodSpec (kind "static"): one function that merges a group of same-shape keys (the mergekit
    MergeMethodSpec / BatchedMergeMethod idea), run by pymerge.merge;
  - LearnedMethodSpec (kind "learned"): DivMerge, AdaMerging; their options only, the method being its own
    function (pymerge.divmerge, pymerge.adamerging) since it needs models and data.
The CLI, the docs and the adapters all read the same specs.

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
   output dtype (group.out_dtype; a method whose result is one rounding of an fp32 accumulation, like the
   fused weighted sums of task arithmetic and weight averaging, may return it in group.out_dtype directly and
   save the cast's extra pass: the values are the same). merge_group must not modify its inputs and must not depend on which other keys share its
   group except through batching (results may differ by floating-point rounding only; randomized methods
   derive their randomness from the seed and the key names, see ``key_seed``).
"""
import zlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from .params import Param, check_value, describe_params, reject_unknown


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
    # The dtype pymerge.merge casts the results to (None: the inputs' dtype). A method may return its results in
    # it when that is the same as computing in compute_dtype and casting (one rounding of an fp32 result).
    out_dtype: Optional[torch.dtype] = None

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

    @property
    def result_dtype(self):
        """The dtype the merged tensors end in: out_dtype, else the inputs' dtype."""
        return self.out_dtype or self.dtype

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

    kind: ClassVar[str] = "static"

    def resolve_params(self, given: dict, num_models: int) -> dict:
        """Defaults filled in, names and values checked; per-model values expanded to lists of length T."""
        reject_unknown(self.name, given, self.params, "parameter")
        out = {}
        for p in self.params:
            value = given.get(p.name, p.default)
            if p.per_model:
                if isinstance(value, torch.Tensor):
                    value = value.tolist()
                values = list(value) if isinstance(value, (list, tuple)) else [value] * num_models
                if len(values) != num_models:
                    raise ValueError(f"{self.name}: {p.name} has {len(values)} values for {num_models} models")
                for v in values:
                    check_value(self.name, p, v)
                out[p.name] = values
            else:
                check_value(self.name, p, value)
                out[p.name] = value
        return out

    def describe(self) -> str:
        return "\n".join([f"{self.name}: {self.description}", *describe_params(self.params)])


@dataclass(frozen=True)
class LearnedMethodSpec:
    """A learned merging method (DivMerge, AdaMerging): merge coefficients trained on the fine-tuned models and
    unlabelled data of each task, run by its own function (``run``, e.g. "pymerge.divmerge") and command
    (``pymerge <name>``), never by pymerge.merge, which has neither models nor data.

    params: its options, declared with the same Param as a static method's; the function reads defaults and
    checks from them (resolve_params), the command line generates its flags from them, describe() lists them.
    model_kinds: the model kinds it merges (divmerge's kind=); a Param with model_kinds applies to those only.
    """
    name: str
    description: str
    run: str
    params: Sequence[Param] = field(default_factory=tuple)
    model_kinds: Tuple[str, ...] = ("classification",)

    kind: ClassVar[str] = "learned"

    def param(self, name) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no option {name!r}")

    def params_for(self, model_kind) -> List[Param]:
        """The options that apply to `model_kind` (None: all of them)."""
        return [p for p in self.params if p.applies_to(model_kind)]

    def owner(self, model_kind=None) -> str:
        """How errors name the method: "divmerge (causal-lm)" where the options depend on the model kind."""
        return f"{self.name} ({model_kind})" if model_kind is not None and len(self.model_kinds) > 1 else self.name

    def check_values(self, given: dict, model_kind=None):
        """ValueError naming the first unknown option or bad value of `given` (no defaults filled in)."""
        params = self.params_for(model_kind)
        reject_unknown(self.owner(model_kind), given, params, "option")
        for p in params:
            if p.name in given:
                check_value(self.owner(model_kind), p, given[p.name])

    def resolve_params(self, given: dict, model_kind=None) -> dict:
        """{name: value} of every option that applies to `model_kind`: `given` over the defaults, checked."""
        self.check_values(given, model_kind)
        return {p.name: given.get(p.name, p.default) for p in self.params_for(model_kind)}

    def describe(self) -> str:
        return "\n".join([f"{self.name}: {self.description}", *describe_params(self.params)])
