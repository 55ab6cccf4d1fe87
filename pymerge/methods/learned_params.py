"""The options both learned methods (DivMerge, AdaMerging) take, declared once as Params: the pymerge.learn
pipeline's (granularity, optimiser, data, fast paths) and the start point's (pymerge.methods.learned_starts).

Each learned method's SPEC (a LearnedMethodSpec) lists these with its own options, through
dataclasses.replace where its default differs (AdaMerging's lr=1e-3, steps=500, init=0.3, ...). A Param's
type is what a command-line flag parses (pymerge.cli generates the flags); its check accepts what Python may
pass besides (init: a list or a tensor, init_from: a state dict or a callable).
"""
import os
from collections.abc import Mapping

import torch

from ..learn.merged_model import GRANULARITIES
from ..learn.optimizer import LR_SCHEDULES
from . import available, cart
from .params import (BACKEND_PARAM, Param, boolean, finite_number, int_at_least, integer, number_in, positive_number,
                     regex)


def _init(v):
    if isinstance(v, (list, tuple, torch.Tensor)):
        return None  # its shape ([T] or [G, T]) and values are checked once the models are read
    return None if finite_number(v) is None else "must be a finite number, [T] or [G, T] values"


def _task_names(v):
    if isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v):
        return None
    return "must be a list of task names (str), one per model"


def _pad_value(v):
    if isinstance(v, Mapping) and all(finite_number(x) is None for x in v.values()):
        return None
    return None if finite_number(v) is None else "must be a number or a dict {input name: number}"


def _init_from(v):
    if isinstance(v, str):
        static = available("static")
        return None if v in static else f"unknown static method; expected one of {static}"
    if isinstance(v, Mapping) or callable(v):
        return None
    return "must be a static method name, a merged state dict or a callable returning one"


def _clamp(v):
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(finite_number(x) is None for x in v) and v[0] <= v[1]:
        return None
    return "must be a (low, high) pair of numbers with low <= high, or None"


def _mapping(v):
    return None if isinstance(v, Mapping) else "must be a dict of parameters"


GRANULARITY = Param("granularity", "layer", "'layer': one Γ per task and merged key (or per layer_groups match); "
                    "'task': one Γ per task", type=str, choices=GRANULARITIES)
TASK_SPECIFIC_KEYS = Param("task_specific_keys", None, "regex of keys not merged, task t runs with its own (e.g. "
                           "'^classifier\\.'); None: every key is merged, heads included, so they must agree",
                           type=str, check=regex)
LAYER_GROUPS = Param("layer_groups", None, "regex: one Γ per task per match (layer granularity); None: one per key",
                     type=str, check=regex)
INIT = Param("init", None, "initial Γ: a number, [T] or [G, T] values; None = 1/T (start='cart': CART's λ; "
             "init_from: 0)",
             check=_init)
LR = Param("lr", 1e-2, "Adam learning rate", check=positive_number)
LR_SCHEDULE = Param("lr_schedule", "constant", "the learning rate over the run's steps: 'constant', or 'cosine' "
                    "(from lr down to 0 at the last step, half a cosine)", type=str, choices=LR_SCHEDULES)
BATCH_SIZE = Param("batch_size", None, "examples per step, mixed across tasks (batch_size // T of every task); "
                   "None = 4 * T", type=int, check=int_at_least(1))
EPOCHS = Param("epochs", 4, "passes over the data (when steps is None)", type=int, check=int_at_least(1))
STEPS = Param("steps", None, "optimisation steps, overriding epochs; None = epochs passes", type=int,
              check=int_at_least(0))
EXAMPLES_PER_TASK = Param("examples_per_task", None, "the first N examples of each task's data (all of it when "
                          "shorter); None = all", type=int, check=int_at_least(1))
CLAMP = Param("clamp", None, "Γ projected onto [low, high] after every step; None = unconstrained", type=tuple,
              check=_clamp, optional=True)
TEMPERATURE = Param("temperature", 1.0, "softmax temperature of the logits", check=positive_number)
SEED = Param("seed", 0, "seed of the batch order", type=int, check=integer)
PROGRESS = Param("progress", True, "tqdm progress bar with the running loss", type=bool, check=boolean)
LOG_EVERY = Param("log_every", None, "an INFO line through logging (logger 'pymerge.learn') every N steps: step, "
                  "loss, elapsed, ETA; None = about ten lines a run; 0 = none", type=int, check=int_at_least(0))
BACKEND = Param("backend", BACKEND_PARAM.default, "pymerge.ops backend of the loss (and of start='cart''s "
                "randomized SVD)", type=str, choices=BACKEND_PARAM.choices)
GATHER_EMBEDDINGS = Param("gather_embeddings", True, "look merged embedding rows up without materialising the "
                          "tables (verified once against the plain path)", type=bool, check=boolean)
BATCH_TASKS = Param("batch_tasks", True, "run every task's examples as one batch where the heads allow it "
                    "(verified once against the plain path)", type=bool, check=boolean)
TASK_NAMES = Param("task_names", None, "one name per model; None = the models mapping's keys, else task0, task1, ...",
                   type=object, check=_task_names)
def _model_factory(v):
    return None if callable(v) else "must be a callable state_dict -> nn.Module"


def _tokenizer(v):
    if callable(v) or isinstance(v, (str, os.PathLike)):
        return None
    return "must be a tokenizer (text -> {'input_ids': [...]}, e.g. a transformers tokenizer) or its directory"


# What the caller holds (pymerge.learn.model_sources): models as state dicts or Hugging Face directories, data as texts.
MODEL_FACTORY = Param("model_factory", None, "builds the module of a model (or base) given as a state dict: "
                      "f(state_dict) -> nn.Module, then loaded strictly (it may size a head from the state dict)",
                      type=object, check=_model_factory)
TOKENIZER = Param("tokenizer", None, "tokenizes data given as texts (a list of str per task): a tokenizer or the "
                  "directory of one (read offline); None = the base's or a model directory's, when given as "
                  "directories", type=object, check=_tokenizer)
TEXT_MAX_LENGTH = Param("text_max_length", None, "data given as texts: tokens per text, longer ones truncated; None = "
                        "the tokenizer's model_max_length, at most 512", type=object, check=int_at_least(1),
                        optional=True)
PAD_VALUE = Param("pad_value", 0, "right-padding when examples of different lengths share a batch; a dict maps "
                  "input names to pad values", type=object, check=_pad_value)

# The start point (pymerge.methods.learned_starts.learned_start reads these six). start='cart' takes static CART's
# defaults (its Params): svd, lam (Γ's start), so that it starts where pymerge.merge("cart", ...) ends.
CART_DEFAULTS = {p.name: p.default for p in cart.SPEC.params}
START = Param("start", "pretrained", "'pretrained': θ_0 + Σ_t Γ_t τ_t (the papers); 'cart': θ_avg + Σ_t Γ_t "
              "lowrank(θ_t − θ_avg), Γ starting at static CART's λ (init None), i.e. at pymerge.merge('cart') "
              "(docs/METHODS.md §Adaptive CART)", type=str, choices=("pretrained", "cart"))
CART_RANK_RATIO = Param("cart_rank_ratio", None, "start='cart': k = max(1, int(ratio * min(m, n))), in (0, 1]; "
                        f"None = {cart.DEFAULT_RANK_RATIO} (static CART's default)",
                        check=number_in(0, 1, low_open=True))
CART_KEYS = Param("cart_keys", None, "start='cart': static CART's low_rank_keys (a regex, or 'vit'); None = CART's "
                  "default selection: every 2-D merged key matching none of pymerge.methods.cart.DEFAULT_EXCLUDE_KEYS "
                  "(embeddings, heads, poolers)", type=str, check=regex)
CART_SVD = Param("cart_svd", CART_DEFAULTS["svd"], "start='cart': static CART's svd, 'randomized' "
                 "(its oversampling and power iterations, seed 0 per key) or 'exact'", type=str,
                 choices=("exact", "randomized"))
INIT_FROM = Param("init_from", None, "start from a static merge, Γ from 0: a static method name (pymerge.merge), "
                  "a merged state dict, or f(base_sd, model_sds, **init_from_params) -> state dict", type=str,
                  check=_init_from)
INIT_FROM_PARAMS = Param("init_from_params", None, "parameters of the init_from method or callable",
                         type=object, check=_mapping)
START_PARAMS = (START, CART_RANK_RATIO, CART_KEYS, CART_SVD, INIT_FROM, INIT_FROM_PARAMS)
