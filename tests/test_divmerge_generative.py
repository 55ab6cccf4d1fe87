"""DivMerge's generative path on a tiny Llama built here: greedy teacher generation, the x+ŷ batch structure,
the top-k teacher cache and its divergence against the dense one, the disk cache, and a few optimisation
steps of Γ that reduce the divergence."""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
# transformers is a test dependency (requirements-dev.txt): a missing one must fail, not skip.
from transformers import LlamaConfig, LlamaForCausalLM

import pymerge
from pymerge import ops, reference, teachers
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)

V = 97
EOS, PAD = 2, 0


def _config():
    # initializer_range 0.2 (not 0.02) so the random model's next-token distributions are not near uniform
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _finetune(base, seed, scale=0.3, keys=None):
    """θ_t = θ_0 + τ_t with a random τ_t (relative size `scale`) on the keys matching `keys` (all if None)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in base.state_dict().items():
        if v.is_floating_point() and (keys is None or any(s in k for s in keys)):
            v = v + scale * v.std().clamp(min=1e-2) * torch.randn(v.shape, generator=g)
        sd[k] = v
    m = LlamaForCausalLM(_config()).eval()
    m.load_state_dict(sd)
    return m


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g) for n in lengths]


# ----------------------------------------------------------------------------------------------------------
# generation and batch structure
# ----------------------------------------------------------------------------------------------------------

def test_greedy_loop_matches_transformers_generate(base):
    prompts = _prompts(1, [3, 5, 5, 4, 7, 3, 6])
    hf = teachers.greedy_generate(base, prompts, max_new_tokens=6, eos_token_id=None, batch_size=3,
                                  use_generate=True)
    loop = teachers.greedy_generate(base, prompts, max_new_tokens=6, eos_token_id=None, batch_size=3,
                                    use_generate=False)
    assert [r.tolist() for r in hf] == [r.tolist() for r in loop]
    assert all(r.numel() == 6 and r.dtype == torch.long for r in hf)


def test_generation_stops_after_eos(base):
    prompts = _prompts(2, [4, 4, 6])
    free = teachers.greedy_generate(base, prompts, max_new_tokens=8, eos_token_id=None, use_generate=False)
    eos = int(free[0][2])  # a token the model emits third for prompt 0: make it the eos
    for use_generate in (True, False):
        cut = teachers.greedy_generate(base, prompts, max_new_tokens=8, eos_token_id=eos,
                                       use_generate=use_generate)
        for f, c in zip(free, cut):
            hits = (f == eos).nonzero()
            n = int(hits[0, 0]) + 1 if hits.numel() else f.numel()
            assert c.tolist() == f[:n].tolist()  # eos included, nothing after it
        assert cut[0].tolist()[-1] == eos and cut[0].numel() <= 3
    # the model's own generation_config stop tokens do not leak in: eos_token_id=None never stops
    saved = base.generation_config.eos_token_id
    base.generation_config.eos_token_id = eos
    try:
        hf = teachers.greedy_generate(base, prompts, max_new_tokens=8, eos_token_id=None, use_generate=True)
    finally:
        base.generation_config.eos_token_id = saved
    assert [r.tolist() for r in hf] == [r.tolist() for r in free]


def test_batch_structure_and_dense_teacher_rows(base):
    teacher = _finetune(base, 11)
    prompts = _prompts(3, [3, 6, 4, 5])
    tg = teachers.generative_targets(teacher, prompts, max_new_tokens=5, eos_token_id=None, top_k=None,
                                     cache=False)
    assert len(tg) == 4 and not tg.is_topk
    for i, p in enumerate(prompts):
        assert tg.tokens[i, :p.numel()].tolist() == p.tolist()
    b = tg.select([2, 0, 3])
    assert b.input_ids.shape == b.attention_mask.shape == b.target_mask.shape
    # per row: the target positions are p-1 .. p+r-2 (they predict the ŷ tokens), padding is masked
    for row, i in enumerate([2, 0, 3]):
        p, r = int(tg.prompt_lengths[i]), int(tg.response_lengths[i])
        assert b.target_mask[row].nonzero().reshape(-1).tolist() == list(range(p - 1, p + r - 1))
        assert b.attention_mask[row].sum() == p + r
        assert b.input_ids[row, p:p + r].tolist() == tg.responses()[i].tolist()
        # the cached rows are the teacher's log-probs on x+ŷ alone (no padding, no batch)
        with torch.no_grad():
            alone = torch.log_softmax(teacher(input_ids=tg.tokens[i:i + 1, :p + r]).logits[0].float(), -1)
        o = int(tg.offsets[i])
        torch.testing.assert_close(tg.teacher_log_probs[o:o + r], alone[p - 1:p + r - 1], atol=1e-5, rtol=1e-5)
    # the loss: per-sequence mean over ŷ tokens of the token divergence, which is ~0 for the teacher itself
    with torch.no_grad():
        own = b.loss(teacher(**b.inputs), "js")
        tok = b.token_loss(base(**b.inputs), "kl")
        seq = b.loss(base(**b.inputs), "kl")
    assert own.shape == (3,) and own.abs().max() < 1e-6
    counts = b.target_mask.sum(1).tolist()
    manual = torch.stack([c.mean() for c in tok.split(counts)])
    torch.testing.assert_close(seq, manual)
    assert (seq > 1e-3).all()


def test_prompt_forms_agree(base):
    prompts = _prompts(4, [3, 5])
    padded = torch.full((2, 5), PAD)
    mask = torch.zeros(2, 5, dtype=torch.long)
    padded[0, 2:], mask[0, 2:] = prompts[0], 1  # left padded
    padded[1], mask[1] = prompts[1], 1
    a = teachers.generative_targets(base, prompts, max_new_tokens=3, top_k=8, cache=False)
    b = teachers.generative_targets(base, [{"input_ids": padded, "attention_mask": mask}], max_new_tokens=3,
                                    top_k=8, cache=False)
    c = teachers.generative_targets(base, [p.tolist() for p in prompts], max_new_tokens=3, top_k=8, cache=False)
    for x in (b, c):
        assert torch.equal(x.tokens, a.tokens) and torch.equal(x.top_indices, a.top_indices)
    with pytest.raises(ValueError, match="empty"):
        teachers.generative_targets(base, [[]], cache=False)
    with pytest.raises(ValueError, match="no prompts"):
        teachers.generative_targets(base, [], cache=False)
    with pytest.raises(ValueError, match="tokenizer"):
        teachers.generative_targets(base, ["hello"], cache=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        teachers.generative_targets(base, prompts, max_new_tokens=0, cache=False)


# ----------------------------------------------------------------------------------------------------------
# top-k divergence against the dense one
# ----------------------------------------------------------------------------------------------------------

def _dense(z, teacher_lp, kind, temperature=1.0):
    return reference.divergence(z, teacher_lp, None, reference.JS if kind == "js" else reference.KL, 0.5,
                                temperature, False)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 9), V_=st.integers(2, 300), kfrac=st.floats(0.0, 1.0), kind=st.sampled_from(["js", "kl"]),
       sharp=st.floats(0.5, 4.0), seed=st.integers(0, 2**16))
def test_topk_never_overestimates_and_stays_within_bound(N, V_, kfrac, kind, sharp, seed):
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(V_, int(round(kfrac * V_))))
    z = torch.randn(N, V_, generator=g, dtype=torch.float64) * 2
    tlp = torch.log_softmax(torch.randn(N, V_, generator=g, dtype=torch.float64) * sharp, -1)
    top, idx, tail = ops.topk_teacher(tlp, k)
    approx = ops.topk_divergence(z, top, idx, tail, divergence=kind)
    dense = _dense(z, tlp, kind)
    gap = dense - approx
    assert (gap >= -1e-12).all()  # coarsening never increases an f-divergence
    if k == V_:
        torch.testing.assert_close(approx, dense, atol=1e-12, rtol=1e-10)
    if kind == "js":
        bound = ops.topk_gap_bound(z, idx, tail, divergence="js")
        assert (gap <= bound + 1e-12).all()
        p_r, logq = tail.exp(), torch.log_softmax(z, -1)
        q_r = 1 - logq.gather(-1, idx).exp().sum(-1)
        assert (bound <= 0.5 * (p_r + q_r) * math.log(2) + 1e-12).all()
    else:
        # chain rule, exactly: KL(p||q) = KL(P||Q) + p_R KL(p(.|R) || q(.|R))
        logq = torch.log_softmax(z, -1)
        in_tail = torch.ones_like(z, dtype=torch.bool).scatter(-1, idx, False)
        lp_r = torch.where(in_tail, tlp - tail[:, None], -math.inf)
        lq_r = torch.where(in_tail, logq - torch.logsumexp(torch.where(in_tail, logq, -math.inf), -1, True),
                           -math.inf)
        cond = torch.where(in_tail, lp_r.exp() * (lp_r - lq_r), 0.0).sum(-1)
        torch.testing.assert_close(gap, tail.exp().nan_to_num(0.0) * cond, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_topk_gradient_is_the_exact_gradient_of_the_coarse_divergence(kind):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, 23, generator=g, dtype=torch.float64, requires_grad=True)
    tlp = torch.log_softmax(torch.randn(5, 23, generator=g, dtype=torch.float64) * 2, -1)
    top, idx, tail = ops.topk_teacher(tlp, 6)
    rows = torch.tensor([4, 0, 2, 2])  # repeated rows accumulate
    f = lambda z: ops.topk_divergence(z, top[rows], idx[rows], tail[rows], divergence=kind,  # noqa: E731
                                           rows=rows, chunk_rows=3, temperature=1.7)
    assert torch.autograd.gradcheck(f, (z,))
    # and k = V: the gradient is the dense divergence's gradient
    top, idx, tail = ops.topk_teacher(tlp, 23)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    ga, = torch.autograd.grad((ops.topk_divergence(z, top, idx, tail, divergence=kind) * w).sum(), z)
    gd, = torch.autograd.grad((_dense(z, tlp, kind) * w).sum(), z)
    torch.testing.assert_close(ga, gd, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_topk_low_precision_and_chunking(dtype, tol):
    g = torch.Generator().manual_seed(6)
    z64 = torch.randn(3, 4, 50, generator=g, dtype=torch.float64)
    tlp = torch.log_softmax(torch.randn(12, 50, generator=g, dtype=torch.float64) * 3, -1)
    top, idx, tail = ops.topk_teacher(tlp, 7)
    ref = ops.topk_divergence(z64, top, idx, tail)
    z = z64.to(dtype).requires_grad_()
    outs = [ops.topk_divergence(z, top.float(), idx, tail.float(), chunk_rows=c) for c in (1, 5, None)]
    for o in outs:
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=1e-6)
    gr, = torch.autograd.grad(outs[1].sum(), z)
    assert gr.dtype == dtype and gr.shape == z.shape and torch.isfinite(gr.float()).all()


def test_topk_bad_input():
    z = torch.randn(2, 10)
    top, idx, tail = ops.topk_teacher(torch.log_softmax(torch.randn(2, 10), -1), 3)
    with pytest.raises(ValueError, match="repeat"):
        ops.topk_divergence(z, top, torch.zeros_like(idx), tail)
    with pytest.raises(ValueError, match=r"\[M = 2, k\]"):
        ops.topk_divergence(z, top[:1], idx[:1], tail)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        ops.topk_divergence(torch.randn(2, 2), top, idx, tail)
    with pytest.raises(ValueError, match="divergence"):
        ops.topk_divergence(z, top, idx, tail, divergence="tv")
    with pytest.raises(ValueError, match="rows"):
        ops.topk_divergence(z, top, idx, tail, rows=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\[1, V"):
        ops.topk_teacher(torch.randn(2, 10), 11)


def test_topk_batch_loss_close_to_dense_batch_loss(base):
    """The same teacher cached dense and top-k: per-sequence losses agree within the documented bound."""
    teacher = _finetune(base, 12)
    prompts = _prompts(7, [4, 6, 3])
    dense = teachers.generative_targets(teacher, prompts, max_new_tokens=6, top_k=None, cache=False)
    topk = teachers.generative_targets(teacher, prompts, max_new_tokens=6, top_k=16, cache=False)
    full = teachers.generative_targets(teacher, prompts, max_new_tokens=6, top_k=V, cache=False)
    assert topk.is_topk and not full.is_topk and topk.top_indices.dtype == torch.int32
    assert torch.equal(dense.tokens, topk.tokens)
    bd, bk = dense.select(range(3)), topk.select(range(3))
    with torch.no_grad():
        logits = base(**bd.inputs).logits
        tok_d = bd.token_loss(logits, "js", backend="reference")
        tok_k = bk.token_loss(logits, "js")
        rows = bk.target_mask.reshape(-1).nonzero().reshape(-1)
        bound = ops.topk_gap_bound(logits, bk.top_indices, bk.tail_log_mass, rows=rows).float()
    gap = tok_d - tok_k
    assert (gap >= -1e-5).all() and (gap <= bound + 1e-5).all()
    assert (bk.tail_log_mass.exp() > 0).all()  # the tail really was dropped here


# ----------------------------------------------------------------------------------------------------------
# disk cache
# ----------------------------------------------------------------------------------------------------------

def test_disk_cache_reuse(base, tmp_path, monkeypatch):
    monkeypatch.setenv("PYMERGE_CACHE", str(tmp_path))
    teacher = _finetune(base, 13)
    prompts = _prompts(8, [3, 5, 4])
    first = teachers.generative_targets(teacher, prompts, max_new_tokens=4, top_k=8)
    assert not first.loaded_from_cache
    assert first.cache_path.parent == tmp_path / "teachers" and first.cache_path.exists()
    assert not [p for p in first.cache_path.parent.iterdir() if p.suffix == ".tmp"]

    calls = []
    real_forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    monkeypatch.setattr(teacher, "generate", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    again = teachers.generative_targets(teacher, prompts, max_new_tokens=4, top_k=8)
    assert again.loaded_from_cache and again.cache_path == first.cache_path and not calls
    for name, t in first._tensors().items():
        assert torch.equal(t, again._tensors()[name]), name
    monkeypatch.undo()

    # any change of settings, data or weights is a different entry
    monkeypatch.setenv("PYMERGE_CACHE", str(tmp_path))
    other = [teachers.generative_targets(teacher, prompts, max_new_tokens=5, top_k=8),
             teachers.generative_targets(teacher, prompts[:2], max_new_tokens=4, top_k=8),
             teachers.generative_targets(_finetune(base, 14), prompts, max_new_tokens=4, top_k=8)]
    assert all(not o.loaded_from_cache for o in other)
    assert len({first.cache_path, *(o.cache_path for o in other)}) == 4

    # a damaged file is recomputed (with a warning) and replaced
    first.cache_path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        fixed = teachers.generative_targets(teacher, prompts, max_new_tokens=4, top_k=8)
    assert not fixed.loaded_from_cache and torch.equal(fixed.tokens, first.tokens)
    assert teachers.generative_targets(teacher, prompts, max_new_tokens=4, top_k=8).loaded_from_cache


def test_cache_dir_and_fingerprints(base, tmp_path, monkeypatch):
    monkeypatch.delenv("PYMERGE_CACHE", raising=False)
    assert teachers.cache_dir() == teachers.cache_dir(os.path.expanduser("~/.cache/pymerge"))
    monkeypatch.setenv("PYMERGE_CACHE", str(tmp_path))
    assert teachers.cache_dir() == tmp_path
    fp = teachers.model_fingerprint(base)
    assert fp == teachers.model_fingerprint(base.state_dict())[:0] + fp  # deterministic, hex
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    same = teachers.model_fingerprint(sd)
    assert same == teachers.model_fingerprint({k: v.clone() for k, v in sd.items()})
    # one changed entry that is not among the sampled ones still changes the per-tensor checksum
    w = sd["model.layers.0.mlp.up_proj.weight"]
    w.view(-1)[1] += 0.5
    assert teachers.model_fingerprint(sd) != same
    assert teachers.data_fingerprint([torch.tensor([1, 2])]) != teachers.data_fingerprint([torch.tensor([1, 3])])
    assert teachers.data_fingerprint(["a", "b"]) != teachers.data_fingerprint(["ab"])


def test_fingerprint_of_a_tensor_beyond_float32_indices():
    """Sampled positions of a tensor above 2^24 entries (SmolLM2's 49152 x 576 embedding is 28.3M) stay in range,
    and the last entry is one of them."""
    t = torch.zeros(49152 * 576, dtype=torch.int8)
    fp = teachers.model_fingerprint({"w": t})
    t[-1] = 1
    t[-2] = -1   # the checksum alone would not see +1 - 1; the sampled last entry does
    assert teachers.model_fingerprint({"w": t}) != fp


# ----------------------------------------------------------------------------------------------------------
# end to end: DivMerge on causal LMs (teachers + pymerge.learn's optimiser) reduces the divergence
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k,divergence", [(16, "js")])  # dense + KL: the two-task test below
def test_one_task_recovers_gamma_one(base, top_k, divergence):
    """θ_1 = θ_0 + τ_1 and Γ started at 0.2: the steps drive Γ to ~1 and the divergence to ~0."""
    model = _finetune(base, 21, scale=0.6)
    res = pymerge.divmerge(base, [model], [_prompts(30, [3, 4, 5, 4])], kind="causal-lm", granularity="task",
                           divergence=divergence, init=0.2, lr=0.1, steps=20, max_new_tokens=5, top_k=top_k,
                           teacher_cache=False, progress=False)
    assert res.coefficients.shape == (1,)
    # Adam (default betas, as the paper) swings around the optimum: it passes through ~0 divergence and
    # ends near Γ = 1
    assert min(res.losses) < 0.01 * res.losses[0], res.losses
    assert abs(float(res.coefficients[0]) - 1.0) < 0.15, res.coefficients
    assert res.config["kind"] == "causal-lm" and res.config["top_k"] == top_k
    assert set(res.state_dict) == set(base.state_dict())


def test_two_tasks_layer_level_steps_reduce_the_divergence(base, tmp_path):
    models = {"a": _finetune(base, 21, scale=0.6), "b": _finetune(base, 22, scale=0.05)}
    data = {"a": _prompts(30, [3, 4, 5, 4]), "b": [{"input_ids": torch.stack(_prompts(31, [4, 4, 4]))}]}
    kw = dict(granularity="layer", divergence="kl", steps=6, lr=0.05, max_new_tokens=5, top_k=None,
              cache_dir=tmp_path, progress=False)
    res = pymerge.divmerge(base, models, data, **kw)   # kind="auto": LlamaForCausalLM is a causal LM
    assert res.config["kind"] == "causal-lm" and res.config["batch_size"] == 4 * 2   # the paper's 4 per task
    assert res.config["lr_schedule"] == "constant"                # a causal LM's default (classification: cosine)
    assert res.coefficients.shape == (len(res.groups), 2) and res.tasks == ["a", "b"]
    assert res.losses[-1] < 0.9 * res.losses[0], res.losses
    assert res.config["teacher_cache_hits"] == 0
    # the merged state dict is θ_0 + Σ_t Γ_t τ_t with the learned per-key Γ
    key = "model.layers.1.mlp.down_proj.weight"
    g = res.coefficients[res.groups.index(res.group_of[key])]
    expect = base.state_dict()[key] + sum(g[t] * (m.state_dict()[key] - base.state_dict()[key])
                                         for t, m in enumerate(models.values()))
    torch.testing.assert_close(res.state_dict[key], expect, atol=1e-6, rtol=1e-5)
    # rerun: every teacher comes from the disk cache, nothing is generated, same result
    for m in models.values():
        m.generate = lambda *a, **k: pytest.fail("regenerated despite the cache")
    again = pymerge.divmerge(base, models, data, **kw)
    assert again.config["teacher_cache_hits"] == 2
    torch.testing.assert_close(again.coefficients, res.coefficients)


def test_divmerge_causal_lm_bad_input(base):
    m = _finetune(base, 21)
    with pytest.raises(ValueError, match="no data"):
        pymerge.divmerge(base, {"a": m, "b": m}, {"a": _prompts(1, [3])}, kind="causal-lm", teacher_cache=False,
                         progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        pymerge.divmerge(base, {"a": m}, {"a": _prompts(1, [3]), "z": _prompts(1, [3])}, kind="causal-lm",
                         teacher_cache=False)
    with pytest.raises(ValueError, match="task 'a'.*no prompts"):
        pymerge.divmerge(base, {"a": m}, {"a": []}, kind="causal-lm", teacher_cache=False)
    with pytest.raises(ValueError, match="unknown option"):
        pymerge.divmerge(base, [m], [_prompts(1, [3])], kind="causal-lm", max_new_token=3)
    with pytest.raises(ValueError, match="max_new_tokens = 0"):
        pymerge.divmerge(base, [m], [_prompts(1, [3])], kind="causal-lm", max_new_tokens=0)
    with pytest.raises(ValueError, match="divergence"):
        pymerge.divmerge(base, [m], [_prompts(1, [3])], kind="causal-lm", divergence="tv")


def test_classification_targets_cached(tmp_path):
    """The classification teacher: log-probs per example as pymerge.learn computes them, from the cache
    on a rerun."""
    from pymerge import learn
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    examples = learn.collect_examples([torch.randn(5, 6), torch.randn(4, 6)])
    got = teachers.classification_targets(model, examples, temperature=2.0, batch_size=4, cache_dir=tmp_path)
    with torch.no_grad():
        expect = torch.log_softmax(model(torch.stack(examples)) / 2.0, -1)
    torch.testing.assert_close(torch.stack(got), expect)
    model.forward = lambda *a: pytest.fail("recomputed despite the cache")
    again = teachers.classification_targets(model, examples, temperature=2.0, cache_dir=tmp_path)
    torch.testing.assert_close(torch.stack(again), expect)
    # dict targets of varying shapes round-trip through the generic cache
    ragged = [{"a": torch.arange(n), "b": torch.ones(2)} for n in (1, 3)]
    first = teachers.cached_targets(model, examples, lambda: ragged, kind="t", cache_dir=tmp_path, cache_key="x")
    second = teachers.cached_targets(model, examples, lambda: pytest.fail("miss"), kind="t", cache_dir=tmp_path,
                                     cache_key="x")
    assert len(first) == 2 and first[1]["a"] is ragged[1]["a"]
    for a, b in zip(ragged, second):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
