"""The evaluation harness: merge fine-tuned classifiers of several tasks with each method and measure the merged
model on every task it covers.

    suite = suite_from_experts(build_experts(tasks), tasks)          # or suite_from_model_dirs(...)
    result = run_evaluation(suite, variants(["task_arithmetic", "cart", "divmerge"]), subset_sizes=(2, 4))
    result.rows  ->  one Row per (subset of tasks, variant): per-task test accuracy, ANP, gap closed, seconds

What it does, for each subset size k: a fixed, seeded sample of k-task subsets; for each subset and variant,
the shared weights (everything but the task-specific head) of the subset's fine-tuned models are merged (the
base is the pretrained model's), and task t is evaluated with the merged weights and its own head (heads are
never merged). ANP = mean_t acc(merged, t) / acc(expert t, t), both on the same test examples; the share of
the task-arithmetic -> expert gap a variant closes is (ANP - ANP_TA) / (1 - ANP_TA). Static methods with a
`grid` are tuned on the validation split (the combination with the highest validation ANP, ties to the first
in grid order); the learned methods (DivMerge, AdaMerging) read unlabelled texts of the train split, never
test. Each row records the wall time of its final merge (a learned merge: the whole call, teachers
included) and the time spent tuning. Deterministic for a seed (subsets, randomized methods, batch order).
"""
import itertools
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..learn.batching import logits_of
from ..methods import available
from .experts import Backbone, collate, tokenize
from .resume import SubsetLog, run_key, run_subsets
from .tasks import Task
from .tuning import LEARNED, SuiteResult, TunedRun, checked_sizes, grids_and_variants, mean

logger = logging.getLogger("pymerge.eval")

# Validation grids where the papers tune: λ of task arithmetic and TIES, λ and the rank ratio of CART.
DEFAULT_GRIDS = {
    "task_arithmetic": {"lam": (0.2, 0.3, 0.5, 0.7, 1.0)},
    "ties": {"lam": (0.6, 1.0, 1.4)},
    "cart": {"lam": (1.0, 1.5, 2.0), "rank_ratio": (0.04, 0.08, 0.16)},
}
# The learned methods' cost settings here (their other options: the methods' defaults, docs/METHODS.md).
DEFAULT_LEARNED = {"divmerge": {"steps": 200}, "adamerging": {"steps": 200}}
DEFAULT_UNLABELLED = 200  # unlabelled train texts per task for DivMerge / AdaMerging
REFERENCE_ROWS = ("expert", "pretrained")


# ------------------------------------------------------------------------------------------------- models
@dataclass
class Member:
    """One task's fine-tuned classifier. state(): its full state dict; module(): a fresh module of its
    architecture whose forward(input_ids=, attention_mask=) gives logits (a tensor or an output with .logits);
    label_order: output column of each of the task's class ids (None: the same order)."""
    task: Task
    state: Callable[[], dict]
    module: Callable[[], nn.Module]
    max_length: int
    source: str
    label_order: tuple | None = None


@dataclass
class Suite:
    """What the harness merges: θ_0 of the shared keys (base_state), one Member per task, the tokenizer, and
    the regex of the task-specific keys (never merged: each task keeps its own)."""
    base_state: dict
    members: dict
    tokenizer: object
    task_specific: str

    def shared(self, state: Mapping) -> dict:
        return {k: state[k] for k in self.base_state}

    def own(self, state: Mapping) -> dict:
        return {k: v for k, v in state.items() if k not in self.base_state}


def suite_from_experts(experts: Mapping, tasks: Sequence[Task], backbone: Backbone | None = None) -> Suite:
    """A Suite of pymerge.eval experts ({task name: Expert}, MeanPooledClassifiers of `backbone`): the shared
    keys are the body's ("body.*"), the task-specific ones the head ("head.*")."""
    backbone = backbone or Backbone.default()
    by_name = {t.name: t for t in tasks}
    missing = [n for n in experts if n not in by_name]
    if missing:
        raise ValueError(f"experts {missing} have no task among {list(by_name)}")
    members = {}
    for name, expert in experts.items():
        task = by_name[name]
        members[name] = Member(task, expert.state_dict, lambda n=task.num_classes: backbone.classifier(n),
                               expert.settings.max_length, str(expert.path))
    base = {f"body.{k}": v for k, v in backbone.body_state().items()}
    return Suite(base, members, backbone.tokenizer, r"^head\.")


def suite_from_model_dirs(backbone_dir, model_dirs: Mapping, tasks: Sequence[Task], max_length: int = 128) -> Suite:
    """A Suite of a user's own fine-tuned Hugging Face sequence classifiers ({task name: directory}, each
    fine-tuned from `backbone_dir`, the pretrained model's directory), read offline. The task-specific keys
    are those the pretrained checkpoint lacks (the new classification head); the others are merged. A
    model's labels follow the task's class ids unless its config.json id2label names every class of the task
    (then its columns are mapped by name). ValueError naming the directory when a model does not fit."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    by_name = {t.name: t for t in tasks}
    configs, members = {}, {}
    for name, path in model_dirs.items():
        if name not in by_name:
            raise ValueError(f"model {name}={path}: no task named {name!r} (give its data)")
        try:
            configs[name] = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types; its message says what is wrong
            raise ValueError(f"model {name}={path}: not a Hugging Face model directory ({e})") from None
    first = next(iter(model_dirs))
    try:
        base_model, info = AutoModelForSequenceClassification.from_pretrained(
            str(backbone_dir), local_files_only=True, num_labels=configs[first].num_labels,
            ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"backbone {backbone_dir}: cannot load it as a sequence classifier ({e})") from None
    head = set(info.get("missing_keys", ())) | {m[0] for m in info.get("mismatched_keys", ())}
    base = {k: v for k, v in base_model.state_dict().items() if k not in head}
    for name, path in model_dirs.items():
        task, config = by_name[name], configs[name]
        if config.num_labels != task.num_classes:
            raise ValueError(f"model {name}={path}: {config.num_labels} labels, task {name!r} has "
                             f"{task.num_classes} classes {list(task.class_names)}")
        names = [str(config.id2label.get(i, "")) for i in range(config.num_labels)]
        wanted = [str(c) for c in task.class_names]
        order = tuple(names.index(c) for c in wanted) if sorted(names) == sorted(wanted) else None

        def load(path=path, name=name):
            model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
            state = model.state_dict()
            bad = [k for k in base if k not in state or state[k].shape != base[k].shape]
            if bad:
                raise ValueError(f"model {name}={path}: key(s) {bad[:3]} missing or of another shape than in the "
                                 f"backbone {backbone_dir} (not fine-tuned from it?)")
            return state

        members[name] = Member(task, load, lambda c=config: AutoModelForSequenceClassification.from_config(c),
                               max_length, str(path), order)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir), local_files_only=True)
    regex = "^(?:" + "|".join(re.escape(k) for k in sorted(head)) + ")$" if head else r"^$"
    return Suite(base, members, tokenizer, regex)


# ----------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One row of the tables: `method` (a static method name, "divmerge" or "adamerging") with fixed `params`
    and a validation `grid` ({param: values}, static methods). tuned_as: reuse the parameters chosen for that
    static method in the same subset (e.g. exact-SVD CART at randomized CART's λ and rank), so the two rows
    differ only by what the variant changes. start: a learned method's start, "task_arithmetic" or "cart_merge"
    (init_from that static method at its tuned parameters, Γ from 0 on the whole task vectors) or "cart"
    (start="cart" at the tuned rank ratio: Γ on CART's centered rank-k parts, starting at the tuned λ)."""
    label: str
    method: str
    params: Mapping = field(default_factory=dict)
    grid: Mapping = field(default_factory=dict)
    tuned_as: str | None = None
    start: str | None = None
    note: str = ""


def variants(methods: Sequence[str], *, with_variants: bool = True, grids: Mapping | None = None,
             learned: Mapping | None = None) -> list:
    """The rows for `methods` (names of pymerge.methods.available("all"); "all" for every one): each
    method with its defaults (static methods with a `grids` entry, default DEFAULT_GRIDS, tuned on
    validation), and with_variants: CART with the exact SVD; DivMerge at task level, with KL, started from
    task arithmetic and from CART (init_from), and in CART's space (start="cart"); AdaMerging at task level.
    learned: {method: options} for the learned methods (default DEFAULT_LEARNED)."""
    known = available("all")
    if list(methods) == ["all"]:
        methods = known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(known)}")
    grids = DEFAULT_GRIDS if grids is None else grids
    learned = {**DEFAULT_LEARNED, **(learned or {})}
    rows = []
    for m in dict.fromkeys(methods):
        if m not in LEARNED:
            rows.append(Variant(m, m, {}, dict(grids.get(m, {}))))
            if m == "cart" and with_variants:
                rows.append(Variant("cart-exact", "cart", {"svd": "exact"}, tuned_as="cart",
                                    note="CART with torch.linalg.svd, at the λ and rank chosen for cart"))
            continue
        opts = dict(learned.get(m, {}))
        if m == "divmerge":
            rows.append(Variant("divmerge", m, {**opts, "granularity": "layer", "divergence": "js"},
                                note="layer level, Jensen-Shannon, from the pretrained model"))
            if with_variants:
                rows += [Variant("divmerge-task", m, {**opts, "granularity": "task"}, note="task level"),
                         Variant("divmerge-kl", m, {**opts, "divergence": "kl"}, note="forward KL"),
                         Variant("divmerge-from-ta", m, opts, start="task_arithmetic",
                                 note="refines task arithmetic at its tuned λ (init_from)"),
                         Variant("divmerge-from-cart", m, opts, start="cart_merge",
                                 note="refines CART at its tuned λ and rank (init_from)"),
                         Variant("divmerge-cart-space", m, opts, start="cart",
                                 note="start='cart': Γ on CART's rank-k centered parts, from its tuned λ")]
        else:
            rows.append(Variant("adamerging", m, {**opts, "granularity": "layer"}, note="layer level"))
            if with_variants:
                rows.append(Variant("adamerging-task", m, {**opts, "granularity": "task"}, note="task level"))
    if any(v.method != "task_arithmetic" for v in rows) and not any(v.label == "task_arithmetic" for v in rows):
        # the reference of the gap-closed column
        rows.insert(0, Variant("task_arithmetic", "task_arithmetic", {}, dict(grids.get("task_arithmetic", {})),
                               note="added: the reference of the gap closed"))
    return rows


def subsets(names: Sequence[str], size: int, count: int, seed: int = 0) -> list:
    """`count` distinct `size`-task subsets of `names` (all of them when there are no more), drawn with
    random.Random(seed + size), each a tuple in the order of `names`, sorted by that order."""
    names = list(names)
    if not 1 <= size <= len(names):
        raise ValueError(f"subset size {size}: must be between 1 and the number of tasks ({len(names)})")
    combos = list(itertools.combinations(names, size))
    if len(combos) <= count:
        return combos
    picked = random.Random(seed + size).sample(range(len(combos)), count)
    return [combos[i] for i in sorted(picked)]


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    """One (subset, variant): accuracy per task of the subset (test), ANP, gap closed, seconds."""
    size: int
    subset: tuple
    variant: str
    method: str
    params: dict
    accuracy: dict
    anp: float
    gap_closed: float = float("nan")
    merge_seconds: float = 0.0
    tune_seconds: float = 0.0
    validation_anp: float = float("nan")
    note: str = ""


@dataclass
class EvalResult(SuiteResult):
    rows: list
    experts: dict          # {task: {"test": acc, "validation": acc, "pretrained_test": acc, "source": ...}}
    config: dict

    MEANS = ("anp", "gap_closed", "merge_seconds")


# ------------------------------------------------------------------------------------------------ running
class _Evaluator:
    """Accuracy of shared weights with one task's own task-specific weights (one module per task, reloaded),
    on the first `limit` examples of a split; the tokens are computed once."""

    def __init__(self, suite, limits, batch_size, device):
        self.suite, self.limits, self.batch_size, self.device = suite, limits, batch_size, device
        self.modules, self.own, self.tokens = {}, {}, {}
        self.pad = suite.tokenizer.pad_token_id if suite.tokenizer.pad_token_id is not None else 0

    def _module(self, name):
        if name not in self.modules:
            member = self.suite.members[name]
            state = member.state()
            self.own[name] = self.suite.own(state)
            module = member.module()
            module.load_state_dict(state)
            self.modules[name] = module.to(self.device).eval()
        return self.modules[name]

    def split(self, name, split):
        if (name, split) not in self.tokens:
            member = self.suite.members[name]
            texts, labels = member.task.split(split, self.limits[split])
            self.tokens[name, split] = tokenize(self.suite.tokenizer, texts, member.max_length), labels
        return self.tokens[name, split]

    @torch.no_grad()
    def accuracy(self, name, shared, split) -> float:
        module = self._module(name)
        module.load_state_dict({**shared, **self.own[name]})
        ids, labels = self.split(name, split)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        correct = 0
        member = self.suite.members[name]
        for s in range(0, len(order), self.batch_size):
            batch = order[s:s + self.batch_size]
            x, mask = collate([ids[i] for i in batch], self.pad)
            logits = logits_of(module(input_ids=x.to(self.device), attention_mask=mask.to(self.device))).float()
            if member.label_order is not None:
                logits = logits[:, list(member.label_order)]
            correct += int((logits.argmax(-1).cpu() == torch.tensor([labels[i] for i in batch])).sum())
        return correct / len(ids)


class _SubsetRun(TunedRun):
    """The variants of one subset of tasks: the experts' shared (body) weights merged, scored by ANP."""

    def __init__(self, harness, names):
        super().__init__(harness, names, harness.suite.base_state,
                         {n: harness.suite.shared(harness.suite.members[n].state()) for n in names})

    def score(self, state, split):
        return self.anp(state, split)

    def anp(self, shared, split):
        return mean(self.h.evaluator.accuracy(n, shared, split) / self.h.reference[n][split] for n in self.names)

    def learned_row(self, v):
        return self.learned_result(*self.learn(v))

    def learn(self, v):
        """Run a learned row's method on this subset: (its keyword arguments, the LearnedMerge, seconds)."""
        from ..methods.adamerging import adamerging
        from ..methods.divmerge import divmerge
        params = self.learned_params(v)
        suite, h = self.h.suite, self.h
        first = suite.members[self.names[0]]
        base = first.module()
        base.load_state_dict({**suite.base_state, **suite.own(first.state())})
        base.to(h.evaluator.device)
        loaders = {}
        for n in self.names:
            def load(n=n):
                m = suite.members[n].module()
                m.load_state_dict(suite.members[n].state())
                return m.to(h.evaluator.device).eval()
            loaders[n] = load
        data = {n: h.unlabelled_batches(n) for n in self.names}
        fn = divmerge if v.method == "divmerge" else adamerging
        start = time.perf_counter()
        options = {"progress": False, "pad_value": {"input_ids": h.evaluator.pad},
                   "examples_per_task": h.unlabelled, **params}
        result = fn(base, loaders, data, task_specific_keys=suite.task_specific, **options)
        return params, result, time.perf_counter() - start


class _Harness:
    def __init__(self, suite, grids, seed, unlabelled, limits, batch_size, device):
        self.suite, self.grids, self.seed, self.unlabelled = suite, grids, seed, unlabelled
        self.evaluator = _Evaluator(suite, limits, batch_size, device)
        self.reference = {}
        self._batches = {}

    def unlabelled_batches(self, name, batch_size=32):
        """The first `unlabelled` texts of the task's train split, tokenized, as dict batches (no labels)."""
        if name not in self._batches:
            member = self.suite.members[name]
            texts, _ = member.task.split("train", self.unlabelled)
            ids = tokenize(self.suite.tokenizer, texts, member.max_length)
            self._batches[name] = [dict(zip(("input_ids", "attention_mask"), collate(ids[i:i + batch_size],
                                                                                     self.evaluator.pad)))
                                   for i in range(0, len(ids), batch_size)]
        return self._batches[name]


def run_evaluation(suite: Suite, rows: Sequence[Variant], subset_sizes: Sequence[int] = (2, 4, 6), *,
                   subsets_per_size: int = 3, seed: int = 0, test_limit: int | None = None,
                   validation_limit: int | None = 200, unlabelled_per_task: int = DEFAULT_UNLABELLED,
                   grids: Mapping | None = None, batch_size: int = 64, device="cpu", on_row=None,
                   checkpoint=None) -> EvalResult:
    """Merge and evaluate every variant on `subsets_per_size` seeded subsets of each size (see the module
    docstring). test_limit / validation_limit: the first N examples of each task's test / validation split
    (None: all); unlabelled_per_task: train texts given to the learned methods; grids: {method: grid} of the
    methods whose tuned parameters a tuned_as / start row borrows (default DEFAULT_GRIDS); on_row(row):
    called as each subset's rows finish; checkpoint: a file that keeps each finished subset's rows, so a run
    with the same settings resumes (pymerge.eval.resume). Returns an EvalResult (reports: pymerge.eval.report)."""
    names = list(suite.members)
    sizes = checked_sizes(subset_sizes, names, "tasks")
    grids = DEFAULT_GRIDS if grids is None else grids
    h = _Harness(suite, grids, seed, unlabelled_per_task, {"test": test_limit, "validation": validation_limit},
                 batch_size, device)
    base = suite.base_state
    experts = {}
    ev = h.evaluator
    for n in names:
        expert_shared = suite.shared(suite.members[n].state())
        h.reference[n] = {s: ev.accuracy(n, expert_shared, s) for s in ("test", "validation")}
        experts[n] = {**h.reference[n], "pretrained_test": ev.accuracy(n, base, "test"),
                      "test_examples": len(ev.split(n, "test")[1]),
                      "validation_examples": len(ev.split(n, "validation")[1]), "source": suite.members[n].source}
        logger.info("expert %s: test accuracy %.4f on %d examples (validation %.4f), pretrained body %.4f", n,
                    h.reference[n]["test"], experts[n]["test_examples"], h.reference[n]["validation"],
                    experts[n]["pretrained_test"])
    config = {"seed": seed, "subset_sizes": sizes, "subsets_per_size": subsets_per_size,
              "test_limit": test_limit, "validation_limit": validation_limit,
              "unlabelled_per_task": unlabelled_per_task, **grids_and_variants(grids, rows),
              "torch_threads": torch.get_num_threads(), "device": str(device)}
    log = None if checkpoint is None else SubsetLog(checkpoint, run_key(config, experts), Row)
    pairs = [(size, subset) for size in sizes for subset in subsets(names, size, subsets_per_size, seed)]
    out = run_subsets(pairs, lambda size, subset: _subset_rows(h, rows, size, subset, experts), log, on_row)
    return EvalResult(out, experts, config)


def _subset_rows(h, rows, size, subset, experts):
    """The rows of one subset: expert, pretrained, then each variant, with the gap each closes."""
    run = _SubsetRun(h, subset)
    subset_rows = [Row(size, subset, "expert", "expert", {}, {n: h.reference[n]["test"] for n in subset},
                       1.0, note="each task's own fine-tuned model"),
                   Row(size, subset, "pretrained", "pretrained", {},
                       {n: experts[n]["pretrained_test"] for n in subset},
                       mean(experts[n]["pretrained_test"] / h.reference[n]["test"] for n in subset),
                       note="the pretrained body with each task's head")]
    for v in rows:
        params, merged, seconds, score, tuning = run.row(v)
        acc = {n: h.evaluator.accuracy(n, merged, "test") for n in subset}
        del merged
        row = Row(size, subset, v.label, v.method, params, acc,
                  mean(acc[n] / h.reference[n]["test"] for n in subset), merge_seconds=seconds,
                  tune_seconds=tuning, validation_anp=score, note=v.note)
        subset_rows.append(row)
        logger.info("%d tasks %s: %s ANP %.4f (merge %.1f s, tuning %.1f s) %s", size, "+".join(subset),
                    v.label, row.anp, seconds, tuning, json.dumps(params, default=str))
    ta = next((r.anp for r in subset_rows if r.variant == "task_arithmetic"), float("nan"))
    for r in subset_rows:
        r.gap_closed = (r.anp - ta) / (1 - ta) if 1 - ta > 1e-12 else float("nan")
    return subset_rows
