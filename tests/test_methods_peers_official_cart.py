"""CART against the official CART merge (JH-GEECS/CART src/merging.py) as re-implemented in
pymerge/peers/official_cart.py, the baseline of benchmarks/methods_cart.py. The official code itself is not
installable (a research repository: CLIP loading, ray, wandb), so the peer is its arithmetic written out step by
step: task vectors from theta_0, theta_avg = theta_0 + mean tau_t, tau_bar_t = tau_t + theta_0 - theta_avg, a full
SVD per task, rank-k parts summed, theta_avg + lam * sum; the official rank and energy_threshold rules and its
ViT key selection.

tests/test_methods_cart.py checks pymerge against docs/METHODS.md §CART (a float64 oracle of the formula, with
pymerge's extensions: explicit rank, conv kernels); this file checks that pymerge computes what the official code
computes, on MiniLM-shaped (hidden 32) and CLIP-ViT-shaped synthetic models:
- float64 inputs, svd="exact": equal to rounding (1e-10 relative to the merged low-rank part);
- float32 inputs (as the official code runs), svd="exact": as close to the float64 result as the official float32
  merge is (the truncation at k amplifies float32 rounding of the inputs alike on both sides).
"""
import pytest
import torch

import pymerge
from pymerge import synthetic
from pymerge.methods.cart import select_low_rank_keys
from pymerge.peers import official_cart

T, LAM = 4, 2.0
# pymerge option -> the official code's (energy: rank_ratio read as the energy fraction, energy_threshold=True)
OPTIONS = [(dict(rank_ratio=0.25), dict(rank_ratio=0.25)),
           (dict(rank_ratio=0.08), dict(rank_ratio=0.08)),
           (dict(energy=0.9), dict(rank_ratio=0.9, energy_threshold=True))]
VIT_SHAPES = {"visual.conv1.weight": (32, 3, 2, 2),
              "visual.transformer.resblocks.0.ln_1.weight": (32,),
              "visual.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
              "visual.transformer.resblocks.0.attn.in_proj_bias": (96,),
              "visual.transformer.resblocks.0.attn.out_proj.weight": (32, 32),
              "visual.transformer.resblocks.0.attn.out_proj.bias": (32,),
              "visual.transformer.resblocks.0.ln_2.weight": (32,),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": (128, 32),
              "visual.transformer.resblocks.0.mlp.c_fc.bias": (128,),
              "visual.transformer.resblocks.0.mlp.c_proj.weight": (32, 128),
              "visual.proj": (32, 16)}


def models_of(shapes, dtype, seed=0):
    base, models = synthetic.power_law_models(shapes, T, seed=seed)
    return {k: v.to(dtype) for k, v in base.items()}, [{k: v.to(dtype) for k, v in m.items()} for m in models]


def rel_low_rank(a, ref, models, keys):
    """||a - ref||_F / ||ref - theta_avg||_F over keys: relative to the merged low-rank part."""
    num = den = 0.0
    for k in keys:
        avg = sum(m[k].double() for m in models) / len(models)
        num += float((a[k].double() - ref[k].double()).square().sum())
        den += float((ref[k].double() - avg).square().sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("ours,theirs", OPTIONS)
def test_exact_equals_official_fp64(ours, theirs):
    base, models = models_of(synthetic.minilm_shapes(2, hidden=32), torch.float64)
    selected = select_low_rank_keys(base)                   # the encoder matrices (BERT names: no "attn")
    got = pymerge.merge("cart", base, models, lam=LAM, svd="exact", **ours)
    want = official_cart.merge(base, models, lam=LAM, selected=selected, **theirs)
    for k in selected:
        assert rel_low_rank(got, want, models, [k]) <= 1e-10, k
    for k in set(base) - set(selected):                     # vectors: theta_avg on both sides
        assert torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-15), k
    assert all(got[k].dtype == torch.float64 for k in base)


@pytest.mark.parametrize("ours,theirs", OPTIONS)
def test_exact_fp32_as_close_as_official_fp32(ours, theirs):
    base, models = models_of(synthetic.minilm_shapes(2, hidden=32), torch.float32, seed=1)
    selected = select_low_rank_keys(base)
    b64, m64 = {k: v.double() for k, v in base.items()}, [{k: v.double() for k, v in m.items()} for m in models]
    exact = official_cart.merge(b64, m64, lam=LAM, selected=selected, **theirs)    # the same inputs, float64
    official32 = official_cart.merge(base, models, lam=LAM, selected=selected, **theirs)
    got = pymerge.merge("cart", base, models, lam=LAM, svd="exact", **ours)
    inherent = rel_low_rank(official32, exact, m64, selected)
    assert inherent < 1e-3                                  # the float32 merge is meaningful at all
    assert rel_low_rank(got, exact, m64, selected) <= max(4 * inherent, 1e-6)
    assert all(got[k].dtype == torch.float32 for k in base)


def test_vit_preset_merges_as_the_official_selection():
    """low_rank_keys="vit" selects what the official code truncates: the merged models agree (float64), and the
    keys it leaves out (conv1, proj, LayerNorms, biases) are theta_avg on both sides."""
    base, models = models_of(VIT_SHAPES, torch.float64, seed=2)
    got = pymerge.merge("cart", base, models, lam=LAM, rank_ratio=0.12, svd="exact", low_rank_keys="vit")
    want = official_cart.merge(base, models, lam=LAM, rank_ratio=0.12)           # selected=None: the official rule
    selected = official_cart.select_keys(base)
    assert selected == ["visual.transformer.resblocks.0.attn.in_proj_weight",
                        "visual.transformer.resblocks.0.attn.out_proj.weight",
                        "visual.transformer.resblocks.0.mlp.c_fc.weight",
                        "visual.transformer.resblocks.0.mlp.c_proj.weight"]
    assert rel_low_rank(got, want, models, selected) <= 1e-10
    for k in set(base) - set(selected):
        avg = sum(m[k] for m in models) / T
        assert torch.allclose(got[k], avg, rtol=1e-12, atol=1e-15), k
        assert torch.allclose(want[k], avg, rtol=1e-12, atol=1e-15), k
