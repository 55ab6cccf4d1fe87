"""pymerge's learned methods as FusionBench 0.2.33 algorithms: BaseAlgorithm subclasses a FusionBench run selects
by `_target_` (Hydra configs pymerge/divmerge and pymerge/adamerging_cart in
pymerge/adapters/fusionbench_config/method/pymerge/, docs/ADAPTERS.md). The static algorithms, and the helpers
both kinds share (config checks, the pool, exact key names, copies of the pool's models), are in fusionbench.py.

  DivMergeAlgorithm (pymerge.divmerge), AdaMergingCARTAlgorithm (pymerge.adamerging, start="cart"): Γ learned on
  each task's unlabelled inputs read from the pool's datasets (`data_split`, the dataset named like the model),
  returning the merged model, or {task: model} when task-specific keys (heads) are kept per task; the
  pymerge.learn.LearnedMerge is kept as `.result`.

A module of its own because reading the pool's data is a concern the static algorithms lack: each dataset item
becomes the unlabelled input pymerge.learn reads (_DatasetInputs: (x, y) items give x; dict items their
input_keys, else the keys the model's forward takes, minus label_keys, texts and per-example scalars; texts are
tokenized by pymerge with the pool's tokenizer).

Config fields follow FusionBench's AdaMerging where they overlap (max_steps, lr, merging_weights_save_path).
`pymerge_options` passes any other option of the pymerge function as it is (pymerge.methods.get(name).describe()).
Values are checked when the algorithm is built, so a bad config fails before any model is loaded.

Like fusionbench.py, this module imports FusionBench when it is imported (FusionBench's classes come through
fusionbench.py, whose ImportError names the extra to install). `import pymerge` never imports it.
"""
import functools
import inspect
import logging
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

# FusionBench's classes as fusionbench.py imports them: without FusionBench, its ImportError names the extra
from .fusionbench import (BaseAlgorithm, BaseModelPool, _as_pool, _into_copy, _key_names, _plain, _reject_unknown,
                          auto_register_config)
from ..methods import get as get_method
from ..methods.adamerging import adamerging
from ..methods.divmerge import EXAMPLES_PER_TASK, divmerge

log = logging.getLogger(__name__)

__all__ = ["DivMergeAlgorithm", "AdaMergingCARTAlgorithm"]

SPLITS = ("train", "val", "test")
LABEL_KEYS = ("labels", "label", "label_ids")


def _forward_names(module):
    """Names of the keyword arguments module.forward takes, or None when it takes **kwargs (anything)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _as_tensor(value, where):
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where} holds a {type(value).__name__}, not a tensor (or numbers); give the pool a "
                         f"dataset of model-ready inputs (tokenized / preprocessed tensors)") from None


class _DatasetInputs:
    """One dataset item -> the unlabelled input pymerge.learn reads: a tensor, a {name: tensor} dict, or a text.

    tuple / list items (x, y, ...) give x (the first element); dict items their input_keys when given, else every
    key the model's forward accepts (all of them when it takes **kwargs) except the label_keys, and except texts
    and per-example scalars (metadata such as "idx" or a raw "sentence": a model's inputs per example are at
    least 1-D); a str item, or a dict reduced to one str, is a text (tokenized by pymerge)."""

    def __init__(self, owner, task, input_keys, label_keys, forward_names):
        self.owner, self.task = owner, task
        self.input_keys = None if input_keys is None else list(input_keys)
        self.label_keys, self.forward_names = set(label_keys), forward_names

    def __call__(self, item, index):
        where = f"{self.owner}: task {self.task!r}, dataset item {index}"
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError(f"{where} is empty")
            item = item[0]                     # (inputs, label, ...): the inputs only
        if isinstance(item, str):
            return item
        if isinstance(item, Mapping):
            if self.input_keys is not None:
                missing = [k for k in self.input_keys if k not in item]
                if missing:
                    raise ValueError(f"{where} lacks input_keys {missing}; its keys: {sorted(item)}")
                keys = self.input_keys
            else:
                keys = [k for k in item if k not in self.label_keys
                        and (self.forward_names is None or k in self.forward_names)]
                if not (len(keys) == 1 and isinstance(item[keys[0]], str)):
                    # metadata besides the inputs (an "idx", a raw "sentence"): texts and per-example scalars
                    keys = [k for k in keys if not isinstance(item[k], str) and _as_tensor(item[k], where).dim() > 0]
            if not keys:
                raise ValueError(f"{where}: no input key among {sorted(item)} (labels {sorted(self.label_keys)}, "
                                 f"texts and scalars are dropped); set input_keys")
            if len(keys) == 1 and isinstance(item[keys[0]], str):
                return item[keys[0]]
            return {k: _as_tensor(item[k], f"{where}, key {k!r},") for k in keys}
        return _as_tensor(item, where)


def _batch_of_one(example):
    """A per-example input as a batch of one (pymerge.learn splits batches into examples again)."""
    if isinstance(example, dict):
        return {k: v.unsqueeze(0) for k, v in example.items()}
    return example.unsqueeze(0)


class _LearnedAlgorithm(BaseAlgorithm):
    """Shared by the learned methods: each task's examples from the pool, the pymerge function, the result."""
    FUNCTION = None
    FIELDS: Dict[str, str] = {}           # {field: pymerge option} passed when the field is not None

    def _setup(self, kwargs):
        owner = type(self).__name__
        meta = _reject_unknown(owner, kwargs)
        self.pymerge_options = dict(_plain(self.pymerge_options) or {})
        for f in ("task_specific_keys", "input_keys", "label_keys", "init", "clamp", "cart_keys"):
            if hasattr(self, f):
                setattr(self, f, _plain(getattr(self, f)))
        if self.data_split not in SPLITS:
            raise ValueError(f"{owner}: data_split = {self.data_split!r}; expected one of {list(SPLITS)}")
        if self.input_keys is not None:
            _key_names(self.input_keys, owner, "input_keys")
        _key_names(self.label_keys, owner, "label_keys")
        n = self.examples_per_task
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{owner}: examples_per_task = {n!r} must be a positive int (or null)")
        if not isinstance(self.shuffle_examples, bool):
            raise ValueError(f"{owner}: shuffle_examples = {self.shuffle_examples!r} must be true or false")
        self.spec().check_values(self.options())
        return meta

    @classmethod
    def spec(cls):
        return get_method(cls.FUNCTION.__name__)

    def options(self) -> dict:
        """The keyword arguments of the pymerge function: the set fields, then pymerge_options."""
        opts = {opt: _plain(getattr(self, f)) for f, opt in self.FIELDS.items() if getattr(self, f) is not None}
        both = sorted(set(opts) & set(self.pymerge_options))
        if both:
            raise ValueError(f"{type(self).__name__}: pymerge_options sets {both}, which the config's own fields "
                             f"already set; use the fields")
        return {**opts, **self.pymerge_options}

    def examples_count(self, options) -> Optional[int]:
        return self.examples_per_task

    def task_examples(self, pool, name, count, inputs_of) -> list:
        """The first `count` items of task `name`'s dataset (a seeded random subset when shuffle_examples),
        as unlabelled inputs; batches of one (tensors, dicts) or texts."""
        split = self.data_split
        names = {"train": pool.train_dataset_names, "val": pool.val_dataset_names,
                 "test": pool.test_dataset_names}[split]
        if name not in names:
            raise ValueError(f"{type(self).__name__}: the model pool has no {split} dataset named {name!r} (the "
                             f"model's name); its {split} datasets: {names}. Set data_split to a split that has one "
                             f"per model")
        dataset = getattr(pool, f"load_{split}_dataset")(name)
        try:
            size = len(dataset)
        except TypeError:
            size = None
        if size is None:                       # an iterable dataset: its first items
            items = []
            for i, item in enumerate(dataset):
                if count is not None and i >= count:
                    break
                items.append((i, item))
        else:
            take = size if count is None else min(count, size)
            if self.shuffle_examples:
                g = torch.Generator().manual_seed(int(self.seed))
                order = torch.randperm(size, generator=g)[:take].tolist()
            else:
                order = range(take)
            items = [(i, dataset[i]) for i in order]
        if not items:
            raise ValueError(f"{type(self).__name__}: the {split} dataset of task {name!r} is empty")
        examples = [inputs_of(item, i) for i, item in items]
        texts = [isinstance(e, str) for e in examples]
        if any(texts) and not all(texts):
            raise ValueError(f"{type(self).__name__}: task {name!r}: the {split} dataset mixes texts and tensors")
        return examples if all(texts) else [_batch_of_one(e) for e in examples]

    def data(self, pool, pretrained, count) -> dict:
        forward_names = _forward_names(pretrained)
        return {name: self.task_examples(pool, name, count, _DatasetInputs(
            type(self).__name__, name, self.input_keys, self.label_keys, forward_names))
            for name in pool.model_names}

    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]):
        owner = type(self).__name__
        pool = _as_pool(modelpool, owner)
        options = self.options()
        count = self.examples_count(options)
        pretrained = pool.load_pretrained_model()
        data = self.data(pool, pretrained, count)
        if count is not None:
            options["examples_per_task"] = count
        if all(isinstance(src[0], str) for src in data.values()) and "tokenizer" not in options \
                and hasattr(pool, "load_tokenizer"):
            options["tokenizer"] = pool.load_tokenizer()
        # loaders: pymerge.learn reads one fine-tuned model at a time
        models = {name: functools.partial(pool.load_model, name) for name in pool.model_names}
        log.info("%s: %s on %d tasks %s, %s examples each from the %s split", owner, type(self).FUNCTION.__name__,
                 len(models), list(models), count if count is not None else "all", self.data_split)
        result = type(self).FUNCTION(pretrained, models, data, **options)
        self.result = result
        if self.merging_weights_save_path is not None:
            result.save_coefficients(self.merging_weights_save_path)
        if result.heads and any(result.heads.values()):
            # task-specific keys (heads): one model per task, built from its own fine-tuned model
            return {name: _into_copy(pool.load_model(name), result.task_state_dicts[name]) for name in result.tasks}
        return _into_copy(pretrained, result.state_dict)


_LEARNED_FIELDS = {"granularity": "granularity", "lr": "lr", "max_steps": "steps", "epochs": "epochs",
                   "batch_size": "batch_size", "seed": "seed", "task_specific_keys": "task_specific_keys",
                   "temperature": "temperature", "init": "init"}


@auto_register_config
class DivMergeAlgorithm(_LearnedAlgorithm):
    """DivMerge (pymerge.divmerge, docs/METHODS.md §DivMerge): Γ minimising the divergence of the merged model
    from each fine-tuned model on unlabelled inputs of its task.

    From the pool: `_pretrained_` (θ_0), every fine-tuned model (read one at a time; each must return logits, or
    an output with .logits, on its task's inputs; causal LMs are continued greedily), and per model the dataset
    of the same name in `data_split` ("train", "val" or "test"): `examples_per_task` items (None = 200 at task,
    400 at layer granularity), a random subset drawn with `seed` (shuffle_examples, default) or the first ones.
    Only inputs are read: (x, y) items give x; dict items their `input_keys` (None = the keys the model's
    forward takes) minus `label_keys`; texts are tokenized with the pool's tokenizer (load_tokenizer()).
    Config: granularity ("layer" | "task"), divergence ("js" | "kl"), lr and lr_schedule ("cosine" | "constant";
    None = 0.5 with the cosine for classifiers, 0.2 constant for causal LMs), max_steps (None = epochs passes),
    epochs, batch_size (examples per step over all tasks; None = 8 T, or 4 T for a causal LM), seed,
    task_specific_keys (a regex of keys each task keeps, e.g. "^classifier\\."), temperature, beta, init, start
    ("pretrained" | "cart"), merging_weights_save_path (Γ as JSON); pymerge_options: any other pymerge.divmerge
    option.
    """
    FUNCTION = staticmethod(divmerge)
    FIELDS = {**_LEARNED_FIELDS, "divergence": "divergence", "beta": "beta", "start": "start",
              "lr_schedule": "lr_schedule"}

    def __init__(self, data_split: str = "train", examples_per_task: Optional[int] = None,
                 shuffle_examples: bool = True, input_keys: Optional[List[str]] = None,
                 label_keys: List[str] = LABEL_KEYS, granularity: str = "layer", divergence: str = "js",
                 lr: Optional[float] = None, lr_schedule: Optional[str] = None, max_steps: Optional[int] = None,
                 epochs: int = 4, batch_size: Optional[int] = None,
                 seed: int = 0, task_specific_keys: Optional[str] = None, temperature: float = 1.0, beta: float = 0.5,
                 init: Optional[float] = None, start: str = "pretrained",
                 merging_weights_save_path: Optional[str] = None, pymerge_options: Optional[Dict[str, Any]] = None,
                 **kwargs):
        super().__init__(**self._setup(kwargs))

    def examples_count(self, options):
        if self.examples_per_task is not None:
            return self.examples_per_task
        return EXAMPLES_PER_TASK[options.get("granularity", "layer")]


@auto_register_config
class AdaMergingCARTAlgorithm(_LearnedAlgorithm):
    """AdaMerging started from CART (pymerge.adamerging(..., start="cart"), docs/METHODS.md §Adaptive CART): Γ
    over CART's centered low-rank task vectors, starting at static CART (λ = 2), minimising the entropy of the
    merged model's predictions on unlabelled inputs of each task.

    Reads the pool as DivMergeAlgorithm does (no teacher: the fine-tuned models give their task vectors and
    heads). examples_per_task: 1000 (the datasets are read into memory; pymerge.adamerging's own default is all of
    them). Config: granularity, lr (1e-3), max_steps (500), batch_size (None = 16 T), seed, task_specific_keys,
    temperature, init (None = CART's λ), clamp (None = unconstrained), cart_rank_ratio (None = 0.08), cart_keys,
    cart_svd, merging_weights_save_path; pymerge_options: any other pymerge.adamerging option.
    """
    FUNCTION = staticmethod(adamerging)
    FIELDS = {**_LEARNED_FIELDS, "clamp": "clamp", "cart_rank_ratio": "cart_rank_ratio", "cart_keys": "cart_keys",
              "cart_svd": "cart_svd"}

    def __init__(self, data_split: str = "train", examples_per_task: Optional[int] = 1000,
                 shuffle_examples: bool = True, input_keys: Optional[List[str]] = None,
                 label_keys: List[str] = LABEL_KEYS, granularity: str = "layer", lr: float = 1e-3,
                 max_steps: Optional[int] = 500, epochs: Optional[int] = None, batch_size: Optional[int] = None,
                 seed: int = 0, task_specific_keys: Optional[str] = None, temperature: float = 1.0,
                 init: Optional[float] = None, clamp: Optional[Sequence[float]] = None,
                 cart_rank_ratio: Optional[float] = None, cart_keys: Optional[str] = None, cart_svd: str = "randomized",
                 merging_weights_save_path: Optional[str] = None, pymerge_options: Optional[Dict[str, Any]] = None,
                 **kwargs):
        super().__init__(**self._setup(kwargs))

    def options(self):
        opts = super().options()
        if "start" in self.pymerge_options or "init_from" in self.pymerge_options:
            raise ValueError("AdaMergingCARTAlgorithm: the start point is CART (start='cart'); pymerge_options may not "
                             "set start or init_from")
        opts["start"] = "cart"
        if "clamp" in opts:
            opts["clamp"] = tuple(opts["clamp"]) if opts["clamp"] is not None else None
        return opts
