"""pymerge.ops: the only door to pymerge's kernels.

Every op takes backend="auto"|"reference"|"cpu"|"cuda"|"triton" (see pymerge.ops.backend.resolve); the
top-k divergence of a compressed teacher is plain torch.
"""
from .backend import BACKENDS, resolve
from .center import center_task_vectors
from .divergence import entropy, js_divergence, kl_divergence
from .randomized_svd import Centered, centered_matmul, low_rank_sum, randomized_svd
from .topk_divergence import topk_divergence, topk_gap_bound, topk_teacher

__all__ = ["BACKENDS", "resolve", "center_task_vectors", "randomized_svd", "Centered", "centered_matmul",
           "low_rank_sum",
           "js_divergence", "kl_divergence", "entropy", "topk_teacher", "topk_divergence", "topk_gap_bound"]
