"""center_task_vectors on every available backend against the float64 reference.

Oracle: pymerge.reference.center_task_vectors run in float64 on the same (exactly widened) inputs and
weights. Tolerances, relative to the scale s = max|x| * max(1, sum|w|) of the key (centered values can
cancel to ~0, so an element-wise relative error means nothing there):
  fp32 / fp64 accumulation error <= 1e-5 * s (fp32 sums; fp64 inputs: 1e-12 * s), plus the rounding of the
  output dtype, <= 2^-8 (bf16), 2^-11 (fp16), 2^-24 (fp32) relative to the reference value itself.
The C++ CPU paths (AVX-512, AVX2, streaming and cached stores, scalar tails, several threads) must agree bit
for bit with one another; fp16/bf16 conversions must be bit-exact against torch's .to() (T = 1, w = 1).
Triton runs in the interpreter (tests/conftest.py) on small shapes, and its kernels are compiled ahead of time
for sm_80 / sm_90 (no GPU needed) to check vector memory access; CUDA / GPU Triton run only where present.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymerge import reference
from pymerge.ops import center_task_vectors
from pymerge.ops.backend import cuda_kernels_built, extension_loaded, triton_available

from backend_lists import kernel_backends, op_backends

BACKENDS = op_backends()
KERNELS = kernel_backends(BACKENDS)
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OUT_ROUNDING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24,
                torch.float64: 2.0 ** -53}
needs_cpu = pytest.mark.skipif(not extension_loaded(), reason="pymerge._C not built")
GPU = torch.cuda.is_available()


def make_thetas(T, shape, dtype, gen, layout="list"):
    """T tensors of `shape`: separate contiguous tensors, rows of one Tensor[T, ...], or non-contiguous views."""
    if layout == "stacked":
        return torch.randn(T, *shape, generator=gen).to(dtype)
    if layout == "noncontig" and len(shape) >= 2:     # transposed views
        return [torch.randn(*reversed(shape), generator=gen).to(dtype).permute(*reversed(range(len(shape))))
                for _ in range(T)]
    if layout == "noncontig":                          # every other element of a wider tensor
        return [torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen).to(dtype)[..., 1::2] for _ in range(T)]
    return [torch.randn(*shape, generator=gen).to(dtype) for _ in range(T)]


def as_list(thetas):
    return list(thetas.unbind(0)) if isinstance(thetas, torch.Tensor) else list(thetas)


def oracle(thetas, weights, want_centered=True):
    """float64 reference on the exactly widened inputs, with the weights rounded as the op rounds them."""
    xs = as_list(thetas)
    T = len(xs)
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    w = torch.full((T,), 1.0 / T, dtype=acc) if weights is None else torch.as_tensor(weights, dtype=acc)
    return reference.center_task_vectors([x.double() for x in xs], w.double(), torch.float64, want_centered)


def assert_close(got, want, scale, in_dtype, out_dtype):
    assert got.dtype == out_dtype and got.shape == want.shape
    if want.numel() == 0:
        return
    acc = 1e-12 if in_dtype == torch.float64 else 1e-5
    err = (got.double() - want).abs()
    # accumulation error + half an ulp of the output (a hair more: fp64 -> 16-bit rounds twice, through fp32)
    # + half the subnormal spacing of the output dtype
    info = torch.finfo(out_dtype)
    bound = acc * scale + OUT_ROUNDING[out_dtype] * 1.001 * want.abs() + info.tiny * info.eps / 2 + 1e-300
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds bound (scale {scale:.3g}, {in_dtype}->{out_dtype})"


def scale_of(thetas, weights):
    xs = as_list(thetas)
    m = max((x.double().abs().max().item() for x in xs if x.numel()), default=0.0)
    wsum = 1.0 if weights is None else float(torch.as_tensor(weights).double().abs().sum())
    return m * max(1.0, wsum)


# ------------------------------------------------------------------------- random shapes, every backend
shapes = st.lists(st.sampled_from([0, 1, 2, 3, 5, 7, 16, 17, 33, 64, 129]), min_size=1, max_size=4).filter(
    lambda s: math.prod(s) <= 6000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, T=st.sampled_from([1, 2, 3, 8]), dtype=st.sampled_from(FLOATS),
       out_dtype=st.sampled_from([None, *FLOATS]), custom_weights=st.booleans(),
       layout=st.sampled_from(["list", "stacked", "noncontig"]), want_centered=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_matches_float64_reference(shape, T, dtype, out_dtype, custom_weights, layout, want_centered, seed):
    gen = torch.Generator().manual_seed(seed)
    thetas = make_thetas(T, shape, dtype, gen, layout)
    weights = (torch.rand(T, generator=gen) * 2 - 0.5).tolist() if custom_weights else None
    want_avg, want_cent = oracle(thetas, weights, want_centered)
    scale = scale_of(thetas, weights)
    odt = out_dtype or dtype
    for backend in BACKENDS:
        avg, cent = center_task_vectors(thetas, weights, out_dtype, return_centered=want_centered, backend=backend)
        assert_close(avg, want_avg, scale, dtype, odt)
        if want_centered:
            assert_close(cent, want_cent, 2 * scale, dtype, odt)
        else:
            assert cent.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_centered_sums_to_zero(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    thetas = make_thetas(5, (37, 11), dtype, gen)
    avg, cent = center_task_vectors(thetas, out_dtype=torch.float32 if dtype != torch.float64 else None,
                                    backend=backend)
    total = cent.double().sum(0)
    assert total.abs().max().item() <= (1e-12 if dtype == torch.float64 else 5 * 1e-6) * 5 * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_and_list_inputs_agree(backend):
    gen = torch.Generator().manual_seed(2)
    stacked = make_thetas(3, (9, 13), torch.float32, gen, "stacked")
    a1, c1 = center_task_vectors(stacked, [0.2, 0.3, 0.5], backend=backend)
    a2, c2 = center_task_vectors([s.clone() for s in stacked], [0.2, 0.3, 0.5], backend=backend)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 5)])
@pytest.mark.parametrize("T", [1, 3])
def test_empty_tensors(backend, shape, T):
    thetas = [torch.empty(shape) for _ in range(T)]
    avg, cent = center_task_vectors(thetas, out_dtype=torch.bfloat16, backend=backend)
    assert avg.shape == shape and cent.shape == (T, *shape) and avg.dtype == cent.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_task_and_zero_dim(backend):
    x = torch.randn(17, 3)
    avg, cent = center_task_vectors([x], backend=backend)
    assert torch.equal(avg, x) and torch.equal(cent, torch.zeros(1, 17, 3))
    scalars = [torch.tensor(1.0), torch.tensor(3.0)]
    avg, cent = center_task_vectors(scalars, backend=backend)
    assert avg.shape == () and avg.item() == 2.0 and cent.tolist() == [-1.0, 1.0]


# ---------------------------------------------------------------------------------------------- out=
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_out_buffers(backend, out_dtype):
    gen = torch.Generator().manual_seed(3)
    thetas = make_thetas(4, (33, 7), torch.bfloat16, gen)
    want_avg, want_cent = oracle(thetas, None)
    scale = scale_of(thetas, None)
    avg_buf, cent_buf = torch.empty(33, 7, dtype=out_dtype), torch.empty(4, 33, 7, dtype=out_dtype)
    avg, cent = center_task_vectors(thetas, out=(avg_buf, cent_buf), backend=backend)
    assert avg is avg_buf and cent is cent_buf
    assert_close(avg, want_avg, scale, torch.bfloat16, out_dtype)
    assert_close(cent, want_cent, 2 * scale, torch.bfloat16, out_dtype)
    # non-contiguous buffers (transposed views) and no centered buffer
    avg_t = torch.empty(7, 33, dtype=out_dtype).T
    cent_t = torch.empty(4, 7, 33, dtype=out_dtype).transpose(1, 2)
    center_task_vectors(thetas, out=(avg_t, cent_t), backend=backend)
    assert torch.equal(avg_t, avg_buf) and torch.equal(cent_t, cent_buf)
    only = torch.empty(33, 7, dtype=out_dtype)
    avg2, none = center_task_vectors(thetas, out=(only, None), backend=backend)
    assert none is None and torch.equal(avg2, avg_buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_centering_in_place(backend):
    """centered buffer = the input stack itself (centered[t] aliases thetas[t] exactly)."""
    gen = torch.Generator().manual_seed(4)
    stacked = make_thetas(3, (1000,), torch.float32, gen, "stacked")
    want_avg, want_cent = center_task_vectors(stacked.clone(), backend="reference")
    avg = torch.empty(1000)
    center_task_vectors(stacked, out=(avg, stacked), backend=backend)
    assert torch.allclose(avg, want_avg, atol=1e-6) and torch.allclose(stacked, want_cent, atol=1e-6)


# ------------------------------------------------------------------------------------------ C++ paths
def _run_cpu(thetas, out_dtype, monkeypatch, isa=None, nt=None, threads=1):
    monkeypatch.delenv("PYMERGE_CPU_ISA", raising=False)
    monkeypatch.delenv("PYMERGE_CENTER_NT_BYTES", raising=False)
    if isa:
        monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    if nt is not None:
        monkeypatch.setenv("PYMERGE_CENTER_NT_BYTES", str(nt))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return center_task_vectors(thetas, [0.1, 0.7, -0.3, 0.5, 0.25][:len(thetas)], out_dtype, backend="cpu")
    finally:
        torch.set_num_threads(old)


@needs_cpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("numel", [1, 31, 1024 + 33, 4160, 70001, 131072])
def test_cpu_paths_agree_bitwise(dtype, out_dtype, numel, monkeypatch):
    """AVX-512 vs AVX2, streaming vs cached stores, 1 vs 2 threads, vector body vs scalar tail: same bits."""
    gen = torch.Generator().manual_seed(numel)
    thetas = make_thetas(5, (numel,), dtype, gen)
    base = _run_cpu(thetas, out_dtype, monkeypatch)
    for kw in ({"isa": "avx2"}, {"nt": 0}, {"isa": "avx2", "nt": 0}, {"threads": 2, "nt": 0}):
        other = _run_cpu(thetas, out_dtype, monkeypatch, **kw)
        assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1]), kw
    # and the whole-vector elements agree bitwise with the scalar tail's math: an odd offset shifts every
    # element between the vector body and the scalar tail
    if numel > 40:
        shifted = _run_cpu([x[3:] for x in thetas], out_dtype, monkeypatch)
        assert torch.equal(shifted[0], base[0][3:]) and torch.equal(shifted[1], base[1][:, 3:])


def _special_values(dtype):
    """fp32 values that probe rounding to dtype: ties, subnormals, overflow, signed zeros, inf, NaN."""
    info = torch.finfo(dtype)
    f32 = torch.finfo(torch.float32)
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny, info.tiny / 2,
               info.tiny / 3, f32.tiny, f32.max, 65504.0, 65519.0, 65520.0, 65536.0, 2.0 ** -24, 2.0 ** -25,
               1.5 * 2.0 ** -25, 2.0 ** -26, 3.0 * 2 ** -25, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
               1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -12]
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (4000,), generator=gen, dtype=torch.int64).to(torch.int32)
    rand = bits.view(torch.float32)                       # every exponent, NaN payloads included
    small = torch.randn(2000, generator=gen) * 1e-5        # the subnormal range of fp16
    vals = torch.cat([torch.tensor(special, dtype=torch.float32), rand, small])
    vals = torch.cat([vals, -vals])
    return vals


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,isa", [("cpu", "avx512"), ("cpu", "avx2"), ("triton", None)])
def test_conversions_match_torch(out_dtype, backend, isa, monkeypatch):
    """T = 1, w = 1: avg is x itself, so its conversion must equal torch's .to() bit for bit."""
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} not available")
    if isa:
        monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    vals = _special_values(out_dtype)
    for x in (vals, vals[1:]):                            # shift every value between SIMD body and scalar tail
        avg, _ = center_task_vectors([x], [1.0], out_dtype=out_dtype, return_centered=False, backend=backend)
        want = x.to(out_dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(avg), nan)
        assert torch.equal(avg[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # and the widening direction: 16-bit inputs -> fp32 outputs exactly
    for x in (vals.to(out_dtype), vals.to(out_dtype)[1:]):
        avg, _ = center_task_vectors([x], [1.0], out_dtype=torch.float32, return_centered=False, backend=backend)
        want = x.float()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(avg), nan) and torch.equal(avg[~nan], want[~nan])


@pytest.mark.skipif(not {"cpu", "triton"} <= set(BACKENDS), reason="needs the cpu and triton backends")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_and_triton_agree_bitwise(dtype, out_dtype):
    """Same accumulation order, fused multiply-adds and roundings: same bits (stacked and pointer paths)."""
    gen = torch.Generator().manual_seed(11)
    for thetas in (make_thetas(3, (517,), dtype, gen), make_thetas(3, (517,), dtype, gen, "stacked")):
        a1, c1 = center_task_vectors(thetas, [0.25, -0.5, 1.25], out_dtype, backend="cpu")
        a2, c2 = center_task_vectors(thetas, [0.25, -0.5, 1.25], out_dtype, backend="triton")
        assert torch.equal(a1, a2) and torch.equal(c1, c2)


@needs_cpu
def test_cpu_many_tasks_and_threads():
    gen = torch.Generator().manual_seed(5)
    thetas = make_thetas(20, (50003,), torch.bfloat16, gen)
    want_avg, want_cent = oracle(thetas, None)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        avg, cent = center_task_vectors(thetas, out_dtype=torch.float32, backend="cpu")
    finally:
        torch.set_num_threads(old)
    scale = scale_of(thetas, None)
    assert_close(avg, want_avg, scale, torch.bfloat16, torch.float32)
    assert_close(cent, want_cent, 2 * scale, torch.bfloat16, torch.float32)


@needs_cpu
def test_opcheck_schemas():
    """Registration, fake (meta) kernels and schema (mutation/aliasing) of both C++ ops."""
    xs = [torch.randn(5, 3) for _ in range(3)]
    w = torch.full((3,), 1 / 3)
    torch.library.opcheck(torch.ops.pymerge.center_task_vectors.default, (xs, w, torch.bfloat16, True))
    torch.library.opcheck(torch.ops.pymerge.center_task_vectors.default, (xs, w, None, False))
    torch.library.opcheck(torch.ops.pymerge.center_task_vectors_out.default,
                          (xs, w, torch.empty(5, 3), torch.empty(3, 5, 3)))


# ------------------------------------------------------------------------------------------- Triton
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available in interpreter mode")
@pytest.mark.parametrize("T", [17, 33])
@pytest.mark.parametrize("want_centered", [True, False])
def test_triton_many_separate_tasks(T, want_centered):
    """More than MAX_POINTERS separate tensors: grouped launches, the same numbers."""
    gen = torch.Generator().manual_seed(T)
    thetas = make_thetas(T, (300,), torch.float16, gen)
    weights = torch.rand(T, generator=gen).tolist()
    want_avg, want_cent = oracle(thetas, weights, want_centered)
    avg, cent = center_task_vectors(thetas, weights, torch.float32, return_centered=want_centered,
                                    backend="triton")
    scale = scale_of(thetas, weights)
    assert_close(avg, want_avg, scale, torch.float16, torch.float32)
    if want_centered:
        assert_close(cent, want_cent, 2 * scale, torch.float16, torch.float32)
    # the same as a stacked Tensor[T, ...] (one pass)
    avg2, _ = center_task_vectors(torch.stack(thetas), weights, torch.float32, backend="triton")
    assert_close(avg2, want_avg, scale, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------------------ GPU
_TRITON_AOT = r"""
import importlib.util, os, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("kc", sys.argv[1])
kc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kc)
D = [["tt.divisibility", 16]]                      # 16-byte aligned pointers, as the JIT specialises them
for arch in (80, 90):
    for ity in ("fp32", "bf16"):
        sig = {"xs": (f"*{ity}",) * 8, "w_ptr": "*fp32", "avg_ptr": f"*{ity}", "cent_ptr": f"*{ity}",
               "acc_ptr": "*fp32", "N": "i32", "NT": "constexpr", "ACC": "constexpr", "NARROW": "constexpr",
               "ACCUMULATE": "constexpr", "FINISH": "constexpr", "WANT_CENTERED": "constexpr", "BLOCK": "constexpr"}
        attrs = {(0, i): D for i in range(8)}
        attrs.update({(k,): D for k in (1, 2, 3, 4, 5)})
        consts = {"NT": 8, "ACC": tl.float32, "NARROW": ity == "bf16", "ACCUMULATE": False, "FINISH": True,
                  "WANT_CENTERED": True, "BLOCK": kc.BLOCK}
        tup = triton.compile(ASTSource(kc._center_tuple_kernel, sig, consts, attrs),
                             target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        sig = {"x_ptr": f"*{ity}", "row_stride": "i64", "w_ptr": "*fp32", "avg_ptr": f"*{ity}",
               "cent_ptr": f"*{ity}", "N": "i32", "T": "i32", "ACC": "constexpr", "NARROW": "constexpr",
               "WANT_CENTERED": "constexpr", "BLOCK": "constexpr"}
        consts = {"ACC": tl.float32, "NARROW": ity == "bf16", "WANT_CENTERED": True, "BLOCK": kc.BLOCK}
        stk = triton.compile(ASTSource(kc._center_stacked_kernel, sig, consts, {(k,): D for k in range(6)}),
                             target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        for name, ptx in (("tuple", tup), ("stacked", stk)):
            assert re.search(r"ld\.global[^\n]*\.v[248]", ptx), f"{name} {ity} sm_{arch}: scalar loads"
            assert re.search(r"st\.global[^\n]*\.v[248]", ptx), f"{name} {ity} sm_{arch}: scalar stores"
            assert ".local" not in ptx, f"{name} {ity} sm_{arch}: local memory"
            assert "fma.rn.f32" in ptx, f"{name} {ity} sm_{arch}: no fused multiply-add"
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_gpus():
    """Ahead-of-time compile (no GPU needed) for sm_80 / sm_90: vector loads and stores, fma, no local memory."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    path = os.path.join(os.path.dirname(__file__), "..", "kernels", "center.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _TRITON_AOT, path], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.skipif(not GPU, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("numel", [1, 1000, 4099, 1 << 20])
def test_gpu_backends(backend, dtype, numel):
    if backend == "cuda" and not cuda_kernels_built():
        pytest.skip("pymerge._C built without CUDA kernels")
    gen = torch.Generator().manual_seed(numel)
    thetas = [x.cuda() for x in make_thetas(8, (numel,), dtype, gen)]
    odd = [x[1:] for x in thetas]                      # misaligned inputs: the scalar path
    for xs in (thetas, odd):
        want_avg, want_cent = oracle([x.cpu() for x in xs], None)
        for out_dtype in (None, torch.float32, torch.bfloat16):
            avg, cent = center_task_vectors(xs, out_dtype=out_dtype, backend=backend)
            scale = scale_of([x.cpu() for x in xs], None)
            assert_close(avg.cpu(), want_avg, scale, dtype, out_dtype or dtype)
            assert_close(cent.cpu(), want_cent, 2 * scale, dtype, out_dtype or dtype)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error(backend):
    x = torch.randn(4, 3)

    def bad(*args, match, **kw):
        with pytest.raises(ValueError, match=match):
            center_task_vectors(*args, backend=backend, **kw)

    bad([], match="T = 0")
    bad(torch.empty(0, 4, 3), match="T = 0")
    bad(torch.tensor(1.0), match="0-d")
    bad([x, torch.randn(3, 4)], match="shape")
    bad([x, x.double()], match="dtype")
    bad([x.int(), x.int()], match="dtype")
    bad([x, "not a tensor"], match="Tensor")
    bad([x, x], weights=[1.0], match="weights has 1 entries")
    bad([x, x], weights=[1.0, math.nan], match="finite")
    bad([x, x], out_dtype=torch.int32, match="out_dtype")
    bad([x, x], out=(torch.empty(3, 4), None), match="out buffers have shapes")
    bad([x, x], out=(torch.empty(4, 3), torch.empty(3, 4, 3)), match="out buffers have shapes")
    bad([x, x], out=(torch.empty(4, 3), torch.empty(2, 4, 3, dtype=torch.float64)), match="dtypes")
    bad([x, x], out=(torch.empty(4, 3, dtype=torch.int32), None), match="dtype")
    bad([x, x], out=torch.empty(4, 3), match="pair")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        center_task_vectors([torch.randn(3)], backend="fortran")
