"""`pymerge merge` on checkpoints on disk with 7B-like layer shapes, against `mergekit-yaml` (0.1.5) and against
simply reading the inputs once; the 2-process torchrun split for cart. One thread everywhere, ratios in one run.

    python benchmarks/large_merge.py            # 8 fine-tunes of a ~1.3 GB bf16 Llama (hidden 4096, MLP 11008,
                                                # vocab 32000, 2 layers), + the same at 4 layers for the memory check
    python benchmarks/large_merge.py --quick    # 4 fine-tunes of a ~0.33 GB one (half widths), + 4 layers
    options: --dir DIR (where the models go; default /tmp/pymerge-large-merge), --keep (leave them), --no-mergekit,
             --no-torchrun, --no-growth (skip the second model size), --methods task_arithmetic,ties,cart,
             --repeat N (warm runs of the read and of task_arithmetic, median reported; default 3)

What is measured, per command (a fresh child process; its whole process tree for torchrun):
- wall time; peak RSS (VmHWM, the kernel's own high-water mark, largest process of the tree) and peak RssAnon
  (polled from /proc/PID/status every 10 ms, summed over the tree, and of the largest process: the anonymous
  memory, i.e. what the merge allocates, without the page-cache pages of memory-mapped inputs);
- bytes read and written: the file sizes of the inputs and the output, and the tree's /proc/PID/io read_bytes /
  write_bytes (what reached the block device: ~0 read when the page cache holds the inputs).
- "read all inputs once": a child that read()s every input file sequentially into one 16 MiB buffer.
Warm: the inputs were read just before (page cache). Cold: every input file was first evicted from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; /proc/sys/vm/drop_caches needs root), and the
child's read_bytes shows whether it really came from the disk (on a VM the host may still cache it).
Targets (issue #13): task_arithmetic <= 1.4x the read time; ties >= 5x faster than mergekit at equal output;
peak RssAnon <= (T+1) x largest tensor + 1 GB and flat as the model grows; torchrun -n 2 >= 1.7x for cart.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9
FULL = dict(hidden=4096, intermediate=11008, vocab=32000, layers=2, models=8, shard="1GB")
QUICK = dict(hidden=2048, intermediate=5504, vocab=16000, layers=2, models=4, shard="200MB")


# ------------------------------------------------------------------------------------------ models on disk
def llama_shapes(hidden, intermediate, vocab, layers):
    """The keys and shapes of a Llama (MHA, untied head) in the order transformers saves them."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(directory, shapes, seed, base_seed, size, shard_bytes):
    """A Hugging Face Llama directory in bf16, sharded: the base (seed == base_seed) has N(0, 0.02) weights
    (norms 1); a fine-tune is the base + N(0, 0.002) (a task vector ~10% of the weights). Deterministic."""
    import torch
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True)
    shards, current, current_bytes = [], {}, 0
    for k, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        if current and current_bytes + n > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[k] = shape
        current_bytes += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k, shape in shard.items():
            salt = sum(map(ord, k)) * 7919
            g = torch.Generator().manual_seed(base_seed * 1_000_003 + salt)
            if len(shape) == 1:
                w = torch.ones(shape)
            else:
                w = torch.randn(shape, generator=g).mul_(0.02)
            if seed != base_seed:
                g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
                w.add_(torch.randn(shape, generator=g).mul_(0.002))
            tensors[k] = w.to(torch.bfloat16)
            del w
            weight_map[k] = name
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    total = sum(2 * _numel(s) for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": size["hidden"],
        "intermediate_size": size["intermediate"], "vocab_size": size["vocab"],
        "num_hidden_layers": size["layers"], "num_attention_heads": size["hidden"] // 128,
        "num_key_value_heads": size["hidden"] // 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}, indent=2))


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def make_models(root, size):
    """base + size["models"] fine-tunes under root (reused when already there); returns their directories."""
    shapes = llama_shapes(size["hidden"], size["intermediate"], size["vocab"], size["layers"])
    from pymerge.io import parse_size
    dirs = [root / "base"] + [root / f"ft{t}" for t in range(1, size["models"] + 1)]
    for seed, d in enumerate(dirs):
        if not (d / "config.json").is_file():
            if d.exists():
                shutil.rmtree(d)
            t0 = time.perf_counter()
            write_model(d, shapes, seed, 0, size, parse_size(size["shard"]))
            print(f"  wrote {d} ({dir_bytes(d) / GB:.2f} GB, {time.perf_counter() - t0:.0f} s)", flush=True)
    largest = max(2 * _numel(s) for s in shapes.values())
    return dirs, largest


def dir_bytes(d):
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def weight_files(dirs):
    return [p for d in dirs for p in sorted(Path(d).glob("*.safetensors"))]


def evict(files):
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED; clean pages only, no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ measuring
READER = """import os, sys
buf = bytearray(16 << 20); view = memoryview(buf); n = 0
for f in sys.argv[1:]:
    with open(f, 'rb', buffering=0) as fh:
        while True:
            k = fh.readinto(view)
            if not k:
                break
            n += k
print(n)
"""


def _tree(pid):
    """pid and its descendants (through /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _io(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            d = dict(line.split(": ") for line in f.read().splitlines())
        return int(d["read_bytes"]), int(d["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None

# The fused weighted sum of task_arithmetic alone (pymerge.ops.center_task_vectors, bf16 in, bf16 out) over every
# key of the memory-mapped inputs, one thread: what one core streams through the arithmetic, without start-up,
# checks or output. Prints the kernel's seconds.
KERNEL = """import sys, time, torch
torch.set_num_threads(1)
from pymerge.io import open_model
from pymerge.ops import center_task_vectors
models = [open_model(d) for d in sys.argv[1:]]
T = len(models) - 1
c = [1 - 0.3 * T] + [0.3] * T
spent = 0.0
for key in models[0].keys():
    xs = [m[key] for m in models]
    if not xs[0].is_floating_point():
        continue
    t = time.perf_counter()
    center_task_vectors(xs, c, return_centered=False)
    spent += time.perf_counter() - t
    for m in models:
        m.release([key])
print(spent)
"""

# What two processes can gain on this machine at all: the same fixed fp32 GEMM work (one thread), one copy alone
# and two copies at once; the ceiling of any 2-process speed-up is 2 x (one alone) / (both at once).
GEMM = """import time, torch
torch.set_num_threads(1)
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)
t = time.perf_counter()
for _ in range(300):
    a @ b
print(time.perf_counter() - t)
"""


def median_run(run, repeat):
    """run() `repeat` times; the run of median wall time (all wall times printed): a warm page cache still
    leaves the reclaim and write-back of other runs' pages as noise of +-20% on this VM."""
    runs = sorted((run() for _ in range(repeat)), key=lambda r: r["wall"])
    if repeat > 1:
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"    wall times: {walls} s", flush=True)
    return runs[len(runs) // 2]


def two_process_ceiling(env):
    """(seconds of one GEMM copy alone, seconds of two copies run at once, ceiling speed-up)."""
    def run(n):
        procs = [subprocess.Popen([sys.executable, "-c", GEMM], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)
    alone, both = run(1), run(2)
    return alone, both, 2 * alone / both


def measure(cmd, env=None, cwd=None):
    """Run cmd; {wall, rc, peak_rss, peak_anon, peak_anon_proc, disk_read, disk_write, out}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon, peak_anon_proc, peak_rss, io = 0, 0, 0, {}
    done = threading.Event()

    def poll():
        nonlocal peak_anon, peak_anon_proc, peak_rss
        while not done.is_set():
            pids = _tree(proc.pid)
            anon = [_status_kb(p, "RssAnon") for p in pids]
            peak_anon = max(peak_anon, sum(anon))
            peak_anon_proc = max([peak_anon_proc] + anon)
            peak_rss = max([peak_rss] + [_status_kb(p, "VmHWM") for p in pids])
            for p in pids:
                got = _io(p)
                if got is not None:
                    io[p] = got
            time.sleep(0.01)
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    return dict(wall=wall, rc=proc.returncode, out=out, err=err, peak_anon=peak_anon * 1024,
                peak_anon_proc=peak_anon_proc * 1024, peak_rss=peak_rss * 1024,
                disk_read=sum(v[0] for v in io.values()), disk_write=sum(v[1] for v in io.values()))


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def config_yaml(path, method, dirs, params, per_model=None):
    lines = [f"merge_method: {method}", f"base_model: {dirs[0]}", "models:"]
    for d in dirs[1:]:
        lines.append(f"  - model: {d}")
        if per_model:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in per_model.items()]
    if params:
        lines.append("parameters:")
        lines += [f"  {k}: {v}" for k, v in params.items()]
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def compare_outputs(a, b):
    """(max |a - b| over every tensor, fraction of bf16 entries that differ, max |a|) of two output dirs."""
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out
    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return float("inf"), 1.0, 0.0
    worst, differ, total, scale = 0.0, 0, 0, 0.0
    for k in ia:
        with safe_open(str(ia[k]), "pt") as ha, safe_open(str(ib[k]), "pt") as hb:
            x, y = ha.get_tensor(k).float(), hb.get_tensor(k).float()
        worst = max(worst, float((x - y).abs().max()))
        differ += int((x != y).sum())
        total += x.numel()
        scale = max(scale, float(x.abs().max()))
    return worst, differ / max(total, 1), scale


# ------------------------------------------------------------------------------------------ the run
METHOD_PARAMS = {  # (global parameters, per-model parameters) in mergekit's names where mergekit has the method
    "task_arithmetic": ({"lambda": 1.0}, {"weight": 0.3}),
    "ties": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.2}),
    "cart": ({"rank_ratio": 0.08, "seed": 0}, None),
}
MERGEKIT_HAS = ("task_arithmetic", "ties")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default="/tmp/pymerge-large-merge")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-torchrun", action="store_true")
    ap.add_argument("--no-growth", action="store_true")
    ap.add_argument("--methods", default="task_arithmetic,ties,cart")
    ap.add_argument("--repeat", type=int, default=3,
                    help="warm runs of the read and of task_arithmetic (the median is reported; each run's wall "
                    "time is printed)")
    args = ap.parse_args()
    size = dict(QUICK if args.quick else FULL)
    methods = args.methods.split(",")
    root = Path(args.dir) / ("quick" if args.quick else "full")
    env = child_env()
    py = sys.executable
    print(f"large_merge: {'quick' if args.quick else 'full'}: {size}; 1 thread per process; "
          f"{os.cpu_count()} vCPUs", flush=True)
    rows = []

    def report(label, r, inputs, out_dir=None, extra=""):
        out_bytes = dir_bytes(out_dir) if out_dir and Path(out_dir).exists() else 0
        rows.append(dict(label=label, wall=r["wall"], anon=r["peak_anon"], anon_proc=r["peak_anon_proc"],
                         peak_rss=r["peak_rss"],
                         read=inputs, wrote=out_bytes, disk_read=r["disk_read"], rc=r["rc"]))
        print(f"  {label:36s} {r['wall']:7.1f} s  peak RSS {r['peak_rss'] / GB:5.2f} GB  RssAnon "
              f"{r['peak_anon'] / GB:5.2f} GB (per process {r['peak_anon_proc'] / GB:5.2f})  inputs {inputs / GB:6.2f} GB  wrote {out_bytes / GB:5.2f} GB  "
              f"disk read {r['disk_read'] / GB:6.2f} GB  rc {r['rc']}{extra}", flush=True)
        if r["rc"] != 0:
            print(r["err"][-3000:], flush=True)
        return r

    def pymerge_cmd(cfg, out, extra=()):
        return [py, "-P", "-m", "pymerge", "merge", str(cfg), "--out", str(out), "--threads", "1", "--quiet",
                *extra]

    def torchrun_cmd(cfg, out, n=2):
        return [py, "-P", "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
                "--master-port", "29533", "-m", "pymerge", "merge", str(cfg), "--out", str(out), "--threads", "1",
                "--quiet"]

    def rss_from_summary(r):
        line = [x for x in r["out"].splitlines() if "peak RSS" in x]
        return line[-1].split("peak RSS ")[1].split(",")[0] if line else "?"

    sizes = [("", size)]
    if not args.no_growth:
        sizes.append(("x2 layers ", dict(size, layers=2 * size["layers"])))
    for tag, sz in sizes:
        sub = root / (f"L{sz['layers']}")
        dirs, largest = make_models(sub, sz)
        files = weight_files(dirs)
        inputs = sum(f.stat().st_size for f in files)
        T = sz["models"]
        print(f"\n== {tag or ''}{T} models + base, {inputs / (T + 1) / GB:.2f} GB each, largest tensor "
              f"{largest / GB:.3f} GB; RssAnon target (T+1) x largest + 1 GB = {((T + 1) * largest + GB) / GB:.2f} GB",
              flush=True)
        work = sub / "out"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        reader = [py, "-c", READER, *map(str, files)]
        evict(files)
        cold_read = report("read all inputs once (cold)", measure(reader, env), inputs)
        warm_read = report(f"read all inputs once (warm, median of {args.repeat})",
                           median_run(lambda: measure(reader, env), args.repeat), inputs)
        for method in (methods if not tag else ["task_arithmetic"]):
            glob, per = METHOD_PARAMS[method]
            cfg = config_yaml(work / f"{method}.yaml", method, dirs, glob, per)
            out = work / f"pymerge-{method}"
            if method == "task_arithmetic":
                evict(files)
                r = report(f"pymerge {method} (cold)", measure(pymerge_cmd(cfg, out), env), inputs, out)
                print(f"    cold: {r['wall'] / cold_read['wall']:.2f}x the cold read time", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            repeat = args.repeat if method == "task_arithmetic" else 1

            def warm_merge():
                shutil.rmtree(out, ignore_errors=True)
                return measure(pymerge_cmd(cfg, out), env)
            r = report(f"pymerge {method} (warm{f', median of {repeat}' if repeat > 1 else ''})",
                       median_run(warm_merge, repeat), inputs, out)
            print(f"    {r['wall'] / warm_read['wall']:.2f}x the warm read time; pymerge's own peak RSS "
                  f"{rss_from_summary(r)}", flush=True)
            if method == "task_arithmetic":
                kernel = subprocess.run([py, "-P", "-c", KERNEL, *map(str, dirs)], env=env, capture_output=True,
                                        text=True)
                if kernel.returncode == 0:
                    k = float(kernel.stdout.split()[-1])
                    print(f"    the fused kernel alone over the mapped inputs: {k:.2f} s, {inputs / k / GB:.1f} GB/s "
                          f"({k / warm_read['wall']:.2f}x the warm read time)", flush=True)
                dry = report("pymerge --dry-run (start-up + checks)",
                             measure([py, "-P", "-m", "pymerge", "merge", str(cfg), "--dry-run", "--quiet"], env),
                             inputs)
                print(f"    merge minus start-up: {(r['wall'] - dry['wall']) / warm_read['wall']:.2f}x the warm "
                      f"read time", flush=True)
            if tag:
                shutil.rmtree(out, ignore_errors=True)
                continue
            if method in MERGEKIT_HAS and not args.no_mergekit:
                mk_out = work / f"mergekit-{method}"
                mk = report(f"mergekit-yaml {method} (warm)",
                            measure([str(Path(py).parent / "mergekit-yaml"), str(cfg), str(mk_out), "--quiet",
                                     "--lazy-unpickle", "-j", "1"], env), inputs, mk_out)
                if mk["rc"] == 0 and r["rc"] == 0:
                    worst, frac, scale = compare_outputs(out, mk_out)
                    print(f"    mergekit / pymerge wall time: {mk['wall'] / r['wall']:.2f}x; outputs: max |diff| "
                          f"{worst:.3g} (max |w| {scale:.3g}), {100 * frac:.4f}% of bf16 entries differ", flush=True)
                shutil.rmtree(mk_out, ignore_errors=True)
            if method == "cart" and not args.no_torchrun:
                alone, both, ceiling = two_process_ceiling(env)
                print(f"    the machine's 2-process ceiling: one 1-thread GEMM loop {alone:.2f} s alone, two at once "
                      f"{both:.2f} s: at most {ceiling:.2f}x from 2 processes", flush=True)
                out2 = work / "pymerge-cart-torchrun2"
                r2 = report("torchrun -n 2 pymerge cart (warm)", measure(torchrun_cmd(cfg, out2), env), inputs,
                            out2)
                if r2["rc"] == 0 and r["rc"] == 0:
                    same = all((out / f.name).read_bytes() == f.read_bytes() for f in sorted(out2.iterdir()))
                    print(f"    speed-up 1 -> 2 processes: {r['wall'] / r2['wall']:.2f}x; byte-identical output: "
                          f"{same}", flush=True)
                shutil.rmtree(out2, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + json.dumps(rows))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
