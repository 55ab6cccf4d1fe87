"""pytest-benchmark suite for randomized_svd / low_rank_sum on CPU, 1 thread (the ratio table with error
columns is benchmarks/ops_randomized_svd.py).

    python -m pytest benchmarks/test_bench_randomized_svd.py --benchmark-only [--benchmark-group-by=group]

Groups compare, on the same matrix: pymerge's randomized_svd (p = 10, q = 2), torch.svd_lowrank at the same
sketch size and iterations, and torch.linalg.svd (one round; 4096^2 takes ~30 s on one core). extra_info
holds err/opt, the rank-k Frobenius error over the optimal one (known spectrum s_i = 1 / (1 + i)).
"""
import pytest
import torch

from pymerge.ops import Centered, center_task_vectors, low_rank_sum, randomized_svd

SHAPES = [(768, 768), (3072, 768), (4096, 4096)]
RATIO = 0.08


_CACHE = {}


def spectrum_matrix(m, n):
    if (m, n) not in _CACHE:
        gen = torch.Generator().manual_seed(m * 7 + n)
        r = min(m, n)
        U = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
        s = 1.0 / (1.0 + torch.arange(r, dtype=torch.float64))
        _CACHE[(m, n)] = ((U * s.float()) @ V.T, s)
    return _CACHE[(m, n)]


def _err_ratio(A, U, S, V, s, k):
    R = torch.addmm(A, U[:, :k] * S[:k], V[:, :k].T, alpha=-1.0)
    return torch.linalg.vector_norm(R, dtype=torch.float64).item() / s[k:].square().sum().sqrt().item()


@pytest.mark.parametrize("method", ["pymerge", "svd_lowrank", "linalg_svd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_randomized_svd(benchmark, shape, method):
    m, n = shape
    A, s = spectrum_matrix(m, n)
    k = int(RATIO * min(m, n))
    benchmark.group = f"randomized_svd {m}x{n} k={k}"
    if method == "pymerge":
        U, S, V = benchmark(lambda: randomized_svd(A, k, 10, 2, seed=0, backend="cpu"))
    elif method == "svd_lowrank":
        U, S, V = benchmark(lambda: torch.svd_lowrank(A, q=k + 10, niter=2))
    else:
        U, S, Vh = benchmark.pedantic(lambda: torch.linalg.svd(A, full_matrices=False), rounds=1, iterations=1)
        V = Vh.T
    benchmark.extra_info["err_over_optimal"] = _err_ratio(A, U, S, V, s, k)


@pytest.mark.parametrize("method", ["pymerge_centered", "materialise_pymerge", "svd_lowrank_M"])
def test_centered_batch(benchmark, method):
    T, m = 8, 1024
    k = int(RATIO * m)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(m, m, generator=gen)
    thetas = [torch.randn(m, m, generator=gen).mul_(0.01).add_(base) for _ in range(T)]
    avg = center_task_vectors(thetas, return_centered=False, backend="cpu")[0]
    benchmark.group = f"centered T={T} {m}x{m} k={k}"
    if method == "pymerge_centered":
        benchmark(lambda: randomized_svd(Centered(thetas, avg), k, 10, 2, seed=0, backend="cpu"))
    elif method == "materialise_pymerge":
        benchmark(lambda: randomized_svd(center_task_vectors(thetas, backend="cpu")[1], k, 10, 2, seed=0,
                                         backend="cpu"))
    else:
        benchmark(lambda: [torch.svd_lowrank(t, q=k + 10, niter=2, M=avg) for t in thetas])


@pytest.mark.parametrize("method", ["pymerge", "einsum", "loop"])
def test_low_rank_sum(benchmark, method):
    T, m, n, k = 8, 4096, 4096, 327
    gen = torch.Generator().manual_seed(0)
    U, S, V = torch.randn(T, m, k, generator=gen), torch.rand(T, k, generator=gen), torch.randn(T, n, k, generator=gen)
    base = torch.randn(m, n, generator=gen)
    benchmark.group = f"low_rank_sum T={T} {m}x{n} k={k}"
    if method == "pymerge":
        benchmark(lambda: low_rank_sum(U, S, V, 2.0, base, backend="cpu"))
    elif method == "einsum":
        benchmark(lambda: base + 2.0 * torch.einsum("bmk,bk,bnk->mn", U, S, V))
    else:   # what merging scripts do: one rank-k product per task, summed
        def loop():
            out = base.clone()
            for t in range(T):
                out += 2.0 * (U[t] * S[t]) @ V[t].T
            return out
        benchmark(loop)
