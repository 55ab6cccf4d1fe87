"""center_task_vectors on CPU, 1 thread: pymerge vs torch eager and vs a plain copy of the same bytes.

    python benchmarks/ops_center.py [--quick] [--reps R] [--numel N] [--tasks T] [--threads N]

T = 8 task tensors of 16M elements (fp32 and bf16), held as T separate tensors the way a checkpoint loader
hands them over. Measured side by side in one run, rounds interleaved (every method once per round, best
round kept), so the machine's state is the same for all of them:

  copy            cp.copy_(stacked): T*N elements read and T*N written - the achievable bandwidth
  pymerge out=    center_task_vectors(thetas, out=(avg, centered), backend="cpu") into preallocated buffers
  pymerge         the same, allocating its outputs (fresh pages: the kernel pays their first touch)
  eager           torch.stack + mean + sub (what merging scripts do), allocating as it goes
  eager out=      the same three ops into preallocated buffers (eager without allocation costs)

Times are CPU seconds of the (only) working thread, best and median over the rounds; "wall ms" is the best
wall-clock time, which on a shared machine also holds other processes' time slices. With --threads N > 1 the
work is spread over N threads and every column is wall-clock time.
GB/s counts the bytes each method must move at least: copy 2*T*N elements, center (2*T+1)*N elements
(T inputs read, avg and T centered written). "of copy" = center GB/s / copy GB/s; "vs eager" compares like with like
(allocating pymerge with allocating eager, out= with out=). Targets (issue 2): pymerge out= >= 80% of copy
bandwidth and >= 1.5x torch eager (both comparisons). The headline line is last.
"""
import argparse
import statistics
import sys
import time

import torch

import pymerge
from measure import add_threads_option, set_torch_threads, threads_label, timing_clock
from pymerge.ops import center_task_vectors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLOCK = {"cpu": time.thread_time, "wall": time.perf_counter}
_clock = CLOCK["cpu"]


def _timed(fn):
    """(CPU seconds of this thread, wall seconds). With one torch thread everything runs on this thread, so
    its CPU time is the op's time without the time-slices other processes take on a shared machine (page
    faults and memory stalls are included). Above one thread the first is wall seconds too (timing_clock)."""
    c0, w0 = _clock(), time.perf_counter()
    fn()
    return _clock() - c0, time.perf_counter() - w0


def run_case(T, N, dtype, reps):
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(N, generator=gen).to(dtype) for _ in range(T)]
    stacked = torch.stack(thetas)
    copy_out = torch.empty_like(stacked)
    avg, cent = torch.empty(N, dtype=dtype), torch.empty(T, N, dtype=dtype)
    e_stack, e_avg, e_cent = torch.empty(T, N, dtype=dtype), torch.empty(N, dtype=dtype), torch.empty(T, N, dtype=dtype)

    def eager():
        s = torch.stack(thetas)
        a = s.mean(0)
        return a, s - a

    def eager_out():
        torch.stack(thetas, out=e_stack)
        torch.mean(e_stack, 0, out=e_avg)
        torch.sub(e_stack, e_avg, out=e_cent)

    methods = {
        "copy": lambda: copy_out.copy_(stacked),
        "pymerge out=": lambda: center_task_vectors(thetas, out=(avg, cent), backend="cpu"),
        "pymerge": lambda: center_task_vectors(thetas, backend="cpu"),
        "eager": eager,
        "eager out=": eager_out,
    }
    for fn in methods.values():  # warm-up: touches every buffer once, loads code
        fn()
    times = {k: [] for k in methods}
    for _ in range(reps):
        for k, fn in methods.items():
            times[k].append(_timed(fn))

    # The result is right (cheap check on a slice, so a broken build never reports a fast number).
    ref_avg = torch.stack([t[:4096].double() for t in thetas]).mean(0)
    center_task_vectors(thetas, out=(avg, cent), backend="cpu")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(avg[:4096].double(), ref_avg, rtol=tol, atol=tol), "pymerge avg is wrong"

    es = stacked.element_size()
    copy_bytes, center_bytes = 2 * T * N * es, (2 * T + 1) * N * es
    rows = {}
    for k, ts in times.items():
        nbytes = copy_bytes if k == "copy" else center_bytes
        cpu = [c for c, _ in ts]
        rows[k] = (min(cpu), statistics.median(cpu), nbytes / min(cpu) / 1e9, min(w for _, w in ts))
    del thetas, stacked, copy_out, avg, cent, e_stack, e_avg, e_cent
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4M elements, 3 rounds (about 20 s)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    ap.add_argument("--numel", type=int, default=None, help="elements per task tensor (default 16M, quick 4M)")
    ap.add_argument("--tasks", type=int, default=8)
    add_threads_option(ap)
    args = ap.parse_args(argv)
    N = args.numel or ((4 << 20) if args.quick else (16 << 20))
    reps = args.reps or (3 if args.quick else 7)
    T = args.tasks
    threads = set_torch_threads(args.threads)
    global _clock
    clock = timing_clock("cpu", threads)
    _clock = CLOCK[clock]

    print(f"center_task_vectors, T = {T}, {N} elements per task, {threads_label(threads)}, {clock} time, best of "
          f"{reps} interleaved rounds (pymerge {pymerge.__version__}, torch {torch.__version__})")
    head = (f"{'dtype':<6}{'method':<14}{'best ms':>10}{'median ms':>11}{'wall ms':>10}{'GB/s':>8}{'of copy':>9}"
            f"{'vs eager':>10}")
    print(head)
    print("-" * len(head))
    summary = []
    for name, dtype in DTYPES.items():
        rows = run_case(T, N, dtype, reps)
        copy_gbs, eager_best = rows["copy"][2], rows["eager"][0]
        for k, (best, med, gbs, wall) in rows.items():
            frac = f"{gbs / copy_gbs:8.0%}" if k != "copy" else f"{'':>8}"
            # like with like: allocating pymerge vs allocating eager, out= vs out=
            base = rows["eager out="][0] if k.endswith("out=") else eager_best
            speed = f"{base / best:9.2f}x" if k.startswith("pymerge") else f"{'':>10}"
            print(f"{name:<6}{k:<14}{best * 1e3:10.1f}{med * 1e3:11.1f}{wall * 1e3:10.1f}{gbs:8.1f} {frac}{speed}")
        ours, ours_alloc = rows["pymerge out="], rows["pymerge"]
        summary.append((name, ours[2] / copy_gbs, eager_best / ours_alloc[0], rows["eager out="][0] / ours[0]))
        sys.stdout.flush()
    print("-" * len(head))
    met = all(f >= 0.8 and min(s, so) >= 1.5 for _, f, s, so in summary)
    parts = "; ".join(f"{n} {f:.0%} of copy bandwidth, {s:.1f}x eager (out=: {so:.1f}x)" for n, f, s, so in summary)
    print(f"headline: pymerge center (T={T}, {N >> 20}M, {threads_label(threads)}): {parts} -> targets "
          "(>=80%, >=1.5x) "
          f"{'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
