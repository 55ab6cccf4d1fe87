"""The learned methods' start points against the static merges they claim to start at (docs/METHODS.md
§Adaptive CART): start="cart" with the default init is static CART (pymerge.merge("cart"), its defaults:
the fidelity control tol = 0.05, lam 2.0), and so is init_from="cart"; both factor every key by the same route
(cart.centered_factors). These keys are small enough for CART's exact Gram route, which would make every route
agree; the `iterate` fixture makes the route the seeded subspace iteration, so agreement means the same route."""
import pytest
import torch
from torch import nn

import pymerge
from pymerge.methods import cart_factors
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)


@pytest.fixture(autouse=True)
def iterate(monkeypatch):
    monkeypatch.setattr(cart_factors, "GRAM_EIGH", 1e12)




class MLP(nn.Module):
    """64 -> 48 -> 48 -> head: two 2-D keys big enough that CART's randomized SVD (k = 3, l = 13 of 48) is not
    the exact one."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.l1 = nn.Linear(64, 48)
        self.l2 = nn.Linear(48, 48)
        self.head = nn.Linear(48, num_labels)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def problem(T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = MLP().double()
    models = []
    for t in range(T):
        m = MLP(2 + t).double()
        m.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("head.")}, strict=False)
        with torch.no_grad():
            for name, p in m.named_parameters():   # flat spectra: no gap at k
                p.add_((0.05 if not name.startswith("head.") else 1.0) * torch.randn(p.shape, generator=g,
                                                                                     dtype=torch.float64))
        models.append(m)
    data = [[torch.randn(8, 64, generator=g, dtype=torch.float64)] for _ in range(T)]
    return base, models, data


def body(sd):
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def static_cart(base, models, **params):
    return pymerge.merge("cart", body(base.state_dict()), [body(m.state_dict()) for m in models], **params)


@pytest.mark.parametrize("method", [pymerge.divmerge, pymerge.adamerging])
def test_cart_start_with_default_init_is_static_cart(method):
    base, models, data = problem()
    # CART's defaults: the fidelity-controlled subspace iteration (seed 0 per key), lam 2
    want = static_cart(base, models)
    exact = static_cart(base, models, svd="exact")
    assert max(float((want[k] - exact[k]).norm() / exact[k].norm()) for k in ("l1.weight", "l2.weight")) > 1e-4
    r = method(base, models, data, task_specific_keys=r"^head\.", start="cart", steps=0, progress=False,
               backend="reference")
    assert torch.equal(r.coefficients, torch.full_like(r.coefficients, 2.0))     # static CART's lam
    assert r.config["cart_svd"] == "randomized" and r.config["init"] == 2.0
    for k, v in want.items():
        torch.testing.assert_close(r.state_dict[k], v, rtol=1e-9, atol=1e-12)
    # the exact path of both is the exact static merge too
    r = method(base, models, data, task_specific_keys=r"^head\.", start="cart", cart_svd="exact", steps=0,
               progress=False, backend="reference")
    for k, v in exact.items():
        torch.testing.assert_close(r.state_dict[k], v, rtol=1e-9, atol=1e-12)


def test_cart_start_and_init_from_cart_start_at_the_same_point():
    base, models, data = problem(T=2, seed=1)
    kw = dict(task_specific_keys=r"^head\.", steps=0, progress=False, backend="reference")
    started = pymerge.divmerge(base, models, data, start="cart", **kw)
    refined = pymerge.divmerge(base, models, data, init_from="cart", **kw)
    assert (refined.coefficients == 0).all()
    for k in started.state_dict:
        torch.testing.assert_close(started.state_dict[k], refined.state_dict[k], rtol=1e-9, atol=1e-12)
    # a given init still wins, and rank / lam given to both agree as well (exact SVD: the fidelity control's
    # stopping test is static CART's at its default lam, so with another lam only the exact route is bitwise)
    r = pymerge.divmerge(base, models, data, start="cart", init=1.5, cart_rank_ratio=0.2, cart_svd="exact", **kw)
    want = static_cart(base, models, lam=1.5, rank_ratio=0.2, svd="exact")
    for k, v in want.items():
        torch.testing.assert_close(r.state_dict[k], v, rtol=1e-9, atol=1e-12)


def test_adamerging_cart_start_is_not_clamped_to_one():
    base, models, data = problem(T=2)
    r = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", start="cart", steps=2, lr=1e-3,
                           progress=False, backend="reference")
    assert (r.coefficients > 1.9).all() and r.config["clamp"] == "None"
    r = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", start="cart", steps=2,
                           clamp=(0.0, 1.0), progress=False, backend="reference")
    assert (r.coefficients <= 1.0).all()
