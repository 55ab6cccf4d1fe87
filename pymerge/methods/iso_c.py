"""Iso-C: isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv 2502.04959; docs/METHODS.md
§Iso-C).

Per 2-D key (m x n, r = min(m, n)) with task vectors tau_t = theta_t - theta_0:

    M = sum_t tau_t = U diag(sigma) V^T              (thin SVD)
    theta = theta_0 + alpha * sigma_bar U V^T,       sigma_bar = (1/r) sum_i sigma_i = ||M||_* / r

i.e. the task-arithmetic sum with its spectrum flattened to the mean singular value. Non-matrix keys (not 2-D,
or 2-D keys matching exclude_keys): theta_0 + alpha * mean_t tau_t (official code / FusionBench). alpha default
1.5: FusionBench's documented setting for 8 CLIP ViT-B/32 and ViT-L/14 tasks (its shipped config has 1.0; the
official repository tunes alpha on validation data; docs/METHODS.md §Iso-C).

Cheapest route: Iso-C needs only the polar factor U V^T of M and sigma_bar (nuclear norm / r) -- never U, V or
the spectrum themselves. Every direction of the range gets the same weight, so no low-rank or randomized
approximation applies (there is no svd= parameter). polar_factor (tsv_m.py) gives both:
- float32 / bf16 / fp16 weights: one thin SVD (LAPACK gesdd) of M; U V^T is one GEMM, then one fused
  theta_0 + (alpha sigma_bar) U V^T pass (torch.add with alpha). The sum of task vectors is always badly
  conditioned (decaying spectrum, cond 1e3..1e6), where the cheaper Gram route (eigh of M^T M) would lose
  ~all float32 digits in the small singular directions (error ~ eps cond(M)^2), so polar="auto" takes the
  SVD.
- float64 weights, or polar="gram": eigendecomposition of the smaller Gram matrix (about half an SVD's time;
  error ~ eps64 cond(M)^2, far below float32 rounding), with the SVD as fallback when that bound is not met.
The official code / FusionBench do the same SVD, then U diag(sigma_bar 1) V^T as two GEMMs, after averaging the
task vectors and multiplying back by T. With a single SVD per key at the core of both, pymerge's advantage
is the fused reconstruction only (benchmarks/methods_svd.py measures it).

backend is accepted for a uniform interface only: Iso-C's work is one torch.linalg.svd and elementwise torch
(no pymerge.ops op fits a full-rank polar factor).

Rank-deficient M (e.g. a key that no task changed: M = 0, sigma_bar = 0, theta = theta_0): the polar factor
is not unique; like the official code, pymerge uses the SVD's completion (weighted by sigma_bar).
"""
from typing import List

import torch

from .params import BACKEND_PARAM, Param, finite_number
from .spec import KeyGroup, MethodSpec
from .tsv_m import (DEFAULT_EXCLUDE_KEYS, EXCLUDE_PARAM, POLAR_PARAM, group_matrix_mask, mean_merge, polar_factor,
                    prepare_matrix_keys, task_vector_sum)


def iso_c_matrix(base, thetas, *, alpha, polar, backend, acc):
    """Iso-C of one 2-D key: theta_0 + alpha * sigma_bar polar(sum_t tau_t). Returns [m, n] in acc."""
    M = task_vector_sum(base, thetas, acc)
    P, sigma = polar_factor(M, polar)
    del M
    r = min(base.shape)
    sigma_bar = float(sigma.sum()) / r
    if sigma_bar == 0.0:
        return base.to(acc).clone()
    return base.to(acc).add(P, alpha=alpha * sigma_bar)


def merge_group(group: KeyGroup, *, alpha=1.5, polar="auto", exclude_keys=DEFAULT_EXCLUDE_KEYS, backend="auto",
                _matrix=None) -> List[torch.Tensor]:
    acc = group.compute_dtype
    mask = group_matrix_mask("iso_c", group, exclude_keys, _matrix)
    out = []
    for base, thetas, is_matrix in zip(group.base, group.models, mask):
        if is_matrix:
            out.append(iso_c_matrix(base, thetas, alpha=alpha, polar=polar, backend=backend, acc=acc))
        else:
            out.append(mean_merge(base, thetas, alpha, acc))
    return out


SPEC = MethodSpec(
    name="iso_c",
    description="Iso-C: theta_0 + alpha * (sum of task vectors with all singular values set to their mean)",
    merge_group=merge_group,
    prepare=prepare_matrix_keys("iso_c"),
    params=(
        Param("alpha", 1.5, "scaling of the merged task vector (FusionBench's 8-task ViT setting; tune it)",
              check=finite_number),
        POLAR_PARAM,
        EXCLUDE_PARAM,
        BACKEND_PARAM,
    ),
)
