"""Grid-tuning of the static methods' parameters on validation data, and the run bookkeeping both evaluation
suites share (the text-classification harness.py and the generative lm_harness.py).

TunedRun is the part of one subset's run that does not depend on the suite: static merges, the grid search
(the grid point with the best validation score, the first of equals), the tuned parameters that tuned_as /
start rows borrow, and a learned row's keyword arguments and result. A suite subclasses it with its score
(ANP, RPS) and its learned_row. checked_sizes, grids_and_variants and mean are the bookkeeping both suites'
run functions and results use. It is a module of its own so that neither harness holds the other's shared
code, and lm_harness.py need not import the text suite's harness for it.
"""
import itertools
import math
import time

from ..merge import merge as static_merge
from ..methods import get as method_spec

LEARNED = ("divmerge", "adamerging")
# Variant.start values that start a learned method from a static merge (init_from) at that method's tuned parameters
INIT_FROM_STARTS = {"task_arithmetic": "task_arithmetic", "cart_merge": "cart"}


def mean(values):
    """The mean of the values that are not NaN (NaN when none is)."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


class SuiteResult:
    """What both suites' results (harness.EvalResult, lm_harness.LMEvalResult: dataclasses with rows, experts,
    config) answer alike; MEANS names the row fields summary() averages over subsets."""
    MEANS: tuple = ()

    def sizes(self):
        return sorted({r.size for r in self.rows})

    def variants(self):
        return list(dict.fromkeys(r.variant for r in self.rows))

    def summary(self) -> dict:
        """{(variant, size): {each of MEANS, "subsets"}}: means over the subsets."""
        out = {}
        for v in self.variants():
            for s in self.sizes():
                rows = [r for r in self.rows if r.variant == v and r.size == s]
                if rows:
                    out[v, s] = {**{f: mean(getattr(r, f) for r in rows) for f in self.MEANS}, "subsets": len(rows)}
        return out


def _default(method, name):
    return next(p.default for p in method_spec(method).params if p.name == name)


def _grid_points(grid):
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


class TunedRun:
    """What both suites' subset runs share: static merges, the grid search on the validation split, the tuned
    parameters tuned_as / start rows borrow. A suite's run gives score(state, split) (higher is better: ANP,
    RPS) and learned_row(v). A row: (params, merged state, merge seconds, validation score, tuning seconds)."""

    def __init__(self, h, names, base_state, states):
        self.h, self.names, self.base_state, self.states = h, names, base_state, states
        self.chosen = {}  # static method -> (params, validation score, tuning seconds)

    def row(self, v):
        return self.learned_row(v) if v.method in LEARNED else self.static_row(v)

    def merge_static(self, method, params):
        start = time.perf_counter()
        merged = static_merge(method, self.base_state, [self.states[n] for n in self.names], **params)
        return merged, time.perf_counter() - start

    def tune(self, method, fixed, grid):
        """(params, merged state, merge seconds, validation score, tuning seconds): the grid point with the best
        validation score (the first of equals; no score when the grid has one point)."""
        start, best, points = time.perf_counter(), None, _grid_points(grid)
        for point in points:
            params = {**fixed, **point}
            merged, seconds = self.merge_static(method, params)
            score = self.score(merged, "validation") if len(points) > 1 else float("nan")
            if best is None or score > best[3]:
                best = (params, merged, seconds, score)
            del merged
        params, merged, seconds, score = best
        return params, merged, seconds, score, time.perf_counter() - start

    def chosen_params(self, method):
        if method not in self.chosen:
            params, _, _, score, tuning = self.tune(method, {}, self.h.grids.get(method, {}))
            self.chosen[method] = (params, score, tuning)
        return self.chosen[method][0]

    def static_row(self, v):
        if v.tuned_as is not None:
            params = {**self.chosen_params(v.tuned_as), **v.params}
            merged, seconds = self.merge_static(v.method, params)
            return params, merged, seconds, float("nan"), 0.0
        params, merged, seconds, score, tuning = self.tune(v.method, v.params, v.grid)
        if not v.params:
            self.chosen.setdefault(v.method, (params, score, tuning))
        return params, merged, seconds, score, tuning

    def learned_params(self, v):
        """A learned row's keyword arguments: its own, its start's tuned parameters, the run's seed."""
        params = dict(v.params)
        if v.start in INIT_FROM_STARTS:
            method = INIT_FROM_STARTS[v.start]
            params.update(init_from=method, init_from_params=self.chosen_params(method))
        elif v.start == "cart":
            cart = self.chosen_params("cart")
            params.update(start="cart", init=cart.get("lam", _default("cart", "lam")))
            if cart.get("rank_ratio") is not None:
                params["cart_rank_ratio"] = cart["rank_ratio"]
        params.setdefault("seed", self.h.seed)
        return params

    def learned_result(self, params, result, seconds):
        """A learned method's row: its merged state on the base's keys, the parameters a report can show, and
        its validation score (never used to choose anything inside a run: it lets a study compare options of a
        learned method on validation before looking at test)."""
        merged = {k: result.state_dict.get(k, self.base_state[k]) for k in self.base_state}
        params = {k: val for k, val in params.items() if isinstance(val, (int, float, str, bool, dict))}
        return params, merged, seconds, self.score(merged, "validation"), 0.0


def checked_sizes(subset_sizes, names, what) -> list:
    """The distinct subset sizes, ascending; each must be between 1 and the number of tasks (domains)."""
    sizes = sorted(set(int(s) for s in subset_sizes))
    for s in sizes:
        if not 1 <= s <= len(names):
            raise ValueError(f"subset size {s}: must be between 1 and the number of {what} ({len(names)}: "
                             f"{', '.join(names)})")
    return sizes


def grids_and_variants(grids, rows) -> dict:
    """The config entries that record the grids and the variants (both suites)."""
    return {"grids": {k: {p: list(vs) for p, vs in g.items()} for k, g in grids.items()},
            "variants": {v.label: {"method": v.method, "params": dict(v.params),
                                   "grid": {k: list(x) for k, x in v.grid.items()}, "note": v.note} for v in rows}}
