"""Start points of the learned methods (DivMerge, AdaMerging) built from pymerge's static methods.

``learned_start(start, cart_rank_ratio=..., cart_keys=..., cart_svd=..., init_from=..., init_from_params=...)``
turns the learned methods' start options into a pymerge.learn.start_points.StartPoint:
  - start="pretrained", init_from=None: theta_s = theta_0, delta_t = tau_t (the papers);
  - start="cart" (docs/METHODS.md §Adaptive CART): theta_s = theta_avg, delta_t = CART's rank-k part of
    theta_t - theta_avg on CART's low-rank keys, the full centered vector elsewhere, and Gamma starting at
    static CART's lam (2.0): the optimisation starts at pymerge.merge("cart", ...) with CART's defaults. The
    key selection (cart.select_low_rank_keys), the rank (cart.ratio_rank) and the factorisation
    (cart.centered_factors: the route static CART takes for a materialised key with its default options, i.e.
    the fidelity control tol = cart.DEFAULT_TOL, Gram route or seeded subspace iteration; or the exact SVD) are
    static CART's own, so start="cart" and init_from="cart" start at the same point (up to rounding: the stacks
    center task vectors, static CART weights; and a key too large to materialise, which static CART iterates
    through its implicit operator, is factored here by the same tol from its materialised stack);
  - init_from=<static method name>: theta_s = pymerge.merge(name, theta_0, [theta_t], **init_from_params),
    delta_t = tau_t, Gamma from 0; a merged state dict or a callable goes to StaticMergeStart as it is.
"""
import functools
from types import SimpleNamespace

import torch

from ..learn.inputs import compile_regex
from ..learn.start_points import StartPoint, StaticMergeStart
from ..merge import merge
from . import cart
from .learned_params import CART_DEFAULTS, START_PARAMS
from .params import check_value

# the learned methods' options that make their start point (with backend, which their objective also reads)
START_OPTIONS = tuple(p.name for p in START_PARAMS)
# docs/METHODS.md §Adaptive CART: static CART's defaults (pymerge.methods.cart), so that start="cart" and
# init_from="cart" factor every key alike: its lam (Gamma's start) and SVD route.
CART_LAM = CART_DEFAULTS["lam"]
CART_SVD = CART_DEFAULTS["svd"]


class CartStart(StartPoint):
    """theta_s = theta_avg, delta_t = rank-k approximation of theta_t - theta_avg (CART's low-rank keys) or the
    full centered vector (others), k = cart.ratio_rank(rank_ratio, m, n); Gamma starts at lam (static CART's
    2.0): Phi = theta_avg + lam sum_t SVD_k(tau_bar_t) is static CART. keys: CART's low_rank_keys (a regex
    among the >= 2-D merged keys); None: cart.select_low_rank_keys's default (2-D keys matching none of
    cart.DEFAULT_EXCLUDE_KEYS). svd: "randomized" (static CART's default route and fidelity, each key seeded by
    key_seed(0, key), as pymerge.merge("cart", ...) with seed 0; cart.centered_factors) or "exact"."""
    name = "cart"

    def __init__(self, rank_ratio=cart.DEFAULT_RANK_RATIO, keys=None, svd=CART_SVD, backend="auto",
                 what="learned merge", lam=CART_LAM):
        self.rank_ratio, self.svd, self.backend, self.what = rank_ratio, svd, backend, what
        compile_regex(keys, "cart_keys", what)       # a bad regex fails here, before any model is read
        self.keys = keys
        self.initial_gamma = lam

    def config(self):
        return {"start": self.name, "cart_rank_ratio": self.rank_ratio, "cart_svd": self.svd}

    def selected(self, merged):
        """CART's low-rank keys among the merged keys (pymerge.methods.cart.select_low_rank_keys)."""
        try:
            keys = {k: SimpleNamespace(shape=shape) for k, shape in merged.shape_of.items()}
            return set(cart.select_low_rank_keys(keys, self.keys))
        except ValueError as e:
            raise ValueError(f"{self.what}: start='cart': {e}") from None

    def apply(self, merged, what):
        selected = self.selected(merged)
        with torch.no_grad():
            for g in merged.stacks:
                mean = g.delta.mean(dim=1, keepdim=True)                       # [K, 1, S]
                g.start = g.start + mean                                       # new tensor: base is not written
                g.delta.sub_(mean)
                for i, (k, shape) in enumerate(zip(g.keys, g.shapes)):
                    if k not in selected:
                        continue
                    m, n = cart.matrix_shape(shape)
                    A = g.delta[i].view(-1, m, n)
                    # mean[i]: theta_avg - theta_0, what static CART's fidelity is measured against
                    U, S, V = cart.centered_factors(k, A, mean[i].view(m, n), cart.ratio_rank(self.rank_ratio, m, n),
                                                    lam=self.initial_gamma, svd=self.svd, seed=0,
                                                    backend=self.backend)
                    A.copy_((U * S.unsqueeze(-2)) @ V.mT)
                del mean


def learned_start(start="pretrained", *, cart_rank_ratio=None, cart_keys=None, cart_svd=CART_SVD, init_from=None,
                  init_from_params=None, backend="auto", what="learned merge") -> StartPoint:
    """The StartPoint of the learned methods' options (see the module docstring); ValueError naming the
    option for a bad one (checked by the options' Params, pymerge.methods.learned_params). backend: the
    pymerge.ops backend of CART's randomized SVD."""
    given = dict(start=start, cart_rank_ratio=cart_rank_ratio, cart_keys=cart_keys, cart_svd=cart_svd,
                 init_from=init_from, init_from_params=init_from_params)
    for p in START_PARAMS:
        check_value(what, p, given[p.name])
    if start == "cart" and init_from is not None:
        raise ValueError(f"{what}: start='cart' and init_from are exclusive (both set the starting point)")
    if cart_rank_ratio is None:
        cart_rank_ratio = cart.DEFAULT_RANK_RATIO
    if start == "cart":
        return CartStart(cart_rank_ratio, cart_keys, cart_svd, backend, what)
    if init_from is None:
        return StartPoint()
    if isinstance(init_from, str):
        return StaticMergeStart(functools.partial(merge, init_from), init_from_params, what, label=init_from)
    return StaticMergeStart(init_from, init_from_params, what)


def pop_learned_start(options, what) -> StartPoint:
    """learned_start() of a learned method's options dict, from which it removes START_OPTIONS and backend."""
    return learned_start(**{k: options.pop(k) for k in START_OPTIONS}, backend=options.pop("backend"), what=what)
