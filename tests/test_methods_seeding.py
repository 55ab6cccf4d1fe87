"""Randomized methods (CART, TSV-M, Iso-CTS, DARE) draw a key's randomness from (seed, key name, task) only, and
compute each key on its own: a key's merged value is bitwise the same whatever keys are merged with it.

Each case merges a small model (four same-shape 2-D keys, two of another shape, biases and an excluded head) and
then the same model one key per group (max_group_bytes=1), with its keys in reverse order, and a subset of its
keys, and asserts torch.equal per key; at 1 and at 2 threads. The same seed must also matter (another seed
changes the randomized keys), so no case passes by never drawing anything.
Not asserted: equality across thread counts for the SVD-based methods. MKL's LAPACK (geqrf / orgqr in every
randomized SVD, gesdd in TSV-M and Iso-CTS) rounds differently at 1 and 2 threads on MiniLM-sized keys (384 x
45 and up), which no seeding can change; DARE (uniforms from per-key generators, a GEMV per chunk) is asserted.
"""
import collections

import pytest
import torch
from torch import nn

import pymerge
from pymerge.learn import MergedModel
from pymerge.methods import get
from pymerge.methods.learned_starts import learned_start

from backend_lists import method_backends

T = 3
SVD_BACKENDS = method_backends("center_task_vectors", "randomized_svd", "randomized_svd_centered", "low_rank_sum")
CASES = [  # (method, params): every randomized route of each method
    ("cart", {}),                                        # tol's subspace iteration (forced: see _params)
    ("cart", {"power_iters": 2}),                        # a fixed number of power iterations
    ("cart", {"energy": 0.35}),                          # per-key doubling of the trial rank (1, 2, 4)
    ("tsv_m", {}),
    ("iso_cts", {}),                                      # auto: randomized on the tall keys only
    ("iso_cts", {"svd": "randomized"}),
    ("dare_linear", {"p": 0.5}),
    ("dare_ties", {"p": 0.5}),
]


def shapes():
    out = collections.OrderedDict()
    for i in range(4):                       # interleaved, so every arrangement below splits the shapes' groups
        out[f"layer.{i}.attn.q.weight"] = (24, 16)
        out[f"layer.{i}.attn.q.bias"] = (24,)
        if i < 2:
            out[f"layer.{i}.mlp.fc.weight"] = (16, 40)
    out["lm_head.weight"] = (30, 16)          # excluded by default: merged without randomness
    return out


def model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = collections.OrderedDict((k, torch.randn(s, generator=gen)) for k, s in shapes().items())
    models = [collections.OrderedDict((k, b + 0.1 * torch.randn(b.shape, generator=gen)) for k, b in base.items())
              for _ in range(T)]
    return base, models


def arrangements(base, models):
    """(name, base, models, merge kwargs): the same keys and values merged with other company."""
    keys = list(base)
    reverse = keys[::-1]
    subset = keys[1::2]
    pick = lambda sd, ks: collections.OrderedDict((k, sd[k]) for k in ks)   # noqa: E731
    return [("one key per group", base, models, {"max_group_bytes": 1}),
            ("reversed order", pick(base, reverse), [pick(m, reverse) for m in models], {}),
            ("subset", pick(base, subset), [pick(m, subset) for m in models], {})]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _params(method, params, backend):
    takes_backend = any(p.name == "backend" for p in get(method).params)
    return {**params, "backend": backend} if takes_backend else dict(params)


@pytest.mark.parametrize("backend", SVD_BACKENDS)
@pytest.mark.parametrize("method, params", CASES, ids=[f"{m}{p}" for m, p in CASES])
def test_key_result_independent_of_other_keys(method, params, backend, threads, monkeypatch):
    if method.startswith("dare") and backend != "auto" and "auto" in SVD_BACKENDS:
        pytest.skip("DARE's only kernel is the GEMV: one backend is enough")
    if method == "cart" and not params:     # keys this small take CART's exact Gram route, which draws nothing
        from pymerge.methods import cart_factors
        monkeypatch.setattr(cart_factors, "GRAM_EIGH", 1e12)
    if method in ("tsv_m", "iso_cts") and not params:   # svd="auto" takes the exact SVDs on keys this small
        from pymerge.methods import tsv_m
        monkeypatch.setattr(tsv_m, "EXACT_SVD_NS", 1e12)
    base, models = model()
    kw = _params(method, params, backend)
    want = pymerge.merge(method, base, models, **kw)
    for name, b, ms, extra in arrangements(base, models):
        got = pymerge.merge(method, b, ms, **kw, **extra)
        for key in b:
            assert torch.equal(got[key], want[key]), (name, key)
    other = pymerge.merge(method, base, models, **{**kw, "seed": 1})
    assert any(not torch.equal(other[k], want[k]) for k in base)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_independent_of_thread_count(method):
    """DARE's drop masks come from per-key generators and its sum is a GEMV per chunk: 1 and 2 threads agree
    bitwise, on a key large enough (256 x 384) for a parallel kernel."""
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(256, 384, generator=gen), "b": torch.randn(384, generator=gen)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(T)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pymerge.merge(method, base, models, p=0.5)
        torch.set_num_threads(2)
        two = pymerge.merge(method, base, models, p=0.5)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(one[k], two[k]) for k in base)


# ------------------------------------------------------------------------ learned merges: the CART start point
class Layers(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Linear(64, 48) for name in names})


def test_learned_cart_start_seeds_each_key_by_name(monkeypatch):
    """start="cart", cart_svd="randomized": delta_t of a selected key is static CART's rank-k part of
    theta_t - theta_avg (cart.centered_factors: here the seeded subspace iteration, forced on these small keys,
    which would otherwise take the exact Gram route), seeded by key_seed(0, key), not one seed shared by every
    key. The keys have a flat spectrum and k + 10 = 13 of 48 columns, so another test matrix moves delta_t by far
    more than the float64 rounding allowed here."""
    from pymerge.methods import cart, cart_factors
    monkeypatch.setattr(cart_factors, "GRAM_EIGH", 1e12)
    torch.manual_seed(0)
    base = Layers("abc").double()
    models = []
    for _ in range(T):
        m = Layers("abc").double()
        with torch.no_grad():
            for p, b in zip(m.parameters(), base.parameters()):
                p.copy_(b + 0.1 * torch.randn_like(b))
        models.append(m)
    merged = MergedModel.build(base, models, start=learned_start("cart", cart_svd="randomized", cart_rank_ratio=0.08),
                               gather_embeddings=False, batch_tasks=False)
    for name in "abc":
        key = f"layers.{name}.weight"
        thetas = torch.stack([dict(m.named_parameters())[key].detach() for m in models])
        cent = thetas - thetas.mean(0)
        avg = thetas.mean(0) - dict(base.named_parameters())[key].detach()
        U, S, V = cart.centered_factors(key, cent, avg, 3)
        want = (U * S.unsqueeze(-2)) @ V.mT
        U, S, V = cart.centered_factors("another key", cent, avg, 3)
        other = (U * S.unsqueeze(-2)) @ V.mT
        for t in range(T):
            got = merged.delta_of(key, t)
            assert float((got - want[t]).norm() / want[t].norm()) <= 1e-10, (key, t)
            assert float((got - other[t]).norm() / want[t].norm()) > 1e-6, (key, t)
