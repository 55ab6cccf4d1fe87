"""What a merging method is: a small declarative spec (named, typed, documented parameters) plus one
function that merges a group of same-shape keys (the mergekit MergeMethodSpec / BatchedMergeMethod idea).

The CLI, the docs and the adapters all read the same MethodSpec.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch


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


@dataclass
class KeyGroup:
    """Keys of one shape and dtype, merged together so batched kernels see them at once.

    keys[i] names base[i] (theta_0, [*S]) and models[i] (the T fine-tuned tensors theta_1..theta_T of that key).
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


@dataclass(frozen=True)
class MethodSpec:
    """A registered merging method. merge_group(group: KeyGroup, **params) -> list of merged tensors, one
    per key of the group, computed in fp32 (fp64 for fp64 inputs); pymerge.merge casts them to the output dtype.
    """
    name: str
    description: str
    merge_group: Callable[..., List[torch.Tensor]]
    params: Sequence[Param] = field(default_factory=tuple)

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
        if p.check is not None and value is not None:
            msg = p.check(value)
            if msg:
                raise ValueError(f"{self.name}: {p.name} = {value!r}: {msg}")

    def describe(self) -> str:
        lines = [f"{self.name}: {self.description}"]
        for p in self.params:
            per = " (scalar or one per model)" if p.per_model else ""
            lines.append(f"  {p.name} = {p.default!r}{per}: {p.help}")
        return "\n".join(lines)
