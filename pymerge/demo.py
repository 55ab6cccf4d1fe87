"""`python -m pymerge.demo` (`make demo`): fine-tune all-MiniLM-L6-v2 on four real text tasks, merge the four
experts with every static method and DivMerge, and print how good each merged model is on every task.

    python -m pymerge.demo              # the real demo (first run builds the experts, later runs reuse them)
    python -m pymerge.demo --synthetic  # the older weight-distance demo on synthetic fine-tunes (no training)

The real demo's budget is this project's 2-vCPU machine: first run <= 10 minutes (building four experts),
later runs <= 2 minutes. Its choices, each for that budget:
  - tasks: rt_polarity, rt_subjectivity, vader_tweets, debates_party: four label spaces, short texts (23 to
    46 tokens on average; bbc_news's articles fill all 64 and cost twice as much per example);
  - experts: FineTuneSettings(max_train_examples=640) (the defaults' 1,500 take ~4 minutes per task here),
    cached under $PYMERGE_CACHE/experts apart from the full suite's;
  - splits: at most DEMO_TEST test and DEMO_VALIDATION validation examples per task (the full suite: 1,000 /
    500), so the accuracies are on a fixed, small test set (stated in the output);
  - hyper-parameters: DEMO_GRIDS tuned on validation, DivMerge with DEMO_DIVMERGE (few steps).
The full evaluation is `make bench-quality` (`pymerge eval`).
"""
import argparse
import logging
import sys
import time

import torch

DEMO_TASKS = ("rt_polarity", "rt_subjectivity", "vader_tweets", "debates_party")
DEMO_TRAIN_EXAMPLES = 640
DEMO_TEST, DEMO_VALIDATION = 150, 60
DEMO_UNLABELLED = 32
DEMO_GRIDS = {"task_arithmetic": {"lam": (0.2, 0.3, 0.5)}, "ties": {"lam": (0.7, 1.0)},
              "cart": {"lam": (1.0, 2.0), "rank_ratio": (0.08,)}}
# 4 examples per task and step (DivMerge's default is 8): half the cost, for the second run's 2-minute budget;
# lr 0.05 constant over its 20 steps, measured for it (docs/RESULTS.md "DivMerge steps")
DEMO_DIVMERGE = {"steps": 20, "lr": 0.05, "lr_schedule": "constant", "batch_size": 4 * len(DEMO_TASKS)}


# ---------------------------------------------------------------------------------------------- real demo
def run_demo(tasks, backbone, settings, out, *, grids=None, divmerge_options=None, unlabelled=DEMO_UNLABELLED,
             command="python -m pymerge.demo", model_name=None):
    """Build (or read from the cache) one expert per task with `settings`, merge them all with every static
    method (grids tuned on validation) and DivMerge (divmerge_options), print the per-task table and write
    the reports into `out`. Returns (EvalResult, {kind: path})."""
    from pymerge.eval import build_experts, console_table, run_evaluation, suite_from_experts, variants, write_reports
    from pymerge.methods import available
    from pymerge.teachers.cache import cache_dir
    grids = DEMO_GRIDS if grids is None else grids
    divmerge_options = DEMO_DIVMERGE if divmerge_options is None else divmerge_options
    t0 = time.perf_counter()
    print(f"pymerge demo: {model_name or backbone.path} fine-tuned on {len(tasks)} tasks ({', '.join(t.name for t in tasks)}), "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"experts: whole body + a linear head on mean-pooled tokens, {settings.max_train_examples} training "
          f"examples x {settings.epochs} epochs each, cached under {cache_dir() / 'experts'}", flush=True)
    experts = build_experts(tasks, backbone=backbone, settings=settings)
    built = [n for n, e in experts.items() if e.built]
    t_experts = time.perf_counter() - t0
    print(f"experts ready in {t_experts:.0f} s ({'built: ' + ', '.join(built) if built else 'all from the cache'})",
          flush=True)
    rows = variants([*available("static"), "divmerge"], with_variants=False, grids=grids,
                    learned={"divmerge": divmerge_options})
    result = run_evaluation(suite_from_experts(experts, tasks, backbone), rows, (len(tasks),), subsets_per_size=1,
                            seed=0, test_limit=None, validation_limit=None, unlabelled_per_task=unlabelled,
                            grids=grids)
    sizes = ", ".join(f"{t.name} {len(t.splits['test'])}" for t in tasks)
    tuned = "; ".join(f"{m} " + ", ".join(f"{p} in {list(v)}" for p, v in g.items()) for m, g in grids.items())
    steps = divmerge_options.get("steps")
    print(f"\nTest accuracy % of each task with the merged body and that task's own head (test examples: {sizes}).")
    print(f"ANP = mean over tasks of accuracy / the expert's. Tuned on the validation split: {tuned}; the other "
          f"methods at their defaults. DivMerge: layer level, Jensen-Shannon, {steps} steps"
          f"{' of ' + str(divmerge_options['batch_size']) + ' examples' if 'batch_size' in divmerge_options else ''}"
          f"{', lr ' + str(divmerge_options['lr']) if 'lr' in divmerge_options else ''} on {unlabelled} unlabelled "
          f"train texts per task (its paper runs hundreds of steps: make bench-quality). merge s: wall time of "
          f"the merge (DivMerge: its teachers included).\n")
    print(console_table(result))
    paths = write_reports(result, out, command=command)
    print(f"\nplot (ANP per method): {paths['anp_plot']}\nplot (per task): {paths['per_task_plot']}\n"
          f"tables: {paths['markdown']}, {paths['csv']}")
    print(f"total {time.perf_counter() - t0:.0f} s (experts {t_experts:.0f} s)")
    return result, paths


def real_demo(args):
    from pymerge.eval import Backbone, FineTuneSettings, load_task
    from pymerge.teachers.cache import cache_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("pymerge.learn").setLevel(logging.WARNING)  # DivMerge's per-step lines
    try:
        backbone = Backbone.default()
        tasks = [load_task(n, max_test=DEMO_TEST, max_validation=DEMO_VALIDATION) for n in DEMO_TASKS]
    except FileNotFoundError as e:
        raise SystemExit(f"pymerge.demo: {e}") from None
    command = "python -m pymerge.demo" + (f" --out {args.out}" if args.out else "")
    run_demo(tasks, backbone, FineTuneSettings(max_train_examples=DEMO_TRAIN_EXAMPLES),
             args.out or cache_dir() / "demo", command=command, model_name="all-MiniLM-L6-v2")


# ----------------------------------------------------------------------------------------- synthetic demo
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
    from pymerge.ops import resolve
    chosen = resolve("auto", "cpu", "randomized_svd")
    if chosen == "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key("pymerge::randomized_svd_centered",
                                                                               "CPU"):
        return "reference"
    return chosen


def synthetic_demo(args):
    """Merge T synthetic fine-tunes (task vectors with a decaying singular spectrum, pymerge.synthetic) of the
    packaged MiniLM weights with CART, weight averaging, task arithmetic and TIES; print each method's time and
    the median over keys of ||theta_merged - theta_t||_F / ||theta_t - theta_0||_F (1.0: as far from theta_t
    as the base is; 0: theta_t itself). No data, no training: well under a minute."""
    import pymerge
    from pymerge.synthetic import finetunes, load_minilm
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
    print(f"{'(base model)':<18} {'':>7}  " + "  ".join(f"{d:6.3f}" for d in distances(base, base, models)))
    for name, params in runs:
        if any(p.name == "backend" for p in pymerge.methods.get(name).params):
            params = {**params, "backend": backend}
        t1 = time.perf_counter()
        merged = pymerge.merge(name, base, models, **params)
        dt = time.perf_counter() - t1
        print(f"{name:<18} {dt:7.2f}  " + "  ".join(f"{d:6.3f}" for d in distances(merged, base, models)))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", action="store_true", help="the weight-distance demo on synthetic fine-tunes")
    ap.add_argument("--tasks", type=int, default=4, help="--synthetic: number of synthetic fine-tunes")
    ap.add_argument("--out", help="report directory of the real demo (default $PYMERGE_CACHE/demo)")
    # One thread by default: on small shared machines OpenMP threads competing with other processes run many
    # times slower than one (measured on 2 vCPUs under load: the synthetic demo 200 s instead of 18 s; a
    # fine-tuning epoch of the real demo 193 s with 2 threads, 57 s with 1).
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    (synthetic_demo if args.synthetic else real_demo)(args)


if __name__ == "__main__":
    main()
