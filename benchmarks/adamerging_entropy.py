"""Why AdaMerging ends below task arithmetic on the text suite (issue #11): its objective against accuracy.

    python benchmarks/adamerging_entropy.py [--tasks rt_polarity,rt_subjectivity,bbc_news,vader_tweets]
                                            [--lams 0.1,0.2,0.3,0.5,0.7,1.0] [--steps 200] [--test-limit 500]

On the cached all-MiniLM-L6-v2 experts (pymerge.eval.build_experts; `make data` builds them), along the task
arithmetic line θ_0 + λ Σ_t τ_t: per λ the test ANP (as pymerge eval: accuracy of the merged body with each task's
own head over the expert's) and AdaMerging's objective, the mean entropy of the merged model's predictions on the
unlabelled train texts each task gives AdaMerging (the first 200, as pymerge eval). Then one AdaMerging run with
the harness's settings (layer level, official init 0.3, lr 1e-3, clamp [0, 1], --steps): where its Γ went, its
entropy and its ANP. If entropy keeps falling as λ grows while ANP falls, the objective rewards scaling the task
vectors up, confident and wrong: the method, not the optimiser, sets where AdaMerging ends. 1 thread.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pymerge  # noqa: E402
from pymerge.eval import build_experts, load_task  # noqa: E402
from pymerge.eval.harness import (DEFAULT_UNLABELLED, Variant, _Harness, _SubsetRun,  # noqa: E402
                                  suite_from_experts)
from pymerge.learn.batching import logits_of  # noqa: E402


class Probe:
    """Test ANP (pymerge eval's evaluator) and the mean entropy on the unlabelled batches pymerge eval gives the
    learned methods, of merged bodies, each task with its own expert head."""

    def __init__(self, suite, names, test_limit):
        self.names = names
        self.h = _Harness(suite, grids={}, seed=0, unlabelled=DEFAULT_UNLABELLED, limits={"test": test_limit},
                          batch_size=64, device="cpu")
        self.ev = self.h.evaluator
        self.reference = {n: self.ev.accuracy(n, suite.shared(suite.members[n].state()), "test") for n in names}

    @torch.no_grad()
    def entropy(self, n, shared):
        module = self.ev._module(n)
        module.load_state_dict({**shared, **self.ev.own[n]})
        logp = torch.cat([logits_of(module(**b)).float() for b in self.h.unlabelled_batches(n)]).log_softmax(-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    def line(self, label, shared):
        acc = {n: self.ev.accuracy(n, shared, "test") for n in self.names}
        ent = {n: self.entropy(n, shared) for n in self.names}
        anp = sum(acc[n] / self.reference[n] for n in self.names) / len(self.names)
        print(f"{label:34s} {100 * anp:6.1f} {sum(ent.values()) / len(ent):8.3f}   "
              + "  ".join(f"{acc[n]:.3f} / {ent[n]:.3f}" for n in self.names), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="rt_polarity,rt_subjectivity,bbc_news,vader_tweets")
    ap.add_argument("--lams", default="0.1,0.2,0.3,0.5,0.7,1.0")
    ap.add_argument("--steps", type=int, default=200, help="AdaMerging steps (pymerge eval's default 200; 0: skip)")
    ap.add_argument("--test-limit", type=int, default=500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.tasks.split(",")
    tasks = [load_task(n) for n in names]
    suite = suite_from_experts(build_experts(tasks), tasks)
    probe = Probe(suite, names, args.test_limit)
    base = suite.base_state
    shared = [suite.shared(suite.members[n].state()) for n in names]
    print(f"{'merged body':34s} {'ANP %':>6s} {'mean H':>8s}   per task: test accuracy / entropy "
          f"({', '.join(names)})")
    for lam in (float(x) for x in args.lams.split(",")):
        probe.line(f"task arithmetic λ = {lam}", pymerge.merge("task_arithmetic", base, shared, lam=lam))
    if args.steps == 0:
        return
    # pymerge eval's AdaMerging row (layer level, the official init / lr / clamp), keeping its coefficients
    _, result, seconds = _SubsetRun(probe.h, tuple(names)).learn(
        Variant("adamerging", "adamerging", {"steps": args.steps, "granularity": "layer"}))
    g = result.coefficients.double()
    probe.line(f"AdaMerging ({args.steps} steps)", {k: result.state_dict.get(k, v) for k, v in base.items()})
    print(f"AdaMerging: {seconds:.0f} s, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
          f"Γ (from 0.3) mean per task {', '.join(f'{float(x):.3f}' for x in g.mean(0))}, "
          f"min {float(g.min()):.3f}, max {float(g.max()):.3f}")


if __name__ == "__main__":
    main()
