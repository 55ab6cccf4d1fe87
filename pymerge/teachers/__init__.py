"""Teacher targets of learned merges: the fine-tuned models' outputs, computed once per (model, data, settings)
and cached on disk. DivMerge compares the merged model with each fine-tuned model θ_t on unlabelled inputs of
task t (docs/METHODS.md §DivMerge); the fine-tuned models are needed only to produce these targets: once
computed (or loaded from the cache) the optimisation of Γ needs θ_0, the τ_t and the targets.

Modules (built on pymerge.learn and pymerge.ops; nothing below imports them):
    classification.py  TeacherObjective (an objective whose prepare() computes and caches its targets),
                       LogProbTeacher (class log-probabilities at a temperature), objective_targets,
                       classification_targets, teacher_targets (uncached)
    generative.py      causal LMs: greedy_generate, teacher forcing over x+ŷ, GenerativeTargets (dense or top-k
                       rows), GenerativeBatch, generative_targets, prompt_list
    divergence.py      the student's divergence from cached targets: dense_divergence, token_divergence,
                       sequence_divergence (the top-k divergence itself is pymerge.ops.topk_divergence)
    cache.py           the disk cache, the only IO: cache_dir, model_fingerprint, data_fingerprint,
                       cached_targets, CachedTargets
"""
from .cache import CachedTargets, cache_dir, cached_targets, data_fingerprint, model_fingerprint
from .classification import (LogProbTeacher, TeacherObjective, classification_targets, objective_targets,
                             teacher_targets)
from .divergence import DIVERGENCES, dense_divergence, sequence_divergence, token_divergence
from .generative import GenerativeBatch, GenerativeTargets, generative_targets, greedy_generate, prompt_list

__all__ = [
    "cache_dir", "model_fingerprint", "data_fingerprint", "cached_targets", "CachedTargets",
    "TeacherObjective", "LogProbTeacher", "teacher_targets", "objective_targets", "classification_targets",
    "generative_targets", "GenerativeTargets", "GenerativeBatch", "greedy_generate", "prompt_list",
    "dense_divergence", "token_divergence", "sequence_divergence", "DIVERGENCES",
]
