"""js_divergence, kl_divergence and entropy (one fused op) on every available backend.

Oracle: pymerge.reference.divergence evaluated in float64 on the very values the kernel sees (low-precision
inputs widened exactly), its gradient by autograd. Tolerances:
  * losses: 1e-5 relative (+1e-6 absolute) for every input dtype - the kernels accumulate in fp32 (fp64 for
    fp64 students) whatever the storage dtype, so only the fp32 arithmetic separates them from the oracle;
  * gradients (written in the student's dtype): fp32 within 1e-5 of their scale, the larger of the largest
    entry and the size of the terms a softmax gradient is the difference of (term_scale): dL/dz_j =
    q_j (g_j - sum_i q_i g_i) / T cancels when one q_j dominates, in any fp32 evaluation (torch's autograd
    too), so relative to the largest entry alone no fp32 kernel could promise 1e-5. bf16 / fp16 within
    twice the rounding of their dtype (2^-7 / 2^-9 relative per entry: the scale by the upstream gradient is a
    second rounding) plus 1e-5 of that scale (fp16 subnormals);
  * fp64: 1e-10 relative (and gradcheck).
Triton runs in the interpreter (tests/conftest.py), on small shapes only.
"""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymerge import reference
from pymerge.ops import entropy, js_divergence, kl_divergence

from backend_lists import kernel_backends, op_backends

BACKENDS = op_backends()
KERNELS = kernel_backends(BACKENDS)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
JS, KL, ENT = reference.JS, reference.KL, reference.ENTROPY

# The Triton interpreter evaluates log(0) of masked-off lanes with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def call(kind, student, teacher=None, **kw):
    if kind == JS:
        return js_divergence(student, teacher, **kw)
    if kind == KL:
        kw.pop("beta", None)
        return kl_divergence(student, teacher, **kw)
    kw.pop("beta", None)
    kw.pop("teacher_is_logits", None)
    return entropy(student, **kw)


def loss_and_grad(kind, student, teacher, backend, upstream=None, **kw):
    """Loss (detached, float64) and d(upstream . loss)/d student through the public wrapper."""
    z = student.detach().clone().requires_grad_(True)
    loss = call(kind, z, teacher, backend=backend, **kw)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    loss.backward(up)
    grad = z.grad if z.grad is not None else torch.zeros_like(z)
    return loss.detach().double(), grad


def oracle(kind, student, teacher, upstream=None, **kw):
    """The float64 reference on the same values: loss and gradient (float64)."""
    t64 = teacher.double() if teacher is not None else None
    return loss_and_grad(kind, student.double(), t64, "reference", upstream, **kw)


def assert_close_loss(got, want, rtol=1e-5, atol=1e-6):
    assert got.shape == want.shape
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), f"loss error {float((err - bound).max()):.3g} over bound; got {got} want {want}"


def term_scale(kind, student, teacher, temperature=1.0, teacher_is_logits=True, beta=0.5, row_factor=None):
    """Per row, the size of the terms dL/dz_j is the difference of (float64), times the row's upstream factor:
    KL (q_j sum p - p_j) / T: max(p_j, q_j) / T; entropy -q_j (log q_j + H) / T: q_j (|log q_j| + H) / T;
    JS q_j (g_j - S) / T: q_j ((1 - beta) (|log q_j| + |log m_j|) + |S|) / T, S = sum_i q_i g_i: g_j =
    (1 - beta) (log q_j - log m_j) is a difference of two logs, so its fp32 error scales with their size, not g's."""
    V = student.shape[-1]
    logq = torch.log_softmax(student.double().reshape(-1, V) / temperature, -1)
    q = logq.exp()
    if kind == ENT:
        H = -(q * logq).nan_to_num(0.0).sum(-1, keepdim=True)
        terms = q * (logq.abs() + H)
    else:
        t = teacher.double().reshape(-1, V)
        logp = torch.log_softmax(t / temperature, -1) if teacher_is_logits else t
        p = logp.exp()
        if kind == KL:
            terms = torch.maximum(p, q)
        else:
            logm = torch.log(beta * p + (1 - beta) * q)
            qg = (q * (1 - beta) * (logq - logm)).nan_to_num(0.0)
            logs = (logq.abs() + logm.abs()).nan_to_num(0.0, posinf=0.0)
            terms = (1 - beta) * q * logs + q * qg.sum(-1, keepdim=True).abs()
    rows = terms.nan_to_num(0.0).amax(-1) / temperature if V else torch.zeros(terms.shape[0], dtype=torch.float64)
    if row_factor is not None:
        rows = rows * row_factor.reshape(-1).abs()
    return float(rows.max()) if rows.numel() else 0.0


def assert_close_grad(got, want, dtype, scale=0.0, floor=0.0):
    """floor: the absolute noise allowed in fp32-computed entries whose exact value is 0 or tiny (see
    check_against_oracle); fp64 keeps 1e-20."""
    assert got.dtype == dtype and got.shape == want.shape
    got, want = got.double(), want.double()
    scale = max(scale, float(want.abs().max()) if want.numel() else 0.0)
    err = (got - want).abs()
    # absolute floors: a gradient that is exactly 0 (V = 1) comes out as rounding noise of the log-sum-exp
    floor = max(floor, 1e-12)
    if dtype == torch.float64:
        ok = err <= 1e-10 * scale + 1e-20
    elif dtype == torch.float32:
        ok = err <= 1e-5 * scale + floor
    else:
        rel = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -9
        ok = err <= rel * want.abs() + 1e-5 * scale + floor
    assert bool(ok.all()), f"{dtype} gradient error {float(err.max()):.3g} (scale {scale:.3g})"


def make_inputs(lead, V, s_dtype, t_dtype, teacher_is_logits, layout, seed, scale=3.0):
    """Student / teacher [*lead, V] in the given dtypes and memory layout, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, V)
    if layout == "row_stride":  # rows padded: unit column stride, row stride > V (used without a copy)
        s = (torch.randn(*lead, V + 5, generator=gen) * scale)[..., :V]
    elif layout == "strided":  # every other column: needs a contiguous copy
        s = (torch.randn(*lead, 2 * V, generator=gen) * scale)[..., ::2]
    else:
        s = torch.randn(shape, generator=gen) * scale
    t = torch.randn(shape, generator=gen) * scale
    if not teacher_is_logits:
        t = torch.log_softmax(t.double(), dim=-1)
    return s.to(s_dtype), t.to(t_dtype)


# --------------------------------------------------------------------------- all kernels vs the oracle
def check_against_oracle(backend, kind, lead, V, s_dtype, t_dtype, beta, temperature, teacher_is_logits,
                         use_mask, reduction, layout, seed):
    student, teacher = make_inputs(lead, V, s_dtype, t_dtype, teacher_is_logits, layout, seed)
    mask = None
    if use_mask:
        mask = torch.rand(lead, generator=torch.Generator().manual_seed(seed + 1)) > 0.35
    kw = dict(beta=beta, temperature=temperature, teacher_is_logits=teacher_is_logits, mask=mask,
              reduction=reduction)
    upstream = None
    if reduction == "none":  # a non-uniform upstream gradient exercises the per-row scaling of backward
        upstream = torch.rand(lead, generator=torch.Generator().manual_seed(seed + 2)) + 0.5
    got_loss, got_grad = loss_and_grad(kind, student, teacher, backend, upstream, **kw)
    want_loss, want_grad = oracle(kind, student, teacher, upstream, **kw)
    assert_close_loss(got_loss, want_loss, **({"rtol": 1e-10, "atol": 1e-12} if s_dtype == torch.float64 else {}))
    # the upstream gradient each row's d loss_row / d z is multiplied by
    n_rows = student[..., 0].numel()
    if reduction == "none":
        factor = upstream
    elif reduction == "sum":
        factor = torch.ones(n_rows)
    else:
        factor = torch.full((n_rows,), 1.0 / max(1, int(mask.sum()) if mask is not None else n_rows))
    scale = term_scale(kind, student, teacher, temperature, teacher_is_logits, beta, factor)
    # fp32 kernels: log q_j and log m_j of probabilities near 1 are off by ~1 ulp (2^-24..2^-23), so a gradient
    # entry whose exact value is 0 (V = 1: q = p = m = 1) may come out as (1 - beta) * ulp * factor / T.
    # Hypothesis found 6.5e-9 (bf16 student, V = 1, T = 2.3, beta = 0.625, mean over 3 rows); 4 ulp allowed.
    floor = 2.0 ** -21 * (float(factor.abs().max()) if factor.numel() else 0.0) / temperature
    assert_close_grad(got_grad, want_grad, s_dtype, scale, floor)


lead_shapes = st.sampled_from([(1,), (3,), (5,), (2, 3), (0,), (2, 0, 3), (1, 1, 2)])
vocab_sizes = st.sampled_from([1, 2, 3, 7, 15, 16, 17, 33, 100, 1023, 1024, 1025, 2500])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="pymerge._C not built")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([JS, KL, ENT]), lead=lead_shapes, V=vocab_sizes,
       s_dtype=st.sampled_from(DTYPES), t_dtype=st.sampled_from(DTYPES),
       beta=st.floats(0.05, 0.95), temperature=st.sampled_from([0.5, 1.0, 2.3]), teacher_is_logits=st.booleans(),
       use_mask=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       layout=st.sampled_from(["contiguous", "row_stride", "strided"]), seed=st.integers(0, 2**16))
def test_cpu_matches_reference(kind, lead, V, s_dtype, t_dtype, beta, temperature, teacher_is_logits, use_mask,
                               reduction, layout, seed):
    check_against_oracle("cpu", kind, lead, V, s_dtype, t_dtype, beta, temperature, teacher_is_logits, use_mask,
                         reduction, layout, seed)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="pymerge._C not built")
@pytest.mark.parametrize("isa", ["avx2", "auto"])
@pytest.mark.parametrize("kind", [JS, KL, ENT])
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_both_isas(monkeypatch, isa, kind, s_dtype):
    """The AVX2 build and the run-time AVX-512 path (where the CPU has it) give the oracle's answer."""
    if isa == "avx2":
        monkeypatch.setenv("PYMERGE_CPU_ISA", "avx2")
    for V, logits in ((1031, True), (4096 + 9, False)):
        check_against_oracle("cpu", kind, (6,), V, s_dtype, torch.float32, 0.3, 1.7, logits, True, "mean",
                             "contiguous", seed=V)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available (interpreted)")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([JS, KL, ENT]), lead=st.sampled_from([(1,), (3,), (2, 2), (0,)]),
       V=st.sampled_from([1, 5, 16, 37, 130]), s_dtype=st.sampled_from([torch.float32, torch.float64]),
       t_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), beta=st.floats(0.05, 0.95),
       temperature=st.sampled_from([0.5, 1.0, 2.3]), teacher_is_logits=st.booleans(), use_mask=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), layout=st.sampled_from(["contiguous", "strided"]),
       seed=st.integers(0, 2**16))
def test_triton_matches_reference(kind, lead, V, s_dtype, t_dtype, beta, temperature, teacher_is_logits, use_mask,
                                  reduction, layout, seed):
    check_against_oracle("triton", kind, lead, V, s_dtype, t_dtype, beta, temperature, teacher_is_logits,
                         use_mask, reduction, layout, seed)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available (interpreted)")
@pytest.mark.parametrize("s_dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_student(s_dtype):
    check_against_oracle("triton", JS, (3,), 70, s_dtype, torch.float32, 0.5, 1.0, True, True, "mean",
                         "contiguous", seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [JS, KL, ENT])
def test_every_backend_same_answer(backend, kind):
    """A fixed mixed case (3-D rows, mask, temperature, mixed dtypes) on every backend, reference included."""
    check_against_oracle(backend, kind, (2, 3), 45, torch.float32, torch.bfloat16, 0.4, 0.8, True, True, "none",
                         "contiguous", seed=11)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", [JS, KL, ENT])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_float64(backend, kind, teacher_is_logits, reduction):
    """torch.autograd.gradcheck of the fused backward (it backpropagates through a retained graph too)."""
    gen = torch.Generator().manual_seed(kind * 10 + teacher_is_logits)
    z = (torch.randn(4, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 2
    if not teacher_is_logits:
        t = torch.log_softmax(t, -1)
    mask = torch.tensor([True, False, True, True])

    def f(x):
        return call(kind, x, t, beta=0.35, temperature=1.4, teacher_is_logits=teacher_is_logits, mask=mask,
                    reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_backward_twice_through_retained_graph(backend):
    """The first backward scales the gradient buffer in place; a second one recomputes it, results stay exact."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 40, generator=gen).requires_grad_(True)
    t = torch.randn(5, 40, generator=gen)
    loss = js_divergence(z, t, backend=backend)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    g1_copy = g1.clone()
    (g2,) = torch.autograd.grad(loss * 3.0, z, retain_graph=True)
    loss.backward()
    _, want = oracle(JS, z.detach(), t)
    assert_close_grad(g1, want.float(), torch.float32)
    assert torch.equal(g1, g1_copy)  # handed-out gradients are never touched again
    assert_close_grad(g2, (3 * want).float(), torch.float32)
    assert_close_grad(z.grad, want.float(), torch.float32)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="pymerge._C not built")
@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                             (torch.bfloat16, "mean"), (torch.float16, "sum")])
def test_backward_allocates_no_second_gradient(dtype, reduction):
    """backward scales the forward's gradient in place: no out-of-place N x V multiply, cast or copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        """Records every op that returns a new (non-aliasing) tensor of at least N x V elements."""

        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)}
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.numel() >= 64 * 300 and o.untyped_storage().data_ptr() not in ins:
                    self.big.append(str(func))
            return out

    z = torch.randn(64, 300).to(dtype).requires_grad_(True)
    t = torch.randn(64, 300)
    loss = js_divergence(z, t, reduction=reduction, backend="cpu")
    upstream = torch.rand(64) + 0.5 if reduction == "none" else torch.tensor(0.7)
    with Log() as log:
        loss.backward(upstream)
    assert log.big == [], f"backward allocated N x V tensors: {log.big}"
    _, want = oracle(JS, z.detach(), t, upstream, reduction=reduction)
    assert_close_grad(z.grad, want.to(dtype), dtype, term_scale(JS, z.detach(), t))


# --------------------------------------------------------------------------- properties of the divergences
@pytest.mark.parametrize("backend", KERNELS)
def test_js_bounded_by_log2_and_symmetric(backend):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 4
    b = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 4
    ab = js_divergence(a, b, reduction="none", backend=backend)
    ba = js_divergence(b, a, reduction="none", backend=backend)
    torch.testing.assert_close(ab, ba, rtol=1e-12, atol=1e-14)
    assert bool((ab >= 0).all()) and bool((ab <= math.log(2)).all())
    # generalised JS: swapping the two distributions is swapping beta and 1 - beta
    torch.testing.assert_close(js_divergence(a, b, beta=0.2, reduction="none", backend=backend),
                               js_divergence(b, a, beta=0.8, reduction="none", backend=backend),
                               rtol=1e-12, atol=1e-14)
    # disjoint supports reach the bound; identical distributions give 0
    far = torch.full((2, 8), -1e4, dtype=torch.float64)
    near = far.clone()
    far[:, 0] = 0.0
    near[:, 1] = 0.0
    torch.testing.assert_close(js_divergence(far, near, reduction="none", backend=backend),
                               torch.full((2,), math.log(2), dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(js_divergence(a, a, reduction="none", backend=backend),
                               torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", KERNELS)
def test_kl_and_entropy_identities(backend):
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kl_divergence(a, a, reduction="none", backend=backend),
                               torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-14)
    # temperature rescales both sides; teacher log-probabilities give the same KL as the teacher's logits
    b = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    logp = torch.log_softmax(b / 2.0, -1)
    torch.testing.assert_close(kl_divergence(a, b, temperature=2.0, reduction="none", backend=backend),
                               kl_divergence(a / 2.0, logp, teacher_is_logits=False, reduction="none",
                                             backend=backend), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(entropy(torch.zeros(3, 77, dtype=torch.float64), reduction="none", backend=backend),
                               torch.full((3,), math.log(77), dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", [JS, KL, ENT])
def test_vocabulary_of_one(backend, kind):
    """V = 1: every distribution is a point mass, every divergence and its gradient are 0."""
    z = torch.randn(3, 1).requires_grad_(True)
    t = torch.randn(3, 1)
    loss = call(kind, z, t, reduction="sum", backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and bool((z.grad == 0).all())


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", [JS, KL, ENT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_infinite_logits(backend, kind, dtype):
    """-inf student logits (vocabulary masking) contribute 0 with a 0 gradient; so do teacher zeros."""
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(4, 40, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(4, 40, generator=gen, dtype=torch.float64) * 2
    ninf = torch.zeros(4, 40, dtype=torch.bool)
    ninf[:, 3:9] = True
    ninf[1, 20:] = True
    z_inf = z.masked_fill(ninf, -math.inf)
    if kind == KL:  # KL(p || q) is finite only where the teacher puts no mass on the student's -inf entries
        t = t.masked_fill(ninf, -math.inf)
    t[0, 30:] = -math.inf  # teacher zeros
    got_loss, got_grad = loss_and_grad(kind, z_inf.to(dtype), t.to(dtype), backend, reduction="none")
    # the oracle's autograd gives NaN through -inf; an effectively-zero finite logit is the same distribution
    want_loss, want_grad = oracle(kind, z.masked_fill(ninf, -1e30), t.masked_fill(t == -math.inf, -1e30),
                                  reduction="none")
    assert torch.isfinite(got_loss).all() and torch.isfinite(got_grad).all()
    assert bool((got_grad[ninf] == 0).all())
    assert_close_loss(got_loss, want_loss)
    assert_close_grad(got_grad, want_grad.to(dtype), dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_masked_rows_are_skipped(backend):
    """Masked-out rows give loss 0 and gradient 0 and are never read (garbage there does not leak)."""
    z = torch.randn(4, 25)
    t = torch.randn(4, 25)
    z[2] = math.nan
    t[2] = math.inf
    mask = torch.tensor([True, True, False, True])
    for kind in (JS, KL, ENT):
        loss, grad = loss_and_grad(kind, z, t, backend, reduction="none", mask=mask)
        assert float(loss[2]) == 0.0 and bool((grad[2] == 0).all())
        keep = mask.nonzero().squeeze(1)
        want_loss, want_grad = oracle(kind, z[keep], t[keep], reduction="none")
        assert_close_loss(loss[keep], want_loss)
        assert_close_grad(grad[keep], want_grad.float(), torch.float32)
    # mean over counted rows only; an all-masked batch means 0
    mean = js_divergence(z, t, mask=mask, backend=backend)
    torch.testing.assert_close(mean, js_divergence(z, t, mask=mask, reduction="sum", backend=backend) / 3)
    none = torch.zeros(4, dtype=torch.bool)
    assert float(js_divergence(z, t, mask=none, backend=backend)) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    z = torch.randn(0, 7).requires_grad_(True)
    t = torch.randn(0, 7)
    loss = js_divergence(z, t, backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and z.grad.shape == (0, 7)
    assert js_divergence(z, t, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", KERNELS)
def test_no_grad_and_detached_students(backend):
    z = torch.randn(3, 20)
    t = torch.randn(3, 20)
    with torch.no_grad():
        a = js_divergence(z.requires_grad_(True), t, backend=backend)
    b = js_divergence(z.detach(), t, backend=backend)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error(backend):
    z = torch.randn(3, 5)
    t = torch.randn(3, 5)
    bad = [
        (lambda: js_divergence(z.long(), t, backend=backend), "float"),
        (lambda: js_divergence(z, t.long(), backend=backend), "float"),
        (lambda: js_divergence(z, t[:, :4], backend=backend), "shape"),
        (lambda: js_divergence(z, t.clone().requires_grad_(True), backend=backend), "detach"),
        (lambda: js_divergence(torch.randn(3, 0), torch.randn(3, 0), backend=backend), "vocabulary"),
        (lambda: js_divergence(torch.tensor(1.0), torch.tensor(1.0), backend=backend), "vocabulary"),
        (lambda: js_divergence(z, t, temperature=0.0, backend=backend), "temperature"),
        (lambda: js_divergence(z, t, temperature=math.inf, backend=backend), "temperature"),
        (lambda: js_divergence(z, t, temperature=math.nan, backend=backend), "temperature"),
        (lambda: js_divergence(z, t, beta=0.0, backend=backend), "beta"),
        (lambda: js_divergence(z, t, beta=1.0, backend=backend), "beta"),
        (lambda: js_divergence(z, t, reduction="max", backend=backend), "reduction"),
        (lambda: js_divergence(z, t, mask=torch.ones(3), backend=backend), "mask"),
        (lambda: js_divergence(z, t, mask=torch.ones(4, dtype=torch.bool), backend=backend), "mask"),
        (lambda: kl_divergence(z, t, backend="gpu"), "backend"),
        (lambda: entropy(z, backend="cuda"), "cuda"),
        (lambda: js_divergence(z.masked_fill(torch.eye(3, 5, dtype=torch.bool), math.nan), t, backend=backend),
         "non-finite"),
        (lambda: kl_divergence(z.masked_fill(torch.eye(3, 5, dtype=torch.bool), -math.inf), t, backend=backend),
         "non-finite"),
    ]
    if backend != "reference":  # (the reference's `q > 0` tests read a NaN q as 0: its entropy here is 0)
        bad.append((lambda: entropy(torch.full((2, 4), -math.inf), backend=backend), "non-finite"))
    for fn, words in bad:
        with pytest.raises(ValueError, match=words):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="pymerge._C not built")
def test_torch_compile():
    """register_fake + register_autograd: the op traces under torch.compile (aot_eager) with the same result."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(6, 50, generator=gen).requires_grad_(True)
    t = torch.randn(6, 50, generator=gen)

    def f(x):
        return js_divergence(x, t, beta=0.4, temperature=1.5, backend="cpu") * 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(f, backend="aot_eager")
        loss = compiled(z)
        loss.backward()
    got = z.grad.clone()
    z.grad = None
    want = f(z)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(got, z.grad)
