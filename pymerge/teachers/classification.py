"""Teacher targets of classification-style objectives: per example, objective.teacher(t, outputs) of
fine-tuned model t, computed once (eval mode, no grad, in chunks) and cached on disk (pymerge.teachers.cache).

``TeacherObjective``: the base class of an objective with a teacher; its prepare() hands learn() the
examples and their cached targets (``objective_targets``), what pymerge.learn.pipeline.learn uses for every
objective with a teacher. ``LogProbTeacher``: the fine-tuned classifier's class log-probabilities at a
temperature [C] as the teacher (DivMerge's; ``classification_targets`` computes them directly).
"""
import torch

from ..dtypes import accumulation_dtype
from ..learn.batching import call_model, collate, evaluating, module_device, real_length, trim_padding
from ..learn.objective import Objective, TeacherOptions
from .cache import CachedTargets, cached_targets


def _size(example):
    """The size of an example: examples of similar size share a teacher batch. Its real length where it has
    an attention_mask (rows of a padded batch carry their batch's padding), else the number of elements of
    its tensors."""
    length = real_length(example)
    if length is not None:
        return length
    if isinstance(example, torch.Tensor):
        return example.numel()
    values = example.values() if isinstance(example, dict) else example if isinstance(example, (list, tuple)) \
        else ()
    return sum(v.numel() for v in values if isinstance(v, torch.Tensor))


def teacher_targets(module, examples, objective, t, *, batch_size=32, pad_value=0, device=None):
    """objective.teacher(t, outputs) of `module` on the examples, in chunks of examples of similar size (little
    padding: by real length where they carry an attention_mask, and the columns every row of a chunk masks
    dropped), computed once under no_grad and returned per example, in the examples' order (on `device`)."""
    order = sorted(range(len(examples)), key=lambda i: _size(examples[i]))
    out = [None] * len(examples)
    with evaluating(module):
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            batch = trim_padding(collate([examples[j] for j in chunk], pad_value, device))
            target = objective.teacher(t, objective.extract(call_model(module, batch)))
            for j, row in zip(chunk, target.detach().to(device).unbind(0)):
                out[j] = row
    return out


def objective_targets(module, examples, objective, t=0, *, batch_size=32, pad_value=0, cache=True,
                      cache_dir=None, cache_key=None, device=None) -> CachedTargets:
    """objective.teacher(t, outputs) of the fine-tuned `module` per example (teacher_targets:
    eval mode, no grad, chunks of batch_size collated with pad_value), through the disk cache keyed by the
    model, the examples, objective.teacher_settings() and pad_value (an objective whose teacher_settings() is
    None is never cached). batch_size is not part of the key: it only groups the computation (examples of
    different lengths rely on the model masking the padding, e.g. through an attention_mask input).
    Tensors on `device` (default: the module's)."""
    device = module_device(module) if device is None else device
    settings = objective.teacher_settings()
    return cached_targets(
        module, examples,
        lambda: teacher_targets(module, examples, objective, t, batch_size=batch_size, pad_value=pad_value,
                                device=device),
        kind="classification", settings=dict(settings or {}, pad_value=pad_value),
        cache=cache and settings is not None, cache_dir=cache_dir, cache_key=cache_key, device=device)


def classification_targets(module, examples, *, temperature=1.0, batch_size=32, pad_value=0, cache=True,
                           cache_dir=None, cache_key=None, device=None) -> CachedTargets:
    """The fine-tuned classifier's class log-probabilities log softmax(logits / temperature), one fp32 (fp64
    for fp64 models) [C] tensor per example, computed once (eval mode, no grad) and cached on disk.

    examples: per-example inputs as pymerge.learn.collect_examples makes them (batched again with
    pymerge.learn.collate, right-padded with pad_value). objective_targets with LogProbTeacher, DivMerge's
    teacher: the same cache entries as pymerge.divmerge's classification teachers.
    """
    return objective_targets(module, examples, LogProbTeacher(temperature), 0, batch_size=batch_size,
                             pad_value=pad_value, cache=cache, cache_dir=cache_dir, cache_key=cache_key,
                             device=device)


class TeacherObjective(Objective):
    """An objective whose targets are the fine-tuned models' outputs: prepare() computes teacher(t, outputs)
    of fine-tuned model t per example once, through the disk cache (when options.cache and
    teacher_settings() is not None). Subclasses define teacher(), teacher_settings() and loss()."""
    needs_teacher = True

    def prepare(self, t, module, examples, options: TeacherOptions):
        """(inputs, targets) of task t, computed once with fine-tuned model t: the examples themselves and the
        per-example teacher(t, outputs) through the disk cache."""
        return examples, objective_targets(module, examples, self, t, batch_size=options.batch_size,
                                           pad_value=options.pad_value, cache=options.cache,
                                           cache_dir=options.cache_dir)


class LogProbTeacher(TeacherObjective):
    """The teacher: the fine-tuned model's log-probabilities log softmax(logits / temperature), fp32 (fp64
    for fp64 logits). No loss of its own (DivMerge's DivergenceObjective adds one)."""

    def __init__(self, temperature=1.0):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"teacher: temperature = {temperature} must be a positive number")
        self.temperature = float(temperature)

    def teacher(self, t, logits):
        """Cached target: the fine-tuned model's log-probabilities at the temperature, fp32 (fp64 for fp64)."""
        return torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)) / self.temperature, dim=-1)

    def teacher_settings(self):
        # the divergence and beta only enter the loss: JS and KL runs share their teachers
        return {"teacher": "log_softmax", "temperature": self.temperature}

