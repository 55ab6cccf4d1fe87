"""What moves DivMerge's share of the task-arithmetic -> expert gap on the six text tasks (issue #11).

    python benchmarks/divmerge_study.py [--suite text|generative] [--tasks a,b,..] [--sizes 6]
                                        [--configs default,lr0.05,...] [--test-limit 500] [--validation-limit 100]
                                        [--steps 200] [--out DIR]

One pymerge.eval.run_evaluation over the cached experts (pymerge.eval.build_experts: `make data` builds them)
with task arithmetic (λ tuned on validation, the gap's reference), CART (λ and rank tuned) and one DivMerge row
per configuration below (layer level, Jensen-Shannon, unlabelled train texts only). Each row prints test ANP,
the gap closed and the VALIDATION ANP: choose a configuration on validation ANP, then confirm it on a task set
the choice never saw (--tasks). Every configuration runs the same steps on the same data unless it says
otherwise, at pymerge.divmerge's learning rate and schedule unless it names its own (lr 0.5 with a cosine decay;
docs/RESULTS.md's DivMerge tables before "The learning-rate schedule" ran at the former constant 0.2, which
`former-default` and the lr* configurations pin; a causal LM's default is still 0.2, constant). Writes
results.csv / results.md (pymerge.eval.report) under --out.

--suite generative: the same over the causal-LM experts of pymerge.eval (SmolLM2-135M fine-tuned per text domain,
`pymerge eval --suite generative`'s; DivMerge's generative path, 100 steps, 100 prompts per domain): rows task
arithmetic and the configurations, scored by RPS (mean expert / merged test perplexity) and the gain kept.
"""
import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymerge.cli.eval import LIMITS as EVAL_LIMITS  # noqa: E402
from pymerge.eval import build_experts, lm_experts, lm_harness, load_task  # noqa: E402
from pymerge.eval.lm_data import DEFAULT_DOMAINS, load_domain  # noqa: E402
from pymerge.eval.harness import (DEFAULT_GRIDS, DEFAULT_LEARNED, Variant, run_evaluation,  # noqa: E402
                                  suite_from_experts)
from pymerge.eval.report import write_reports  # noqa: E402

TASKS = ("rt_polarity", "rt_subjectivity", "debates_party", "bbc_news", "vader_tweets", "vader_nyt")
BASE = {**DEFAULT_LEARNED["divmerge"], "granularity": "layer", "divergence": "js"}
LM_BASE = {**lm_harness.DEFAULT_LM_LEARNED["divmerge"], "granularity": "layer", "divergence": "js"}
# --suite: (tasks, test limit, validation limit, unlabelled texts per task, steps) when not given
# (text: the study's own caps; generative: `pymerge eval --suite generative`'s)
SUITE_DEFAULTS = {"text": (",".join(TASKS), 500, 100, 200, BASE["steps"]),
                  "generative": (",".join(DEFAULT_DOMAINS), *(EVAL_LIMITS["generative"][k] for k in (
                      "test_limit", "validation_limit", "unlabelled")), LM_BASE["steps"])}
# name -> (options over BASE, start); start as pymerge.eval.harness.Variant.start
CONSTANT = {"lr_schedule": "constant"}
CONFIGS = {
    "default": ({}, None),
    # the default before the cosine schedule (docs/RESULTS.md "The learning-rate schedule")
    "former-default": ({"lr": 0.2, **CONSTANT}, None),
    "lr0.05": ({"lr": 0.05, **CONSTANT}, None),
    "lr0.1": ({"lr": 0.1, **CONSTANT}, None),
    "lr0.2": ({"lr": 0.2, **CONSTANT}, None),
    "lr0.5": ({"lr": 0.5, **CONSTANT}, None),
    "from-cart-lr0.2": ({"lr": 0.2, **CONSTANT}, "cart"),
    "steps400": ({"steps": 400}, None),
    "lr0.05-steps400": ({"lr": 0.05, "steps": 400, **CONSTANT}, None),
    "temp2": ({"temperature": 2.0}, None),
    "lr0.05-temp2": ({"lr": 0.05, "temperature": 2.0, **CONSTANT}, None),
    "from-ta": ({}, "task_arithmetic"),
    "from-ta-lr0.05": ({"lr": 0.05, **CONSTANT}, "task_arithmetic"),
    "from-cart": ({}, "cart"),
    "from-cart-lr0.05": ({"lr": 0.05, **CONSTANT}, "cart"),
    # static CART's merged model (its tuned λ and rank) as the start, Γ from 0 on the whole task vectors
    "from-cart-merge": ({}, "cart_merge"),
    "task-level": ({"granularity": "task"}, None),
    # Γ projected onto [0, 1] after every step (AdaMerging's official clamp); the paper's Γ is unconstrained
    "clamp01": ({"clamp": (0.0, 1.0)}, None),
    "kl": ({"divergence": "kl"}, None),
    # one Γ per task and transformer layer (BERT-style key names) instead of per key: 6x fewer coefficients
    "per-layer": ({"layer_groups": r"layer\.(\d+)\."}, None),
    "kl-per-layer": ({"divergence": "kl", "layer_groups": r"layer\.(\d+)\."}, None),
    # twice the examples per step: 8 per task (batch_size 8 T instead of the default 4 T; T = the one --sizes)
    "batch8": ({"batch_per_task": 8}, None),
    "kl-batch8": ({"divergence": "kl", "batch_per_task": 8}, None),
    # the learning rate decayed to 0 over the run (half a cosine) instead of constant; cosine-lr0.5 is the default
    "cosine-lr0.2": ({"lr": 0.2, "lr_schedule": "cosine"}, None),
    "cosine-lr0.3": ({"lr": 0.3, "lr_schedule": "cosine"}, None),
    "cosine-lr0.5": ({"lr": 0.5, "lr_schedule": "cosine"}, None),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="text", choices=tuple(SUITE_DEFAULTS))
    ap.add_argument("--tasks", help="default: the suite's (text: the six tasks; generative: its three domains)")
    ap.add_argument("--sizes", default="6")
    ap.add_argument("--subsets-per-size", type=int, default=1)
    ap.add_argument("--configs", default="default,lr0.05,from-cart")
    ap.add_argument("--test-limit", type=int, help="default 500 (generative 200)")
    ap.add_argument("--validation-limit", type=int, help="default 100")
    ap.add_argument("--unlabelled", type=int, help="default 200 (generative 100)")
    ap.add_argument("--steps", type=int, help="steps of every configuration without its own (default 200; "
                    "generative 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsets and DivMerge's batch order")
    ap.add_argument("--out", default="divmerge-study")
    args = ap.parse_args(argv)
    for name, value in zip(("tasks", "test_limit", "validation_limit", "unlabelled", "steps"),
                           SUITE_DEFAULTS[args.suite]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    generative = args.suite == "generative"
    grids = lm_harness.DEFAULT_LM_GRIDS if generative else DEFAULT_GRIDS
    rows = [Variant("task_arithmetic", "task_arithmetic", {}, dict(grids["task_arithmetic"]))]
    if not generative:
        rows.append(Variant("cart", "cart", {}, dict(grids["cart"])))
    sizes = tuple(int(s) for s in args.sizes.split(","))
    for n in names:
        opts, start = CONFIGS[n]
        if "batch_per_task" in opts:
            if len(sizes) != 1:
                raise SystemExit(f"config {n} sets examples per task and step: give one --sizes")
            opts = {k: v for k, v in opts.items() if k != "batch_per_task"} | {
                "batch_size": opts["batch_per_task"] * sizes[0]}
        rows.append(Variant(f"divmerge-{n}", "divmerge", {**(LM_BASE if generative else BASE), "steps": args.steps,
                                                          **opts}, start=start, note=n))
    t0 = time.perf_counter()
    command = " ".join(["python benchmarks/divmerge_study.py", *sys.argv[1:]])
    if generative:
        domains = [load_domain(n) for n in args.tasks.split(",")]
        base = lm_experts.LMBase.default()
        suite = lm_harness.lm_suite_from_experts(lm_experts.build_lm_experts(domains, base=base), domains, base)
        result = lm_harness.run_lm_evaluation(suite, rows, sizes, subsets_per_size=args.subsets_per_size,
                                              seed=args.seed, test_limit=args.test_limit,
                                              validation_limit=args.validation_limit,
                                              unlabelled_per_domain=args.unlabelled)
        heading = f"{'RPS':>8s} {'gain kept':>9s}"
    else:
        tasks = [load_task(n) for n in args.tasks.split(",")]
        suite = suite_from_experts(build_experts(tasks), tasks)
        result = run_evaluation(suite, rows, sizes,
                                subsets_per_size=args.subsets_per_size, test_limit=args.test_limit,
                                validation_limit=args.validation_limit, unlabelled_per_task=args.unlabelled,
                                seed=args.seed)
        heading = f"{'test ANP':>8s} {'valid ANP':>9s}"
    write_reports(result, args.out, command=command)
    print(f"\n{'subset':60s} {'row':28s} {heading} {'gap closed':>10s} {'merge s':>8s}")
    for r in result.rows:
        print(f"{'+'.join(r.subset):60s} {r.variant:28s} {_cells(r, generative)} {100 * r.gap_closed:9.1f}% "
              f"{r.merge_seconds or 0:8.1f}")
    print(f"\n{time.perf_counter() - t0:.0f} s; reports in {args.out}")


def _cells(row, generative):
    """A result row's quality cells: RPS and gain kept of a causal-LM merge, test and validation ANP of a classifier
    merge."""
    if generative:
        return f"{row.rps:8.4f} {row.gain_kept:9.3f}"
    return f"{100 * row.anp:8.1f} {100 * (row.validation_anp or float('nan')):9.1f}"


if __name__ == "__main__":
    main()
