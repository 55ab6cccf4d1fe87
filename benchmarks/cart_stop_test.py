"""Does CART's `tol` stop keep its promise? The true error of the merged weights at the stop, over many keys.

    python benchmarks/cart_stop_test.py [--seeds 40] [--no-real]

For each key: T centered matrices A_t = theta_t - theta_avg (float32), rank k = int(ratio * min(m, n)), l = k +
max(10, k) (pymerge's defaults), exact merged weights from float64 torch.linalg.svd; then
pymerge.methods.cart_factors.adaptive_factors with a SubspaceIteration from two iteration seeds, at tol 0.05 and
1e-2, and the true relative error ||merged - merged_exact||_F / ||merged_exact - theta_0||_F at its stop. Keys:
- flat-tailed synthetic keys (pymerge.synthetic.flat_tail_models, the spectrum measured on real MiniLM-L6
  fine-tunes): 160 x 80, 80 x 160, 384 x 384, T = 4, --seeds seeds, rank ratios 0.04 / 0.08 / 0.16 (where l <
  min(m, n), so the iteration runs);
- unless --no-real: three keys of layer 3 of the six cached all-MiniLM-L6-v2 experts of pymerge.eval (query
  384 x 384, intermediate 1536 x 384, output 384 x 1536; T = 6; `make data` builds them), rank ratios 0.02-0.08.
Rows: the stop test with and without each of its two guards (cart_factors.RITZ_STEP_GUARD: no stop before the
Ritz rate's j-th power is below tol; cart_factors.ESTIMATE_SAFETY: the margin on the geometric tail). Each row
prints how many merges ended above tol, the worst error / tol and the mean number of steps. No timing.
Full run: ~10 CPU minutes at 1 thread.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymerge import synthetic  # noqa: E402
from pymerge.methods import cart_factors as cf  # noqa: E402

LAM = 2.0
SYNTHETIC_SHAPES = ((160, 80), (80, 160), (384, 384))
REAL_KEYS = ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
             "encoder.layer.3.output.dense.weight")
TOLS = (0.05, 0.01)
ITERATION_SEEDS = (0, 1)


def key_cases(thetas, base, ratios):
    """[(A fp32, avg fp32, theta_0 fp32, exact merged fp64, ||exact - theta_0||, k, l)] of one key's thetas
    [T, m, n] (float64) at each rank ratio where the iteration runs (l < min(m, n))."""
    avg = thetas.mean(0)
    A = thetas - avg
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    m, n = A.shape[-2:]
    out = []
    for ratio in ratios:
        k = cf.ratio_rank(ratio, m, n)
        l = k + cf.adaptive_oversampling(None, k)
        if l >= min(m, n):
            continue
        exact = avg + LAM * torch.einsum("tik,tk,tkj->ij", U[..., :k], S[..., :k], Vh[:, :k])
        out.append((A.float(), avg.float(), base.float(), exact, float((exact - base).norm()), k, l))
    return out


def synthetic_cases(seeds):
    cases = []
    for shape in SYNTHETIC_SHAPES:
        for seed in range(seeds):
            base, models = synthetic.flat_tail_models({"w": shape}, 4, seed=seed, dtype=torch.float64)
            cases += key_cases(torch.stack([m["w"] for m in models]), base["w"], (0.04, 0.08, 0.16))
    return cases


def real_cases():
    from pymerge.eval import Backbone, build_experts, load_task
    from methods_cart import REAL_TASKS
    backbone = Backbone.default()
    experts = build_experts([load_task(n) for n in REAL_TASKS], backbone=backbone)
    base = backbone.body_state()
    bodies = [experts[n].body_state() for n in REAL_TASKS]
    cases = []
    for key in REAL_KEYS:
        cases += key_cases(torch.stack([b[key].double() for b in bodies]), base[key].double(), (0.02, 0.04, 0.08))
    return cases


def sweep(cases, ritz_guard, safety):
    """(merges above tol, total, worst error / tol, mean steps) with the given guards."""
    cf.RITZ_STEP_GUARD, cf.ESTIMATE_SAFETY = ritz_guard, safety
    over = total = steps = 0
    worst = 0.0
    for A, avg, base, exact, ref, k, l in cases:
        def merge(U, S, V, avg=avg):
            return avg + LAM * torch.einsum("tik,tk,tjk->ij", U, S, V)
        for tol in TOLS:
            for seed in ITERATION_SEEDS:
                _, merged, info = cf.adaptive_factors(cf.SubspaceIteration(A, l, seed), k, LAM, merge, base,
                                                      lambda: cf.exact_factors(A, k), tol)
                err = float((merged.double() - exact).norm()) / ref
                total += 1
                over += err > tol
                worst = max(worst, err / tol)
                steps += info["steps"]
    return over, total, worst, steps / max(1, total)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=40, help="synthetic keys per shape")
    ap.add_argument("--no-real", action="store_true", help="skip the real MiniLM keys")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = synthetic_cases(args.seeds) + ([] if args.no_real else real_cases())
    print(f"{len(cases)} keys x tol {TOLS} x iteration seeds {ITERATION_SEEDS}; true error at the stop vs float64 "
          f"exact CART (lam {LAM})")
    print(f"{'Ritz-rate guard':>15s} {'tail margin':>11s} {'above tol':>12s} {'worst err/tol':>13s} "
          f"{'mean steps':>10s}")
    defaults = cf.RITZ_STEP_GUARD, cf.ESTIMATE_SAFETY
    try:
        for guard, safety in ((False, 1.0), (False, defaults[1]), (True, 1.0), defaults):
            over, total, worst, steps = sweep(cases, guard, safety)
            print(f"{str(guard):>15s} {safety:11.2f} {f'{over}/{total}':>12s} {worst:13.2f} {steps:10.2f}",
                  flush=True)
    finally:
        cf.RITZ_STEP_GUARD, cf.ESTIMATE_SAFETY = defaults
    print("(last row: pymerge's default)")


if __name__ == "__main__":
    main()
