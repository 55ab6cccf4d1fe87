"""pymerge's methods as FusionBench 0.2.33 algorithms: BaseAlgorithm subclasses a FusionBench run selects by
`_target_` (Hydra configs in pymerge/adapters/fusionbench_config/method/pymerge/, docs/ADAPTERS.md). This module
holds the static algorithms and the helpers every algorithm shares (config checks, the pool, exact key names,
copies of the pool's models); the learned ones (DivMergeAlgorithm, AdaMergingCARTAlgorithm) and the reading of
the pool's datasets they need are in fusionbench_learned.py, which imports these helpers.

  CARTAlgorithm, TSVMAlgorithm, IsoCAlgorithm, IsoCTSAlgorithm, TIESAlgorithm: run(modelpool) reads the pool's
  `_pretrained_` model and its fine-tuned models, merges their state dicts with pymerge.merge and returns a copy
  of the pretrained model holding the result (the pool's models are never written).

Config fields follow FusionBench's own algorithms where one exists (TSV-M: alpha; Iso-C / Iso-CTS / TIES:
scaling_factor; TIES: threshold, remove_keys, merge_func). Key lists (exclude_keys, remove_keys) are exact key
names as in FusionBench, not pymerge's regexes. `pymerge_options` passes any other parameter of the pymerge
method as it is (pymerge.methods.get(name).describe()). Values are checked when the algorithm is built, so a bad
config fails before any model is loaded.

Unlike pymerge/peers and the other adapters, this module imports FusionBench when it is imported: its classes
subclass FusionBench's BaseAlgorithm. `import pymerge` never imports it.
"""
import copy
import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

try:
    from fusion_bench.method.base_algorithm import BaseAlgorithm
    from fusion_bench.mixins import auto_register_config
    from fusion_bench.modelpool import BaseModelPool
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("pymerge.adapters.fusionbench subclasses FusionBench's BaseAlgorithm: install FusionBench "
                      "0.2.33 (pip install pymerge[fusionbench])") from e

from ..merge import merge
from ..methods import get as get_method
from ..methods.spec import KeyInfo

log = logging.getLogger(__name__)

__all__ = ["CARTAlgorithm", "TSVMAlgorithm", "IsoCAlgorithm", "IsoCTSAlgorithm", "TIESAlgorithm"]

# FusionBench's own bookkeeping keys a config may carry besides an algorithm's fields.
_META_KEYS = ("_usage_", "_version_", "_recursive_")


# ----------------------------------------------------------------- helpers (fusionbench_learned.py's too)
def _plain(value):
    """OmegaConf containers (what Hydra hands a `_target_`) as plain lists / dicts; anything else as it is."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - FusionBench depends on omegaconf
        return value
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _reject_unknown(owner, kwargs):
    unknown = sorted(k for k in kwargs if k not in _META_KEYS)
    if unknown:
        raise ValueError(f"{owner}: unknown config field(s) {unknown}; put other parameters of the pymerge method "
                         f"in pymerge_options")
    return {k: v for k, v in kwargs.items() if k in _META_KEYS}


def _as_pool(modelpool, owner):
    """A BaseModelPool, or a {name: nn.Module} mapping holding `_pretrained_` (made into one)."""
    if isinstance(modelpool, BaseModelPool):
        pool = modelpool
    elif isinstance(modelpool, Mapping) and all(isinstance(m, nn.Module) for m in modelpool.values()):
        pool = BaseModelPool(dict(modelpool))
    else:
        raise ValueError(f"{owner}: modelpool must be a fusion_bench BaseModelPool or a {{name: nn.Module}} mapping, "
                         f"got {type(modelpool).__name__}")
    if not pool.has_pretrained:
        raise ValueError(f"{owner}: the model pool has no '_pretrained_' model (models: {pool.all_model_names}); "
                         f"pymerge's methods merge task vectors relative to it")
    if not pool.model_names:
        raise ValueError(f"{owner}: the model pool has no fine-tuned model besides '_pretrained_'")
    return pool


def _key_names(value, owner, field):
    """A FusionBench key list (exact names; None = none) as a list of str."""
    value = _plain(value)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{owner}: {field} = {value!r} must be a list of exact key names (or null)")
    return list(value)


def _warn_absent(names, state_dict, owner, field):
    absent = [k for k in names if k not in state_dict]
    if absent:
        # FusionBench ignores a name the model does not have; say so, since it is most likely a typo.
        warnings.warn(f"{owner}: {field} names key(s) {absent} that the pretrained model does not have; ignored",
                      UserWarning, stacklevel=3)


def _matrix_exclusions(algorithm, params, state_dict):
    """TSV-M / Iso: FusionBench's exclude_keys (exact names; None = every 2-D key is a matrix) into params, unless
    the field is None and pymerge_options gives pymerge's own exclude_keys (regexes)."""
    if algorithm.exclude_keys is None and "exclude_keys" in algorithm.pymerge_options:
        return params
    names = _key_names(algorithm.exclude_keys, type(algorithm).__name__, "exclude_keys")
    params["exclude_keys"] = exact_key_patterns(names, state_dict, type(algorithm).__name__) if state_dict else ()
    return params


def exact_key_patterns(names, state_dict, owner, field="exclude_keys"):
    """FusionBench's exclude_keys (exact names of 2-D keys merged like the other keys, by the mean of the task
    vectors) as pymerge's regexes: re.escape'd and anchored, for the names that are 2-D keys of the model (a
    name of a key of another shape changes nothing in FusionBench, and pymerge refuses patterns that match no 2-D
    key); a name the model lacks is ignored with a UserWarning."""
    _warn_absent(names, state_dict, owner, field)
    return tuple("^" + re.escape(k) + "$" for k in names if k in state_dict and state_dict[k].dim() == 2)


class _OnDevice(Mapping):
    """A state dict whose tensors move to `device` as pymerge.merge reads them, one key group at a time (the
    whole model never sits on the device at once); key_info answers without moving anything."""

    def __init__(self, state_dict, device):
        self.state_dict, self.device = state_dict, device

    def __getitem__(self, key):
        return self.state_dict[key].to(self.device)

    def __iter__(self):
        return iter(self.state_dict)

    def __len__(self):
        return len(self.state_dict)

    def key_info(self, key):
        v = self.state_dict[key]
        return KeyInfo(v.shape, v.dtype)


def _state_dict(module):
    return {k: v.detach() for k, v in module.state_dict().items()}


def _into_copy(module, state_dict):
    """A deep copy of `module` with `state_dict` loaded (strictly): the pool's own model stays untouched."""
    out = copy.deepcopy(module)
    out.load_state_dict(state_dict)
    return out


# ---------------------------------------------------------------------------------------------- static
class _StaticAlgorithm(BaseAlgorithm):
    """run(modelpool): pymerge.merge(METHOD, pretrained state dict, fine-tuned state dicts (pool order),
    **self.merge_params(...)) loaded into a copy of the pretrained model. Subclasses map their FusionBench-style
    fields to the method's parameters (_field_params; exact key names become regexes once the model's keys are
    known), and pymerge_options adds the method's other parameters."""
    METHOD = ""

    def _setup(self, kwargs):
        meta = _reject_unknown(type(self).__name__, kwargs)
        self.pymerge_options = _plain(self.pymerge_options) or {}
        if not isinstance(self.pymerge_options, Mapping):
            raise ValueError(f"{type(self).__name__}: pymerge_options = {self.pymerge_options!r} must be a mapping "
                             f"of the pymerge method's parameters")
        self.pymerge_options = dict(self.pymerge_options)
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"{type(self).__name__}: device = {self.device!r} must be a device name (e.g. 'cuda')")
        self._check_fields()
        # every parameter checked now, before a model is read; only the method's whole-model checks (its
        # prepare step, e.g. CART's exclusive rank options) wait for the models
        spec, params = get_method(self.METHOD), self.merge_params({})
        lengths = [len(params[p.name]) for p in spec.params if p.per_model and isinstance(params.get(p.name), list)]
        spec.resolve_params(params, lengths[0] if lengths else 1)
        return meta

    def _check_fields(self):
        pass

    def _field_params(self, state_dict) -> dict:
        """{pymerge parameter: value} of the fields that are set (state_dict: the pretrained model's, or {} for
        the construction-time check)."""
        raise NotImplementedError

    def merge_params(self, state_dict) -> dict:
        """The keyword arguments of pymerge.merge: the fields' parameters, then pymerge_options (a parameter may
        come from one of them only)."""
        params = self._field_params(state_dict)
        both = sorted(set(params) & set(self.pymerge_options))
        if both:
            raise ValueError(f"{type(self).__name__}: pymerge_options sets {both}, which the config's own fields "
                             f"already set; use the fields")
        return {**params, **self.pymerge_options}

    def prepare_models(self, base_sd, model_sds) -> List[dict]:
        """The fine-tuned state dicts pymerge.merge reads (TSV-M's per-task alpha scales them here)."""
        return model_sds

    def merge_state_dicts(self, base_sd, model_sds) -> dict:
        """pymerge.merge of the pretrained and fine-tuned state dicts with this config (on self.device when set)."""
        params = self.merge_params(base_sd)
        model_sds = self.prepare_models(base_sd, model_sds)
        if self.device is not None:
            base_sd, model_sds = _OnDevice(base_sd, self.device), [_OnDevice(m, self.device) for m in model_sds]
        return merge(self.METHOD, base_sd, model_sds, **params)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> nn.Module:
        pool = _as_pool(modelpool, type(self).__name__)
        pretrained = pool.load_pretrained_model()
        base_sd = _state_dict(pretrained)
        model_sds = [_state_dict(pool.load_model(name)) for name in pool.model_names]
        log.info("%s: pymerge.merge(%r) of %d models %s", type(self).__name__, self.METHOD, len(model_sds),
                 pool.model_names)
        merged = self.merge_state_dicts(base_sd, model_sds)
        return _into_copy(pretrained, merged)


def _set(params, name, value):
    if value is not None:
        params[name] = _plain(value)


@auto_register_config
class CARTAlgorithm(_StaticAlgorithm):
    """CART (pymerge.merge("cart"), docs/METHODS.md §CART): θ_avg + λ Σ_t SVD_k(θ_t − θ_avg) on the low-rank keys.

    scaling_factor: λ (2.0). rank_ratio (None = 0.08) / rank / energy: the rank, one of them. svd, seed: the
    factorisation. low_rank_keys: pymerge's selection (a regex, a list of regexes or "vit"; None = every 2-D
    key except exclude_keys). exclude_keys: exact names of 2-D keys left at θ_avg; None = CART's default
    (pymerge.methods.cart.DEFAULT_EXCLUDE_KEYS: embeddings, heads, poolers). FusionBench has no CART of its own.
    """
    METHOD = "cart"

    def __init__(self, scaling_factor: float = 2.0, rank_ratio: Optional[float] = None, rank: Optional[int] = None,
                 energy: Optional[float] = None, svd: str = "randomized", seed: Optional[int] = 0,
                 low_rank_keys: Union[None, str, List[str]] = None, exclude_keys: Optional[List[str]] = None,
                 device: Optional[str] = None, pymerge_options: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**self._setup(kwargs))

    def _field_params(self, state_dict):
        p = {"lam": self.scaling_factor, "svd": self.svd, "seed": self.seed}
        for name in ("rank_ratio", "rank", "energy", "low_rank_keys"):
            _set(p, name, getattr(self, name))
        names = _key_names(self.exclude_keys, type(self).__name__, "exclude_keys")
        if self.exclude_keys is not None:
            p["exclude_keys"] = exact_key_patterns(names, state_dict, type(self).__name__) if state_dict else ()
        return p


@auto_register_config
class TSVMAlgorithm(_StaticAlgorithm):
    """TSV-M (pymerge.merge("tsv_m"), docs/METHODS.md §TSV-M), with FusionBench's TaskSingularVectorMerging fields.

    alpha: a number scales the merged task vector (None = 1.0); a list of T numbers scales each task vector before
    the merge, as FusionBench does (θ_t → θ_0 + alpha_t (θ_t − θ_0), then alpha = 1). exclude_keys: exact names of
    2-D keys merged by the mean of the task vectors; None = none, every 2-D key is a matrix (FusionBench's
    default; pymerge's own default leaves embeddings and heads out), unless pymerge_options gives pymerge's
    exclude_keys (regexes). svd ("auto" | "randomized" | "exact", FusionBench's route), seed: the per-task SVDs.
    return_single_task_models=True is not supported.
    """
    METHOD = "tsv_m"

    def __init__(self, alpha: Union[None, float, List[float]] = 1.0, exclude_keys: Optional[List[str]] = None,
                 return_single_task_models: bool = False, svd: str = "auto", seed: Optional[int] = 0,
                 device: Optional[str] = None, pymerge_options: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**self._setup(kwargs))

    def _check_fields(self):
        if self.return_single_task_models:
            raise ValueError("TSVMAlgorithm: return_single_task_models=True is not supported (pymerge's TSV-M "
                             "returns the merged model only); use FusionBench's TaskSingularVectorMerging for it")
        self.alpha = _plain(self.alpha)
        if isinstance(self.alpha, (list, tuple)):
            bad = [a for a in self.alpha if isinstance(a, bool) or not isinstance(a, (int, float))]
            if bad or not self.alpha:
                raise ValueError(f"TSVMAlgorithm: alpha = {self.alpha!r} must be a number or a non-empty list of "
                                 f"numbers (one per model)")

    def _field_params(self, state_dict):
        scalar = self.alpha is None or isinstance(self.alpha, (list, tuple))
        p = {"alpha": 1.0 if scalar else self.alpha, "svd": self.svd, "seed": self.seed}
        return _matrix_exclusions(self, p, state_dict)

    def prepare_models(self, base_sd, model_sds):
        if not isinstance(self.alpha, (list, tuple)):
            return model_sds
        if len(self.alpha) != len(model_sds):
            raise ValueError(f"TSVMAlgorithm: alpha has {len(self.alpha)} values for {len(model_sds)} models")
        out = []
        for a, sd in zip(self.alpha, model_sds):
            out.append({k: base_sd[k] + float(a) * (v - base_sd[k]) if v.is_floating_point() else v
                        for k, v in sd.items()})
        return out


class _IsoAlgorithm(_StaticAlgorithm):
    def _field_params(self, state_dict):
        p = {"alpha": self.scaling_factor}
        if self.METHOD == "iso_cts":
            p.update(common_space_fraction=self.common_space_fraction, svd=self.svd, seed=self.seed)
        return _matrix_exclusions(self, p, state_dict)


@auto_register_config
class IsoCAlgorithm(_IsoAlgorithm):
    """Iso-C (pymerge.merge("iso_c"), docs/METHODS.md §Iso-C), with FusionBench's IsotropicMergingInCommonSubspace
    fields: scaling_factor (α, pymerge's 1.5; FusionBench's shipped config has 1.0), exclude_keys (exact names;
    None = every 2-D key is a matrix, as FusionBench)."""
    METHOD = "iso_c"

    def __init__(self, scaling_factor: float = 1.5, exclude_keys: Optional[List[str]] = None,
                 device: Optional[str] = None, pymerge_options: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**self._setup(kwargs))


@auto_register_config
class IsoCTSAlgorithm(_IsoAlgorithm):
    """Iso-CTS (pymerge.merge("iso_cts"), docs/METHODS.md §Iso-CTS), with FusionBench's
    IsotropicMergingInCommonAndTaskSubspace fields: scaling_factor (α, 1.5), common_space_fraction (0.8),
    exclude_keys (as IsoCAlgorithm); svd ("auto" | "randomized" | "exact"), seed: the task-specific SVDs."""
    METHOD = "iso_cts"

    def __init__(self, scaling_factor: float = 1.5, common_space_fraction: float = 0.8,
                 exclude_keys: Optional[List[str]] = None, svd: str = "auto", seed: Optional[int] = 0,
                 device: Optional[str] = None, pymerge_options: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**self._setup(kwargs))


@auto_register_config
class TIESAlgorithm(_StaticAlgorithm):
    """TIES (pymerge.merge("ties"), docs/METHODS.md §TIES), with FusionBench's TiesMergingAlgorithm fields.

    scaling_factor: λ (1.0). threshold: the share of each task vector kept, FusionBench's way: a value > 1 is a
    percentage (20 = the top 20%), one in (0, 1] a fraction. remove_keys: exact names of keys not merged (kept at
    the pretrained value). merge_func: "mean" only, pymerge's disjoint mean; FusionBench's "sum" / "max" are
    refused. Trimming is per tensor (mergekit, peft), where FusionBench ranks magnitudes over the whole model.
    """
    METHOD = "ties"

    def __init__(self, scaling_factor: float = 1.0, threshold: float = 20, remove_keys: Optional[List[str]] = None,
                 merge_func: str = "mean", device: Optional[str] = None,
                 pymerge_options: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**self._setup(kwargs))

    def _check_fields(self):
        if self.merge_func != "mean":
            raise ValueError(f"TIESAlgorithm: merge_func = {self.merge_func!r}; pymerge's TIES is the disjoint mean "
                             f"('mean') of the paper and mergekit; FusionBench's 'sum' / 'max' are not offered")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 100:
            raise ValueError(f"TIESAlgorithm: threshold = {t!r} must be in (0, 100]: a percentage when > 1, else a "
                             f"fraction of each task vector's entries kept")
        _key_names(self.remove_keys, type(self).__name__, "remove_keys")

    def density(self) -> float:
        """threshold as pymerge's density: FusionBench's topk_values_mask reads K > 1 as a percentage."""
        return self.threshold / 100 if self.threshold > 1 else float(self.threshold)

    def _field_params(self, state_dict):
        return {"lam": self.scaling_factor, "density": self.density()}

    def merge_state_dicts(self, base_sd, model_sds):
        removed = _key_names(self.remove_keys, type(self).__name__, "remove_keys")
        _warn_absent(removed, base_sd, type(self).__name__, "remove_keys")
        keep = set(removed)
        merged = super().merge_state_dicts({k: v for k, v in base_sd.items() if k not in keep},
                                           [{k: v for k, v in m.items() if k not in keep} for m in model_sds])
        return {k: merged[k] if k in merged else base_sd[k] for k in base_sd}
