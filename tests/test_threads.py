"""Every op (every CPU backend) and every static method gives the same answer at 1 and at 2 torch threads, and
nothing crashes at 2 (issue 9).

torch 2.13's batched CPU torch.linalg.lu_factor_ex returns garbage pivots with 2+ threads for tall matrices
from ~200 x 100 up (MKL then reports "Parameter 6 was incorrect on entry to SLASWP" and the process
segfaults, aborts or hangs, or carries on with a wrong basis); the randomized SVD kernels (C++ and the Triton
host code) factor one matrix at a time on the CPU instead.
The computations run in child processes (this file run as a script), so a crash or a hang is a test failure
carrying the child's stderr, not a dead test run; an MKL argument error on stderr fails too. Shapes reach the
bug: 384 x 384 with l = 192 (the issue's call), tall 384 x 192 keys with batch >= 2 (tsv_m with svd="randomized" on
T = 4 runs the issue's call), 200 x 100 for Triton (interpreted, slow); and they are large enough for the C++
kernels' own at::parallel_for to split the work over both threads.
Agreement: byte-identical where every element is computed by the same arithmetic whatever the thread count
(center, low_rank_sum, the per-row divergence kernels and their small row mean, the elementwise methods).
The randomized SVDs differ by fp32 rounding (LAPACK / GEMM blocking follows the thread count). Compared: S and
the rank-k error ||A - U S V^T||, well-conditioned for any spectrum, within 1e-5 (measured <= 4e-7); not
U S V^T itself, which fp32 rounding moves by up to ~1e-4 on these gapless Gaussian matrices (as it moves
fp32 against float64). The SVD-based methods' merged task vectors: within 1e-4 per key (measured <= 3e-5;
fp32 against float64 is 1e-6 - 1e-4 for these methods, tests/test_methods_tsv_iso.py).
"""
import os
import subprocess
import sys

if __name__ == "__main__":  # the child runs with -P: put tests/ (backend_lists) on the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
import torch

import pymerge
from pymerge import methods, ops

from backend_lists import op_backends

THREADS = (1, 2)
CHILD_TIMEOUT_S = 300   # a hang (one of the bug's forms) must end as a failure, not stall the run
EXACT = 0.0             # tolerance of a byte-identical result; others: relative Frobenius distance per part
SVD_OP = 1e-5           # S and the rank-k error
SVD_METHOD = 1e-4       # per key, on the merged task vector


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- op cases
def _center(backend, dtype):
    g = _gen(1)
    thetas = [torch.randn(384, 384, generator=g).to(dtype) for _ in range(3)]
    return ops.center_task_vectors(thetas, weights=[0.5, 0.3, 0.2], backend=backend)


def _svd_result(A, U, S, V):
    """S and the rank-k error ||A[b] - U S V^T||_F per matrix (float64): both well-conditioned whatever the
    spectrum (U S V^T itself is not: Gaussian matrices have no gap at k, so fp32 rounding moves it by ~1e-4),
    and both move by far more than rounding when a power iteration's basis is wrong."""
    recon = (U.double() * S.double().unsqueeze(-2)) @ V.double().mT
    return {"S": S, "rank-k error": (A.double() - recon).norm(dim=(-2, -1))}


def _rsvd_explicit(backend):
    if backend == "triton":   # the interpreter: the smallest shape that reached the bug (Y [200, 100])
        A = torch.randn(2, 200, 100, generator=_gen(2))
        return _svd_result(A, *ops.randomized_svd(A, 50, oversample=50, power_iters=1, seed=0, backend=backend))
    A = torch.randn(2, 384, 384, generator=_gen(2))   # the issue's call
    return _svd_result(A, *ops.randomized_svd(A, 96, oversample=96, power_iters=1, seed=0, backend=backend))


def _rsvd_centered(backend):
    # cpu / reference: Y [384, 144] and Z [192, 144] per task
    (T, m, n, k, p, q) = (2, 200, 100, 50, 50, 1) if backend == "triton" else (3, 384, 192, 96, 48, 2)
    thetas = torch.randn(T, m, n, generator=_gen(3))
    U, S, V = ops.randomized_svd(ops.Centered(list(thetas)), k, oversample=p, power_iters=q, seed=0, backend=backend)
    return _svd_result(thetas - thetas.double().mean(0), U, S, V)


def _centered_matmul(backend, transpose):
    # the implicit batch's products alone (CART's fidelity iteration on large keys); GEMM blocking follows the
    # thread count, so the results agree to fp32 rounding, not bitwise
    T, m, n, l = 3, 384, 192, 96
    thetas = torch.randn(T, m, n, generator=_gen(6)).bfloat16()
    X = torch.randn(T, m if transpose else n, l, generator=_gen(7))
    return ops.centered_matmul(ops.Centered(list(thetas)), X, transpose=transpose, backend=backend)


def _low_rank_sum(backend):
    g = _gen(4)
    U, S, V = torch.randn(3, 384, 8, generator=g), torch.rand(3, 8, generator=g), torch.randn(3, 192, 8, generator=g)
    return ops.low_rank_sum(U, S, V, 0.7, torch.randn(384, 192, generator=g), backend=backend)


def _divergence(backend, kind):
    g = _gen(5)
    student = (3 * torch.randn(8, 16, 1000, generator=g)).requires_grad_(True)   # 128 rows: 8 tasks of 16
    teacher = 3 * torch.randn(8, 16, 1000, generator=g)
    if kind == "js":
        loss = ops.js_divergence(student, teacher, beta=0.3, temperature=1.5, backend=backend)
    elif kind == "kl":
        loss = ops.kl_divergence(student, teacher, temperature=1.5, backend=backend)
    else:
        loss = ops.entropy(student, temperature=1.5, backend=backend)
    loss.backward(torch.tensor(1.3))
    return loss.detach(), student.grad


def _op_cases():
    cases = {}
    for be in op_backends():
        for dtype in (torch.float32, torch.bfloat16):
            cases[f"center_task_vectors[{be},{str(dtype)[6:]}]"] = (lambda be=be, dt=dtype: _center(be, dt), EXACT)
        cases[f"randomized_svd[{be}]"] = (lambda be=be: _rsvd_explicit(be), SVD_OP)
        cases[f"randomized_svd_centered[{be}]"] = (lambda be=be: _rsvd_centered(be), SVD_OP)
        for tr in (False, True):
            cases[f"centered_matmul[{be},transpose={tr}]"] = (lambda be=be, tr=tr: _centered_matmul(be, tr), SVD_OP)
        cases[f"low_rank_sum[{be}]"] = (lambda be=be: _low_rank_sum(be), EXACT)
        for kind in ("js", "kl", "entropy"):
            cases[f"{kind}_divergence[{be}]" if kind != "entropy" else f"entropy[{be}]"] = (
                lambda be=be, kind=kind: _divergence(be, kind), EXACT)
    return cases


# --------------------------------------------------------------------------------------- method cases
# Keys like MiniLM's (384-wide; tall 384 x 192), two of each shape so that the kernels see a batch, T = 4 models:
# tsv_m with svd="randomized" then runs the issue's randomized SVD (k = 96, l = 192 on the 384 x 384 keys; its
# default svd="auto" takes the exact SVDs there and the randomized ones on the tall keys).
SHAPES = {"embed.weight": (64, 32), "layer.0.attn.weight": (384, 384), "layer.0.attn.bias": (384,),
          "layer.0.ffn.weight": (384, 192), "layer.1.attn.weight": (384, 384), "layer.1.ffn.weight": (384, 192)}
SVD_METHODS = ("tsv_m", "iso_c", "iso_cts", "cart")


def _state_dicts(T):
    g = _gen(6)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + 0.05 * torch.randn(*v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    return base, models


def _merge(name, T=4, **params):
    """The merged state dict; for the SVD-based methods its task vector (merged - base), compared relatively."""
    base, models = _state_dicts(T)
    merged = pymerge.merge(name, base, models, **params)
    if name not in SVD_METHODS:
        return dict(merged)
    return {k: merged[k] - base[k] for k in merged}


def _method_cases():
    cases = {name: (lambda name=name: _merge(name), SVD_METHOD if name in SVD_METHODS else EXACT)
             for name in methods.available()}
    cases["tsv_m[svd=randomized]"] = (lambda: _merge("tsv_m", svd="randomized"), SVD_METHOD)
    # CART at a rank where its Centered randomized SVD factors Y [384, 144] (crashed before the fix), T = 2
    cases["cart[rank=96,T=2]"] = (lambda: _merge("cart", T=2, rank=96), SVD_METHOD)
    # CART's fidelity iteration through the implicit centered operator (the route of keys too large to center)
    cases["cart[implicit]"] = (_cart_implicit, SVD_METHOD)
    return cases


def _cart_implicit():
    from pymerge.methods import cart
    saved, cart.MATERIALIZE_BYTES = cart.MATERIALIZE_BYTES, 0
    try:
        return _merge("cart", T=3, rank=24, tol=1e-2)
    finally:
        cart.MATERIALIZE_BYTES = saved


def cases():
    """{case name: (function computing the result, tolerance)}; the same table in the child and the parent."""
    return {**_op_cases(), **_method_cases()}


# ------------------------------------------------------------------------------------------------ child
def child(threads, out_path):
    torch.set_num_threads(threads)
    results = {}
    for name, (fn, _) in cases().items():
        print(f"case {name}", file=sys.stderr, flush=True)   # the last one named is where a crash happened
        results[name] = fn()
    torch.save(results, out_path)


def run_child(what, args, timeout=CHILD_TIMEOUT_S):
    """Run `python -P <args>` in a fresh process with Triton interpreted; fail with its stderr on a non-zero
    exit (MKL abort, segfault) or a timeout (hang). what: the child's name in the failure message."""
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    # idle OpenMP workers sleep instead of spinning: on a loaded machine 2 spinning threads sharing one free core
    # made the 2-thread child ~100x slower (many small parallel regions); results are the same either way
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        proc = subprocess.run([sys.executable, "-P", *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{what} hung (killed after {timeout} s); stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    # MKL reports the garbage pivots (and carries on with them when they happen to be in range)
    assert "oneMKL ERROR" not in proc.stderr, f"{what}: MKL rejected an argument; stderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{threads: {case name: result}}, each thread count computed in its own child process."""
    out = {}
    for threads in THREADS:
        path = tmp_path_factory.mktemp("threads") / f"results_{threads}.pt"
        run_child(f"child at {threads} thread(s)", [os.path.abspath(__file__), str(threads), str(path)])
        out[threads] = torch.load(path)
    return out


def _flat(result):
    if isinstance(result, torch.Tensor):
        return {"": result}
    if isinstance(result, dict):
        return dict(result)
    return {f"[{i}]": t for i, t in enumerate(result)}


@pytest.mark.parametrize("name", list(cases()))
def test_one_and_two_threads_agree(results, name):
    tol = cases()[name][1]   # EXACT or a relative Frobenius distance, for every part of the result
    one, two = _flat(results[1][name]), _flat(results[2][name])
    assert one.keys() == two.keys()
    for part, a in one.items():
        b = two[part]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name} {part}"
        assert bool(torch.isfinite(a).all()), f"{name} {part}: non-finite result at 1 thread"
        if tol == EXACT:
            assert torch.equal(a, b), f"{name} {part}: 1 and 2 threads differ, max {(a - b).abs().max().item()}"
        else:
            d, r = (a.double() - b.double()).norm().item(), b.double().norm().item()
            assert d <= tol * r, f"{name} {part}: 1 and 2 threads differ, rel {d / max(r, 1e-300):.2e}"


REPRO = """
import sys, torch
torch.set_num_threads(2)
from pymerge import ops
A = torch.randn(2, 384, 384, generator=torch.Generator().manual_seed(0))
U, S, V = ops.randomized_svd(A, 96, oversample=96, power_iters=1, seed=0)
torch.save((A, U, S, V), sys.argv[1])
"""


def test_issue_repro_two_threads(tmp_path):
    """The issue's exact call at 2 threads: no MKL error or crash, and the answer of the float64 reference (same
    test matrix omega): the same singular values, orthonormal factors, the same rank-k error. (U S V^T itself
    is not compared: the Gaussian matrix has no gap at k, so fp32 rounding moves it by ~1e-4.)"""
    path = tmp_path / "repro.pt"
    run_child("the issue's call at 2 threads", ["-c", REPRO, str(path)])
    A, U, S, V = torch.load(path)
    U64, S64, V64 = ops.randomized_svd(A.double(), 96, oversample=96, power_iters=1, seed=0, backend="reference")
    assert (S.double() - S64).abs().max() <= 1e-5 * S64[:, 0].max()
    for Q in (U, V):
        assert (Q.mT @ Q - torch.eye(96)).abs().max() <= 1e-5
    err, err64 = _svd_result(A, U, S, V)["rank-k error"], _svd_result(A, U64, S64, V64)["rank-k error"]
    assert ((err / err64) - 1).abs().max() <= 1e-6   # measured <= 1.2e-8


TRITON_LU = """
import sys, torch
torch.set_num_threads(2)
from pymerge.kernels.randomized_svd import _lu_basis
out = []
for seed, shape in enumerate([(2, 100, 200), (3, 192, 384)]):   # Yt [B, l, m]: Y = Yt^T tall
    Yt = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    out.append((Yt, _lu_basis(Yt)))
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif("triton" not in op_backends(), reason="Triton is not interpreted here")
def test_triton_lu_basis_two_threads(tmp_path):
    """The Triton backend's host-side LU basis (torch's LU on CPU tensors) at 2 threads, as the first thing a
    process does: inside the agreement child above, after other work, the batched call happened to come out
    right. P L of Y = P L U spans range(Y) and, partial pivoting, has |entries| <= 1."""
    path = tmp_path / "lu.pt"
    run_child("Triton's LU basis at 2 threads", ["-c", TRITON_LU, str(path)])
    for Yt, basis in torch.load(path):
        Y, PL = Yt.mT.double(), basis.mT.double()
        assert bool(torch.isfinite(PL).all()) and PL.abs().max() <= 1 + 1e-6
        Q = torch.linalg.qr(PL).Q
        assert (Y - Q @ (Q.mT @ Y)).norm() <= 1e-5 * Y.norm()


if __name__ == "__main__":
    child(int(sys.argv[1]), sys.argv[2])
