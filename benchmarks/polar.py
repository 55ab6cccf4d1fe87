"""Polar-factor routes on the very matrices TSV-M and Iso-C orthogonalise: time and float32 accuracy.

    python benchmarks/polar.py [--size N]

1 thread. From the synthetic fine-tunes of benchmarks/methods_svd.py (pymerge.synthetic.power_law_models, T = 8)
of one N x N key (default 2048):
- X = [U_1 .. U_T], TSV-M's stacked top-(N/T) singular vectors of each task vector (pymerge's randomized
  per-task SVDs, default settings), and
- M = sum_t tau_t, the matrix Iso-C flattens.
For each, the orthonormal polar factor P = U V^T by
- svd:    torch.linalg.svd in float32, then U @ Vh (what FusionBench and pymerge do),
- newton: the scaled Newton iteration X <- (g X + X^-T / g) / 2 with Higham's (1, inf)-norm scaling g, float32,
          one inverse per step, iterated until its error stops improving (the cheapest backward-stable
          alternative that needs no SVD; QDWH / Newton-Schulz need as many or more O(N^3) passes),
- gram32 / gram64: X (X^T X)^(-1/2) from torch.linalg.eigh of the Gram matrix in float32 / float64.
Error: ||P - P_ref||_F / ||P_ref||_F with P_ref from a float64 SVD; cond from float64 singular values.
This is the evidence behind pymerge's choice of the SVD (pymerge/methods/tsv_m.py, README "Methods").
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from methods_svd import T  # noqa: E402
from pymerge.synthetic import power_law_models  # noqa: E402


def polar_svd(A):
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return U @ Vh


def polar_gram(A):
    lam, Q = torch.linalg.eigh(A.mT @ A)
    return A @ ((Q * lam.clamp_min(torch.finfo(A.dtype).tiny).rsqrt()) @ Q.mT)


def newton_steps(A, ref, max_steps=12):
    """Scaled Newton on square A; yields (cumulative CPU seconds, error vs ref) after each step."""
    X, spent = A.clone(), 0.0
    for _ in range(max_steps):
        c0 = time.process_time()
        Xi = torch.linalg.inv(X)
        g = float((Xi.abs().sum(0).max() * Xi.abs().sum(1).max())
                  / (X.abs().sum(0).max() * X.abs().sum(1).max())) ** 0.25
        X = (g * X).add_(Xi.mT, alpha=1.0 / g).mul_(0.5)
        spent += time.process_time() - c0
        yield spent, rel(X, ref)


def rel(P, ref):
    return float((P.double() - ref).norm() / ref.norm())


def timed(fn):
    c0 = time.process_time()
    out = fn()
    return time.process_time() - c0, out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.size
    from pymerge.methods.tsv_m import drop_null_components, top_task_svds
    base, models = power_law_models({"w": (n, n)}, T)
    thetas = [m["w"] for m in models]
    U, S, V = top_task_svds(base["w"], thetas, n // T, torch.float32, svd="randomized", oversample=n // T,
                            power_iters=4, seed=0, key="w", backend="auto")
    X = drop_null_components(U, S, V, (n, n))[0]
    M = sum(t - base["w"] for t in thetas)
    print(f"{'matrix':28s} {'cond':>8s} {'route':>8s} {'CPU s':>7s} {'rel err vs fp64':>16s}")
    for name, A in ((f"TSV-M X [{n}, {X.shape[1]}]", X), (f"Iso-C sum [{n}, {n}]", M)):
        ref = polar_svd(A.double())
        s = torch.linalg.svdvals(A.double())
        cond = float(s[0] / s[-1])
        t_svd, P = timed(lambda: polar_svd(A))
        print(f"{name:28s} {cond:8.1e} {'svd':>8s} {t_svd:7.2f} {rel(P, ref):16.1e}", flush=True)
        for label, dtype in (("gram32", torch.float32), ("gram64", torch.float64)):
            t, P = timed(lambda: polar_gram(A.to(dtype)))
            print(f"{'':28s} {'':8s} {label:>8s} {t:7.2f} {rel(P, ref):16.1e}", flush=True)
        if A.shape[0] == A.shape[1]:
            best = (float("inf"), 0.0, 0)
            for step, (t, err) in enumerate(newton_steps(A, ref), 1):
                if err < best[0] * 0.9:
                    best = (err, t, step)
            print(f"{'':28s} {'':8s} {'newton':>8s} {best[1]:7.2f} {best[0]:16.1e}   ({best[2]} steps to its "
                  f"best error; {best[1] / t_svd:.2f}x the SVD's time)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
