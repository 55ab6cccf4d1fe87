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
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pymerge  # noqa: E402
from pymerge.eval import build_experts, load_task  # noqa: E402
from pymerge.eval.experts import collate, tokenize  # noqa: E402
from pymerge.eval.harness import DEFAULT_UNLABELLED, suite_from_experts  # noqa: E402
from pymerge.learn.batching import logits_of  # noqa: E402


class Probe:
    """Test accuracy and unlabelled-train entropy of merged bodies, each task with its own expert head."""

    def __init__(self, suite, names, test_limit, unlabelled):
        self.suite, self.names = suite, names
        self.pad = suite.tokenizer.pad_token_id or 0
        self.modules, self.own, self.test, self.train, self.reference = {}, {}, {}, {}, {}
        for n in names:
            member = suite.members[n]
            state = member.state()
            self.own[n] = suite.own(state)
            self.modules[n] = member.module()
            self.modules[n].load_state_dict(state)
            self.modules[n].eval()
            texts, labels = member.task.split("test", test_limit)
            self.test[n] = tokenize(suite.tokenizer, texts, member.max_length), labels
            texts, _ = member.task.split("train", unlabelled)
            self.train[n] = tokenize(suite.tokenizer, texts, member.max_length)
            self.reference[n] = self.accuracy(n, suite.shared(state))

    @torch.no_grad()
    def _logits(self, n, shared, ids):
        module = self.modules[n]
        module.load_state_dict({**shared, **self.own[n]})
        out = []
        for s in range(0, len(ids), 64):
            x, mask = collate(ids[s:s + 64], self.pad)
            out.append(logits_of(module(input_ids=x, attention_mask=mask)).float())
        return torch.cat(out)

    def accuracy(self, n, shared):
        ids, labels = self.test[n]
        order = self.suite.members[n].label_order
        logits = self._logits(n, shared, ids)
        if order is not None:
            logits = logits[:, list(order)]
        return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())

    def entropy(self, n, shared):
        logp = self._logits(n, shared, self.train[n]).log_softmax(-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    def line(self, label, shared):
        acc = {n: self.accuracy(n, shared) for n in self.names}
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
    probe = Probe(suite, names, args.test_limit, DEFAULT_UNLABELLED)
    base = suite.base_state
    shared = [suite.shared(suite.members[n].state()) for n in names]
    print(f"{'merged body':34s} {'ANP %':>6s} {'mean H':>8s}   per task: test accuracy / entropy "
          f"({', '.join(names)})")
    for lam in (float(x) for x in args.lams.split(",")):
        probe.line(f"task arithmetic λ = {lam}", pymerge.merge("task_arithmetic", base, shared, lam=lam))
    if args.steps == 0:
        return
    first = suite.members[names[0]]
    model = first.module()
    model.load_state_dict({**base, **suite.own(first.state())})

    def loader(n):
        def load():
            m = suite.members[n].module()
            m.load_state_dict(suite.members[n].state())
            return m.eval()
        return load

    data = {n: [dict(zip(("input_ids", "attention_mask"), collate(probe.train[n][i:i + 32], probe.pad)))
                for i in range(0, len(probe.train[n]), 32)] for n in names}
    t0 = time.perf_counter()
    result = pymerge.adamerging(model, {n: loader(n) for n in names}, data, task_specific_keys=suite.task_specific,
                                granularity="layer", steps=args.steps, progress=False,
                                pad_value={"input_ids": probe.pad}, examples_per_task=DEFAULT_UNLABELLED)
    g = result.coefficients.double()
    probe.line(f"AdaMerging ({args.steps} steps)", {k: result.state_dict.get(k, v) for k, v in base.items()})
    print(f"AdaMerging: {time.perf_counter() - t0:.0f} s, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
          f"Γ (from 0.3) mean per task {', '.join(f'{float(x):.3f}' for x in g.mean(0))}, "
          f"min {float(g.min()):.3f}, max {float(g.max()):.3f}")


if __name__ == "__main__":
    main()
