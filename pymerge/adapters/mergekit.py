"""pymerge's static methods inside mergekit 0.1.5: `merge_method: pymerge_cart` in a `mergekit-yaml` config runs
pymerge's CART through mergekit's own planner, lazy loader and writer (docs/ADAPTERS.md §mergekit).

    import pymerge.adapters.mergekit as pm
    pm.register()              # adds pymerge_cart, pymerge_tsv_m, ... to mergekit.merge_methods' registry
    # then mergekit-yaml's code, mergekit.merge_methods.merge_state_dicts / merge_tensors, or
    # `pymerge-mergekit-yaml config.yml out/` (main(): register, then mergekit-yaml's own command)

mergekit 0.1.5 looks methods up by name in one dict (mergekit.merge_methods.registry, filled at import) and has no
plugin discovery (no entry points), so a method exists only in a process that called register(); main() is
mergekit-yaml with pymerge's methods registered first.

Why each piece is the way it is:
- One mergekit MergeMethod per pymerge MethodSpec, its parameters generated from the spec's Params: the same names
  and defaults; per-model Params (weights, density, p) are mergekit NON_BASE parameters (one value per fine-tuned
  model, none for the base), the others SHARED. Every value is checked by the Param itself when mergekit
  resolves it (planning time: before any tensor is read), with pymerge's message.
- mergekit hands a method one TensorGroup per output weight (base + the T models' tensors, named by the weight).
  Each is merged by pymerge.merge itself on {name: tensor} dicts, so a key gets what pymerge.merge on the whole
  state dicts gives it: the key name seeds the randomized methods (key_seed), the models keep their config
  order (models[t], DARE's per-task seeds), fp32 math (fp64 for fp64) returned in the input dtype, pymerge's
  checks (NaN/Inf, shapes). A key's result never depends on the keys merged with it (docs/ARCHITECTURE.md),
  which is what makes the per-tensor call exact.
- What needs the whole model is decided per key instead: the spec's prepare step (CART's low-rank keys, TSV-M /
  Iso's matrix keys) is replaced by the same selection rule applied to the key's name and shape; a pattern that
  selects no key of the model cannot be detected from one key, so that error is lost on mergekit's per-tensor
  path. Called on a whole model at once (merge_state_dicts: every group with the same parameters), the real
  pymerge.merge runs over all of them, whole-model checks and same-shape batching included.
"""
import re
from dataclasses import replace
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..merge import DEFAULT_MAX_GROUP_BYTES, merge
from ..methods import cart, get, tsv_m
from ..methods.params import Param, check_value
from ..methods.spec import KeyInfo, MethodSpec

# The pymerge methods offered to mergekit, as `pymerge_<name>`.
METHODS = ("cart", "tsv_m", "iso_c", "iso_cts", "ties", "task_arithmetic", "dare_ties")
PREFIX = "pymerge_"
# Methods whose prepare() selects the matrix keys (tsv_m.prepare_matrix_keys): 2-D keys minus exclude_keys.
MATRIX_KEY_METHODS = ("tsv_m", "iso_c", "iso_cts")
# mergekit's names for task-vector parameters (its generalized task arithmetic). A pymerge method that has no
# parameter of that name refuses it (mergekit_name_hint says what to write instead): mergekit itself ignores a
# parameter its method does not declare, so `weight: 0.5` would otherwise merge with pymerge's default weights.
MERGEKIT_NAMES = ("weight", "lambda", "density", "normalize", "rescale", "int8_mask")
# Text that means None for a Param that accepts None (a YAML null is not a mergekit parameter value).
NONE_TEXT = ("none", "null")


def mergekit_name(method: str) -> str:
    """The name a mergekit config uses for pymerge's `method`: pymerge_<method>."""
    return PREFIX + method


class _ExplicitNone:
    """A parameter explicitly set to None in a mergekit config (`seed: none`). mergekit's resolver takes a None
    value for "not set here" and falls back to the default, so None travels as this marker until the merge."""

    def __repr__(self):
        return "None"

    def __reduce__(self):
        return "EXPLICIT_NONE"


EXPLICIT_NONE = _ExplicitNone()


def _plain(value):
    return None if value is EXPLICIT_NONE else value


def _is_number_text(p: Param, value) -> bool:
    return isinstance(value, str) and p.type in (int, float) and value.strip().lower() not in NONE_TEXT


def param_value(owner: str, p: Param, value):
    """One value of Param p as mergekit gives it (YAML scalars, a per-layer gradient's interpolation, or a
    Python value), converted the way pymerge's own config reader converts text, then checked by the Param.

    ValueError "{owner}: {name} = {value}: {what is wrong}" for a bad value. Text: "none" / "null" is None where
    the Param accepts None; numbers written as text (YAML reads `1e-3` as a string) are parsed for int / float
    Params; a tuple Param (exclude_keys) written as one string is one regex (join alternatives with `|`: a YAML
    list is mergekit's per-layer gradient, not a list)."""
    none_text = isinstance(value, str) and value.strip().lower() in NONE_TEXT and (p.default is None or p.optional)
    if value is EXPLICIT_NONE or none_text:
        check_value(owner, p, None)
        return EXPLICIT_NONE if p.default is not None else None
    if _is_number_text(p, value):
        try:
            value = p.type(value.strip()) if p.type is int else float(value)
        except ValueError:
            raise ValueError(f"{owner}: {p.name} = {value!r}: expected {'an int' if p.type is int else 'a number'}"
                             ) from None
    if p.type is tuple and isinstance(value, str):
        value = (value,)
    elif p.type is tuple and isinstance(value, list):
        value = tuple(value)
    check_value(owner, p, value)
    if p.name == "low_rank_keys" and isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{owner}: low_rank_keys = {value!r}: an empty list; pass None for the default selection")
    for pattern in _regexes(p, value):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{owner}: {p.name} = {value!r}: {pattern!r} is not a valid regex ({e})") from None
    return value


def _regexes(p: Param, value) -> List[str]:
    """The regexes a key-selection value holds (exclude_keys, low_rank_keys), to be compiled at planning time."""
    if p.name == "exclude_keys" and isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    if p.name == "low_rank_keys" and value is not None and not callable(value):
        values = [value] if isinstance(value, str) else list(value)
        return [v for v in values if isinstance(v, str) and v not in cart.PRESETS]
    return []


def mergekit_name_hint(spec: MethodSpec, name: str) -> str:
    """What to write in place of mergekit's parameter `name` for pymerge's `spec`."""
    own = {p.name for p in spec.params}
    if name == "weight" and "weights" in own:
        return "pymerge's per-model weight is `weights`"
    if name == "lambda" and own & {"lam", "alpha"}:
        return f"pymerge's scaling is `{'lam' if 'lam' in own else 'alpha'}`"
    if name == "density" and "p" in own:
        return "pymerge's DARE takes the drop probability `p` = 1 - density"
    if name == "normalize" and "weights" in own and spec.name != "task_arithmetic":
        return "pymerge's sign election always takes the weighted disjoint mean (mergekit's normalize: true)"
    if name == "rescale" and "p" in own:
        return "pymerge's DARE always rescales the kept entries by 1 / (1 - p)"
    return f"{mergekit_name(spec.name)} has no such setting; its parameters: {sorted(own)}"


def _named(function, name):
    """function under `name`: pydantic titles a failed validation with the validator's name."""
    function.__name__ = function.__qualname__ = name
    return function


def _param_validator(owner: str, p: Param):
    return _named(lambda value: param_value(owner, p, value), f"{owner}.{p.name}")


def _mergekit_name_validator(spec: MethodSpec, name: str):
    owner = mergekit_name(spec.name)

    def check(value):
        if value is not None:
            raise ValueError(f"{owner}: `{name}` is a parameter of mergekit's task-arithmetic methods, not of "
                             f"{owner}; {mergekit_name_hint(spec, name)}")
        return None
    return _named(check, f"{owner}.{name}")


# ------------------------------------------------------------------------------------------- per-key rules
def _every_key(key):
    return True


def _cart_prepare_per_key(params: dict, keys: Dict[str, KeyInfo]) -> dict:
    chosen = {k: info for k, info in keys.items()
              if cart.selects(k, info.shape, params["low_rank_keys"], params["exclude_keys"])}
    if not chosen:
        return {**params, "_selected": frozenset()}
    # CART's own prepare on the chosen keys: rank options exclusive, tol's companions, rank < min(m, n).
    done = cart.prepare({**params, "low_rank_keys": _every_key, "exclude_keys": ()}, chosen)
    return {**params, "_selected": done["_selected"]}


def _matrix_prepare_per_key(params: dict, keys: Dict[str, KeyInfo]) -> dict:
    return {**params, "_matrix": frozenset(k for k, info in keys.items()
                                           if tsv_m.is_matrix_key(k, info.shape, params["exclude_keys"]))}


def per_key_spec(spec: MethodSpec) -> MethodSpec:
    """`spec` with its whole-model prepare step replaced by the same decision taken key by key, so that
    pymerge.merge on one key gives that key's result of the whole-model merge."""
    if spec.prepare is None:
        return spec
    if spec.name == "cart":
        return replace(spec, prepare=_cart_prepare_per_key)
    if spec.name in MATRIX_KEY_METHODS:
        return replace(spec, prepare=_matrix_prepare_per_key)
    raise ValueError(f"pymerge.adapters.mergekit: no per-key rule for {spec.name}'s prepare step")


# --------------------------------------------------------------------------------------- the lazy inputs
class _Inputs:
    """{key: tensor} of one input (the base or models[t]) over several groups, converted to the group's input
    dtype only when pymerge.merge reads the key (so a whole-model call holds converted copies of one key group
    at a time); key_info answers shapes and dtypes without converting."""

    def __init__(self):
        self._tensors, self._dtypes = {}, {}

    def add(self, key, tensor, dtype):
        self._tensors[key], self._dtypes[key] = tensor, dtype

    def keys(self):
        return self._tensors.keys()

    def __contains__(self, key):
        return key in self._tensors

    def __getitem__(self, key):
        return self._tensors[key].to(dtype=self._dtypes[key])

    def key_info(self, key) -> KeyInfo:
        return KeyInfo(self._tensors[key].shape, self._dtypes[key])


class _Batch:
    """Groups merged by one pymerge.merge call: the same fine-tuned inputs (ids, in order) and parameters."""

    def __init__(self, ids, params):
        self.ids, self.params, self.indices, self.names = ids, params, [], set()
        self.base, self.models = _Inputs(), [_Inputs() for _ in ids]


# ---------------------------------------------------------------------------------------- the MergeMethod
@lru_cache(maxsize=None)
def _method_class():
    """The MergeMethod subclass, built on first use so that importing this module never needs mergekit."""
    from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup
    from mergekit.merge_methods.dtype import promoted_dtype

    class PymergeMergeMethod(GroupMergeMethod):
        """pymerge's MethodSpec `pymerge_spec` as a mergekit merge method (module doc)."""

        def __init__(self, spec: MethodSpec):
            self.pymerge_spec = spec
            self.per_key = per_key_spec(spec)
            self.spec = mergekit_spec(spec)

        def __repr__(self):
            return f"<mergekit method {self.spec.name}: pymerge {self.pymerge_spec.name}>"

        # mergekit's public call (merge_state_dicts, merge_tensors, a registry.get(name)(groups, ...) caller). Several
        # groups are a whole model: pymerge's whole-model checks apply to them. A single group is one weight
        # (merge_tensors), merged by the per-key rule as mergekit-yaml merges it.
        def __call__(self, groups, /, *, parameters=None, dtype=None, out_dtype=None, batch_options=None):
            groups = tuple(groups)
            if not all(isinstance(group, TensorGroup) for group in groups):
                raise TypeError("Merge inputs must be a sequence of TensorGroup values")
            bound = self._bind_parameters(groups, parameters or {})
            return self._execute_resolved(groups, bound, dtype=dtype, out_dtype=out_dtype,
                                          batch_options=batch_options, whole_model=len(groups) > 1)

        # mergekit's graph (mergekit-yaml) calls this with one group per output weight.
        def _execute_resolved(self, groups, parameters, *, dtype=None, out_dtype=None, batch_options=None,
                              whole_model=False):
            for name, value in (("dtype", dtype), ("out_dtype", out_dtype)):
                if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
                    raise ValueError(f"{name} must be a floating-point torch.dtype")
            input_dtypes = [(dtype or promoted_dtype(group)) if group.entries else dtype for group in groups]
            max_bytes = batch_options.max_bytes if batch_options is not None else DEFAULT_MAX_GROUP_BYTES
            return self._merge(groups, parameters, input_dtypes, out_dtype, max_bytes, whole_model)

        def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
            return self._merge(groups, parameters, input_dtypes, out_dtype, options.max_bytes, False)

        def merge_group(self, group, /, **parameters):
            (out,) = self._merge((group,), [parameters], [promoted_dtype(group)], None, DEFAULT_MAX_GROUP_BYTES,
                                 False)
            return out

        def pymerge_params(self, bound: dict, non_base) -> dict:
            """pymerge.merge's keyword arguments from one group's bound mergekit parameters: per-model values as
            lists in the fine-tuned inputs' order (models[t])."""
            out = {}
            for p in self.pymerge_spec.params:
                value = bound[p.name]
                out[p.name] = ([_plain(v) for v in value.values_for(non_base)] if p.per_model else _plain(value))
            return out

        def _merge(self, groups, parameters, input_dtypes, out_dtype, max_bytes, whole_model):
            owner = self.spec.name
            batches: List[_Batch] = []
            for index, (group, bound) in enumerate(zip(groups, parameters)):
                name = group.metadata.name
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{owner}: tensor group {index} has no name; pymerge's methods need each "
                                     f"weight's key name (TensorGroup.from_tensors(..., name=KEY)): it seeds the "
                                     f"randomized methods and decides which keys are merged as matrices")
                if group.base is None:
                    raise ValueError(f"{owner}: {name!r} has no base input; pymerge's methods merge task vectors "
                                     f"theta_t - theta_0 (set base_model)")
                non_base = group.non_base
                if not non_base:
                    raise ValueError(f"{owner}: {name!r} has only the base input; nothing to merge")
                ids = tuple(entry.id for entry in non_base)
                params = self.pymerge_params(bound, non_base)
                batch = next((b for b in batches if b.ids == ids and b.params == params and name not in b.names),
                             None)
                if batch is None:
                    batch = _Batch(ids, params)
                    batches.append(batch)
                batch.indices.append(index)
                batch.names.add(name)
                batch.base.add(name, group.base.tensor, input_dtypes[index])
                for inputs, entry in zip(batch.models, non_base):
                    inputs.add(name, entry.tensor, input_dtypes[index])
            # The real spec (whole-model prepare, pymerge's checks and batching) where the call is one pymerge
            # merge of a whole model; the per-key rule where mergekit merges weight by weight.
            spec = self.pymerge_spec if whole_model and len(batches) == 1 else self.per_key
            results: List[Optional[torch.Tensor]] = [None] * len(groups)
            for batch in batches:
                merged = merge(spec, batch.base, batch.models, out_dtype=out_dtype, max_group_bytes=max_bytes,
                               **batch.params)
                for index in batch.indices:
                    results[index] = merged[groups[index].metadata.name]
            return tuple(results)

    return PymergeMergeMethod


def mergekit_spec(spec: MethodSpec):
    """mergekit's MergeMethodSpec of pymerge's `spec`: one ParameterSpec per Param (same name and default;
    per-model Params are NON_BASE, the others SHARED), values checked by the Param (param_value), and mergekit's
    task-arithmetic names the method does not have refused (MERGEKIT_NAMES)."""
    from mergekit.merge_methods.base import (BasePolicy, InputContract, MergeMethodSpec, OptionalTensorPolicy,
                                             ParameterScope, ParameterSpec)
    from pydantic import AfterValidator
    from typing_extensions import Annotated

    owner = mergekit_name(spec.name)
    parameters = [ParameterSpec(name=p.name, value_type=Annotated[Any, AfterValidator(_param_validator(owner, p))],
                                default=p.default, description=p.help,
                                scope=ParameterScope.NON_BASE if p.per_model else ParameterScope.SHARED)
                  for p in spec.params]
    own = {p.name for p in spec.params}
    parameters += [ParameterSpec(name=name, value_type=Annotated[Any, AfterValidator(_mergekit_name_validator(spec,
                                                                                                            name))],
                                 default=None, scope=ParameterScope.NON_BASE,
                                 description=f"refused: {mergekit_name_hint(spec, name)}")
                   for name in MERGEKIT_NAMES if name not in own]
    return MergeMethodSpec(
        name=owner,
        pretty_name=f"pymerge {spec.name}",
        parameters=tuple(parameters),
        # A base and at least one fine-tuned model per weight; an optional weight only the base holds (e.g. a
        # buffer the fine-tunes dropped) is kept as the base's.
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
    )


@lru_cache(maxsize=None)
def mergekit_method(name: str):
    """The mergekit MergeMethod running pymerge's `name` (one of METHODS), not registered (see register())."""
    if name not in METHODS:
        raise ValueError(f"pymerge.adapters.mergekit: {name!r} is not offered to mergekit; offered: {list(METHODS)}")
    return _method_class()(get(name))


def register() -> List[str]:
    """Add pymerge_<name> for every name of METHODS to mergekit's merge-method registry (what mergekit-yaml,
    mergekit.merge_methods.get, merge_state_dicts and merge_tensors look names up in). Idempotent: a name already
    holding a pymerge method is left as it is. ValueError when one of the names holds another method.
    Returns the registered names."""
    from mergekit.merge_methods import registry

    names = []
    for name in METHODS:
        ours = mergekit_method(name)
        try:
            existing = registry.get(ours.spec.name)
        except RuntimeError:
            registry.register(ours)
        else:
            if getattr(existing, "pymerge_spec", None) is None:
                raise ValueError(f"register: mergekit already has a method named {ours.spec.name!r} that is not "
                                 f"pymerge's ({existing!r}); pymerge's methods were not all registered")
        names.append(ours.spec.name)
    return names


def main(args: Optional[Sequence[str]] = None, standalone_mode: bool = True):
    """`pymerge-mergekit-yaml CONFIG OUT [mergekit-yaml options]`: mergekit-yaml with pymerge's methods
    registered first (mergekit has no plugin discovery). Same arguments and options as mergekit-yaml."""
    register()
    from mergekit.scripts.run_yaml import main as run_yaml
    return run_yaml.main(args=None if args is None else [str(a) for a in args], prog_name="pymerge-mergekit-yaml",
                         standalone_mode=standalone_mode)


if __name__ == "__main__":
    main()
