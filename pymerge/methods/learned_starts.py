"""Start points of the learned methods (DivMerge, AdaMerging) built from pymerge's static methods.

``learned_start(start, cart_rank_ratio=..., cart_keys=..., cart_svd=..., init_from=..., init_from_params=...)``
turns the learned methods' start options into a pymerge.learn.start_points.StartPoint:
  - start="pretrained", init_from=None: theta_s = theta_0, delta_t = tau_t (the papers);
  - start="cart" (docs/METHODS.md §Adaptive CART): theta_s = theta_avg, delta_t = CART's rank-k part of
    theta_t - theta_avg on the selected 2-D keys (CartStart, the factorisation of pymerge.methods.cart), the
    full centered vector elsewhere;
  - init_from=<static method name>: theta_s = pymerge.merge(name, theta_0, [theta_t], **init_from_params),
    delta_t = tau_t, Gamma from 0; a merged state dict or a callable goes to StaticMergeStart as it is.
"""
import functools
import re

import torch

from ..learn.inputs import compile_regex
from ..learn.start_points import StartPoint, StaticMergeStart
from ..merge import merge
from . import cart
from .learned_params import START_PARAMS
from .params import check_value
from .spec import key_seed

# the learned methods' options that make their start point (with backend, which their objective also reads)
START_OPTIONS = tuple(p.name for p in START_PARAMS)
# docs/METHODS.md §Adaptive CART: cart_svd="randomized" is pymerge.ops.randomized_svd with that op's defaults
# (l = k + 10 columns, 2 power iterations), not static CART's l = 1.5 k.
CART_START_OVERSAMPLE = 10
CART_START_POWER_ITERS = 2


class CartStart(StartPoint):
    """theta_s = theta_avg, delta_t = rank-k approximation of theta_t - theta_avg (selected 2-D keys) or the
    full centered vector (others), k = max(1, int(rank_ratio * min(m, n))). keys: a regex selecting among the
    2-D merged keys; None: every 2-D merged key that is no untied nn.Embedding table and matches none of
    pymerge.methods.cart.DEFAULT_EXCLUDE_KEYS. svd="randomized": each key's test matrix is seeded by
    key_seed(0, key), whatever stack the key is in."""
    name = "cart"

    def __init__(self, rank_ratio=cart.DEFAULT_RANK_RATIO, keys=None, svd="exact", backend="auto",
                 what="learned merge"):
        self.rank_ratio, self.svd, self.backend = rank_ratio, svd, backend
        self.keys = compile_regex(keys, "cart_keys", what)
        self.exclude = [re.compile(p) for p in cart.DEFAULT_EXCLUDE_KEYS]

    def config(self):
        return {"start": self.name, "cart_rank_ratio": self.rank_ratio}

    def _selected(self, key, shape, embedding_keys):
        if self.keys is not None:
            return self.keys.search(key) is not None and len(shape) == 2
        return len(shape) == 2 and key not in embedding_keys and not any(e.search(key) for e in self.exclude)

    def apply(self, merged, what):
        with torch.no_grad():
            for g in merged.stacks:
                mean = g.delta.mean(dim=1, keepdim=True)                       # [K, 1, S]
                g.start = g.start + mean                                       # new tensor: base is not written
                g.delta.sub_(mean)
                del mean
                for i, (k, shape) in enumerate(zip(g.keys, g.shapes)):
                    if not self._selected(k, shape, merged.embedding_keys):
                        continue
                    m, n = shape
                    A = g.delta[i].view(-1, m, n)
                    U, S, V = cart.low_rank_factors(A, cart.ratio_rank(self.rank_ratio, m, n), svd=self.svd,
                                                    oversample=CART_START_OVERSAMPLE,
                                                    power_iters=CART_START_POWER_ITERS, seed=key_seed(0, k),
                                                    backend=self.backend)
                    A.copy_((U * S.unsqueeze(-2)) @ V.mT)


def learned_start(start="pretrained", *, cart_rank_ratio=None, cart_keys=None, cart_svd="exact", init_from=None,
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
