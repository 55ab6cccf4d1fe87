"""The peers' own merge code as oracle: mergekit 0.1.5 (`GeneralizedTaskArithmeticMerge` and `linear` via its
registry, the same code `mergekit-yaml` runs; pymerge/peers/mergekit.py, the benchmarks' baseline too) and peft's
`merge_utils`, on the same tensors as pymerge.

Installed by `make test` (requirements-dev.txt: mergekit 0.1.5, which pulls peft, but not a new torch); a missing
peer is an error, not a skip.
Every difference is either zero (to fp32 rounding) or a deliberate deviation pinned by a test below.
"""
import collections
import functools

import peft.utils.merge_utils as peft_merge
import pytest
import torch

import pymerge
from pymerge.methods import key_seed
from pymerge.peers import mergekit


def family(T=4, dtype=torch.float32, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    shapes = collections.OrderedDict([("q.weight", (64, 48)), ("q.bias", (64,)), ("mlp.weight", (96, 48)),
                                      ("ln.weight", (48,))])
    base = collections.OrderedDict((k, torch.randn(s, generator=g)) for k, s in shapes.items())
    models = [collections.OrderedDict((k, (b + scale * torch.randn(b.shape, generator=g)).to(dtype))
                                      for k, b in base.items()) for _ in range(T)]
    return collections.OrderedDict((k, b.to(dtype)) for k, b in base.items()), models


# mergekit's own merge of every key (one TensorGroup per key, base first), computed in float32 as pymerge does.
mergekit_merge = functools.partial(mergekit.merge, dtype=torch.float32)


def _assert_close(ours, theirs, tol=1e-6):
    for k in theirs:
        err = (ours[k].float() - theirs[k].float()).norm() / theirs[k].float().norm()
        assert err <= tol, (k, float(err))


def our_masks(key, shape, ps, seed):
    """pymerge's documented DARE masks (see pymerge/methods/dare_linear.py): per task a Generator seeded with
    key_seed(seed, key, t), float32 uniforms in CHUNK pieces (one piece here), keep where u < 1 - p."""
    n = 1
    for s in shape:
        n *= s
    out = []
    for t, p in enumerate(ps):
        g = torch.Generator().manual_seed(key_seed(seed, key, t))
        out.append((torch.rand(n, generator=g) < 1 - p).float().reshape(shape))
    return out


class FeedMasks:
    """Stands in for torch.bernoulli inside the peers' DARE so they drop exactly pymerge's entries."""

    def __init__(self, masks):
        self.masks = list(masks)

    def __call__(self, probs, *args, **kwargs):
        mask = self.masks.pop(0)
        assert mask.shape == probs.shape
        return mask.to(probs.dtype)


# ------------------------------------------------------------------------------------------ task arithmetic
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_matches_mergekit(dtype):
    base, models = family(dtype=dtype)
    w = [1.0, 0.5, 2.0, 0.7]
    ours = pymerge.merge("task_arithmetic", base, models, lam=0.3, weights=w, backend="reference",
                         out_dtype=torch.float32)
    # mergekit: base + lambda * sum_t weight_t tau_t (normalize=False by default for task_arithmetic).
    theirs = mergekit_merge("task_arithmetic", base, models, weight=w, **{"lambda": 0.3})
    _assert_close(ours, theirs)


def test_task_arithmetic_matches_peft():
    base, models = family()
    w = [1.0, 0.5, 2.0, 0.7]
    ours = pymerge.merge("task_arithmetic", base, models, lam=1.0, weights=w, backend="reference")
    for k in base:
        theirs = base[k] + peft_merge.task_arithmetic([m[k] - base[k] for m in models], torch.tensor(w))
        _assert_close({k: ours[k]}, {k: theirs})


# ------------------------------------------------------------------------------------------ weight averaging
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_average_matches_mergekit_linear(dtype):
    """pymerge/methods/weight_average.py: per-model weights as mergekit's `linear` (normalize=True, no base)."""
    base, models = family(dtype=dtype, seed=7)
    w = [1.0, 0.5, 2.0, 0.7]
    ours = pymerge.merge("weight_average", base, models, weights=w, backend="reference", out_dtype=torch.float32)
    theirs = mergekit_merge("linear", None, models, weight=w)
    _assert_close(ours, theirs)
    uniform = pymerge.merge("weight_average", base, models, backend="reference", out_dtype=torch.float32)
    assert any((uniform[k] - theirs[k]).abs().max() > 1e-3 for k in base)   # the weights do matter here


# ---------------------------------------------------------------------------------------------------- TIES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties_matches_mergekit(density, dtype, monkeypatch):
    base, models = family(dtype=dtype, seed=1)
    w = [1.0, 0.5, 2.0, 0.7]
    ours = pymerge.merge("ties", base, models, density=density, lam=1.0, weights=w, out_dtype=torch.float32)
    # mergekit ties: magnitude top-k per tensor (k = max(1, int(density * n))), weights applied before the
    # sum-sign election, weighted disjoint mean (normalize=True default), lambda = 1.
    if dtype == torch.bfloat16:
        # Deliberate deviation: bf16 task vectors take few distinct values, so many |tau| tie at the trim
        # threshold; mergekit's (unstable) argsort keeps an arbitrary subset of the tied entries, pymerge keeps
        # the lowest flat indices. With a stable argsort (ties -> lowest index first) mergekit equals pymerge.
        unstable = mergekit_merge("ties", base, models, weight=w, density=density)
        argsort = torch.argsort
        monkeypatch.setattr(torch, "argsort", lambda *a, **kw: argsort(*a, **{**kw, "stable": True}))
    theirs = mergekit_merge("ties", base, models, weight=w, density=density)
    _assert_close(ours, theirs)
    if dtype == torch.bfloat16:
        for k in theirs:   # the unstable tie-break changes only a few entries
            assert ((unstable[k] - theirs[k]).abs() > 1e-6).float().mean() <= 0.1, k


def test_ties_per_model_density_and_lambda_match_mergekit():
    base, models = family(seed=2)
    d = [0.1, 0.3, 0.5, 0.9]
    ours = pymerge.merge("ties", base, models, density=d, lam=0.7)
    theirs = mergekit_merge("ties", base, models, weight=1.0, density=d, **{"lambda": 0.7})
    _assert_close(ours, theirs)


def test_ties_matches_peft_with_unit_weights():
    base, models = family(seed=3)
    ours = pymerge.merge("ties", base, models, density=0.3)
    for k in base:
        theirs = base[k] + peft_merge.ties([m[k] - base[k] for m in models], torch.ones(4), density=0.3)
        _assert_close({k: ours[k]}, {k: theirs})


def test_ties_weighted_deviation_from_peft_pinned():
    """Deliberate deviation: with non-unit weights peft elects the sign on the *unweighted* trimmed vectors and
    divides by the *count* of agreeing entries; pymerge (= mergekit) elects on weighted vectors and divides by
    the weight sum. They coincide for unit weights (previous test) and differ otherwise."""
    base, models = family(seed=3)
    w = [1.0, 3.0, 0.2, 1.0]
    ours = pymerge.merge("ties", base, models, density=0.3, weights=w)
    k = "q.weight"
    taus = [m[k] - base[k] for m in models]
    theirs = base[k] + peft_merge.ties(taus, torch.tensor(w), density=0.3)
    assert (ours[k] - theirs).abs().max() > 1e-3
    # Re-derive peft's formula from our building blocks to show the difference is only that convention.
    trimmed = torch.stack([peft_merge.prune(t, 0.3, "magnitude") for t in taus])
    agree = trimmed.sign() == torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    wt = torch.tensor(w).reshape(-1, 1, 1)
    peft_formula = base[k] + (trimmed * wt * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(theirs, peft_formula, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- DARE
def test_dare_p0_matches_mergekit():
    base, models = family(seed=4)
    w = [1.0, 0.5, 2.0, 0.7]
    ours_l = pymerge.merge("dare_linear", base, models, p=0.0, lam=0.5, weights=w, backend="reference")
    theirs_l = mergekit_merge("dare_linear", base, models, weight=w, density=1.0, **{"lambda": 0.5})
    _assert_close(ours_l, theirs_l)
    # dare_ties: mergekit's default normalize=False *sums* the agreeing entries; docs/METHODS.md §TIES (pymerge)
    # takes their disjoint mean, which is mergekit with normalize=True.
    ours_t = pymerge.merge("dare_ties", base, models, p=0.0, weights=w)
    theirs_t = mergekit_merge("dare_ties", base, models, weight=w, density=1.0, normalize=True)
    _assert_close(ours_t, theirs_t)
    summed = mergekit_merge("dare_ties", base, models, weight=w, density=1.0)
    assert any((summed[k] - ours_t[k]).abs().max() > 1e-3 for k in base)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_seed_matches_peft_given_the_same_masks(method, monkeypatch):
    """peft rescales survivors by 1/density = 1/(1 - p) as docs/METHODS.md §DARE; feeding it pymerge's masks (in
    place of torch.bernoulli) must reproduce pymerge's result for a fixed seed."""
    base, models = family(seed=5)
    p, seed = 0.6, 123
    kw = {"backend": "reference"} if method == "dare_linear" else {}
    ours = pymerge.merge(method, base, models, p=p, seed=seed, lam=1.0, **kw)
    for k in base:
        monkeypatch.setattr(torch, "bernoulli", FeedMasks(our_masks(k, base[k].shape, [p] * 4, seed)))
        fn = getattr(peft_merge, method)
        theirs = base[k] + fn([m[k] - base[k] for m in models], torch.ones(4), density=1 - p)
        monkeypatch.undo()
        _assert_close({k: ours[k]}, {k: theirs}, tol=2e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_seed_vs_mergekit_rescale_deviation_pinned(method, monkeypatch):
    """mergekit 0.1.5 rescales DARE survivors by ||tau||_1 / ||mask * tau||_1 (RescaleNorm.l1) instead of
    1/(1 - p). With pymerge's masks fed in: rescale=False times 1/(1 - p) is exactly pymerge; rescale=True
    differs from it only by that per-task factor (close to 1/(1 - p) for large tensors)."""
    base, models = family(seed=6)
    p, seed = 0.5, 9
    kw = {"backend": "reference"} if method == "dare_linear" else {}
    ours = pymerge.merge(method, base, models, p=p, seed=seed, lam=1.0, **kw)
    extra = {"normalize": True} if method == "dare_ties" else {}
    for k in base:
        masks = our_masks(k, base[k].shape, [p] * 4, seed)
        monkeypatch.setattr(torch, "bernoulli", FeedMasks(masks))
        plain = mergekit_merge(method, {k: base[k]}, [{k: m[k]} for m in models], weight=1.0, density=1 - p,
                               rescale=False, **extra)[k]
        monkeypatch.setattr(torch, "bernoulli", FeedMasks(masks))
        l1 = mergekit_merge(method, {k: base[k]}, [{k: m[k]} for m in models], weight=1.0, density=1 - p,
                            rescale=True, **extra)[k]
        monkeypatch.undo()
        _assert_close({k: ours[k]}, {k: base[k] + (plain - base[k]) / (1 - p)}, tol=2e-6)
        if method == "dare_linear":
            # mergekit's L1 rescale written out: tau_t * m_t * ||tau_t||_1 / ||m_t tau_t||_1.
            taus = [m[k] - base[k] for m in models]
            l1_formula = base[k] + sum(t * mk * (t.abs().sum() / (t * mk).abs().sum()) for t, mk in zip(taus, masks))
            _assert_close({k: l1}, {k: l1_formula}, tol=2e-6)
        assert (l1 - ours[k]).abs().max() > 1e-6, k   # differs from 1/(1 - p) ...
        rel = ((l1 - ours[k]).norm() / (ours[k] - base[k]).norm()).item()
        assert rel < 0.5, (k, rel)                     # ... by a per-task factor near 1 (~1/sqrt(numel))
