"""js_divergence forward + backward: pymerge's fused kernel vs the torch eager composite, 1 thread.

    python benchmarks/ops_divergence.py [--quick] [--reps R] [--dtypes fp32,bf16] [--shapes 4096x32000,...]
                                        [--clock cpu|wall] [--threads N]

Default shapes 4096 x 32000 and 1024 x 152064 (rows x vocabulary), fp32 and bf16 student and teacher logits,
beta = 0.5, T = 1, reduction "mean"; --quick uses 1024 x 32000 and 256 x 152064, fp32 only (about 30 s).

Variants, each measured in its own fresh subprocess (so neither sees the other's allocator state):
  eager    log_softmax of both sides + the JS formula with torch ops (Liger-Kernel's TorchJSD composite:
           m = lerp(q, p, beta), kl_div terms), fp32 compute, autograd backward;
  pymerge  pymerge.ops.js_divergence(backend="cpu"): the fused C++ kernel, gradient computed in the forward's
           sweep and scaled in place in backward.
time: the best of R (default 2) forward+backward rounds after one warm-up round, by default in CPU time of the
process (user + sys, time.process_time: with one thread it equals wall time on an idle machine, and it is not
inflated by other processes on a shared one); --clock wall for wall-clock time, which is also what --threads N > 1
measures (process CPU time would add up the threads).
peak extra: the process's peak resident set during the warm-up round minus its resident set just before it,
with the inputs already allocated and touched. The peak is Linux's VmHWM, reset before the round by writing 5
to /proc/self/clear_refs (where that is refused: ru_maxrss, with inputs built chunk by chunk so that nothing
before the round peaks higher). The student's .grad (one N x V buffer in the student's dtype) is part of both
variants' peak. Large torch CPU allocations are mmap-backed and go back to the OS when freed, so the resident
set follows the live tensors.
The table's last line is the headline: the smallest speedup and the largest memory ratio over all rows,
against the targets (>= 2x faster, <= 25% of the eager composite's peak extra memory).
"""
import argparse
import json
import os
import sys
import time

from measure import (ChildFailed, add_threads_option, bench_threads, maxrss_kb, reset_peak, run_json_child,
                     set_torch_threads, status_kb, threads_label, timing_clock)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(hwm):
    """VmHWM where it could be reset (hwm), else ru_maxrss, in bytes."""
    return (status_kb("VmHWM") if hwm else maxrss_kb()) * 1024


def random_logits(N, V, dtype, seed, torch):
    """N x V logits (std 2) in dtype, generated in row blocks: no fp32 temporary of the whole matrix."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(N, V, dtype=dtype)
    step = max(1, (1 << 22) // V)
    for i in range(0, N, step):
        out[i:i + step] = torch.randn(min(step, N - i), V, generator=gen).mul_(2)
    return out


def child(variant, N, V, dtype_name, reps, clock):
    """Run one variant in this (fresh) process and print one JSON line."""
    import math

    import torch

    set_torch_threads()   # the parent's count, through the environment
    dtype = getattr(torch, DTYPES[dtype_name])
    beta = 0.5
    z = random_logits(N, V, dtype, 0, torch).requires_grad_(True)
    t = random_logits(N, V, dtype, 1, torch)

    if variant == "eager":
        from eager_divergence import eager_js

        def loss_fn():
            return eager_js(z, t, beta)
    else:
        from pymerge.ops import js_divergence

        def loss_fn():
            return js_divergence(z, t, beta=beta, backend="cpu")

    def step():
        z.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss)

    now = time.process_time if clock == "cpu" else time.perf_counter
    hwm = reset_peak()
    base = rss_bytes()
    t0 = now()
    loss = step()
    first = now() - t0
    extra = max(0, peak_bytes(hwm) - base)
    best = first
    for _ in range(reps):
        t0 = now()
        step()
        best = min(best, now() - t0)
    gnorm = float(z.grad.double().norm())
    assert math.isfinite(loss) and math.isfinite(gnorm)
    print(json.dumps({"time": best, "extra": extra, "loss": loss, "gnorm": gnorm, "hwm": hwm}))


def run_variant(variant, N, V, dtype_name, reps, clock):
    try:
        return run_json_child(__file__, ["--child", variant, N, V, dtype_name, reps, clock])
    except ChildFailed as e:
        raise RuntimeError(f"{variant} {N}x{V} {dtype_name} failed:\n{e.stderr[-3000:]}") from None


def main(argv):
    if argv and argv[0] == "--child":
        variant, N, V, dtype_name, reps, clock = argv[1], int(argv[2]), int(argv[3]), argv[4], int(argv[5]), argv[6]
        child(variant, N, V, dtype_name, reps, clock)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024x32000 and 256x152064, fp32 (about 30 s)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds after the warm-up (default 2)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32,bf16; quick fp32)")
    ap.add_argument("--shapes", default=None, help="comma list of NxV")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    threads = bench_threads(args.threads)
    clock = timing_clock(args.clock, threads)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(1024, 32000), (256, 152064)] if args.quick else [(4096, 32000), (1024, 152064)]
    dtypes = (args.dtypes or ("fp32" if args.quick else "fp32,bf16")).split(",")
    reps = args.reps or 2

    print(f"js_divergence (beta 0.5, T 1, mean) forward + backward, {threads_label(threads)}, {clock} time, best of "
          f"{reps} "
          "after a warm-up; peak extra memory above the inputs")
    print(f"{'shape':>13} {'dtype':>5} | {'eager s':>8} {'pymerge s':>9} {'speedup':>7} | "
          f"{'eager MB':>8} {'pymerge MB':>10} {'mem':>5} | {'|dloss|':>8}")
    speedups, mem_ratios = [], []
    for N, V in shapes:
        for dt in dtypes:
            e = run_variant("eager", N, V, dt, reps, clock)
            p = run_variant("pymerge", N, V, dt, reps, clock)
            sp = e["time"] / p["time"]
            mr = p["extra"] / e["extra"] if e["extra"] > 0 else float("nan")
            speedups.append(sp)
            mem_ratios.append(mr)
            print(f"{N:>6}x{V:<6} {dt:>5} | {e['time']:>8.3f} {p['time']:>9.3f} {sp:>6.2f}x | "
                  f"{e['extra'] / 2**20:>8.0f} {p['extra'] / 2**20:>10.0f} {mr:>5.0%} | "
                  f"{abs(e['loss'] - p['loss']):>8.1e}", flush=True)
    ok = min(speedups) >= 2.0 and max(mem_ratios) <= 0.25
    print(f"headline: fwd+bwd speedup >= {min(speedups):.2f}x with <= {max(mem_ratios):.0%} of eager's peak extra "
          f"memory (targets 2x, 25%: {'met' if ok else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
