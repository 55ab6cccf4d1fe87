"""Measuring helpers shared by the benchmark scripts: peak resident memory, fresh-subprocess runs, differences.

The scripts run as `python benchmarks/X.py`, which puts benchmarks/ first on sys.path, so they import this
module as a sibling (`from measure import ...`). No torch import here: some scripts keep torch out of the
parent process that only starts the measuring children.

Threads: every script runs torch on one thread unless given --threads N (add_threads_option); the count goes
into the header line and, through the environment, to every measuring child (bench_threads / set_torch_threads).
CPU-time clocks measure the work of one thread only, so above one thread the scripts time wall-clock instead
(timing_clock).

Peak memory: torch's allocations are invisible to tracemalloc, so the scripts read the kernel's own counters.
VmHWM (the peak resident set) is reset to the current resident set by writing 5 to /proc/self/clear_refs, so
"peak during a call minus resident set before it" is the memory the call itself needed. ru_maxrss cannot be
reset (and a child starts with its parent's mark): it is only the fallback where clear_refs is refused.
"""
import json
import os
import resource
import subprocess
import sys


THREADS_ENV = "PYMERGE_BENCH_THREADS"   # the run's thread count, inherited by the children a script starts


def add_threads_option(parser):
    """--threads N on an argparse parser (default: what a parent script passed down, else 1)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every measurement (default 1, the project's benchmark rule)")


def bench_threads(threads=None):
    """The torch thread count of this run: `threads` (a --threads value), else the one a parent script passed
    down, else 1. Recorded in the environment (and OMP_NUM_THREADS) so that every child started from here uses
    it too. No torch import: parents that only start children stay torch-free."""
    if threads is None:
        threads = int(os.environ.get(THREADS_ENV, "1"))
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    os.environ[THREADS_ENV] = os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def set_torch_threads(threads=None):
    """bench_threads(threads) applied to torch in this process; returns the count."""
    import torch
    threads = bench_threads(threads)
    torch.set_num_threads(threads)
    return threads


def threads_label(threads):
    """"1 thread" / "2 threads", for header lines."""
    return f"{threads} thread{'s' if threads != 1 else ''}"


def timing_clock(clock, threads):
    """The clock a script times with: its "cpu" choice (process or thread CPU time, immune to other processes'
    time slices) only at 1 thread; above, CPU time would sum (or miss) the other threads' work: "wall"."""
    return clock if threads == 1 else "wall"


def status_kb(field):
    """The value of a /proc/self/status field in KiB, e.g. "VmRSS" (resident now) or "VmHWM" (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_kb():
    """ru_maxrss of this process in KiB (Linux): the peak since the process started, never reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kb():
    """VmHWM in KiB, or ru_maxrss where /proc/self/status cannot be read."""
    try:
        return status_kb("VmHWM")
    except OSError:
        return maxrss_kb()


class ChildFailed(RuntimeError):
    """A measuring subprocess exited non-zero; returncode, stdout and stderr say how."""

    def __init__(self, proc):
        super().__init__(f"exit {proc.returncode}")
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr


def run_json_child(script, args, env=None):
    """Run `python script *args` in a fresh process (its own allocator state and peak-memory mark) and return
    the JSON object it printed as the last line of stdout. env: the child's whole environment (None: ours).
    Raises ChildFailed on a non-zero exit."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise ChildFailed(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scripts(scripts, flags):
    """Run each benchmark script (a sibling of this file) with `flags` in its own process, echoing its output,
    then repeat every script's "headline" lines. Returns the exit status: 1 if any script failed."""
    here = os.path.dirname(os.path.abspath(__file__))
    failed, headlines = [], []
    for script in scripts:
        print(f"\n=== {script} {' '.join(flags)} ===", flush=True)
        proc = subprocess.Popen([sys.executable, os.path.join(here, script), *flags], stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith("headline"):
                headlines.append(f"{script}: {line[len('headline'):].lstrip(': ').strip()}")
        if proc.wait() != 0:
            failed.append(script)
    print("\n=== headlines ===")
    for line in headlines:
        print(line)
    if failed:
        print(f"failed: {failed}")
        return 1
    return 0


def rel_diff(a, b, base):
    """||a - b||_F / ||b - base||_F over the floating-point keys of the state dict `base`, in float64: the
    difference between two merged state dicts relative to the merged task vector (not flattered by
    ||theta_0||)."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
    den = sum(float((b[k].double() - base[k].double()).square().sum()) for k in keys)
    return (num / den) ** 0.5
