"""TSV-M, Iso-C and Iso-CTS against FusionBench 0.2.33's own implementations on the same tensors.

Oracles (pymerge/peers/fusionbench.py, the benchmarks' baseline too: the lowest-level functions FusionBench's
algorithm classes call, on lists of task-vector state dicts):
  fusion_bench.method.task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction   (TSV-M)
  fusion_bench.method.isotropic_merging.iso_utils.iso_c / iso_cts                                (Iso-C / -CTS)
followed, as in TaskSingularVectorMerging.run / IsotropicMergingIn*.run, by theta_0 + alpha * merged.
Install (torch stays untouched): `make install` installs it; a missing fusion_bench is an error, not a skip.

Matched semantics: FusionBench merges every 2-D key as a matrix unless its exact name is in exclude_keys;
pymerge takes regexes (exclude_keys=() merges every 2-D key, [re.escape(name)] excludes one by exact name).
Agreement: float64 inputs to 1e-9 (relative to the merged task vector), float32 inputs within the formula's own
float32 rounding (see tests/test_methods_tsv_iso.py), pymerge's default randomized SVDs within the documented
randomized bounds. Deliberate deviations are pinned in the tests at the end of this file.
"""
import re

import pytest
import torch

import pymerge
from pymerge.peers import fusionbench
from pymerge.synthetic import decaying_matrix

F64 = torch.float64
ALPHA = {"tsv_m": 1.0, "iso_c": 1.5, "iso_cts": 1.5}
RANDOMIZED_BOUND = {"tsv_m": 1e-3, "iso_cts": 3e-3}
SHAPES = {"layer.0.attn.q.weight": (32, 32), "layer.0.attn.q.bias": (32,), "layer.0.mlp.fc1.weight": (64, 32),
          "layer.0.mlp.fc2.weight": (32, 64), "layer.0.norm.weight": (32,), "layer.1.attn.q.weight": (32, 32)}


def state_dicts(T=4, seed=0, kind="gauss", dtype=F64):
    """base + T models. gauss: i.i.d. task vectors; decaying: shared + per-task parts with sigma_i ~ 0.8^i."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=F64) for k, s in SHAPES.items()}
    shared = {k: decaying_matrix(*s, g, decay=0.8, scale=1e-2) for k, s in SHAPES.items() if len(s) == 2}
    models = []
    for _ in range(T):
        sd = {}
        for k, s in SHAPES.items():
            if len(s) == 2 and kind == "decaying":
                sd[k] = base[k] + 0.5 * shared[k] + decaying_matrix(*s, g, decay=0.8, scale=1e-2)
            else:
                sd[k] = base[k] + 0.05 * torch.randn(s, generator=g, dtype=F64)
        models.append(sd)
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}   # noqa: E731
    return cast(base), [cast(m) for m in models]


def rel(a, ref, base, keys=None):
    keys = keys or list(base)
    num = sum(float((a[k].double() - ref[k].double()).square().sum()) for k in keys)
    den = sum(float((ref[k].double() - base[k].double()).square().sum()) for k in keys)
    return (num / den) ** 0.5


def _exact(method):
    return {} if method == "iso_c" else {"svd": "exact"}


# ----------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_exact_equals_fusionbench_fp64(method, T):
    base, models = state_dicts(T, seed=T)
    a = ALPHA[method]
    fb = fusionbench.merge(method, base, models, scaling_factor=a)
    pm = pymerge.merge(method, base, models, alpha=a, exclude_keys=(), backend="reference", **_exact(method))
    for k in base:
        assert rel(pm, fb, base, [k]) < 1e-9, k


@pytest.mark.parametrize("kind", ["gauss", "decaying"])
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_exact_equals_fusionbench_fp32(method, kind):
    base, models = state_dicts(4, seed=1, kind=kind)
    a = ALPHA[method]
    ref = fusionbench.merge(method, base, models, scaling_factor=a)     # float64: the formula's exact value
    b32, m32 = {k: v.float() for k, v in base.items()}, [{k: v.float() for k, v in m.items()} for m in models]
    fb32 = fusionbench.merge(method, b32, m32, scaling_factor=a)
    pm32 = pymerge.merge(method, b32, m32, alpha=a, exclude_keys=(), **_exact(method))
    inherent = rel(fb32, ref, base)
    assert rel(pm32, ref, base) <= max(4 * inherent, 1e-5)
    assert rel(pm32, fb32, base) <= max(5 * inherent, 1e-5)
    assert all(pm32[k].dtype == torch.float32 for k in base)


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_default_randomized_within_bound_of_fusionbench(method):
    base, models = state_dicts(4, seed=2, kind="decaying")
    b32, m32 = {k: v.float() for k, v in base.items()}, [{k: v.float() for k, v in m.items()} for m in models]
    fb = fusionbench.merge(method, base, models, scaling_factor=ALPHA[method])
    pm = pymerge.merge(method, b32, m32, exclude_keys=())             # every default: randomized SVDs
    assert rel(pm, fb, base) < RANDOMIZED_BOUND[method]


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_exclude_keys_by_exact_name(method):
    """FusionBench's exclude_keys are exact names; pymerge's are regexes: re.escape gives the same selection."""
    base, models = state_dicts(3, seed=3)
    name = "layer.0.mlp.fc1.weight"
    fb = fusionbench.merge(method, base, models, scaling_factor=ALPHA[method], exclude_keys=[name])
    pm = pymerge.merge(method, base, models, alpha=ALPHA[method], exclude_keys=[re.escape(name)],
                       backend="reference", **_exact(method))
    assert rel(pm, fb, base) < 1e-9
    mean = base[name] + ALPHA[method] * sum(m[name] - base[name] for m in models) / 3
    assert torch.allclose(pm[name], mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
def test_iso_cts_common_space_fraction(fraction):
    base, models = state_dicts(4, seed=4)
    fb = fusionbench.merge("iso_cts", base, models, scaling_factor=1.5, common_space_fraction=fraction)
    pm = pymerge.merge("iso_cts", base, models, common_space_fraction=fraction, exclude_keys=(), svd="exact")
    assert rel(pm, fb, base) < 1e-9


# ------------------------------------------------------------------------------ deliberate deviations
def _drop_task_from_tsv_m(base, models, key, dropped):
    """TSV-M's definition with task `dropped`'s (all-zero) block left out of the stacked factors; d stays
    int(r / T) with the full T."""
    b = base[key]
    T, r = len(models), min(b.shape)
    d = r // T
    Us, ss, Vs = [], [], []
    for t, m in enumerate(models):
        if t == dropped:
            continue
        U, s, Vh = torch.linalg.svd(m[key] - b, full_matrices=False)
        Us.append(U[:, :d])
        ss.append(s[:d])
        Vs.append(Vh[:d].mT)

    def polar(A):
        U, _, Vh = torch.linalg.svd(A, full_matrices=False)
        return U @ Vh
    return b + polar(torch.cat(Us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(Vs, 1)).mT


def test_deviation_tsv_m_zero_task_vector():
    """DEVIATION (tsv_m.py doc): a task that left a key untouched (tau_t = 0) has no singular vectors; the
    official code / FusionBench still stacks LAPACK's arbitrary orthonormal completion (here: the SVD of a
    zero matrix) into [U_1..U_T] with s = 0, which rotates every other task's directions in the polar factor.
    pymerge drops numerically-zero components (s_ti <= max(m, n) eps s_t1) first. With all tasks non-zero
    (every other test) both agree to rounding."""
    base, models = state_dicts(3, seed=5)
    key = "layer.0.attn.q.weight"
    models[2][key] = base[key].clone()                                  # task 3 did not touch this key
    pm = pymerge.merge("tsv_m", base, models, exclude_keys=(), svd="exact")
    fb = fusionbench.merge("tsv_m", base, models, scaling_factor=1.0)
    expected = _drop_task_from_tsv_m(base, models, key, dropped=2)
    assert rel(pm, {key: expected}, base, [key]) < 1e-9
    assert rel(pm, fb, base, [key]) > 1e-3                              # FusionBench: arbitrary directions mixed in
    others = [k for k in base if k != key]
    assert rel(pm, fb, base, others) < 1e-9                             # nothing else changes


def test_deviation_iso_cts_zero_task_vector():
    """DEVIATION (iso_cts.py doc): same for Iso-CTS's task-specific components: a zero tau_t has w_t = 0, whose
    arbitrary singular vectors FusionBench adds with the weight sigma_bar. pymerge drops them (sigma_bar is
    still the mean over all r values, so the zeros count), and agrees with FusionBench elsewhere."""
    base, models = state_dicts(4, seed=6)
    key = "layer.0.attn.q.weight"
    models[1][key] = base[key].clone()
    pm = pymerge.merge("iso_cts", base, models, exclude_keys=(), svd="exact", alpha=1.0)
    fb = fusionbench.merge("iso_cts", base, models, scaling_factor=1.0)
    assert rel(pm, fb, base, [key]) > 1e-3
    others = [k for k in base if k != key]
    assert rel(pm, fb, base, others) < 1e-9
    # what pymerge computes instead: the merged delta lies in the span of the common space and of the three
    # non-zero tasks' specific directions only, with all its singular values equal to sigma_bar
    delta = pm[key] - base[key]
    s = torch.linalg.svdvals(delta)
    T = 4
    k_c, n_t = 24, 2                                                     # int(25.6) = 25 -> 32 - round(7/4)*4
    nonzero = s[s > 1e-9 * s[0]]
    assert len(nonzero) == k_c + (T - 1) * n_t
    assert float((nonzero - nonzero.mean()).abs().max() / nonzero.mean()) < 1e-9


def test_deviation_iso_cts_rounding_past_r():
    """DEVIATION (iso_cts.py doc): when the official rounding gives more task-specific columns than r (tiny r or
    common_space_fraction), FusionBench's slicing breaks; pymerge removes one block of T instead."""
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(7, 9, generator=g, dtype=F64)}
    models = [{"w": base["w"] + 0.1 * torch.randn(7, 9, generator=g, dtype=F64)} for _ in range(2)]
    with pytest.raises(RuntimeError):
        # k_c = 7 - round(3.5) * 2 = -1
        fusionbench.merge("iso_cts", base, models, scaling_factor=1.0, common_space_fraction=0.0)
    out = pymerge.merge("iso_cts", base, models, common_space_fraction=0.0, alpha=1.0, svd="exact")
    s = torch.linalg.svdvals(out["w"] - base["w"])
    assert float((s - s.mean()).abs().max() / s.mean()) < 1e-9         # still isotropic, k_c = 1, n_t = 3
