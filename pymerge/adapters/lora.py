"""Merging LoRA adapters of one base model with any pymerge method: materialise, merge, optionally re-factor.

Two adapters cannot be merged factor by factor (B_1 A_1 + B_2 A_2 != (B_1 + B_2)(A_1 + A_2); pymerge.merge refuses
lora_A / lora_B keys), so each adapter t becomes the full fine-tuned weights of the modules it targets,

    theta_t = theta_0 + Delta W_t,   Delta W_t = scaling_t * B_t A_t      (peft's get_delta_weight)

(transposed for embeddings and fan_in_fan_out layers, scaling_t = lora_alpha / r, or / sqrt(r) with use_rslora,
per module through rank_pattern / alpha_pattern), and `pymerge.merge(method, theta_0, [theta_1..theta_T])` merges
those keys (default CART). The models are lazy mappings: Delta W_t of a key is formed when pymerge.merge reads
its key group and dropped after it, so the T materialised models never exist at once. Keys no adapter touches
are the base's own tensors (every method gives theta_0 there: all T models equal it).

output="dense": the base's state dict with the merged weights (in the base's dtype). output="lora": one LoRA of
rank lora_rank per targeted module, factored from the merged delta D = theta_merged - theta_0 (in fp32):
D ~ U_r S_r V_r^T (pymerge.ops.randomized_svd; the exact SVD where the sketch would span min(m, n) or
lora_svd="exact"), lora_B = U_r sqrt(S_r), lora_A = sqrt(S_r) V_r^T, with lora_alpha = r so that peft's scaling
is 1. Its error is ||D - B A||_2 >= s_(r+1)(D), equal to it for the exact truncation (and for the randomized
SVD when l = r + oversample reaches the rank of D). lora_rank None = the largest sum over the adapters of their
ranks at a module, sum_t r_t: task arithmetic, weight averaging and CART build D from the Delta W_t and their
truncated SVDs, so every column of D lies in span(B_1..B_T) and every row in span(A_1..A_T), rank(D) <= sum_t r_t,
and the LoRA is exact up to rounding (TSV-M too, as long as its per-task singular vectors are independent).
Elementwise methods (TIES, DARE, magnitude trims) and spectrum-flattening ones (Iso-C / Iso-CTS) can make D full
rank: any r is then lossy, as LoraAdapter.errors reports.

The re-factored adapter loads into peft as (key naming of `peft.get_peft_model_state_dict`, the format of
adapter_model.safetensors):

    base_model.model.<module>.lora_A.weight       [r, in]     Linear / Conv1D
    base_model.model.<module>.lora_B.weight       [out, r]
    base_model.model.<module>.lora_embedding_A    [r, num_embeddings]     Embedding
    base_model.model.<module>.lora_embedding_B    [embedding_dim, r]

    model = peft.get_peft_model(base_model, adapter.lora_config())   # r = lora_alpha = lora_rank, full module names
    peft.set_peft_model_state_dict(model, adapter.state_dict)

Supported: peft's plain LoRA on nn.Linear, transformers' Conv1D (fan_in_fan_out) and nn.Embedding. Refused with a
ValueError naming the adapter and key: DoRA, LoRA biases, conv LoRA, modules_to_save / trainable tokens and other
variants whose update is not scaling * B A, adapters targeting different modules, factors whose shapes do not fit
the base weight or each other, a config whose r disagrees with the factors.
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..dtypes import FLOAT_DTYPES, accumulation_dtype
from ..merge import plan_merge
from ..methods.spec import KeyInfo, key_seed
from ..ops import randomized_svd

PEFT_PREFIX = "base_model.model."
# <module>.<part><rest>: rest is ".weight" / ".<adapter name>.weight" (Linear) or "" / ".<adapter name>" (Embedding).
_FACTOR_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?P<rest>(\.[^.]+)*)$")
_PARTS = {"lora_A": ("linear", "A"), "lora_B": ("linear", "B"),
          "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B")}
# LoraConfig fields (peft 0.21) whose adapters are not theta_0 + scaling * B A on the targeted weights.
_UNSUPPORTED_CONFIG = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "target_parameters",
                       "use_bdlora", "kasa_config", "monteclora_config", "velora_config", "arrow_config",
                       "layer_replication")
OUTPUTS = ("dense", "lora")


@dataclass(frozen=True)
class LoraModule:
    """One targeted module. name: its path in the base model ("model.layers.0.self_attn.q_proj"); base_key: the
    weight it updates (name + ".weight"); kind: "linear" (Linear, Conv1D) or "embedding"; transposed: the base
    weight holds (B A)^T (embeddings, fan_in_fan_out layers such as transformers' Conv1D)."""
    name: str
    base_key: str
    kind: str
    transposed: bool


@dataclass
class LoraAdapter:
    """A LoRA re-factored from a merge (merge_lora_adapters(..., output="lora")).

    state_dict: peft's adapter keys (module doc), factors in fp32 (fp64 for an fp64 base); lora_alpha = r, so
    peft's scaling is 1. target_modules: the modules' full paths (peft matches them exactly). errors: per module,
    ||D - B A||_F / ||D||_F of the merged delta D (0 where D = 0)."""
    state_dict: "OrderedDict[str, torch.Tensor]"
    r: int
    target_modules: List[str]
    fan_in_fan_out: bool
    errors: Dict[str, float] = field(default_factory=dict)

    @property
    def lora_alpha(self) -> int:
        return self.r

    def config_kwargs(self) -> dict:
        """The LoraConfig arguments that load state_dict (add task_type etc. as the model needs)."""
        return {"r": self.r, "lora_alpha": self.lora_alpha, "target_modules": list(self.target_modules),
                "fan_in_fan_out": self.fan_in_fan_out}

    def lora_config(self, **overrides):
        """A peft.LoraConfig for this adapter (needs peft: `pip install pymerge[peft]`)."""
        from peft import LoraConfig
        return LoraConfig(**{**self.config_kwargs(), **overrides})


# ------------------------------------------------------------------------------------------- reading adapters
def _config_value(config, name, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _pattern_value(patterns, module, default):
    """peft's rank_pattern / alpha_pattern lookup: the first pattern p with re.match('(.*\\.)?(p)$', module)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _check_config(config, where):
    peft_type = _config_value(config, "peft_type")
    if peft_type is not None and getattr(peft_type, "value", peft_type) != "LORA":
        raise ValueError(f"{where}: config is a {getattr(peft_type, 'value', peft_type)} config; only LoRA adapters "
                         f"are merged here")
    for name in _UNSUPPORTED_CONFIG:
        value = _config_value(config, name)
        if value:
            raise ValueError(f"{where}: config sets {name}={value!r}; only plain LoRA (theta_0 + scaling * B A on the "
                             f"targeted weights) can be merged here")
    if _config_value(config, "lora_alpha") is None or _config_value(config, "r") is None:
        raise ValueError(f"{where}: config has no r / lora_alpha; pass a peft LoraConfig or its dict "
                         f"(adapter_config.json)")


def _scaling_from_config(config, module, rank, where):
    r = _pattern_value(_config_value(config, "rank_pattern"), module, _config_value(config, "r"))
    alpha = _pattern_value(_config_value(config, "alpha_pattern"), module, _config_value(config, "lora_alpha"))
    if int(r) != rank:
        raise ValueError(f"{where}: module {module!r} has factors of rank {rank} but its config says r = {r} "
                         f"(wrong config for this adapter?)")
    return float(alpha) / (math.sqrt(rank) if _config_value(config, "use_rslora", False) else rank)


def _adapter_state_dict(adapter, config, where):
    """(LoRA state dict, config) of an adapter given as a state dict or a PeftModel (its active adapter)."""
    if isinstance(adapter, torch.nn.Module):
        peft_config = getattr(adapter, "peft_config", None)
        if not isinstance(peft_config, Mapping):
            raise ValueError(f"{where}: an nn.Module adapter must be a peft model (it has no peft_config); or pass "
                             f"peft.get_peft_model_state_dict(model)")
        from peft import get_peft_model_state_dict
        name = adapter.active_adapter
        if not isinstance(name, str):
            raise ValueError(f"{where}: the peft model has several active adapters {name}; pass each one's state "
                             f"dict (peft.get_peft_model_state_dict(model, adapter_name=...))")
        return get_peft_model_state_dict(adapter, adapter_name=name), config if config is not None \
            else peft_config[name]
    if not isinstance(adapter, Mapping):
        raise ValueError(f"{where}: expected a LoRA state dict or a peft model, got {type(adapter).__name__}")
    return adapter, config


def _parse_factors(state_dict, where):
    """{module: {"kind", "A", "B"}} from peft's LoRA keys (with or without base_model.model. and an adapter name)."""
    modules, names = OrderedDict(), set()
    for key, value in state_dict.items():
        m = _FACTOR_KEY.match(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if m is None:
            hint = ("DoRA's magnitude vector" if "lora_magnitude_vector" in key else
                    "a full module saved beside the adapter (modules_to_save)" if "modules_to_save" in key else
                    "not a LoRA factor")
            raise ValueError(f"{where}: key {key!r} is {hint}; only plain LoRA factors (lora_A / lora_B / "
                             f"lora_embedding_A / lora_embedding_B) can be merged. Pass the adapter's own state "
                             f"dict (peft.get_peft_model_state_dict(model), adapter_model.safetensors)")
        kind, side = _PARTS[m["part"]]
        rest = [p for p in m["rest"].split(".") if p]
        if kind == "linear":
            if not rest or rest[-1] != "weight" or len(rest) > 2:
                what = "a LoRA bias (lora_bias=True)" if rest and rest[-1] == "bias" else "not a factor weight"
                raise ValueError(f"{where}: key {key!r} is {what}; only lora_A / lora_B weights are merged")
            name = rest[0] if len(rest) == 2 else None
        else:
            if len(rest) > 1:
                raise ValueError(f"{where}: key {key!r} is not a lora_embedding factor")
            name = rest[0] if rest else None
        names.add(name)
        if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: key {key!r} holds {getattr(value, 'dtype', type(value).__name__)}, expected "
                             f"a float tensor")
        if value.dim() != 2:
            raise ValueError(f"{where}: key {key!r} has shape {tuple(value.shape)}; only 2-D factors (Linear, "
                             f"Conv1D, Embedding LoRA) are merged, not conv LoRA")
        entry = modules.setdefault(m["module"], {"kind": kind})
        if entry["kind"] != kind or side in entry:
            raise ValueError(f"{where}: module {m['module']!r} has conflicting LoRA factors (key {key!r})")
        entry[side] = value
    if len(names) > 1:
        raise ValueError(f"{where}: the state dict holds several adapters {sorted(n or '' for n in names)}; pass one "
                         f"(peft.get_peft_model_state_dict(model, adapter_name=...))")
    if not modules:
        raise ValueError(f"{where}: no LoRA factors (lora_A / lora_B) in the adapter state dict")
    for module, entry in modules.items():
        missing = [s for s in ("A", "B") if s not in entry]
        if missing:
            raise ValueError(f"{where}: module {module!r} has no lora_{missing[0]} factor")
        A, B = entry["A"], entry["B"]
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"{where}: module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                             f"disagree on the rank")
    return modules


def _base_state_dict(base):
    if isinstance(base, torch.nn.Module):
        if hasattr(base, "peft_config"):
            raise ValueError("base is a peft model; pass the base model before get_peft_model (or its state dict)")
        return base.state_dict()
    if not isinstance(base, Mapping):
        raise ValueError(f"base must be a state dict or an nn.Module, got {type(base).__name__}")
    return base


def _base_weight(base, module, where):
    key = module + ".weight"
    if key not in base:
        wrapped = module + ".base_layer.weight"
        if wrapped in base:
            raise ValueError(f"{where}: base holds peft's wrapped layer {wrapped!r}; pass the base model's state "
                             f"dict from before get_peft_model")
        raise ValueError(f"{where}: module {module!r} has no weight {key!r} in base")
    weight = base[key]
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or weight.dim() != 2:
        raise ValueError(f"{where}: base key {key!r} is {getattr(weight, 'dtype', type(weight).__name__)} of shape "
                         f"{tuple(getattr(weight, 'shape', ()))}; expected a 2-D float weight (dequantize first)")
    return key, weight


def _read_adapter(base, adapter, config, scaling, where):
    """[(LoraModule, A, B, scaling, rank)] of one adapter, checked against the base's weights."""
    state_dict, config = _adapter_state_dict(adapter, config, where)
    if (config is None) == (scaling is None):
        raise ValueError(f"{where}: give the adapter's LoraConfig (configs=) or its scaling alpha / r "
                         f"(scalings=), {'not both' if config is not None else 'one of them'}")
    if config is not None:
        _check_config(config, where)
    fan_in_fan_out = bool(_config_value(config, "fan_in_fan_out", False)) if config is not None else None
    out = []
    for name, entry in _parse_factors(state_dict, where).items():
        A, B = entry["A"], entry["B"]
        rank = A.shape[0]
        key, weight = _base_weight(base, name, where)
        product = (B.shape[0], A.shape[1])          # B A
        flipped = (A.shape[1], B.shape[0])          # (B A)^T
        if entry["kind"] == "embedding":
            transposed = True
        elif fan_in_fan_out is not None:
            transposed = fan_in_fan_out
        else:                                       # scalings given: the layout the base weight has
            transposed = tuple(weight.shape) != product and tuple(weight.shape) == flipped
        if tuple(weight.shape) != (flipped if transposed else product):
            hint = ""
            if entry["kind"] == "linear" and tuple(weight.shape) == (product if transposed else flipped):
                hint = f" (set fan_in_fan_out={not transposed} in its config)"
            raise ValueError(f"{where}: module {name!r}: lora_B @ lora_A is {product} "
                             f"{'transposed ' if transposed else ''}but base weight {key!r} is {tuple(weight.shape)}"
                             f"{hint}")
        if config is not None:
            s = _scaling_from_config(config, name, rank, where)
        elif isinstance(scaling, Mapping):
            if name not in scaling:
                raise ValueError(f"{where}: scalings has no entry for module {name!r}")
            s = float(scaling[name])
        else:
            s = float(scaling)
        if not math.isfinite(s):
            raise ValueError(f"{where}: module {name!r} has a non-finite scaling {s}")
        out.append((LoraModule(name, key, entry["kind"], transposed), A, B, s, rank))
    return out


def _per_adapter(value, T, what):
    if isinstance(value, (list, tuple)):
        if len(value) != T:
            raise ValueError(f"{what} has {len(value)} entries for {T} adapters")
        return list(value)
    return [value] * T


def _read_adapters(base, adapters, configs, scalings):
    if isinstance(adapters, Mapping) or isinstance(adapters, torch.nn.Module):
        raise ValueError("adapters must be a sequence of LoRA adapters (state dicts or peft models), one per task")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("no adapters to merge; pass at least one LoRA adapter")
    T = len(adapters)
    configs = _per_adapter(configs, T, "configs")
    scalings = _per_adapter(scalings, T, "scalings")
    read = [_read_adapter(base, a, c, s, f"adapters[{t}]") for t, (a, c, s) in enumerate(zip(adapters, configs,
                                                                                             scalings))]
    first = {m.name: m for m, *_ in read[0]}
    for t, entries in enumerate(read[1:], 1):
        these = {m.name: m for m, *_ in entries}
        missing, extra = sorted(set(first) - set(these)), sorted(set(these) - set(first))
        if missing or extra:
            parts = ([f"lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else []) + \
                    ([f"also targets {extra[:6]}{' ...' if len(extra) > 6 else ''}"] if extra else [])
            raise ValueError(f"adapters[{t}] targets other modules than adapters[0]: it " + " and ".join(parts) +
                             "; merge adapters of the same target modules")
        for name, module in these.items():
            if module != first[name]:
                raise ValueError(f"adapters[{t}] module {name!r} is a {module.kind} layer "
                                 f"{'stored transposed ' if module.transposed else ''}but adapters[0]'s is a "
                                 f"{first[name].kind} {'stored transposed' if first[name].transposed else ''}")
    modules = list(first.values())
    factors = [{m.name: (A, B, s) for m, A, B, s, _ in entries} for entries in read]
    ranks = {m.name: sum(int(f[m.name][0].shape[0]) for f in factors) for m in modules}
    return modules, factors, ranks


def _delta(module, A, B, scaling, acc):
    """scaling * B A in the base weight's layout, in acc."""
    product = B.to(acc) @ A.to(acc)
    delta = product.mul_(scaling)
    return delta.mT if module.transposed else delta


def lora_delta_weights(base, adapter, config=None, *, scaling=None) -> "OrderedDict[str, torch.Tensor]":
    """{base weight key: Delta W} of one adapter, Delta W = scaling * B A in the weight's layout (peft's
    get_delta_weight), in fp32 (fp64 for an fp64 base). base: the base model or its state dict; adapter: a LoRA
    state dict or a peft model; config: its LoraConfig (or adapter_config.json dict), or scaling: alpha / r (a
    number, or {module: number})."""
    base = _base_state_dict(base)
    out = OrderedDict()
    for module, A, B, s, _ in _read_adapter(base, adapter, config, scaling, "adapter"):
        out[module.base_key] = _delta(module, A, B, s, accumulation_dtype(base[module.base_key].dtype))
    return out


# ---------------------------------------------------------------------------------------------- the merge
class _BaseKeys(Mapping):
    """The targeted base weights, widened to the merge dtype on read (lazy: a key group at a time)."""

    def __init__(self, base, modules):
        self.base = base
        self.modules = OrderedDict((m.base_key, m) for m in modules)

    def __iter__(self):
        return iter(self.modules)

    def __len__(self):
        return len(self.modules)

    def key_info(self, key):
        w = self.base[key]
        return KeyInfo(w.shape, accumulation_dtype(w.dtype))

    def __getitem__(self, key):
        w = self.base[key]
        return w.to(accumulation_dtype(w.dtype))


class _Materialized(_BaseKeys):
    """theta_0 + Delta W_t of one adapter on the targeted keys, formed when pymerge.merge reads the key."""

    def __init__(self, base, modules, factors):
        super().__init__(base, modules)
        self.factors = factors

    def __getitem__(self, key):
        module = self.modules[key]
        theta0 = super().__getitem__(key)
        A, B, s = self.factors[module.name]
        return theta0 + _delta(module, A, B, s, theta0.dtype)


def _check_factoring(lora_rank, lora_svd, lora_oversample, lora_power_iters, lora_seed):
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be None or an int >= 1, got {lora_rank!r}")
    if lora_svd not in ("randomized", "exact"):
        raise ValueError(f"lora_svd must be 'randomized' or 'exact', got {lora_svd!r}")
    for name, v in (("lora_oversample", lora_oversample), ("lora_power_iters", lora_power_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if lora_seed is not None and (isinstance(lora_seed, bool) or not isinstance(lora_seed, int)):
        raise ValueError(f"lora_seed must be None or an int, got {lora_seed!r}")


def factor_delta(delta: torch.Tensor, rank: int, *, svd="randomized", oversample=10, power_iters=2, seed=None):
    """(B [m, rank], A [rank, n]) with B A ~ delta [m, n]: B = U sqrt(S), A = sqrt(S) V^T of the rank-k truncated
    SVD, k = min(rank, m, n) (factors zero-padded to rank). svd="randomized": pymerge.ops.randomized_svd with
    l = k + oversample columns and power_iters iterations, unless l reaches min(m, n) (the exact SVD is then
    cheaper and optimal); "exact": torch.linalg.svd. In fp32 (fp64 for fp64)."""
    acc = accumulation_dtype(delta.dtype)
    D = delta.to(acc)
    m, n = D.shape
    k = min(rank, m, n)
    B = torch.zeros(m, rank, dtype=acc, device=D.device)
    A = torch.zeros(rank, n, dtype=acc, device=D.device)
    if not bool(D.any()):
        return B, A
    if svd == "exact" or k + oversample >= min(m, n):
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].mT
    else:
        U, S, V = randomized_svd(D, k, oversample=oversample, power_iters=power_iters, seed=seed)
    root = S.clamp_min(0).sqrt()
    B[:, :k] = U * root
    A[:k] = (V * root).mT
    return B, A


def merge_lora_adapters(base, adapters: Sequence, configs=None, *, scalings=None, method="cart",
                        output: str = "dense", lora_rank: Optional[int] = None, lora_svd: str = "randomized",
                        lora_oversample: int = 10, lora_power_iters: int = 2, lora_seed: Optional[int] = 0,
                        **params) -> Union["OrderedDict[str, torch.Tensor]", LoraAdapter]:
    """Merge T LoRA adapters of one base with pymerge.merge(method, theta_0, [theta_0 + Delta W_t], **params).

    base: the base model (nn.Module, not a peft model) or its state dict. adapters: T LoRA state dicts (peft keys,
    with or without the adapter name) or peft models (their active adapter). configs: their LoraConfig(s) (or
    adapter_config.json dicts): one for all or a list of T; taken from a peft model when None. scalings instead:
    alpha / r per adapter (a number or {module path: number}; one for all or a list of T). method, params:
    any static pymerge method and its parameters (default CART with its defaults).

    output="dense": OrderedDict of the base's keys, the targeted weights merged (the merge runs in fp32, fp64 for
    fp64 weights, and is rounded once to the base's dtype, or to out_dtype), every other key the base's own
    tensor (not a copy).
    output="lora": a LoraAdapter of rank lora_rank (None: the largest per-module sum of the adapters' ranks, exact
    for linear methods, see the module doc) factored from each merged delta by factor_delta(lora_svd,
    lora_oversample, lora_power_iters, seed = key_seed(lora_seed, module)).
    Raises ValueError for mismatched adapters (target modules, layouts, shapes), unsupported LoRA variants,
    configs that disagree with the factors, and everything pymerge.merge refuses.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    _check_factoring(lora_rank, lora_svd, lora_oversample, lora_power_iters, lora_seed)
    if output == "dense" and lora_rank is not None:
        raise ValueError("lora_rank applies to output='lora' only")
    out_dtype = params.pop("out_dtype", None)
    if output == "lora" and out_dtype is not None:
        raise ValueError("out_dtype applies to output='dense' only (the LoRA factors are fp32, fp64 for fp64)")
    base = _base_state_dict(base)
    modules, factors, ranks = _read_adapters(base, adapters, configs, scalings)
    theta0 = _BaseKeys(base, modules)
    models = [_Materialized(base, modules, f) for f in factors]
    plan = plan_merge(method, theta0, models, **params)
    by_key = {m.base_key: m for m in modules}
    if output == "dense":
        merged = {}
        for keys in plan.groups:
            for key, value in plan.merge_group(keys).items():
                merged[key] = value.to(out_dtype or base[key].dtype)
        return OrderedDict((key, merged.get(key, value)) for key, value in base.items())

    rank = lora_rank if lora_rank is not None else max(ranks.values())
    factored, errors = {}, {}
    for keys in plan.groups:
        for key, value in plan.merge_group(keys).items():
            module = by_key[key]
            D = value - theta0[key]
            M = D.mT if module.transposed else D          # the layout of B A
            B, A = factor_delta(M, rank, svd=lora_svd, oversample=lora_oversample, power_iters=lora_power_iters,
                                seed=key_seed(lora_seed, module.name))
            norm = float(M.norm())
            errors[module.name] = float((M - B @ A).norm()) / norm if norm > 0 else 0.0
            factored[module.name] = (A, B)
    state = OrderedDict()
    for module in modules:
        A, B = factored[module.name]
        prefix = PEFT_PREFIX + module.name
        parts = ("lora_A.weight", "lora_B.weight") if module.kind == "linear" else ("lora_embedding_A",
                                                                                    "lora_embedding_B")
        state[f"{prefix}.{parts[0]}"], state[f"{prefix}.{parts[1]}"] = A, B
    fan_in_fan_out = any(m.transposed for m in modules if m.kind == "linear")
    return LoraAdapter(state, rank, [m.name for m in modules], fan_in_fan_out,
                       {m.name: errors[m.name] for m in modules})
