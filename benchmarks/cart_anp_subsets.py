"""CART's default against exact CART, judged by accuracy, at every rank ratio and subset size (issue #12).

    python benchmarks/cart_anp_subsets.py [--ratios 0.02,0.04,0.08,0.16] [--sizes 2,4,6] [--subsets-per-size 3]
                                          [--lam 2.0] [--test-limit 500] [--out DIR]

One pymerge.eval.run_evaluation over the six cached all-MiniLM-L6-v2 experts (pymerge.eval.build_experts: `make
data` builds them) on the same seeded task subsets as `pymerge eval` (seed 0): per rank ratio two rows at the same
λ, pymerge.merge("cart") with its defaults (the fidelity control at tol 0.05, randomized or Gram route per key)
and svd="exact" (torch.linalg.svd per task and key, CART's own definition). Prints, per subset size and ratio, the
mean ANP of both over the subsets and the largest |ANP difference| on any subset, in points; the issue's target is
<= 0.3 everywhere. Accuracy only (merge times: benchmarks/methods_cart.py). Writes results.csv / results.md
(pymerge.eval.report) under --out.
"""
import argparse
import logging
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymerge.eval import build_experts, load_task  # noqa: E402
from pymerge.eval.harness import Variant, run_evaluation, suite_from_experts  # noqa: E402
from pymerge.eval.report import write_reports  # noqa: E402

TASKS = ("rt_polarity", "rt_subjectivity", "debates_party", "bbc_news", "vader_tweets", "vader_nyt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--ratios", default="0.02,0.04,0.08,0.16")
    ap.add_argument("--sizes", default="2,4,6")
    ap.add_argument("--subsets-per-size", type=int, default=3)
    ap.add_argument("--lam", type=float, default=2.0, help="CART's λ for both rows (default 2.0, CART's default)")
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the randomized SVD")
    ap.add_argument("--out", default="cart-anp-subsets")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ratios = [float(r) for r in args.ratios.split(",")]
    tasks = [load_task(n) for n in args.tasks.split(",")]
    suite = suite_from_experts(build_experts(tasks), tasks)
    rows = []
    for r in ratios:
        params = {"rank_ratio": r, "lam": args.lam}
        rows += [Variant(f"cart r={r}", "cart", params, note="pymerge default route (tol 0.05)"),
                 Variant(f"cart-exact r={r}", "cart", {**params, "svd": "exact"}, note="torch.linalg.svd")]
    t0 = time.perf_counter()
    # these rows have no grid: validation only gives each row's (unused) score, on few examples
    result = run_evaluation(suite, rows, [int(s) for s in args.sizes.split(",")],
                            subsets_per_size=args.subsets_per_size, test_limit=args.test_limit, validation_limit=50,
                            seed=args.seed)
    write_reports(result, args.out, command=" ".join(["python benchmarks/cart_anp_subsets.py", *sys.argv[1:]]))
    anp = {(r.size, r.subset, r.variant): r.anp for r in result.rows}
    table = defaultdict(list)
    for (size, subset, variant), value in anp.items():
        if variant.startswith("cart r="):
            exact = anp[size, subset, variant.replace("cart r=", "cart-exact r=")]
            table[size, variant[len("cart r="):]].append((value, exact))
    print(f"\nλ {args.lam}, test ANP % (mean over the subsets), default - exact in points")
    print(f"{'tasks':>5s} {'ratio':>6s} {'subsets':>7s} {'default':>8s} {'exact':>8s} {'mean diff':>9s} "
          f"{'max |diff|':>10s}")
    for (size, ratio), pairs in sorted(table.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        d = [100 * (a - b) for a, b in pairs]
        print(f"{size:5d} {ratio:>6s} {len(pairs):7d} {100 * sum(a for a, _ in pairs) / len(pairs):8.2f} "
              f"{100 * sum(b for _, b in pairs) / len(pairs):8.2f} {sum(d) / len(d):+9.2f} {max(map(abs, d)):10.2f}")
    print(f"\n{time.perf_counter() - t0:.0f} s; reports in {args.out}")


if __name__ == "__main__":
    main()
