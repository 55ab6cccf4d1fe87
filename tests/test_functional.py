"""pymerge.functional against peft's own peft.utils.merge_utils (same inputs, same conventions), against float64
oracles of peft's TIES conventions and of CART / TSV-M written here, and against pymerge.merge on one-key state
dicts (cart, tsv_m)."""
import warnings

import pytest
import torch

import pymerge
from pymerge import functional as F

merge_utils = pytest.importorskip("peft.utils.merge_utils")

# (shape, T): a vector, a matrix, a 3-D tensor, and one larger than methods/ties.py's CHUNK (65536 entries), so
# the trim and the election run over several chunks.
CASES = [((7,), 2), ((5, 6), 3), ((3, 4, 5), 4), ((70, 1000), 3)]
DENSITIES = (0.3, 0.7, 1.0)


def make_tasks(shape, T, dtype, seed=0):
    """T task vectors whose entries have distinct magnitudes within each task (a random order of 1..n, jittered,
    random signs): where entries tie at the trim threshold peft's torch.topk keeps any of them and pymerge the
    lowest indices, and fp32 Gaussian draws of 70 000 entries do tie (the birthday bound)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()

    def draw():
        mag = (torch.randperm(n, generator=g).double() + 1 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)) / n
        sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return (3 * sign * mag).reshape(shape).to(dtype)
    tasks = [draw() for _ in range(T)]
    # Weights not all equal, one of them negative (peft multiplies after the election, so signs matter).
    weights = torch.tensor([1.5, -0.4, 0.8, 2.0][:T], dtype=dtype)
    return tasks, weights


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = max(1.0, float(want.double().abs().max()))
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def peft(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # peft's prune warns at density >= 1
        return fn(*args)


# ------------------------------------------------------------------------------------------- vs peft
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,T", CASES)
def test_task_arithmetic_and_magnitude_prune_match_peft(shape, T, dtype):
    tasks, w = make_tasks(shape, T, dtype)
    assert_close(F.task_arithmetic(tasks, w), merge_utils.task_arithmetic(tasks, w), dtype)
    for density in DENSITIES:
        assert_close(F.magnitude_prune(tasks, w, density), peft(merge_utils.magnitude_prune, tasks, w, density), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,T", CASES)
def test_ties_matches_peft(shape, T, dtype):
    tasks, w = make_tasks(shape, T, dtype, seed=1)
    for density in DENSITIES:
        for method in ("total", "frequency"):
            assert_close(F.ties(tasks, w, density, method), peft(merge_utils.ties, tasks, w, density, method), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,T", CASES)
def test_dare_matches_peft_with_the_same_global_seed(shape, T, dtype):
    """Masks drawn like peft's (one torch.bernoulli per task, in order) from torch's global generator: seeding it
    the same way before both calls gives the same masks, hence the same merge."""
    tasks, w = make_tasks(shape, T, dtype, seed=2)
    for density in DENSITIES:
        torch.manual_seed(123)
        want = peft(merge_utils.dare_linear, tasks, w, density)
        torch.manual_seed(123)
        assert_close(F.dare_linear(tasks, w, density), want, dtype)
        for method in ("total", "frequency"):
            torch.manual_seed(7)
            want = peft(merge_utils.dare_ties, tasks, w, density, method)
            torch.manual_seed(7)
            assert_close(F.dare_ties(tasks, w, density, method), want, dtype)


def test_dare_generator_and_seed():
    tasks, w = make_tasks((40, 30), 3, torch.float32)
    # seed= and an equally seeded generator= draw the same masks; the same masks as the global generator seeded so.
    a = F.dare_linear(tasks, w, 0.5, seed=11)
    b = F.dare_linear(tasks, w, 0.5, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    c = F.dare_linear(tasks, w, 0.5)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, F.dare_linear(tasks, w, 0.5, seed=12))
    torch.manual_seed(3)
    want = peft(merge_utils.dare_ties, tasks, w, 0.5)
    assert_close(F.dare_ties(tasks, w, 0.5, seed=3), want, torch.float32)
    with pytest.raises(ValueError, match="generator or seed, not both"):
        F.dare_linear(tasks, w, 0.5, seed=1, generator=torch.Generator())


def test_dare_at_density_one_is_deterministic():
    """density 1 drops nothing and draws no random numbers: exactly task_arithmetic / ties at density 1."""
    tasks, w = make_tasks((9, 8), 3, torch.float32)
    state = torch.get_rng_state()
    assert torch.equal(F.dare_linear(tasks, w, 1.0), F.task_arithmetic(tasks, w))
    assert torch.equal(F.dare_ties(tasks, w, 1.0), F.ties(tasks, w, 1.0))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_stacked_input_and_weight_dtype_promotion(fn):
    """A stacked [T, *S] tensor is the same as the list; fp64 weights promote fp32 tasks to fp64 as in peft."""
    tasks, _ = make_tasks((6, 5), 3, torch.float32, seed=4)
    w64 = torch.tensor([0.5, 1.25, -0.75], dtype=torch.float64)
    args = () if fn == "task_arithmetic" else (0.6,)
    torch.manual_seed(0)
    listed = getattr(F, fn)(tasks, w64, *args)
    torch.manual_seed(0)
    stacked = getattr(F, fn)(torch.stack(tasks), w64, *args)
    torch.manual_seed(0)
    want = peft(getattr(merge_utils, fn), tasks, w64, *args)
    assert listed.dtype == want.dtype == torch.float64
    assert torch.equal(listed, stacked)
    assert_close(listed, want, torch.float32)


# ------------------------------------------------------------------ float64 oracles, pymerge's methods
def oracle_ties(tasks, weights, density, method):
    """peft's TIES in float64: top int(density n) magnitudes, sign elected unweighted, weighted sum / count."""
    X = torch.stack([t.double() for t in tasks])
    n = X[0].numel()
    if density < 1:
        k = int(density * n)
        flat = X.reshape(len(tasks), -1)
        keep = torch.zeros_like(flat)
        keep.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
        X = (flat * keep).reshape(X.shape)
    score = X.sum(0) if method == "total" else X.sign().sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0).double()
    agree = (X.sign() == elected).double()
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (X.dim() - 1))
    return (w * X * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_against_float64_oracle(method):
    tasks, w = make_tasks((30, 20), 4, torch.float32, seed=5)
    for density in (0.01, 0.3, 1.0):
        got = F.ties(tasks, w, density, method)
        want = oracle_ties(tasks, w.tolist(), density, method)
        assert float((got.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())
    # Below 1 / numel nothing is kept (peft's int(density * numel) = 0): the merge is 0.
    assert not F.ties(tasks, w, 1e-4).any() and not F.magnitude_prune(tasks, w, 1e-4).any()


def test_ties_equals_pymerge_ties_for_unit_weights():
    """With unit weights peft's and pymerge's (mergekit's) weighting conventions coincide: the functional ties
    is then pymerge.merge("ties", lam=1) on a zero base (same trim count while int(density * n) >= 1)."""
    tasks, _ = make_tasks((25, 16), 3, torch.float32, seed=6)
    for density in (0.2, 0.7, 1.0):
        got = F.ties(tasks, torch.ones(3), density)
        want = pymerge.merge("ties", {"w": torch.zeros(25, 16)}, [{"w": t} for t in tasks], density=density,
                             lam=1.0)["w"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_low_precision_inputs_are_computed_in_fp32():
    tasks, w = make_tasks((12, 10), 3, torch.bfloat16, seed=7)
    got = F.ties(tasks, w, 0.5)
    want = oracle_ties(tasks, w.tolist(), 0.5, "total")
    assert got.dtype == torch.bfloat16
    # Only the final rounding to bf16: half an ulp of the result.
    assert float((got.double() - want).abs().max()) <= 2 ** -8 * float(want.abs().max())


# -------------------------------------------------------------------------------------------- helpers
def test_helpers_match_peft():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(13, 11, generator=g)
    for density in (0.0, 0.3, 0.7, 1.0):
        assert torch.equal(F.magnitude_based_pruning(x, density),
                           merge_utils.magnitude_based_pruning(x, density) if density < 1 else x)
        assert torch.equal(F.prune(x, density, "magnitude"), peft(merge_utils.prune, x, density, "magnitude"))
        if density > 0:
            torch.manual_seed(1)
            want = peft(merge_utils.prune, x, density, "random", True)
            torch.manual_seed(1)
            assert torch.equal(F.prune(x, density, "random", True), want)
    torch.manual_seed(2)
    want = merge_utils.random_pruning(x, 0.4, rescale=False)
    assert torch.equal(F.random_pruning(x, 0.4, rescale=False, seed=2), want)
    stacked = torch.randn(4, 6, 5, generator=g)
    stacked[0, 0, 0] = 0.0
    for method in ("total", "frequency"):
        mask = F.calculate_majority_sign_mask(stacked, method)
        assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method))
        assert torch.equal(F.disjoint_merge(stacked, mask), merge_utils.disjoint_merge(stacked, mask))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # pymerge's tie-break: among entries tied at the threshold magnitude the lowest indices are kept.
    tied = torch.tensor([0.5, -1.0, 1.0, -1.0, 1.0])
    assert torch.equal(F.magnitude_based_pruning(tied, 0.6), torch.tensor([0.0, -1.0, 1.0, -1.0, 0.0]))
    assert torch.equal(F.reshape_weight_task_tensors(stacked, w), merge_utils.reshape_weight_task_tensors(stacked, w))


# ----------------------------------------------------------------------------------------- CART, TSV-M
def oracle_cart(tasks, k, lam):
    """tau_avg + lam sum_t SVD_k(tau_t - tau_avg), exact SVDs in float64."""
    X = torch.stack([t.double().reshape(t.shape[0], -1) for t in tasks])
    avg = X.mean(0)
    out = avg.clone()
    for x in X:
        U, S, Vh = torch.linalg.svd(x - avg, full_matrices=False)
        out += lam * (U[:, :k] * S[:k]) @ Vh[:k]
    return out.reshape(tasks[0].shape)


def oracle_tsv_m(tasks, alpha):
    """alpha polar(X) diag(s) polar(Y)^T of each task's top int(r / T) singular triplets, in float64."""
    T, r = len(tasks), min(tasks[0].shape)
    d = r // T
    Us, Ss, Vs = [], [], []
    for t in tasks:
        U, S, Vh = torch.linalg.svd(t.double(), full_matrices=False)
        Us.append(U[:, :d]), Ss.append(S[:d]), Vs.append(Vh[:d].mT)

    def polar(A):
        U, _, Vh = torch.linalg.svd(A, full_matrices=False)
        return U @ Vh
    return alpha * (polar(torch.cat(Us, 1)) * torch.cat(Ss)) @ polar(torch.cat(Vs, 1)).mT


def one_key(method, tasks, key="weight", base=None, **params):
    base = torch.zeros_like(tasks[0]) if base is None else base
    return pymerge.merge(method, {key: base}, [{key: base + t} for t in tasks], **params)[key]


@pytest.mark.parametrize("shape,T", [((24, 16), 3), ((16, 40), 2), ((8, 3, 2, 2), 4)])
def test_cart_equals_pymerge_merge_on_one_key(shape, T):
    tasks, _ = make_tasks(shape, T, torch.float32, seed=9)
    got = F.cart(tasks, rank=2, lam=1.5, key="layer.weight")
    assert torch.equal(got, one_key("cart", tasks, "layer.weight", rank=2, lam=1.5, low_rank_keys=["layer"]))
    # Merging theta_0 + tau_t with a real base gives theta_0 + the same delta (up to the rounding of the sums).
    g = torch.Generator().manual_seed(10)
    base = torch.randn(shape, generator=g)
    with_base = one_key("cart", tasks, "layer.weight", base=base, rank=2, lam=1.5, low_rank_keys=["layer"]) - base
    torch.testing.assert_close(got, with_base, rtol=1e-4, atol=1e-5)
    # The formula, with exact SVDs.
    exact = F.cart(tasks, rank=2, lam=1.5, svd="exact")
    torch.testing.assert_close(exact.double(), oracle_cart(tasks, 2, 1.5), rtol=1e-5, atol=1e-5)


def test_cart_one_dimensional_weights_and_seeding():
    tasks, w = make_tasks((9,), 3, torch.float32, seed=11)
    # A 1-D tensor is not approximated: CART gives theta_avg, i.e. the mean delta.
    torch.testing.assert_close(F.cart(tasks), torch.stack(tasks).mean(0), rtol=1e-6, atol=1e-7)
    tasks, w = make_tasks((20, 12), 3, torch.float32, seed=12)
    # weights scale each task vector before the merge.
    scaled = [t * float(v) for t, v in zip(tasks, w)]
    torch.testing.assert_close(F.cart(tasks, w, rank_ratio=0.25), F.cart(scaled, rank_ratio=0.25),
                               rtol=1e-5, atol=1e-6)
    # The key seeds the randomized SVD; a fixed seed is reproducible.
    assert torch.equal(F.cart(tasks, rank=3, power_iters=0, key="a"), F.cart(tasks, rank=3, power_iters=0, key="a"))


@pytest.mark.parametrize("shape,T", [((24, 18), 3), ((12, 30), 2)])
def test_tsv_m_equals_pymerge_merge_and_the_formula(shape, T):
    tasks, _ = make_tasks(shape, T, torch.float32, seed=13)
    got = F.tsv_m(tasks, alpha=0.7, key="proj.weight")
    assert torch.equal(got, one_key("tsv_m", tasks, "proj.weight", alpha=0.7, exclude_keys=()))
    exact = F.tsv_m(tasks, alpha=0.7, svd="exact")
    # float32 against the float64 formula, so within the formula's own float32 rounding: with a nearly tied cut
    # (s_d / s_(d+1) = 1.02 for one task here) that is up to ~1e-5 relative (entries up to ~4.4), in either SVD
    # orientation (the exact route decomposes a wide tau_t as tau_t^T; measured 1e-6..9e-6 over seeds, either way)
    torch.testing.assert_close(exact.double(), oracle_tsv_m(tasks, 0.7), rtol=1e-4, atol=1e-4)
    # Non-matrix tensors: alpha * the mean delta.
    vec, _ = make_tasks((7,), T, torch.float32)
    torch.testing.assert_close(F.tsv_m(vec, alpha=0.7), 0.7 * torch.stack(vec).mean(0), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "cart",
                                "tsv_m"])
def test_bad_task_tensors(fn):
    args = {"task_arithmetic": (), "cart": (), "tsv_m": ()}.get(fn, (0.5,))
    w = torch.ones(2)
    with pytest.raises(ValueError, match=r"task_tensors is empty \(T = 0\)"):
        getattr(F, fn)([], torch.ones(0), *args)
    with pytest.raises(ValueError, match=r"task_tensors\[1\] has shape \(3, 5\) but task_tensors\[0\] has \(4, 5\)"):
        getattr(F, fn)([torch.zeros(4, 5), torch.zeros(3, 5)], w, *args)
    with pytest.raises(ValueError, match="weights has 3 values for T = 2"):
        getattr(F, fn)([torch.zeros(4, 5), torch.zeros(4, 5)], torch.ones(3), *args)


def test_bad_parameters():
    tasks = [torch.randn(4, 5), torch.randn(4, 5)]
    w = torch.ones(2)
    with pytest.raises(ValueError, match="density must be >= 0"):
        F.ties(tasks, w, -0.1)
    with pytest.raises(ValueError, match="density must be > 0"):
        F.dare_linear(tasks, w, 0.0)
    with pytest.raises(ValueError, match="majority_sign_method"):
        F.ties(tasks, w, 0.5, "median")
    with pytest.raises(ValueError, match="weights must be finite"):
        F.task_arithmetic(tasks, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="weights must be a Tensor \\[T\\]"):
        F.task_arithmetic(tasks, torch.ones(2, 1))
    with pytest.raises(ValueError, match="low_rank_keys selects keys"):
        F.cart(tasks, low_rank_keys=["x"])
    with pytest.raises(ValueError, match="rank = 4 >= min"):
        F.cart(tasks, rank=4)
    with pytest.raises(ValueError, match=r"min\(m, n\) = 2 < T = 3"):
        F.tsv_m([torch.randn(2, 5) for _ in range(3)])
    with pytest.raises(ValueError, match="method must be 'magnitude' or 'random'"):
        F.prune(tasks[0], 0.5, "topk")
