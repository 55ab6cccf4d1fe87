"""A learned merge end to end, and its result.

``learn(base, models, data, objective, *, method, ...) -> LearnedMerge``: the whole pipeline (validation,
data, objective.prepare per model while the task vectors are read, verification of the fast paths,
optimisation, merged state dicts); pymerge.divmerge (both kinds) and pymerge.adamerging call it with their
options (declared and checked by their SPEC, pymerge/methods/<name>.py).

Result ``LearnedMerge``:
    state_dict: the merged shared entries (every key except the task-specific ones). Without
        task-specific keys this is the complete merged model.
    task_state_dicts: {task: complete state dict for task t} = state_dict + task t's own head (the shared
        tensors are the same objects, not copies). Load with module.load_state_dict(...).
    heads: {task: {key: tensor}} the task-specific entries.
    coefficients: Gamma, [T] at task granularity, [G, T] at layer granularity (detached, float32/64).
    losses: the objective after every step. save_coefficients(path) writes Gamma as JSON.
    config: the options used (scalars saved in the JSON); teacher_cache_hits: how many tasks' targets came
        from the disk cache (objectives with targets only); read_seconds / optimise_seconds: wall time reading
        the models (task vectors, teacher targets, start point) and optimising Gamma.
"""
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .batching import TaskExamples
from .inputs import data_per_task, task_names_and_models
from .merged_model import MergedModel
from .model_sources import is_text_list, load_tokenizer, model_dirs, resolve_models
from .objective import Objective, TeacherOptions
from .optimizer import CoefficientOptimizer
from .start_points import StartPoint

logger = logging.getLogger("pymerge.learn")


@dataclass
class LearnedMerge:
    """Result of a learned merge (see the module docstring for every field)."""
    method: str
    tasks: List[str]
    granularity: str
    groups: List[str]
    group_of: Dict[str, str]
    coefficients: torch.Tensor
    losses: List[float]
    state_dict: "OrderedDict[str, torch.Tensor]"
    task_state_dicts: Dict[str, "OrderedDict[str, torch.Tensor]"]
    heads: Dict[str, Dict[str, torch.Tensor]]
    config: Dict[str, Any] = field(default_factory=dict)

    def coefficient_table(self):
        """{task: value} (task granularity) or {task: {group: value}} (layer granularity)."""
        gam = self.coefficients.double().cpu()
        if self.granularity == "task":
            return {name: float(gam[t]) for t, name in enumerate(self.tasks)}
        return {name: {grp: float(gam[g, t]) for g, grp in enumerate(self.groups)} for t, name in enumerate(self.tasks)}

    def to_json(self):
        return {"method": self.method, "granularity": self.granularity, "tasks": list(self.tasks),
                "groups": list(self.groups) if self.granularity == "layer" else ["*"],
                "group_of": dict(self.group_of) if self.granularity == "layer" else {},
                "coefficients": self.coefficient_table(), "losses": list(self.losses),
                "config": {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool, type(None)))}}

    def save_coefficients(self, path):
        """Write Gamma (per task, per group at layer level), the key -> group map, the loss curve and the
        scalar options as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return path


# ------------------------------------------------------------------------------------------------- driver
def learn(base, models, data, objective: Objective, *, method, task_names=None, task_specific_keys=None,
          granularity="layer", layer_groups=None, init=None, default_init=None, start: Optional[StartPoint] = None,
          lr=1e-2, lr_schedule="constant", batch_size=None, epochs=4, steps=None, examples_per_task=None, clamp=None,
          seed=0, teacher_batch_size=32, pad_value=0, teacher_cache=False, cache_dir=None, gather_embeddings=True,
          batch_tasks=True, progress=True, log_every=None, model_factory=None, tokenizer=None,
          text_max_length=None):
    """The whole pipeline; divmerge() (classification and causal LM) and adamerging() call it with their
    objective, start point and defaults. The objective turns each task's data into examples
    (objective.examples) and, while the fine-tuned model is read, into inputs and cached targets
    (objective.prepare); teacher_cache / cache_dir: the disk cache of those targets (pymerge.teachers).
    start: a StartPoint (None: the pretrained start). log_every: a progress line through the logger
    "pymerge.learn" every N steps (None: about ten a run; 0: none), and one per task while the models are read.
    model_factory, tokenizer, text_max_length: models given as Hugging Face directories or state dicts, data as
    texts (pymerge.learn.model_sources)."""
    what = method
    start = StartPoint() if start is None else start
    dirs = model_dirs(base, models)
    base, models = resolve_models(base, models, model_factory, what)
    names, entries = task_names_and_models(models, task_names, f"{what}: models")
    sources = data_per_task(data, names, f"{what}: data")
    tokenizer = tokenizer if tokenizer is not None else objective.tokenizer
    if tokenizer is not None or any(is_text_list(src) for src in sources):
        objective.tokenizer = load_tokenizer(tokenizer, dirs, what)
    if text_max_length is not None:
        objective.text_max_length = text_max_length
    if examples_per_task is not None and (isinstance(examples_per_task, bool) or int(examples_per_task) < 1):
        raise ValueError(f"{what}: examples_per_task = {examples_per_task} must be a positive int (or None: all)")
    if steps is None and not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"{what}: epochs = {epochs} must be a positive int")
    if steps is not None and (isinstance(steps, bool) or int(steps) < 0):
        raise ValueError(f"{what}: steps = {steps} must be a non-negative int")
    # Data first: a bad data source fails before any model is touched.
    examples = [objective.examples(name, src, examples_per_task) for src, name in zip(sources, names)]
    if objective.pad_value is not None:   # texts: the tokenizer's pad token
        pad_value = objective.pad_value
    options = TeacherOptions(batch_size=teacher_batch_size, pad_value=pad_value, cache=teacher_cache,
                             cache_dir=cache_dir, progress=progress)
    prepared: List[Optional[tuple]] = [None] * len(names)

    began = time.perf_counter()

    def on_model(t, module):
        tick = time.perf_counter()
        prepared[t] = objective.prepare(t, module, examples[t], options)
        if log_every != 0:
            cached = getattr(prepared[t][1], "loaded_from_cache", None)
            logger.info("%s: task %d/%d %r read: %d examples%s, %.1f s", what, t + 1, len(names), names[t],
                        len(examples[t]), "" if cached is None else
                        " (teacher targets from the disk cache)" if cached else " (teacher targets computed)",
                        time.perf_counter() - tick)

    if init is None and not start.gamma_starts_at_zero:
        # the start point's own Gamma (start='cart': CART's lam), else the method's default
        init = start.initial_gamma if start.initial_gamma is not None else default_init
    merged = MergedModel.build(base, dict(zip(names, entries)), task_specific_keys=task_specific_keys,
                               granularity=granularity, layer_groups=layer_groups, init=init, start=start,
                               gather_embeddings=gather_embeddings, batch_tasks=batch_tasks, on_model=on_model,
                               what=what)
    del entries, examples
    if objective.pad_value is not None:
        pad_value = objective.pad_value
    tasks = [TaskExamples(n, inputs, targets) for n, (inputs, targets) in zip(names, prepared)]
    merged.verify([task.inputs[:2] for task in tasks], pad_value)
    opt = CoefficientOptimizer(merged, tasks, objective, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size,
                               clamp=clamp, seed=seed, pad_value=pad_value, what=what)
    total = int(steps) if steps is not None else epochs * opt.steps_per_epoch()
    if log_every != 0:
        logger.info("%s: models read in %.1f s; %d steps of %d examples, Γ %s", what, time.perf_counter() - began,
                    total, sum(opt.sizes), list(merged.gamma.shape))
    read_s = time.perf_counter() - began
    opt.run(total, progress=progress, desc=method, log_every=log_every)
    optimise_s = time.perf_counter() - began - read_s
    shared, per_task = merged.state_dicts()
    gam = merged.gamma.detach().clone()
    coefficients = gam[0] if granularity == "task" else gam
    config = dict(granularity=granularity, start=start.name, lr=lr, lr_schedule=lr_schedule, batch_size=sum(opt.sizes),
                  epochs=epochs, steps=total, examples_per_task=examples_per_task, seed=seed, layer_groups=layer_groups,
                  task_specific_keys=task_specific_keys, init=init if isinstance(init, (int, float)) else None,
                  init_from=None)
    config.update(start.config())
    # wall time: reading the models (task vectors, teacher targets or their cache, start point, checks), optimising
    config.update(read_seconds=round(read_s, 3), optimise_seconds=round(optimise_s, 3))
    if any(task.targets is not None for task in tasks):
        # targets read from the disk cache carry loaded_from_cache (pymerge.teachers.CachedTargets)
        config["teacher_cache_hits"] = sum(bool(getattr(task.targets, "loaded_from_cache", False)) for task in tasks)
    return LearnedMerge(method=method, tasks=names, granularity=granularity, groups=list(merged.groups),
                        group_of=dict(merged.group_of), coefficients=coefficients, losses=list(opt.losses),
                        state_dict=shared, task_state_dicts=dict(zip(names, per_task)),
                        heads=dict(zip(names, merged.heads)), config=config)

