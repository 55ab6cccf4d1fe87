"""The generative suite (pymerge.eval.lm_data, lm_experts, lm_harness, report) on a tiny Llama written here
(hidden 32, 2 layers, tied embeddings, a word-level tokenizer) and tiny synthetic JSONL domains: perplexity
against a float64 loop, domains from users' text-only files, the experts' cache (reuse, rebuild of corrupt entries,
resumption), the GGUF base dequantized once, the harness's scores (an expert against itself, the average of
identical experts, the base row), DivMerge's causal-LM path, users' own model directories and the reports."""
import csv
import json
import math
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pymerge.eval import lm_data as ld
from pymerge.eval import lm_experts as lx
from pymerge.eval import lm_harness as lh
from pymerge.eval import report, task_from_jsonl
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS_A = "alpha beta gamma delta epsilon".split()
WORDS_B = "red green blue cyan black".split()
SETTINGS = dict(max_length=12, steps=12, batch_size=4, learning_rate=1e-2)


def _config(vocab_size):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tied LlamaForCausalLM and a word-level tokenizer (bos <s>, eos </s>, pad <pad>), saved like a Hugging
    Face model."""
    root = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS_A + WORDS_B)}
    backend = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    LlamaForCausalLM(_config(len(vocab))).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture
def base(lm_dir):
    return lx.LMBase(lm_dir)


def _jsonl(path, words, n=40, seed=0, label=False):
    """Texts that cycle through `words` from a random start (3 to 9 words): a domain a tiny LM can learn."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            start, length = rng.randrange(len(words)), rng.randint(3, 9)
            obj = {"text": " ".join(words[(start + j) % len(words)] for j in range(length))}
            if label:
                obj["label"] = ["x", "y"][i % 2]
            f.write(json.dumps(obj) + "\n")
    return path


@pytest.fixture
def domains(tmp_path):
    return [ld.domain_from_jsonl("a", _jsonl(tmp_path / "a.jsonl", WORDS_A, seed=1)),
            ld.domain_from_jsonl("b", _jsonl(tmp_path / "b.jsonl", WORDS_B, seed=2))]


@pytest.fixture
def fine_tune_calls(monkeypatch):
    calls = []
    real = lx.fine_tune_lm

    def counting(domain, *args, **kwargs):
        calls.append(domain.name)
        return real(domain, *args, **kwargs)

    monkeypatch.setattr(lx, "fine_tune_lm", counting)
    return calls


def _build(domains, base, cache, **extra):
    return lx.build_lm_experts(domains, cache, base=base, progress=False, **{**SETTINGS, **extra})


# ------------------------------------------------------------------------------------------ perplexity
def _float64_nll(model_dir, state, sequences):
    """One sequence at a time, no padding, float64: the summed NLL of every token after the first."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lx.load_lm_state(model, state)
    model = model.double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += len(seq) - 1
    return total, count


def test_encode_adds_start_and_eos_and_truncates(base):
    tok = base.tokenizer
    a, b, c = ld.encode(tok, ["alpha beta", "red green blue cyan", ""], 5)
    ids = {w: tok.convert_tokens_to_ids(w) for w in WORDS_A + WORDS_B}
    assert a == [1, ids["alpha"], ids["beta"], 2]               # start, text, eos
    assert b == [1, ids["red"], ids["green"], ids["blue"], ids["cyan"]]   # truncated: no room for eos
    assert c == [1, 2]
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        ld.encode(tok, ["alpha"], 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_token_nll_matches_a_float64_loop(base, lm_dir, domains, threads):
    torch.set_num_threads(threads)   # the autouse one_thread fixture restores the count
    model = base.model()
    state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
             for k, v in base.state_dict().items()}
    lx.load_lm_state(model, state)
    seqs = ld.encode(base.tokenizer, domains[0].split("test") + domains[1].split("train", 5), 8)
    assert len({len(s) for s in seqs}) > 2  # padded batches
    nll, n = ld.token_nll(model, seqs, pad=ld.pad_id(base.tokenizer), batch_size=3)
    want, count = _float64_nll(lm_dir, state, seqs)
    assert n == count == sum(len(s) - 1 for s in seqs)
    assert nll == pytest.approx(want, rel=1e-5)
    ppl = ld.domain_perplexity(model, base.tokenizer, domains[0], "test", max_length=8, batch_size=2)
    want, count = _float64_nll(lm_dir, state, ld.encode(base.tokenizer, domains[0].split("test"), 8))
    assert ppl == pytest.approx(math.exp(want / count), rel=1e-5)


# --------------------------------------------------------------------------------------------- domains
def test_domain_from_a_text_only_jsonl(tmp_path):
    d = ld.domain_from_jsonl("mine", _jsonl(tmp_path / "m.jsonl", WORDS_A, n=30), seed=4)
    assert len(d.texts) == 30 and d.source == str(tmp_path / "m.jsonl")
    parts = [set(d.splits[s]) for s in ld.SPLITS]
    assert sum(map(len, parts)) == 30 and set().union(*parts) == set(range(30))
    assert d.split("test") == [d.texts[i] for i in d.splits["test"]] and len(d.split("train", 3)) == 3
    assert d.fingerprint() == ld.domain_from_jsonl("mine", tmp_path / "m.jsonl", seed=4).fingerprint()
    assert d.fingerprint() != ld.domain_from_jsonl("mine", tmp_path / "m.jsonl", seed=5).fingerprint()
    # a labelled file works too (labels ignored)
    labelled = ld.domain_from_jsonl("l", _jsonl(tmp_path / "l.jsonl", WORDS_A, n=30, label=True), seed=4)
    assert labelled.texts == d.texts and labelled.splits == d.splits


@pytest.mark.parametrize("lines, message", [
    ('{"text": "alpha"}\n{"label": 1}\n', ':2: expected an object with a "text" field'),
    ('{"text": "alpha"}\n{"text": "  "}\n', ':2: "text" must be a non-empty string'),
    ('{"text": "alpha"}\nnot json\n', ":2: not valid JSON"),
    ('\n\n', "has no texts"),
    ('{"text": "alpha"}\n{"text": "beta"}\n', "need at least 3"),
])
def test_domain_file_errors_name_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=message) as e:
        ld.domain_from_jsonl("bad", path)
    assert str(path) in str(e.value)


def test_a_task_keeps_its_classification_splits(tmp_path):
    task = task_from_jsonl("t", _jsonl(tmp_path / "t.jsonl", WORDS_B, n=30, label=True))
    d = ld.domain_from_task(task)
    assert d.texts == task.texts and d.splits == task.splits and d.split("test") == task.split("test")[0]


# --------------------------------------------------------------------------------------------- experts
def test_experts_learn_their_domain_and_are_reused(domains, base, tmp_path, fine_tune_calls):
    experts = _build(domains, base, tmp_path)
    assert fine_tune_calls == ["a", "b"] and all(e.built for e in experts.values())
    for d in domains:
        e = experts[d.name]
        m = e.manifest
        assert e.path.parent == tmp_path / "lm_experts" and (e.path / "config.json").is_file()
        assert m["perplexity"]["test"] < 0.5 * m["base_perplexity"]["test"]   # cyclic text: easy to learn
        assert m["history"][-1]["step"] == SETTINGS["steps"] and m["trained_tokens"] > 0
        assert m["wall_seconds"]["total"] >= m["wall_seconds"]["fine_tune"] > 0 and m["seconds_per_step"] > 0
        # the entry is a Hugging Face directory; the manifest's perplexities are the loaded model's
        loaded = AutoModelForCausalLM.from_pretrained(str(e.path), dtype=torch.float32).eval()
        for split in ("validation", "test"):
            got = ld.domain_perplexity(loaded, base.tokenizer, d, split, max_length=SETTINGS["max_length"])
            assert got == pytest.approx(m["perplexity"][split], rel=1e-5)
            assert ld.domain_perplexity(base.model(), base.tokenizer, d, split, max_length=SETTINGS["max_length"]) \
                == pytest.approx(m["base_perplexity"][split], rel=1e-5)
        assert set(e.state_dict()) == set(base.state_dict())   # tied lm_head stored once, as in the base
    again = _build(domains, base, tmp_path)
    assert fine_tune_calls == ["a", "b"] and not any(e.built for e in again.values())
    assert {n: e.manifest for n, e in again.items()} == {n: e.manifest for n, e in experts.items()}
    # another setting is another entry
    _build(domains[:1], base, tmp_path, steps=3)
    assert fine_tune_calls == ["a", "b", "a"] and len(list((tmp_path / "lm_experts").iterdir())) == 3


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])


def _bad_manifest(path):
    (path / "manifest.json").write_text("{not json")


def _other_request(path):
    m = json.loads((path / "manifest.json").read_text())
    m["request"]["settings"]["steps"] = 999
    (path / "manifest.json").write_text(json.dumps(m))


def _no_weights(path):
    (path / "model.safetensors").unlink()


@pytest.mark.parametrize("corrupt", [_truncate, _bad_manifest, _other_request, _no_weights])
def test_a_corrupt_entry_is_rebuilt(domains, base, tmp_path, fine_tune_calls, corrupt, caplog):
    first = _build(domains[:1], base, tmp_path)["a"]
    weights = {k: v.clone() for k, v in first.state_dict().items()}  # not views of the file corrupt() rewrites
    corrupt(first.path)
    with caplog.at_level("WARNING", logger="pymerge.eval"):
        rebuilt = _build(domains[:1], base, tmp_path)["a"]
    assert fine_tune_calls == ["a", "a"] and rebuilt.built and rebuilt.path == first.path
    assert "rebuilding the cache entry" in caplog.text
    state = rebuilt.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)   # deterministic for the seed
    assert [p.name for p in (tmp_path / "lm_experts").iterdir()] == [first.path.name]   # nothing left aside


def test_an_interrupted_run_resumes_with_the_next_domain(domains, base, tmp_path, monkeypatch):
    real, calls = lx.fine_tune_lm, []

    def interrupted(domain, *args, **kwargs):
        calls.append(domain.name)
        if domain.name == "b":
            raise KeyboardInterrupt
        return real(domain, *args, **kwargs)

    monkeypatch.setattr(lx, "fine_tune_lm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(domains, base, tmp_path)
    assert [p.name.split("-")[0] for p in (tmp_path / "lm_experts").iterdir()] == ["a"]
    monkeypatch.setattr(lx, "fine_tune_lm", lambda d, *a, **k: calls.append(d.name) or real(d, *a, **k))
    experts = _build(domains, base, tmp_path)
    assert calls == ["a", "b", "b"] and not experts["a"].built and experts["b"].built


def test_settings_are_checked(domains, base, tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        lx.LMFineTuneSettings(steps=0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        lx.LMFineTuneSettings(max_length=1)
    with pytest.raises(ValueError, match="unexpected keyword argument 'epochs'"):
        _build(domains, base, tmp_path, epochs=2)
    with pytest.raises(ValueError, match="domain names must be unique"):
        _build([domains[0], domains[0]], base, tmp_path)


# ------------------------------------------------------------------------------------------------ GGUF
def _write_tiny_gguf(path):
    """A tiny Llama as llama.cpp writes one (float32 tensors, q/k rows permuted, a byte-level BPE vocabulary);
    returns the model whose weights it holds."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spelling = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<s>", "</s>"] + [spelling[b] for b in range(256)] + ["Ġt", "Ġth"]
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                         rope_theta=10000.0, bos_token_id=1, eos_token_id=2))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(t, heads):  # llama.cpp's q/k row order (transformers reverses it on load)
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in model.state_dict().items():
        t = v.numpy().astype(np.float32)
        if k == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif k == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif k != "lm_head.weight":
            layer, part = k.split(".")[2], ".".join(k.split(".")[3:-1])
            t = permute(t, 4) if part == "self_attn.q_proj" else permute(t, 2) if part == "self_attn.k_proj" else t
            w.add_tensor(f"blk.{layer}.{parts[part]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_gguf_base_is_dequantized_once(tmp_path, monkeypatch):
    import transformers
    source = tmp_path / "pkg"
    source.mkdir()
    model = _write_tiny_gguf(source / "tiny.gguf")
    base = lx.dequantize_gguf(source / "tiny.gguf", tmp_path / "cache")
    assert base.path.parent == tmp_path / "cache" / "lm_base" and base.path.name.startswith("tiny-")
    want = model.state_dict()
    got = {k: v.clone() for k, v in base.state_dict().items()}
    assert set(got) == set(want) - {"lm_head.weight"}
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert base.tokenizer.eos_token_id == 2 and base.model().config.tie_word_embeddings
    assert base.fingerprint() == json.loads((base.path / "manifest.json").read_text())["weights_sha256"]

    def no_load(*a, **k):
        raise AssertionError("dequantized again although cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    assert lx.dequantize_gguf(source / "tiny.gguf", tmp_path / "cache").path == base.path
    monkeypatch.undo()
    _truncate(base.path)
    again = lx.dequantize_gguf(source / "tiny.gguf", tmp_path / "cache")
    assert again.path == base.path and all(torch.equal(again.state_dict()[k], got[k]) for k in got)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lx.dequantize_gguf(source / "missing.gguf", tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ harness
def _identical_suite(domains, base, expert):
    """Both domains measured with the same expert: the subset's experts are identical."""
    members = {d.name: lh.LMMember(d, expert.state_dict, SETTINGS["max_length"], "same") for d in domains}
    return lh.LMSuite(base, members)


def test_an_expert_scores_one_and_the_average_of_identical_experts_is_the_expert(domains, base, tmp_path):
    expert = _build(domains[:1], base, tmp_path)["a"]
    suite = _identical_suite(domains, base, expert)
    rows = lh.lm_variants(["weight_average"], with_variants=False)   # + task arithmetic, the gap's reference
    result = lh.run_lm_evaluation(suite, rows, (1, 2), test_limit=None, validation_limit=None)
    model = base.model(expert.state_dict())
    pretrained = base.model()
    ppl = {d.name: ld.domain_perplexity(model, base.tokenizer, d, max_length=SETTINGS["max_length"])
           for d in domains}
    base_ppl = {d.name: ld.domain_perplexity(pretrained, base.tokenizer, d, max_length=SETTINGS["max_length"])
                for d in domains}
    for r in result.rows:
        if r.variant == "base":
            assert r.rps == pytest.approx(sum(ppl[n] / base_ppl[n] for n in r.subset) / r.size, rel=1e-6)
            assert r.gain_kept == 0
        elif r.variant in ("expert", "weight_average"):   # the expert, the average of copies of the expert
            for n in r.subset:
                assert r.perplexity[n] == pytest.approx(ppl[n], rel=1e-5), (r.variant, n)
            assert r.rps == pytest.approx(1, abs=1e-5) and r.gain_kept == pytest.approx(1, abs=1e-4)
    assert {r.variant for r in result.rows} == {"expert", "base", "weight_average", "task_arithmetic"}
    assert result.experts["b"]["test_ppl"] == pytest.approx(ppl["b"], rel=1e-5)
    assert result.experts["a"]["base_test_ppl"] == pytest.approx(base_ppl["a"], rel=1e-5)


def test_scores_of_two_experts(domains, base, tmp_path):
    from pymerge import merge
    experts = _build(domains, base, tmp_path)
    suite = lh.lm_suite_from_experts(experts, domains, base)
    rows = lh.lm_variants(["weight_average", "task_arithmetic"], with_variants=False)
    result = lh.run_lm_evaluation(suite, rows, (2,), test_limit=5, validation_limit=4)
    by = {r.variant: r for r in result.rows}
    merged = base.model(merge("weight_average", base.state_dict(), [e.state_dict() for e in experts.values()]))
    for d in domains:
        want = ld.domain_perplexity(merged, base.tokenizer, d, limit=5, max_length=SETTINGS["max_length"])
        assert by["weight_average"].perplexity[d.name] == pytest.approx(want, rel=1e-5)
    w, ref = by["weight_average"], result.experts
    assert w.rps == pytest.approx(sum(ref[n]["test_ppl"] / w.perplexity[n] for n in "ab") / 2, rel=1e-9)
    gain = [(math.log(ref[n]["base_test_ppl"]) - math.log(w.perplexity[n]))
            / (math.log(ref[n]["base_test_ppl"]) - math.log(ref[n]["test_ppl"])) for n in "ab"]
    assert w.gain_kept == pytest.approx(sum(gain) / 2, rel=1e-9)
    ta = by["task_arithmetic"]
    assert ta.gap_closed == 0 and w.gap_closed == pytest.approx((w.rps - ta.rps) / (1 - ta.rps))
    # task arithmetic's λ was chosen on validation: a grid point, with its validation RPS recorded
    assert ta.params["lam"] in lh.DEFAULT_LM_GRIDS["task_arithmetic"]["lam"] and not math.isnan(ta.validation_rps)


def test_a_checkpointed_run_is_read_back_not_measured_again(domains, base, tmp_path, monkeypatch):
    import dataclasses
    suite = lh.lm_suite_from_experts(_build(domains, base, tmp_path), domains, base)
    rows = lh.lm_variants(["weight_average"], with_variants=False)
    path = tmp_path / "progress.jsonl"
    first = lh.run_lm_evaluation(suite, rows, (1, 2), test_limit=4, validation_limit=3, checkpoint=path)
    assert len(path.read_text().splitlines()) == 1 + 3          # the run's key, then the three subsets
    measured = []

    class Counted(lh._SubsetRun):
        def __init__(self, h, subset):
            measured.append(subset)
            super().__init__(h, subset)

    monkeypatch.setattr(lh, "_SubsetRun", Counted)
    again = lh.run_lm_evaluation(suite, rows, (1, 2), test_limit=4, validation_limit=3, checkpoint=path)
    assert measured == []
    assert [type(r) for r in again.rows] == [lh.LMRow] * len(first.rows)
    assert json.dumps([dataclasses.asdict(r) for r in again.rows]) == json.dumps(
        [dataclasses.asdict(r) for r in first.rows])
    lh.run_lm_evaluation(suite, rows, (1, 2), test_limit=3, validation_limit=3, checkpoint=path)
    assert len(measured) == 3                                     # other settings: measured anew


def test_divmerge_runs_the_causal_lm_path_with_cached_teachers(domains, base, tmp_path,
                                                               teacher_cache_dir):  # noqa: F811
    experts = _build(domains, base, tmp_path)
    suite = lh.lm_suite_from_experts(experts, domains, base)
    rows = [v for v in lh.lm_variants(["divmerge"], with_variants=False,
                                      learned={"divmerge": {"steps": 2, "max_new_tokens": 3, "top_k": 8}})
            if v.method == "divmerge"]
    result = lh.run_lm_evaluation(suite, rows, (2,), test_limit=4, validation_limit=3, unlabelled_per_domain=4,
                                  prompt_tokens=2)
    row = next(r for r in result.rows if r.variant == "divmerge")
    assert row.params["max_new_tokens"] == 3 and row.params["top_k"] == 8 and row.merge_seconds > 0
    assert all(math.isfinite(p) for p in row.perplexity.values())
    cached = list((teacher_cache_dir / "teachers").glob("causal-lm-*.safetensors"))
    assert len(cached) == 2   # one top-k teacher per expert, reused by any later DivMerge row


def test_variants_refuse_methods_that_do_not_merge_causal_lms():
    with pytest.raises(ValueError, match="adamerging does not merge causal LMs"):
        lh.lm_variants(["ties", "adamerging"])
    every = {v.method for v in lh.lm_variants(["all"], with_variants=False)}
    assert "divmerge" in every and "adamerging" not in every and "ties" in every
    divmerge = next(v for v in lh.lm_variants(["divmerge"], with_variants=False) if v.method == "divmerge")
    assert divmerge.params["steps"] == lh.DEFAULT_LM_LEARNED["divmerge"]["steps"]


def test_users_model_directories_give_the_experts_results(domains, base, tmp_path):
    experts = _build(domains, base, tmp_path)
    rows = lh.lm_variants(["weight_average"], with_variants=False)
    mine = lh.lm_suite_from_model_dirs(base, {n: e.path for n, e in experts.items()}, domains,
                                       max_length=SETTINGS["max_length"])
    ours = lh.lm_suite_from_experts(experts, domains, base)
    a = lh.run_lm_evaluation(mine, rows, (2,), test_limit=5, validation_limit=3)
    b = lh.run_lm_evaluation(ours, rows, (2,), test_limit=5, validation_limit=3)
    assert [(r.variant, r.perplexity) for r in a.rows] == [(r.variant, r.perplexity) for r in b.rows]
    other = tmp_path / "other"
    LlamaForCausalLM(_config(30)).save_pretrained(other)
    with pytest.raises(ValueError, match=f"model a={other}: key\\(s\\) .* another shape than in the base"):
        lh.lm_suite_from_model_dirs(base, {"a": other}, domains)
    with pytest.raises(ValueError, match="no domain named 'zz'"):
        lh.lm_suite_from_model_dirs(base, {"zz": experts["a"].path}, domains)


def test_reports(domains, base, tmp_path):
    experts = _build(domains, base, tmp_path)
    suite = lh.lm_suite_from_experts(experts, domains, base)
    result = lh.run_lm_evaluation(suite, lh.lm_variants(["weight_average"], with_variants=False), (1, 2),
                                  test_limit=5, validation_limit=3)
    paths = report.write_reports(result, tmp_path / "out", command="pymerge eval --suite generative")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["per_domain.png", "results.csv", "results.md",
                                                                    "rps_vs_domains.png"]
    lines = list(csv.DictReader(open(paths["csv"])))
    assert len(lines) == len(result.rows)
    for line, r in zip(lines, result.rows):
        assert float(line["rps"]) == pytest.approx(r.rps, abs=1e-6) and line["variant"] == r.variant
        assert all(float(line[f"ppl:{n}"]) == pytest.approx(p, abs=1e-6) for n, p in r.perplexity.items())
        assert all(line[f"ppl:{n}"] == "" for n in "ab" if n not in r.perplexity)
    md = paths["markdown"].read_text()
    assert "$ pymerge eval --suite generative" in md and "RPS = mean over domains of ppl(expert) / ppl(merged)" in md
    table = report.lm_console_table(result)
    w = next(line for line in table.splitlines() if line.startswith("weight_average"))
    two = [r for r in result.rows if r.variant == "weight_average" and r.size == 2][0]
    assert w.split()[-3] == f"{two.rps:.4f}"
