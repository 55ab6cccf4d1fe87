"""The optimiser loop of a learned merge: Adam on Gamma over batches mixed across tasks.

``CoefficientOptimizer(merged, tasks, objective, *, lr, lr_schedule="constant", batch_size, clamp=None, seed=0)``:
    Adam on Gamma.
    Each step draws batch_size examples mixed across tasks (batch_size // T per task, the remainder to the
    first tasks; each task's examples reshuffled every pass), runs every task once on ONE shared merged
    parameter set and minimises sum_t loss_t (docs/METHODS.md §Learned coefficients: tasks summed
    unweighted). ``step() -> float``, ``run(steps, progress=True, desc=..., log_every=None) -> [float]`` (tqdm
    bar with the running loss, and a line through the logger "pymerge.learn" every log_every steps: step,
    running loss, elapsed, ETA; None = about ten lines a run; lr_schedule "cosine": step i of n runs at
    lr_at(lr, "cosine", i, n) = lr (1 + cos(pi (i - 1) / n)) / 2, lr at the first step, near 0 at the last),
    ``loss(gamma=None, indices=None)`` the objective on given examples (used by the gradient checks).
"""
import logging
import math
import time
from typing import List, Sequence

import torch

from .batching import TaskExamples, collate
from .merged_model import MergedModel
from .objective import Objective

logger = logging.getLogger("pymerge.learn")
LOG_LINES = 10   # log_every=None: about this many progress lines per run
LR_SCHEDULES = ("constant", "cosine")


def lr_at(lr, schedule, i, steps):
    """The learning rate of step i (1-based) of `steps` under `schedule` (LR_SCHEDULES)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (i - 1) / steps))
    raise ValueError(f"lr_schedule = {schedule!r}; expected one of {LR_SCHEDULES}")


def default_log_every(steps):
    """log_every=None: a line every ceil(steps / 10) steps (at least every step)."""
    return max(1, math.ceil(steps / LOG_LINES))


class CoefficientOptimizer:
    """Adam on merged.gamma over mixed-task batches (see the module docstring)."""

    def __init__(self, merged: MergedModel, tasks: Sequence[TaskExamples], objective: Objective, *, lr=1e-2,
                 lr_schedule="constant", batch_size=None, clamp=None, seed=0, pad_value=0, what="learned merge"):
        T = len(merged.tasks)
        if len(tasks) != T:
            raise ValueError(f"{what}: {len(tasks)} task example sets for {T} tasks")
        batch_size = 4 * T if batch_size is None else int(batch_size)
        if batch_size < T:
            raise ValueError(f"{what}: batch_size = {batch_size} is smaller than the number of tasks T = {T} "
                             "(each step draws at least one example of every task)")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{what}: lr = {lr} must be a positive finite number")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{what}: lr_schedule = {lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if clamp is not None and (len(clamp) != 2 or not clamp[0] <= clamp[1]):
            raise ValueError(f"{what}: clamp = {clamp} must be a (low, high) pair with low <= high")
        self.merged, self.tasks, self.objective = merged, list(tasks), objective
        self.sizes = [batch_size // T + (1 if t < batch_size % T else 0) for t in range(T)]
        self.clamp, self.pad_value = clamp, pad_value
        self.lr, self.lr_schedule = float(lr), lr_schedule
        self.optimizer = torch.optim.Adam([merged.gamma], lr=lr)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._order = [torch.empty(0, dtype=torch.long) for _ in range(T)]
        self._pos = [0] * T
        self.losses: List[float] = []

    def steps_per_epoch(self):
        return max(math.ceil(len(task) / size) for task, size in zip(self.tasks, self.sizes))

    def _next_indices(self, t):
        n, size = len(self.tasks[t]), self.sizes[t]
        out = []
        while len(out) < size:
            if self._pos[t] >= len(self._order[t]):
                self._order[t] = torch.randperm(n, generator=self.generator)
                self._pos[t] = 0
            take = min(size - len(out), len(self._order[t]) - self._pos[t])
            out.extend(self._order[t][self._pos[t]:self._pos[t] + take].tolist())
            self._pos[t] += take
        return out

    def loss(self, gamma=None, indices=None):
        """sum_t objective.loss over task t's examples `indices[t]` (default: all), for Gamma (default the
        parameter). Differentiable w.r.t. gamma. One merged parameter set per call, shared by every task;
        all tasks in one forward where MergedModel.batched allows it."""
        T = len(self.tasks)
        if indices is None:
            indices = [range(len(task)) for task in self.tasks]
        shared = self.merged.shared_params(gamma)
        examples = [[self.tasks[t].inputs[i] for i in indices[t]] for t in range(T)]
        outputs = self.merged.forward_tasks(examples, shared, self.pad_value, extract=self.objective.extract)
        total = 0
        for t in range(T):
            if outputs[t] is None:
                continue
            targets = None
            if self.tasks[t].targets is not None:
                targets = collate([self.tasks[t].targets[i] for i in indices[t]], 0, self.merged.device)
            total = total + self.objective.loss(t, outputs[t], targets)
        return total

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(indices=[self._next_indices(t) for t in range(len(self.tasks))])
        loss.backward()
        self.optimizer.step()
        if self.clamp is not None:
            with torch.no_grad():
                self.merged.gamma.clamp_(self.clamp[0], self.clamp[1])
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def run(self, steps, progress=True, desc="merge", log_every=None):
        """`steps` optimisation steps; progress: a tqdm bar (running loss); every log_every steps (None: about
        ten lines a run, 0: never) and at the last one, an INFO line through the logger "pymerge.learn":
        step, running loss, elapsed and remaining time, so a run without a terminal still reports."""
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=steps, desc=desc, leave=False)
            except ImportError:
                bar = None
        every = default_log_every(steps) if log_every is None else int(log_every)
        running = None
        start = time.perf_counter()
        for i in range(1, steps + 1):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.lr, self.lr_schedule, i, steps)
            value = self.step()
            running = value if running is None else 0.9 * running + 0.1 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4g}")
            if every > 0 and (i % every == 0 or i == steps):
                elapsed = time.perf_counter() - start
                logger.info("%s: step %d/%d, loss %.4g (running %.4g), %.1f s elapsed, ETA %.1f s", desc, i, steps,
                            value, running, elapsed, elapsed / i * (steps - i))
        if bar is not None:
            bar.close()
        return self.losses
