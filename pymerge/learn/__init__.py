r"""Learned merge coefficients: the machinery shared by DivMerge, AdaMerging and their relatives.

A data-driven merge learns coefficients Gamma for the model

    Phi_Gamma = theta_s + sum_t Gamma_t * delta_t                                    (per merged key)

with theta_s = theta_0 and delta_t = tau_t = theta_t - theta_0 (the papers' start) unless a start point rewrites
them (CART's centered low-rank task vectors, a static merge: docs/METHODS.md §Learned coefficients). Only Gamma
is trained. The merged parameters are a differentiable function of Gamma fed to the caller's own nn.Module with
torch.func.functional_call: no model copy per step, no autograd graph over the delta_t, any torch model.

Modules (imports run downwards only; none imports pymerge.teachers or pymerge.methods):
    pipeline.py            learn(): the whole pipeline; LearnedMerge (the result)
    optimizer.py           CoefficientOptimizer: Adam on Gamma over batches mixed across tasks
    merged_model.py        MergedModel: Gamma, the merged parameters, forward per task / all tasks, results
    start_points.py        StartPoint (pretrained) and StaticMergeStart (init_from a state dict or callable)
    stacks.py              TaskVectorStack: theta_s and delta_t of keys of one (numel, dtype), merged by baddbmm
    gathered_embeddings.py merged nn.Embedding tables looked up row by row, never materialised
    skeletons.py           the caller's module on the meta device, run by functional_call; all-tasks forward
    objective.py           Objective: the protocol a method's loss plugs in through; TeacherOptions
    batching.py            per-example task data: split_batch, collect_examples, collate, logits_of, TaskExamples
    inputs.py              checks of the base, models, data and key regexes at the boundary
Teacher targets (fine-tuned models' outputs, the disk cache) are pymerge.teachers, built on top of this.
"""
from .batching import TaskExamples, collate, collect_examples, logits_of
from .merged_model import MergedModel
from .objective import Objective, TeacherOptions
from .optimizer import CoefficientOptimizer
from .pipeline import LearnedMerge, learn
from .start_points import StartPoint, StaticMergeStart

__all__ = ["learn", "LearnedMerge", "CoefficientOptimizer", "MergedModel", "StartPoint",
           "StaticMergeStart", "Objective", "TeacherOptions", "TaskExamples", "collect_examples", "collate",
           "logits_of"]
