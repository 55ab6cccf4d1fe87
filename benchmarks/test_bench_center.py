"""pytest-benchmark suite for center_task_vectors on CPU, 1 thread (the ratio table with GB/s and fraction of
copy bandwidth is benchmarks/ops_center.py).

    python -m pytest benchmarks/test_bench_center.py --benchmark-only [--benchmark-group-by=group]
    PYMERGE_BENCH_NUMEL=16777216 python -m pytest benchmarks/test_bench_center.py --benchmark-only

Each group (dtype, T = 8, N elements per task; N = 4M by default) compares on the same T separate tensors:
pymerge into preallocated buffers, pymerge allocating its outputs, torch eager (torch.stack + mean + sub),
the same eager ops into preallocated buffers, and a plain copy of T*N elements (the bandwidth yardstick).
extra_info holds GB/s of the bytes each method must move: (2T + 1) * N elements for centering, 2T * N for
the copy.
"""
import os

import pytest
import torch

from pymerge.ops import center_task_vectors
from pymerge.ops.backend import extension_loaded

T = 8
N = int(os.environ.get("PYMERGE_BENCH_NUMEL", 4 << 20))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ["pymerge_out", "pymerge", "eager", "eager_out", "copy"]

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="pymerge._C not built")


_DATA = {}


def data(dtype):
    """T separate tensors (as a checkpoint loader hands them over) plus every buffer the methods write."""
    if dtype not in _DATA:
        _DATA.clear()                       # one dtype's buffers at a time (GBs at 16M)
        gen = torch.Generator().manual_seed(0)
        thetas = [torch.randn(N, generator=gen).to(dtype) for _ in range(T)]
        _DATA[dtype] = {
            "thetas": thetas, "stacked": torch.stack(thetas),
            "avg": torch.empty(N, dtype=dtype), "cent": torch.empty(T, N, dtype=dtype),
            "copy_out": torch.empty(T, N, dtype=dtype),
        }
    return _DATA[dtype]


def make(method, d):
    thetas = d["thetas"]
    if method == "pymerge_out":
        return lambda: center_task_vectors(thetas, out=(d["avg"], d["cent"]), backend="cpu")
    if method == "pymerge":
        return lambda: center_task_vectors(thetas, backend="cpu")
    if method == "eager":
        def eager():
            s = torch.stack(thetas)
            a = s.mean(0)
            return a, s - a
        return eager
    if method == "eager_out":
        def eager_out():
            torch.stack(thetas, out=d["copy_out"])
            torch.mean(d["copy_out"], 0, out=d["avg"])
            torch.sub(d["copy_out"], d["avg"], out=d["cent"])
        return eager_out
    return lambda: d["copy_out"].copy_(d["stacked"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_center(benchmark, dtype, method):
    d = data(DTYPES[dtype])
    benchmark.group = f"center {dtype} T={T} N={N}"
    fn = make(method, d)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    es = d["stacked"].element_size()
    nbytes = (2 * T if method == "copy" else 2 * T + 1) * N * es
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.min / 1e9, 2)
    if method == "pymerge_out":
        want = d["stacked"][:, :4096].double().mean(0)
        tol = 1e-5 if dtype == "fp32" else 1e-2
        assert torch.allclose(d["avg"][:4096].double(), want, rtol=tol, atol=tol)
