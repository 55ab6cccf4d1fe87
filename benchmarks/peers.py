"""pymerge inside the peers' tools, measured side by side with the peers' own methods (issue #14).

    python benchmarks/peers.py [--quick] [--block [--block-scale N]] [--repeat N] [--methods M,..] [--routes R,..]

One run, the same inputs for every route, 1 thread (--threads N: N). Methods (rows): TA (task arithmetic), TIES,
DARE-TIES, TSV-M, Iso-C, CART. Routes, where the route has the method ("—" in the summary where not):
  pymerge              pymerge.merge(method, base, models, **params)
  pymerge-in-mergekit  pymerge's method registered in mergekit (pymerge.adapters.mergekit.register()) and run by
                       mergekit's in-memory registry call registry.get("pymerge_<method>")(groups,
                       parameters=..., dtype=float32), one TensorGroup per key (pymerge/peers/mergekit.py)
  pymerge.functional   pymerge's peft-style API (pymerge.functional) in the peft route's loop: pymerge inside
                       peft's interface (TA, TIES, DARE-TIES)
  mergekit             mergekit 0.1.5's own task_arithmetic / ties / dare_ties, the same registry call
  FusionBench          FusionBench 0.2.33's own TA / TIES / TSV-M / Iso-C (pymerge/peers/fusionbench.py)
  peft                 peft's merge_utils, per tensor, looping over the keys: deltas theta_t - theta_0 of the key,
                       then theta_0 + lam * merged (pymerge.functional's route runs the very same loop)
  official CART        the official full-SVD CART merge (pymerge/peers/official_cart.py), CART's baseline
Cases (T = 8 fine-tunes):
  MiniLM-L6 fp32: the real all-MiniLM-L6-v2 weights as theta_0 with 8 synthetic fine-tunes
      (pymerge.synthetic.finetunes, seed 0), as benchmarks/methods.py's scripts do; 103 float keys (the integer
      position_ids, which every tool copies, are left out of every route's inputs);
  --block: one 7B-like transformer block (synthetic.BLOCK_7B_SHAPES: 4 x 4096 x 4096 + 3 x 14336 x 4096), bf16, the
      flat-tail task vectors measured on real MiniLM fine-tunes (synthetic.flat_tail_models, seed 0; the file
      methods_cart.py caches, generated once, ~4.4 GB in /tmp). pymerge's three routes merge the whole block.
      Every peer route is EXTRAPOLATED from a subset of keys (labelled `*`): it merges attn.q_proj (standing for
      the four 4096 x 4096 keys) and mlp.gate_proj (for the three 14336 x 4096 / 4096 x 14336 keys; the
      transposed down_proj is taken to cost the same), each in its own process, and its block time is
      4 t(q_proj) + 3 t(gate_proj); its peak is the larger of the two (a lower bound for FusionBench, which holds
      the task vectors of the whole model at once); its differences are over those two keys. (Full runs of the
      SVD-bound peers take over half an hour at 1 thread: 56 full SVDs of 4096-wide matrices.)
      --block-scale N divides every dimension by N (a smaller block with the same structure, for a smoke test).
  --quick: MiniLM only, fewer timed runs (below).

Parameters, aligned across the tools (pymerge's names; each peer gets its own names for the same values):
  TA         lam 0.3, unit weights. mergekit weight 1, lambda 0.3; FusionBench scaling_factor 0.3; peft weights 1,
             then theta_0 + 0.3 * sum. EQUAL output up to fp32 summation order (bf16 outputs: 1-ulp flips where
             the exact value sits on a bf16 rounding midpoint, see the block table's footnote).
  TIES       density 0.2, lam 1, unit weights. mergekit weight 1, density 0.2 (its default normalize=True: the
             disjoint mean); peft / pymerge.functional weights 1, density 0.2, majority sign "total".
             EQUAL output up to entries tied at the trim threshold: pymerge keeps the lowest flat indices,
             mergekit's unstable argsort and peft's topk an arbitrary subset of the tied ones (task vectors of
             rounded weights hold many equal |tau|). For mergekit the script checks it: mergekit is run once
             more, untimed, with torch.argsort made stable, and that output is compared too (the "equal output?"
             line). FusionBench (threshold 0.2) is NOT equal-output by design: like the TIES authors' code it
             trims over the whole flattened model, not per tensor, and keeps every entry >= the threshold.
  DARE-TIES  p 0.5 (density 0.5), seed 0, lam 1, unit weights. mergekit dare_ties density 0.5, normalize=True (the
             disjoint mean; its default sums) and its default rescale (survivors rescaled to keep the L1 norm, not
             by 1 / (1 - p)); peft / pymerge.functional density 0.5 from torch's generator seeded with 0. The
             random masks cannot be the same across tools, so the difference is reported as "random" and only
             time compares (pymerge-in-mergekit runs pymerge's own seeded masks: equal output).
  TSV-M      alpha 1.0, pymerge's default exclude_keys (embeddings, pooler: merged by the mean of task vectors);
             FusionBench gets the same keys by name in exclude_keys. NOT bitwise equal: pymerge's default
             per-task SVDs are randomized (docs/METHODS.md §TSV-M), FusionBench's exact.
  Iso-C      alpha 1.5, the same exclude_keys. EQUAL output up to fp32 rounding (one SVD per key in both).
  CART       rank_ratio 0.08, lam 2.0, seed 0, pymerge's default key selection (2-D keys minus embeddings and
             pooler; the official merge gets that selection as `selected`). NOT bitwise equal: pymerge's default
             fidelity control (tol 0.05 relative to the merged task vector) vs the official full SVDs.
  Compute dtype: mergekit and pymerge-in-mergekit get dtype=float32 (mergekit's `dtype: float32`; its default for
  bf16 inputs is bf16 arithmetic), pymerge computes in fp32 for bf16 inputs anyway; FusionBench gets fp32 copies
  of bf16 inputs (made before the clock starts: torch.linalg.svd has no bf16 CPU kernel); peft computes in the
  inputs' dtype (bf16 deltas on the block). Every output is cast to the inputs' dtype before the comparison (what
  a merge writes).

Measurements: every (case, method, route) runs in a fresh process (its own allocator state and peak-memory mark):
the inputs loaded from the cache file, one untimed call on tiny inputs (lazy imports, LAPACK / oneDNN set-up and
other one-time costs stay off the clock), then the timed runs. Time: process CPU time at 1 thread (immune to the
time slices other jobs take on a shared machine; wall time above 1 thread), best of 3 runs (--repeat N); --quick:
pymerge's routes best of 2, each peer 1 run (5-30 s each, where a repeat moves little; the mergekit TIES check
and the SVDs dominate the run); the block: 1 run each. Peak: "peak +" = VmHWM during the first timed run (reset
through /proc/self/clear_refs just before, after malloc_trim returned the freed load buffers) minus VmRSS before
it, i.e. the memory the merge itself needed, its output included, under the default malloc a user's process runs
with. Differences to pymerge.merge's output over every key the route merged: max |theta_route - theta_pymerge|
(for bf16 outputs also in units in the last place, "ulp") and ||theta_route - theta_pymerge||_F /
||theta_pymerge - theta_0||_F (relative to the merged task vector).
Run time on the development machine (2 cores shared with other jobs): --quick ~4 CPU minutes (7 min wall); the
default roughly twice that; --block adds the block's generation once (~5 min) and, for TIES alone, ~15 min (the
SVD-bound peers' subsets take ~10 min each: estimated ~1 h for every method).
Speed-up = time of the row's baseline / time of the row. Baselines: pymerge-in-mergekit -> mergekit's own method
(where mergekit has none: the method's reference peer), pymerge.functional -> peft, every other row -> the
method's reference peer (mergekit for TA / TIES / DARE-TIES, FusionBench for TSV-M / Iso-C, the official merge
for CART). The summary gives the geometric-mean speed-up of each pymerge route over each peer's own methods.
The last line is the headline.
"""
import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

from measure import add_threads_option, reset_peak, set_torch_threads, status_kb, threads_label, timing_clock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from methods_cart import CACHE_7B_FLAT  # noqa: E402  (the flat-tail block file, shared with methods_cart.py)
from pymerge import synthetic  # noqa: E402
from pymerge.peers import fusionbench as fusionbench_peer  # noqa: E402
from pymerge.peers import mergekit as mergekit_peer  # noqa: E402

T, SEED = 8, 0
METHODS = ("task_arithmetic", "ties", "dare_ties", "tsv_m", "iso_c", "cart")
LABEL = {"task_arithmetic": "TA", "ties": "TIES", "dare_ties": "DARE-TIES", "tsv_m": "TSV-M", "iso_c": "Iso-C",
         "cart": "CART"}
# pymerge's parameters of every method (the module doc aligns each peer's to them).
PARAMS = {"task_arithmetic": {"lam": 0.3}, "ties": {"density": 0.2, "lam": 1.0},
          "dare_ties": {"p": 0.5, "seed": SEED, "lam": 1.0}, "tsv_m": {"alpha": 1.0}, "iso_c": {"alpha": 1.5},
          "cart": {"rank_ratio": 0.08, "lam": 2.0, "seed": SEED}}
MERGEKIT_PARAMS = {"task_arithmetic": {"weight": 1.0, "lambda": 0.3},
                   "ties": {"weight": 1.0, "density": 0.2},
                   "dare_ties": {"weight": 1.0, "density": 0.5, "normalize": True}}

OURS = ("pymerge", "pymerge-in-mergekit", "pymerge.functional")
PEERS = ("mergekit", "FusionBench", "peft", "official CART")
ROUTES = OURS + PEERS
HAS = {"pymerge": METHODS, "pymerge-in-mergekit": METHODS,
       "pymerge.functional": ("task_arithmetic", "ties", "dare_ties"),
       "mergekit": ("task_arithmetic", "ties", "dare_ties"),
       "FusionBench": ("task_arithmetic", "ties", "tsv_m", "iso_c"),
       "peft": ("task_arithmetic", "ties", "dare_ties"),
       "official CART": ("cart",)}
REFERENCE = {"task_arithmetic": "mergekit", "ties": "mergekit", "dare_ties": "mergekit", "tsv_m": "FusionBench",
             "iso_c": "FusionBench", "cart": "official CART"}
RANDOM = "random"   # the difference column of a route whose random masks differ from pymerge's
# An fp32 difference at most this (relative to the merged task vector) is rounding: fp32 sums in another order.
# (bf16 outputs: at most 1 ulp, see print_table's footnote.)
ROUNDING = 1e-3

# What the difference to pymerge is (module doc); pymerge-in-mergekit runs pymerge's own code: equal.
NOTE = {("task_arithmetic", "mergekit"): "equal to rounding",
        ("task_arithmetic", "FusionBench"): "equal to rounding",
        ("task_arithmetic", "peft"): "equal to rounding",
        ("task_arithmetic", "pymerge.functional"): "equal to rounding",
        ("ties", "mergekit"): "equal up to ties at the trim threshold",
        ("ties", "peft"): "equal up to ties at the trim threshold",
        ("ties", "pymerge.functional"): "equal (peft's convention at unit weights)",
        ("ties", "FusionBench"): "not equal: whole-model trim",
        ("dare_ties", "mergekit"): "other random masks, L1 rescale",
        ("dare_ties", "peft"): "other random masks",
        ("dare_ties", "pymerge.functional"): "other random masks (peft's draw)",
        ("tsv_m", "FusionBench"): "exact SVDs vs pymerge's randomized",
        ("iso_c", "FusionBench"): "equal (fp32 rounding)",
        ("cart", "official CART"): "full SVDs vs pymerge's tol 0.05"}
SUBSET_KEYS = ("attn.q_proj.weight", "mlp.gate_proj.weight")   # the block's peers run on these (module doc)


def available_routes(method):
    return [r for r in ROUTES if method in HAS[r]]


def baseline_of(route, method):
    if route == "pymerge-in-mergekit" and method in HAS["mergekit"]:
        return "mergekit"
    if route == "pymerge.functional":
        return "peft"
    return REFERENCE[method]


def peers_installed():
    """{route: why it cannot run} for the peers missing here."""
    missing = {}
    if not mergekit_peer.installed():
        missing["mergekit"] = missing["pymerge-in-mergekit"] = (
            f"mergekit not installed (pip install mergekit=={mergekit_peer.VERSION})")
    if not fusionbench_peer.installed():
        missing["FusionBench"] = "fusion-bench not installed (`make install` installs it)"
    try:
        import peft.utils.merge_utils  # noqa: F401
    except ImportError:
        missing["peft"] = "peft not installed (mergekit's requirements pull it)"
    return missing


# ------------------------------------------------------------------------------------------------- inputs
def _save_family(path, base, models):
    """base and models in one safetensors file ("base.<key>", "model<t>.<key>"), the key order in its metadata;
    written atomically."""
    from safetensors.torch import save_file
    tensors = {f"base.{k}": v for k, v in base.items()}
    tensors.update({f"model{t}.{k}": v for t, m in enumerate(models) for k, v in m.items()})
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"keys": json.dumps(list(base))})
    os.replace(tmp, path)


def minilm_file():
    """The MiniLM-L6 case's inputs, generated once: theta_0 = all-MiniLM-L6-v2, T fine-tunes (float keys only)."""
    path = f"/tmp/pymerge_bench_peers_minilm_T{T}.safetensors"
    if not os.path.exists(path):
        print("  generating the MiniLM-L6 fine-tunes (once)", flush=True)
        base = {k: v for k, v in synthetic.load_minilm().items() if v.is_floating_point()}
        _save_family(path, base, synthetic.finetunes(base, T, seed=SEED))
    return path


def block_shapes(scale):
    return {k: (m // scale, n // scale) for k, (m, n) in synthetic.BLOCK_7B_SHAPES.items()}


def block_file(scale):
    """The block case's inputs (flat-tail task vectors, bf16), generated once; at scale 1 the very file
    methods_cart.py caches (same generator, seed and layout)."""
    path = CACHE_7B_FLAT if scale == 1 else f"/tmp/pymerge_bench_peers_block_s{scale}.safetensors"
    if not os.path.exists(path):
        size = "full size, a few minutes" if scale == 1 else f"1/{scale} size"
        print(f"  generating the 7B-like block (flat tail, {size}; once)", flush=True)
        base, models = synthetic.flat_tail_models(block_shapes(scale), T, seed=SEED)
        _save_family(path, base, models)
        del base, models
    return path


def file_keys(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        names = [n[len("base."):] for n in f.keys() if n.startswith("base.")]
    order = json.loads(meta["keys"]) if "keys" in meta else sorted(names)
    return [k for k in order if k in set(names)]


def load_family(path, keys=None, base_only=False):
    """(base, models) of `keys` (None: all, in the saved order) as resident tensors of their own (cloned: a
    tensor read from the file may stay file-backed, whose pages would count in the merge's peak)."""
    from safetensors import safe_open
    keys = file_keys(path) if keys is None else list(keys)
    with safe_open(path, "pt") as f:
        base = {k: f.get_tensor(f"base.{k}").clone() for k in keys}
        models = [] if base_only else [{k: f.get_tensor(f"model{t}.{k}").clone() for k in keys} for t in range(T)]
    return base, models


# --------------------------------------------------------------------------------------------- the routes
def fusionbench_excluded(base):
    """The 2-D keys pymerge's TSV-M / Iso-C merge by the mean (default exclude_keys), by name, as FusionBench
    takes them."""
    from pymerge.methods.cart import DEFAULT_EXCLUDE_KEYS
    from pymerge.methods.tsv_m import matrix_keys
    matrices = set(matrix_keys("tsv_m", base, DEFAULT_EXCLUDE_KEYS))
    return [k for k, v in base.items() if v.dim() == 2 and k not in matrices]


def per_tensor(merge_utils, method, base, models):
    """peft's route (and pymerge.functional's, the same loop): per key the T deltas, merged by the per-tensor
    function, then theta_0 + lam * merged."""
    params = PARAMS[method]
    generator = None
    if method == "dare_ties":
        if merge_utils.__name__.startswith("peft"):
            torch.manual_seed(params["seed"])                 # peft draws from torch's global generator
        else:
            generator = torch.Generator().manual_seed(params["seed"])
    ones = torch.ones(len(models))
    out = {}
    for key, b in base.items():
        deltas = [m[key] - b for m in models]
        if method == "task_arithmetic":
            merged = merge_utils.task_arithmetic(deltas, ones)
        elif method == "ties":
            merged = merge_utils.ties(deltas, ones, density=params["density"])
        else:
            extra = {} if generator is None else {"generator": generator}
            merged = merge_utils.dare_ties(deltas, ones, density=1.0 - params["p"], **extra)
        out[key] = b + params["lam"] * merged
    return out


def route_call(route, method, base, models):
    """A no-argument callable running `route`'s merge of these inputs (imports and registration done here, outside
    the clock)."""
    params = PARAMS[method]
    if route == "pymerge":
        import pymerge
        return lambda: pymerge.merge(method, base, models, **params)
    if route == "pymerge-in-mergekit":
        from pymerge.adapters import mergekit as adapter
        adapter.register()
        name = adapter.mergekit_name(method)
        return lambda: mergekit_peer.merge(name, base, models, dtype=torch.float32, **params)
    if route == "mergekit":
        return lambda: mergekit_peer.merge(method, base, models, dtype=torch.float32, **MERGEKIT_PARAMS[method])
    if route == "FusionBench":
        if method == "task_arithmetic":
            return lambda: fusionbench_peer.task_arithmetic(base, models, scaling_factor=params["lam"])
        if method == "ties":
            return lambda: fusionbench_peer.ties(base, models, threshold=params["density"],
                                                 scaling_factor=params["lam"])
        excluded = fusionbench_excluded(base)
        return lambda: fusionbench_peer.merge(method, base, models, scaling_factor=params["alpha"],
                                              exclude_keys=excluded)
    if route == "peft":
        import peft.utils.merge_utils as merge_utils
        return lambda: per_tensor(merge_utils, method, base, models)
    if route == "pymerge.functional":
        from pymerge import functional
        return lambda: per_tensor(functional, method, base, models)
    if route == "official CART":
        from pymerge.methods.cart import select_low_rank_keys
        from pymerge.peers import official_cart
        selected = select_low_rank_keys(base)
        return lambda: official_cart.merge(base, models, rank_ratio=params["rank_ratio"], lam=params["lam"],
                                           selected=selected)
    raise ValueError(f"unknown route {route!r}; routes: {ROUTES}")


# -------------------------------------------------------------------------------------------- the worker
def trim_heap():
    """Hand the heap's free pages back to the kernel (glibc malloc_trim), so that memory freed while loading the
    inputs is not silently reused by the merge without showing in its peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stable_argsort():
    """torch.argsort with stable=True forced (ties -> lowest index first); returns the function to restore."""
    original = torch.argsort
    torch.argsort = lambda *a, **kw: original(*a, **{**kw, "stable": True})
    return original


def worker(job):
    """One measurement (module doc): load the inputs, warm the route up on tiny inputs, time job["repeat"] runs
    (the peak from the first), save the output in the inputs' dtypes (and mergekit's TIES once more with a stable
    argsort), print RESULT {json}."""
    from safetensors.torch import save_file
    threads = set_torch_threads()   # the parent's count, through the environment
    clock = time.process_time if timing_clock("cpu", threads) == "cpu" else time.perf_counter
    route, method = job["route"], job["method"]
    base, models = load_family(job["inputs"], job["keys"])
    dtype = {k: v.dtype for k, v in base.items()}
    if route == "FusionBench" and any(v.dtype in (torch.float16, torch.bfloat16) for v in base.values()):
        base = {k: v.float() for k, v in base.items()}
        models = [{k: v.float() for k, v in m.items()} for m in models]
    # One untimed call on tiny inputs first: lazy imports, LAPACK / oneDNN set-up and other one-time costs of the
    # route stay out of its time (the block's peers run once).
    g = torch.Generator().manual_seed(1)
    tiny = {"layer.weight": torch.randn(16, 16, generator=g), "layer.bias": torch.randn(16, generator=g)}
    route_call(route, method, tiny, [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tiny.items()}
                                     for _ in range(T)])()
    call = route_call(route, method, base, models)
    trim_heap()
    rss0 = status_kb("VmRSS")
    if not reset_peak():
        raise SystemExit("cannot reset VmHWM (/proc/self/clear_refs): no peak-memory measurement")
    times, peak, out = [], None, None
    for i in range(job["repeat"]):
        out = None
        t0 = clock()
        out = call()
        times.append(clock() - t0)
        if i == 0:
            peak = status_kb("VmHWM")
    result = {"time": min(times), "times": times, "peak_plus_mb": (peak - rss0) / 1024, "peak_mb": peak / 1024,
              "inputs_mb": rss0 / 1024}
    save_file({k: out[k].to(dtype[k]).contiguous() for k in base}, job["out"])
    if job.get("stable_out"):
        out = None
        original = stable_argsort()
        try:
            out = call()
        finally:
            torch.argsort = original
        save_file({k: out[k].to(dtype[k]).contiguous() for k in base}, job["stable_out"])
    print("RESULT " + json.dumps(result))


def run_worker(job):
    """The worker in a fresh process; its RESULT, or {"error": ...} when it failed."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                          env=dict(os.environ), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------- differences
def ulps(diff, ours, base):
    """|diff| in units in the last place of the (16-bit) output dtype at the element's scale, the larger of
    |theta_pymerge| and |theta_0| (at an output that cancels to ~0 the ulp of the output itself is no scale)."""
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11}[ours.dtype]
    scale = torch.maximum(ours.double().abs(), base.double().abs()).clamp_min(torch.finfo(ours.dtype).tiny)
    return diff.abs() / torch.ldexp(torch.ones_like(diff), (torch.frexp(scale).exponent - mantissa_bits).to(diff.dtype))


def differences(ours_path, pieces, inputs):
    """(max |other - ours|, ||other - ours||_F / ||ours - theta_0||_F, for 16-bit outputs the largest difference
    in ulps (see ulps) else None) in float64 over every (file, keys) piece of a route's output."""
    from safetensors import safe_open
    max_abs, num, den, max_ulps = 0.0, 0.0, 0.0, None
    with safe_open(ours_path, "pt") as fo:
        for path, keys in pieces:
            base, _ = load_family(inputs, keys, base_only=True)
            with safe_open(path, "pt") as fr:
                for k in keys:
                    ours_k = fo.get_tensor(k)
                    ours = ours_k.double()
                    d = fr.get_tensor(k).double() - ours
                    if not d.numel():
                        continue
                    max_abs = max(max_abs, float(d.abs().max()))
                    num += float(d.square().sum())
                    den += float((ours - base[k].double()).square().sum())
                    if ours_k.dtype in (torch.bfloat16, torch.float16):
                        max_ulps = max(max_ulps or 0.0, float(ulps(d, ours_k, base[k]).max()))
    return max_abs, (num / den) ** 0.5 if den > 0 else float("nan"), max_ulps


# ----------------------------------------------------------------------------------------------- the cases
def representative(key, shapes):
    """The subset key standing for `key` in an extrapolated block run: q_proj for square keys, gate_proj else."""
    m, n = shapes[key]
    return SUBSET_KEYS[0] if m == n else SUBSET_KEYS[1]


def run_case(case, methods, routes, missing, tmpdir):
    """Every (method, route) of a case: {"title", "rows": [row], "extrapolated": bool}."""
    title, inputs, shapes = case["title"], case["inputs"], case["shapes"]
    all_keys = file_keys(inputs)
    rows = []
    for method in methods:
        ours_out = os.path.join(tmpdir, f"{case['name']}_{method}_pymerge.safetensors")
        for route in available_routes(method):
            if route not in routes:
                continue
            row = {"method": method, "route": route, "extrapolated": False}
            rows.append(row)
            if route in missing:
                row["error"] = missing[route]
                continue
            extrapolate = case["block"] and route in PEERS
            results, pieces = {}, []      # pieces: (output file, the keys it holds)
            for rep in (SUBSET_KEYS if extrapolate else (None,)):
                out = ours_out if route == "pymerge" else os.path.join(
                    tmpdir, f"{case['name']}_{method}_{route}_{rep or 'all'}.safetensors".replace(" ", "_"))
                job = {"route": route, "method": method, "inputs": inputs, "keys": None if rep is None else [rep],
                       "repeat": case["repeat"] if route in OURS else case["peer_repeat"], "out": out,
                       "stable_out": (out + ".stable") if (method == "ties" and route == "mergekit") else None}
                res = run_worker(job)
                if "error" in res:
                    row["error"] = res["error"]
                    break
                results[rep] = res
                pieces.append((out, all_keys if rep is None else [rep]))
            if "error" in row:
                print(f"  {title}: {LABEL[method]:9s} {route:19s} FAILED: {row['error']}", flush=True)
                continue
            if extrapolate:
                row["extrapolated"] = True
                row["time"] = sum(results[representative(k, shapes)]["time"] for k in all_keys)
                row["peak_plus_mb"] = max(r["peak_plus_mb"] for r in results.values())
            else:
                row["time"], row["peak_plus_mb"] = results[None]["time"], results[None]["peak_plus_mb"]
            if route != "pymerge":
                if not os.path.exists(ours_out):
                    row["max_abs"] = row["rel"] = float("nan")
                elif method == "dare_ties" and route != "pymerge-in-mergekit":
                    row["max_abs"] = row["rel"] = RANDOM
                else:
                    row["max_abs"], row["rel"], row["max_ulps"] = differences(ours_out, pieces, inputs)
                    if method == "ties" and route == "mergekit":
                        row["stable_max_abs"], row["stable_rel"], row["stable_ulps"] = differences(
                            ours_out, [(o + ".stable", k) for o, k in pieces], inputs)
                for o, _ in pieces:
                    for path in (o, o + ".stable"):
                        if os.path.exists(path):
                            os.remove(path)
            print(f"  {title}: {LABEL[method]:9s} {route:19s} {row['time']:9.3f} s{'*' if extrapolate else ' '} "
                  f"peak+ {row['peak_plus_mb']:7.0f} MB  max abs diff {_fmt_diff(row.get('max_abs', 0.0))}",
                  flush=True)
        if os.path.exists(ours_out):
            os.remove(ours_out)
    return {"title": title, "short": case["short"], "rows": rows, "block": case["block"]}


# ------------------------------------------------------------------------------------------------ output
def _fmt_diff(v):
    if isinstance(v, str):
        return v
    if v != v:
        return "n/a"
    return "0" if v == 0 else f"{v:.1e}"


def _times(rows):
    return {(r["method"], r["route"]): r["time"] for r in rows if "time" in r}


def print_table(result):
    rows, times = result["rows"], _times(result["rows"])
    print(f"\n### {result['title']}\n")
    print("| method | route | time s | speed-up | vs | peak+ MB | max abs diff | rel diff | output vs pymerge |")
    print("|---|---|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        method, route = r["method"], r["route"]
        if "error" in r:
            print(f"| {LABEL[method]} | {route} | — | — | — | — | — | — | not run: {r['error']} |")
            continue
        base = baseline_of(route, method)
        t_base = times.get((method, base))
        speed = f"{t_base / r['time']:.2f}x" if t_base and r["time"] > 0 else "—"
        star = "*" if r["extrapolated"] else ""
        note = "(reference)" if route == "pymerge" else (
            "equal (pymerge's own code)" if route == "pymerge-in-mergekit" else NOTE.get((method, route), ""))
        if "stable_max_abs" in r:
            note += f"; stable argsort: max abs diff {_fmt_diff(r['stable_max_abs'])}"
        if route in ("peft", "pymerge.functional") and result["block"]:
            note += "; deltas taken in bf16" + ("; bf16 arithmetic" if route == "peft" else "")
        max_abs = _fmt_diff(r.get("max_abs", "—") if route != "pymerge" else "—")
        if r.get("max_ulps"):
            max_abs += f" ({r['max_ulps']:.0f} ulp)"
        print(f"| {LABEL[method]} | {route} | {r['time']:.3f}{star} | {speed} | {base} | {r['peak_plus_mb']:.0f}{star} "
              f"| {max_abs} "
              f"| {_fmt_diff(r.get('rel', '—') if route != 'pymerge' else '—')} | {note} |")
    if result["block"]:
        print("\nbf16 outputs: \"(N ulp)\" is the largest difference in bf16 units in the last place at the "
              "element's scale (the larger of |theta_pymerge| and |theta_0|). "
              "Task vectors of bf16 weights are a few bf16 ulps of theta_0, so many exact merged values (TA: "
              "theta_0 + 0.3 * n ulp) sit exactly on a bf16 rounding midpoint, where fp32 results that differ in "
              "their last bits round to neighbouring bf16 values: 1-ulp flips, which the rel diff (relative to a "
              "merged task vector a few ulps in size) shows as ~1e-2.")
        print("\n`*` EXTRAPOLATED: the peer merged attn.q_proj and mlp.gate_proj only (each in its own process); "
              "time = 4 t(q_proj) + 3 t(gate_proj), peak = the larger key's, differences over those two keys.")


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def speedups(results, route, peer):
    """t_peer / t_route over every (case, method) both measured."""
    out = []
    for res in results:
        times = _times(res["rows"])
        for method in METHODS:
            if (method, route) in times and (method, peer) in times and times[(method, route)] > 0:
                out.append(times[(method, peer)] / times[(method, route)])
    return out


def print_summary(results):
    print("\n### Geometric-mean speed-up over the peers' own methods (pairs measured in brackets)\n")
    print("| route | " + " | ".join(f"vs {p}" for p in PEERS) + " | all peers |")
    print("|---|" + "---:|" * (len(PEERS) + 1))
    overall = {}
    for route in OURS:
        cells, everything = [], []
        for peer in PEERS:
            s = speedups(results, route, peer)
            everything += s
            cells.append(f"{geomean(s):.2f}x ({len(s)})" if s else "—")
        overall[route] = (geomean(everything), len(everything))
        cells.append(f"{overall[route][0]:.2f}x ({overall[route][1]})" if everything else "—")
        print(f"| {route} | " + " | ".join(cells) + " |")
    if any(r["block"] for r in results):
        print("\n(block pairs use the EXTRAPOLATED peer times)")
    # mergekit's TIES against pymerge's TIES run through mergekit, per case.
    ties_lines = []
    for res in results:
        rows = {(r["method"], r["route"]): r for r in res["rows"]}
        ours, theirs = rows.get(("ties", "pymerge-in-mergekit")), rows.get(("ties", "mergekit"))
        if not ours or not theirs or "time" not in ours or "time" not in theirs:
            continue
        stable, stable_rel = theirs.get("stable_max_abs", float("nan")), theirs.get("stable_rel", float("nan"))
        stable_ulps = theirs.get("stable_ulps")
        rounding = stable_ulps <= 1 if stable_ulps is not None else stable_rel <= ROUNDING
        equal = ("yes, bitwise" if stable == 0 else "not checked" if stable_rel != stable_rel else
                 f"yes, to rounding (rel diff {stable_rel:.0e}"
                 + (f", at most {stable_ulps:.0f} ulp)" if stable_ulps is not None else ")") if rounding else "no")
        speed = f"{theirs['time'] / ours['time']:.1f}x" + (" (EXTRAPOLATED)" if theirs["extrapolated"] else "")
        ties_lines.append((res["short"], f"{speed}, equal output: {equal}", (
            f"{res['title']}: {speed} faster; equal output: {equal} (max abs diff {_fmt_diff(stable)} with "
            f"mergekit's argsort made stable, {_fmt_diff(theirs.get('max_abs', float('nan')))} as mergekit runs it: "
            "ties at the trim threshold)")))
    print()
    for _, _, line in ties_lines:
        print(f"mergekit's own TIES vs pymerge-in-mergekit, {line}")
    parts = [f"{route} {v:.1f}x ({n} pairs)" for route, (v, n) in overall.items() if n]
    ties = "; ".join(f"{short} {summary}" for short, summary, _ in ties_lines)
    print("headline: geometric-mean speed-up over the peers' own methods: " + (", ".join(parts) or "no pairs")
          + (f"; pymerge-in-mergekit vs mergekit's own TIES: {ties} (target >= 3x at equal output)" if ties else ""))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM-L6 only, 2 timed runs")
    ap.add_argument("--block", action="store_true", help="add the 7B-like bf16 block (peers EXTRAPOLATED)")
    ap.add_argument("--block-scale", type=int, default=1, help="divide the block's dimensions by N (smoke tests)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement, best kept (default 3; "
                    "--quick 2; the block 1)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {','.join(ROUTES)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    add_threads_option(ap)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    routes = [r for r in args.routes.split(",") if r]
    for name, given, known in (("--methods", methods, METHODS), ("--routes", routes, ROUTES)):
        unknown = [v for v in given if v not in known]
        if unknown:
            ap.error(f"{name}: unknown {unknown}; choose from {list(known)}")
    if "pymerge" not in routes:
        ap.error("--routes must include pymerge: every difference and speed-up is measured against it")
    if args.quick and args.block:
        ap.error("--quick runs MiniLM only; drop --block")
    if args.block_scale < 1:
        ap.error("--block-scale must be >= 1")
    threads = set_torch_threads(args.threads)
    repeat = args.repeat or (2 if args.quick else 3)
    peer_repeat = args.repeat or (1 if args.quick else 3)
    missing = peers_installed()
    for route, why in missing.items():
        print(f"{route}: {why}: its rows are not run")
    print(f"peers benchmark, {threads_label(threads)} ({timing_clock('cpu', threads)} time), T = {T}, torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.1f} at start (a shared CPU: absolute times are "
          "noisy, compare within a row group)", flush=True)
    cases = [{"name": "minilm", "title": "MiniLM-L6 fp32, T = 8", "short": "MiniLM-L6", "inputs": minilm_file(),
              "shapes": None,
              "block": False, "repeat": repeat, "peer_repeat": peer_repeat}]
    if args.block:
        shapes = block_shapes(args.block_scale)
        size = "" if args.block_scale == 1 else f" at 1/{args.block_scale} size"
        cases.append({"name": "block", "title": f"7B-like block bf16{size}, T = 8", "short": f"7B block{size}",
                      "inputs": block_file(
            args.block_scale), "shapes": shapes, "block": True, "repeat": args.repeat or 1,
                      "peer_repeat": args.repeat or 1})
    results = []
    with tempfile.TemporaryDirectory(prefix="pymerge_bench_peers_") as tmpdir:
        for case in cases:
            results.append(run_case(case, methods, routes, missing, tmpdir))
    print(f"\ntime: best of runs, {threads_label(threads)}, {timing_clock('cpu', threads)} time; speed-up = time of "
          "`vs` / time of the row; peak+ = resident-set peak during the merge above the loaded inputs; diffs vs "
          "pymerge.merge's output: max abs, and ||route - pymerge||_F / ||pymerge - theta_0||_F")
    for res in results:
        print_table(res)
    print_summary(results)
    failed = [r for res in results for r in res["rows"] if "error" in r and r["route"] not in missing]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
