"""pytest-benchmark suite for js_divergence / kl_divergence / entropy forward + backward on CPU, 1 thread
(the ratio table with peak memory at full size is benchmarks/ops_divergence.py).

    python -m pytest benchmarks/test_bench_divergence.py --benchmark-only [--benchmark-group-by=param:shape]

Each group compares, on the same logits: pymerge's fused kernel (backend "cpu") and the torch eager composite
(log_softmax of both sides + the formula, autograd), forward + backward with reduction "mean". Shapes are
smaller than the headline ones (256 rows) so that a round stays well under a second.
"""
import math

import pytest
import torch

from eager_divergence import eager_entropy, eager_js, eager_kl
from pymerge.ops import entropy, js_divergence, kl_divergence
from pymerge.ops.backend import extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="pymerge._C not built")

SHAPES = [(256, 32000), (64, 152064)]


FNS = {
    ("js", "pymerge"): lambda z, t: js_divergence(z, t, backend="cpu"),
    ("js", "eager"): eager_js,
    ("kl", "pymerge"): lambda z, t: kl_divergence(z, t, backend="cpu"),
    ("kl", "eager"): eager_kl,
    ("entropy", "pymerge"): lambda z, t: entropy(z, backend="cpu"),
    ("entropy", "eager"): eager_entropy,
}


@pytest.mark.parametrize("impl", ["pymerge", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["js", "kl", "entropy"])
def test_forward_backward(benchmark, kind, shape, dtype, impl):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=gen) * 2).to(dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=gen) * 2).to(dtype)
    fn = FNS[(kind, impl)]
    benchmark.group = f"{kind} {shape[0]}x{shape[1]} {str(dtype).split('.')[-1]}"

    def step():
        z.grad = None
        loss = fn(z, t)
        loss.backward()
        return loss

    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    assert math.isfinite(float(loss)) and z.grad is not None
    ref = FNS[(kind, "eager")](z.detach(), t)
    assert abs(float(loss) - float(ref)) <= 1e-4 * (1 + abs(float(ref)))
