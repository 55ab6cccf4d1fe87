"""The objective protocol of a learned merge: what a method (DivMerge's divergences, AdaMerging's entropy)
plugs into pymerge.learn.pipeline.learn.

    needs_teacher: bool                               whether prepare() needs the fine-tuned model's outputs
    examples(task, source, limit) -> list             per-example items of one task's data (default:
                                                      collect_examples; the causal-LM objective: prompts)
    prepare(t, module, examples, options) -> (inputs, targets)
                                                      called once per task with fine-tuned model t (under
                                                      no_grad, while MergedModel.build visits it): the
                                                      per-example model inputs and cached targets (or None).
                                                      Default: the examples themselves and no targets; an
                                                      objective with a teacher derives from
                                                      pymerge.teachers.TeacherObjective, whose prepare() computes
                                                      teacher(t, outputs) through the disk cache.
    teacher(t, outputs) -> Tensor [B, ...] | None     per-example targets from fine-tuned model t's outputs
    teacher_settings() -> dict | None                 what teacher() depends on besides the model and the
                                                      data (the cache key); None: never cached
    loss(t, outputs, targets) -> scalar Tensor         mean over the batch of task t, differentiable
    pad_value: None, or the pad value its inputs need when collated (set by prepare; else learn's pad_value)
    tokenizer, text_max_length: set by learn() when a task's data are texts (pymerge.learn.model_sources):
                                                      the default examples() tokenizes them one by one
``outputs`` is what ``logits_of`` returns for the batch (override ``Objective.extract`` to use raw outputs).
``TeacherOptions(batch_size, pad_value, cache, cache_dir, progress)``: learn()'s settings handed to prepare().
"""
from dataclasses import dataclass
from typing import Any

from .batching import collect_examples, logits_of
from .model_sources import is_text_list, pad_token_id, text_examples


@dataclass
class TeacherOptions:
    """learn()'s settings that Objective.prepare may use: teacher_batch_size, pad_value, the disk cache
    (teacher_cache, cache_dir) and progress."""
    batch_size: int = 32
    pad_value: Any = 0
    cache: bool = False
    cache_dir: Any = None
    progress: bool = False


class Objective:
    """Base class of an objective over the merged model's outputs (see the module docstring)."""
    needs_teacher = False
    pad_value = None
    tokenizer = None
    text_max_length = None

    def examples(self, task, source, limit):
        """Per-example items of one task's data: the first `limit` examples of its batches, or of its texts
        (a list of str, tokenized one by one by self.tokenizer, padded with its pad token)."""
        if is_text_list(source):
            if self.tokenizer is not None:
                self.pad_value = {"input_ids": pad_token_id(self.tokenizer)}
            return text_examples(source[:limit] if limit is not None else source, self.tokenizer,
                                 self.text_max_length, task)
        return collect_examples(source, task, limit)

    def prepare(self, t, module, examples, options: TeacherOptions):
        """(inputs, targets) of task t: the examples themselves and no targets. Objectives with a teacher
        (needs_teacher) derive from pymerge.teachers.TeacherObjective, whose prepare() computes them."""
        if self.needs_teacher:
            raise NotImplementedError(f"{type(self).__name__}.needs_teacher is set but prepare() computes no "
                                      "targets: derive it from pymerge.teachers.TeacherObjective")
        return examples, None

    def extract(self, outputs):
        return logits_of(outputs)

    def teacher(self, t, outputs):
        return None

    def teacher_settings(self):
        """JSON-able settings teacher() depends on (with the model and the data: the cache key); None: the
        targets are not cached."""
        return None

    def loss(self, t, outputs, targets):
        raise NotImplementedError

