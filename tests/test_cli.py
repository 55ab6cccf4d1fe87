"""`pymerge` command line: methods listing, divmerge end to end on tiny Hugging Face directories written here
(classification with per-task heads, causal LM, the teacher cache), adamerging (classification), atomic
output, and clear errors for bad inputs."""
import json
import subprocess
import sys

import pytest
import torch

import pymerge
from pymerge import cli
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,  # noqa: E402
                          BertForSequenceClassification, BertModel, BertTokenizer, LlamaConfig, LlamaForCausalLM)

WORDS = "the a movie film good bad great plot story was is and not very boring fun".split()
TEXTS = ["the movie was good", "a very boring plot", "the story is fun and great", "not a good film",
         "bad plot", "the film was very fun"]


def _vocab():
    return {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}


def _perturbed(module, seed, scale=0.2, skip=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in module.named_parameters():
            if not any(s in k for s in skip):
                p.add_(scale * p.std().clamp(min=1e-2) * torch.randn(p.shape, generator=g))
    return module


def _jsonl(path, texts, label=True):
    path.write_text("".join(json.dumps({"text": t, **({"label": i % 2} if label else {})}) + "\n"
                            for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """base = BertModel (no head); a, b = sequence classifiers with 2 and 3 labels, body = base + delta."""
    root = tmp_path_factory.mktemp("bert")
    tok = BertTokenizer(vocab=_vocab())
    cfg = dict(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = BertModel(BertConfig(**cfg))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name, labels, seed in (("a", 2, 1), ("b", 3, 2)):
        m = BertForSequenceClassification(BertConfig(**cfg, num_labels=labels))
        m.bert.load_state_dict(base.state_dict())
        _perturbed(m.bert, seed)
        m.save_pretrained(root / name)
    _jsonl(root / "a.jsonl", TEXTS)
    _jsonl(root / "b.jsonl", TEXTS[::-1], label=False)
    return root


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    tok = BertTokenizer(vocab=_vocab())  # any tokenizer AutoTokenizer can load serves the CLI
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=0,
                      initializer_range=0.2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name, seed in (("x", 3), ("y", 4)):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        _perturbed(m, seed, scale=0.3)
        m.save_pretrained(root / name)
    _jsonl(root / "x.jsonl", TEXTS[:3])
    _jsonl(root / "y.jsonl", TEXTS[3:])
    return root


def _two_task_argv(command, root, out, *extra):
    """`pymerge COMMAND` on the two BERT classifiers a, b of bert_dirs."""
    return [command, "--base", root / "base", "--model", f"a={root / 'a'}", "--model", f"b={root / 'b'}",
            "--data", f"a={root / 'a.jsonl'}", "--data", f"b={root / 'b.jsonl'}", "--out", out, *extra]


def _check_per_task_merge(root, out, gamma, key):
    """OUT/a and OUT/b: each its own head and the merged body θ_0 + Σ_t Γ_t τ_t at `key`."""
    base = BertModel.from_pretrained(root / "base").state_dict()
    fine = {n: AutoModelForSequenceClassification.from_pretrained(root / n).state_dict() for n in "ab"}
    b0 = base[key[len("bert."):]].double()
    expect = b0 + sum(gamma[t] * (fine[m][key].double() - b0) for t, m in enumerate("ab"))
    for n in "ab":
        got = AutoModelForSequenceClassification.from_pretrained(out / n).state_dict()
        assert torch.equal(got["classifier.weight"], fine[n]["classifier.weight"])
        torch.testing.assert_close(got[key].double(), expect, atol=1e-6, rtol=1e-5)


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_the_registry(capsys):
    from pymerge import methods
    code, out, _ = _run(["methods"], capsys)
    assert code == 0
    for name in methods.available("all"):   # static and learned, each with its parameters
        assert methods.get(name).describe() in out
    assert "pymerge divmerge --help" in out and "pymerge adamerging --help" in out


@pytest.mark.parametrize("module", ["pymerge", "pymerge.cli"])
def test_python_dash_m_runs_the_cli(module, capsys):
    """`python -m pymerge` and `python -m pymerge.cli` are the `pymerge` command: the same listing."""
    _, expected, _ = _run(["methods"], capsys)
    r = subprocess.run([sys.executable, "-m", module, "methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected


def test_python_dash_m_usage_error_is_one_line_exit_2(tmp_path):
    """A bad input through the real entry point: exit status 2, one `pymerge ...: error:` line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "pymerge", "divmerge", "--base", str(tmp_path / "nobase"),
                        "--model", f"a={tmp_path}", "--data", f"a={tmp_path / 'a.jsonl'}", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"pymerge divmerge: error: --base {tmp_path / 'nobase'}: not a directory\n"


def test_divmerge_classification_per_task_heads(bert_dirs, tmp_path, capsys, teacher_cache_dir):
    out = tmp_path / "merged"
    code, stdout, err = _run(_two_task_argv("divmerge", bert_dirs, out, "--granularity", "task", "--steps", "3",
                                            "--lr", "0.05", "--quiet"), capsys)
    assert code == 0, err
    assert "classification" in stdout and str(out) in stdout
    summary = json.loads((out / "divmerge.json").read_text())
    assert summary["tasks"] == ["a", "b"] and len(summary["losses"]) == 3
    assert summary["config"]["task_specific_keys"] == r"^(?:classifier\.bias|classifier\.weight)$"
    gamma = torch.tensor([summary["coefficients"]["a"], summary["coefficients"]["b"]], dtype=torch.float64)
    assert not torch.allclose(gamma, torch.full((2,), 0.5, dtype=torch.float64))  # it moved
    # each task: merged body θ_0 + Σ Γ_t τ_t, its own head
    _check_per_task_merge(bert_dirs, out, gamma, "bert.encoder.layer.1.attention.self.query.weight")
    assert AutoModelForSequenceClassification.from_pretrained(out / "b").config.num_labels == 3
    assert (out / "a" / "tokenizer_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert summary["config"]["kind"] == "classification" and summary["config"]["teacher_cache_hits"] == 0
    assert len(list((teacher_cache_dir / "teachers").glob("*.safetensors"))) == 2


def test_divmerge_classification_rerun_reads_the_teacher_cache(bert_dirs, tmp_path, capsys, teacher_cache_dir):
    argv = ["divmerge", "--base", bert_dirs / "base", "--model", f"a={bert_dirs / 'a'}", "--data",
            f"a={bert_dirs / 'a.jsonl'}", "--granularity", "task", "--steps", "2", "--quiet"]
    summaries = []
    for name, extra in (("first", []), ("again", []), ("off", ["--no-cache"])):
        code, _, err = _run(argv + ["--out", tmp_path / name] + extra, capsys)
        assert code == 0, err
        summaries.append(json.loads((tmp_path / name / "divmerge.json").read_text()))
    assert [s["config"]["teacher_cache_hits"] for s in summaries] == [0, 1, 0]
    assert summaries[0]["coefficients"] == summaries[1]["coefficients"] == summaries[2]["coefficients"]
    assert len(list((teacher_cache_dir / "teachers").glob("*.safetensors"))) == 1


def test_divmerge_causal_lm_and_teacher_cache(llama_dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["divmerge", "--base", llama_dirs / "base", "--model", f"x={llama_dirs / 'x'}",
            "--model", f"y={llama_dirs / 'y'}", "--data", f"x={llama_dirs / 'x.jsonl'}",
            "--data", f"y={llama_dirs / 'y.jsonl'}", "--out", out, "--granularity", "task", "--divergence", "kl",
            "--steps", "2", "--max-new-tokens", "3", "--top-k", "8", "--cache-dir", tmp_path / "cache", "--quiet"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "causal-lm" in stdout
    summary = json.loads((out / "divmerge.json").read_text())
    assert summary["config"]["kind"] == "causal-lm" and summary["config"]["teacher_cache_hits"] == 0
    assert summary["config"]["top_k"] == 8
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(llama_dirs / "base").state_dict()
    fine = [AutoModelForCausalLM.from_pretrained(llama_dirs / n).state_dict() for n in "xy"]
    gamma = [summary["coefficients"][n] for n in "xy"]
    key = "model.layers.0.mlp.up_proj.weight"
    expect = base[key].double() + sum(g * (f[key].double() - base[key].double()) for g, f in zip(gamma, fine))
    torch.testing.assert_close(merged[key].double(), expect, atol=1e-6, rtol=1e-5)
    assert len(list((tmp_path / "cache" / "teachers").glob("*.safetensors"))) == 2
    # rerun into the same place: refused without --overwrite; with it, both teachers come from the cache
    code, _, err = _run(argv, capsys)
    assert code == 2 and "already exists" in err
    code, _, err = _run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    again = json.loads((out / "divmerge.json").read_text())
    assert again["config"]["teacher_cache_hits"] == 2
    assert again["coefficients"] == summary["coefficients"]


def test_adamerging_classification_per_task_heads(bert_dirs, tmp_path, capsys, teacher_cache_dir):
    out = tmp_path / "merged"
    code, stdout, err = _run(_two_task_argv("adamerging", bert_dirs, out, "--granularity", "task", "--steps", "4",
                                            "--lr", "0.05", "--quiet"), capsys)
    assert code == 0, err
    assert stdout.startswith("pymerge adamerging: classification, 2 tasks") and str(out) in stdout
    summary = json.loads((out / "adamerging.json").read_text())
    assert summary["method"] == "adamerging" and summary["tasks"] == ["a", "b"] and len(summary["losses"]) == 4
    cfg = summary["config"]
    assert cfg["lr"] == 0.05 and cfg["batch_size"] == 32 and cfg["clamp"] == "(0.0, 1.0)"  # 16 per task
    assert cfg["task_specific_keys"] == r"^(?:classifier\.bias|classifier\.weight)$"
    gamma = torch.tensor([summary["coefficients"]["a"], summary["coefficients"]["b"]], dtype=torch.float64)
    assert ((gamma >= 0) & (gamma <= 1)).all() and not torch.allclose(gamma, torch.full((2,), 0.3, dtype=gamma.dtype))
    _check_per_task_merge(bert_dirs, out, gamma, "bert.encoder.layer.0.output.dense.weight")
    assert not (teacher_cache_dir / "teachers").exists()  # no teacher: nothing cached
    # --epochs instead of the official 500 steps (6 examples, 16 per task per step: 1 step per epoch), no clamp
    code, _, err = _run(["adamerging", "--base", bert_dirs / "base", "--model", f"a={bert_dirs / 'a'}",
                         "--data", f"a={bert_dirs / 'a.jsonl'}", "--out", tmp_path / "free", "--epochs", "2",
                         "--no-clamp", "--init", "0.5", "--quiet"], capsys)
    assert code == 0, err
    free = json.loads((tmp_path / "free" / "adamerging.json").read_text())
    assert len(free["losses"]) == 2 and free["config"]["clamp"] == "None" and free["config"]["init"] == 0.5


def test_generated_flags_reach_the_method(bert_dirs, tmp_path, capsys):
    """Flags the command line did not have before its flags came from the Params: --init-from (Γ from 0 on a
    static merge: with 0 steps the body is task arithmetic's) and --no-batch-tasks, --seed, --beta."""
    out = tmp_path / "merged"
    code, _, err = _run(_two_task_argv("adamerging", bert_dirs, out, "--init-from", "task_arithmetic", "--steps", "0",
                                       "--granularity", "task", "--no-batch-tasks", "--seed", "3", "--quiet"), capsys)
    assert code == 0, err
    summary = json.loads((out / "adamerging.json").read_text())
    assert summary["coefficients"] == {"a": 0.0, "b": 0.0}
    assert summary["config"]["init_from"] == "task_arithmetic" and summary["config"]["seed"] == 3
    key = "bert.encoder.layer.0.attention.output.dense.weight"
    base = BertModel.from_pretrained(bert_dirs / "base").state_dict()[key[len("bert."):]]
    fine = [AutoModelForSequenceClassification.from_pretrained(bert_dirs / n).state_dict()[key] for n in "ab"]
    static = pymerge.merge("task_arithmetic", {key: base}, [{key: f} for f in fine])[key]   # lam = 0.3
    torch.testing.assert_close(static, base + 0.3 * (fine[0] - base + fine[1] - base))
    for n in "ab":
        got = AutoModelForSequenceClassification.from_pretrained(out / n).state_dict()[key]
        torch.testing.assert_close(got, static, atol=1e-6, rtol=1e-5)
    code, _, err = _run(_two_task_argv("divmerge", bert_dirs, tmp_path / "beta", "--beta", "0.25", "--steps", "1",
                                       "--granularity", "task", "--quiet"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "beta" / "divmerge.json").read_text())["config"]["beta"] == 0.25


def test_adamerging_errors(bert_dirs, llama_dirs, tmp_path, capsys):
    code, _, err = _run(["adamerging", "--base", llama_dirs / "base", "--model", f"x={llama_dirs / 'x'}",
                         "--data", f"x={llama_dirs / 'x.jsonl'}", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("pymerge adamerging: error: ") and "causal LMs" in err
    code, _, err = _run(["adamerging", "--base", bert_dirs / "base", "--model", f"a={bert_dirs / 'a'}",
                         "--out", tmp_path / "out"], capsys)
    assert code == 2 and r"['a'] have --model but no --data" in err
    # a ValueError of the method (here: a batch smaller than the number of tasks) is a usage error too
    code, _, err = _run(_two_task_argv("adamerging", bert_dirs, tmp_path / "out", "--steps", "1", "--batch-size", "1",
                                       "--quiet"), capsys)
    assert code == 2 and "batch_size = 1 is smaller than the number of tasks T = 2" in err
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_output(bert_dirs, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(cli.json, "dump", boom)
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(["divmerge", "--base", str(bert_dirs / "base"), "--model", f"a={bert_dirs / 'a'}",
                  "--data", f"a={bert_dirs / 'a.jsonl'}", "--out", str(out), "--steps", "0", "--quiet"])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def files(tmp_path, bert_dirs):
    good = _jsonl(tmp_path / "good.jsonl", TEXTS[:2])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "fine"}\n{"label": 1}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
    return dict(good=good, empty=empty, bad=bad, notext=notext, latin1=latin1, missing=tmp_path / "nope.jsonl",
                base=bert_dirs / "base", a=bert_dirs / "a", out=tmp_path / "out")


@pytest.mark.parametrize("case,extra,message", [
    ("missing", [], "does not exist"),
    ("empty", [], "is empty"),
    ("bad", [], r"bad.jsonl:3: not valid JSON"),
    ("notext", [], r"notext.jsonl:2: expected an object with a \"text\" field"),
    ("latin1", [], r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 14 of the line\)"),
    ("good", ["--data", "zzz=FILE"], r"\['zzz'\] have --data but no --model"),
    ("good", ["--model", "zzz=DIR"], r"\['zzz'\] have --model but no --data"),
    ("good", ["--model", "oops"], "expected NAME=PATH"),
    ("good", ["--data", "a=x"], "given twice"),
])
def test_divmerge_input_errors(files, capsys, case, extra, message):
    extra = [e.replace("FILE", str(files["good"])).replace("DIR", str(files["a"])) for e in extra]
    code, _, err = _run(["divmerge", "--base", files["base"], "--model", f"a={files['a']}",
                         "--data", f"a={files[case]}", "--out", files["out"], *extra], capsys)
    assert code == 2
    assert err.startswith("pymerge divmerge: error: ")
    import re
    assert re.search(message, err), err
    assert not files["out"].exists()


def test_divmerge_model_dir_errors(files, tmp_path, capsys):
    code, _, err = _run(["divmerge", "--base", tmp_path, "--model", f"a={files['a']}", "--data",
                         f"a={files['good']}", "--out", files["out"]], capsys)
    assert code == 2 and "no config.json" in err
    code, _, err = _run(["divmerge", "--base", files["base"], "--model", f"a={tmp_path / 'nodir'}", "--data",
                         f"a={files['good']}", "--out", files["out"]], capsys)
    assert code == 2 and "not a directory" in err
    code, _, err = _run(["divmerge", "--base", files["base"], "--data", f"a={files['good']}", "--out",
                         files["out"]], capsys)
    assert code == 2 and "at least one fine-tuned model" in err


def test_jsonl_utf8_bom_is_accepted(tmp_path):
    """A UTF-8 byte order mark (as some editors write) starts the file: it is no part of the first text."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(tmp_path / "plain.jsonl", TEXTS[:3]).read_bytes())
    assert cli.read_jsonl_texts(path) == TEXTS[:3]
    path.write_bytes(b'{"text": "x"}\n\xef\xbb\xbf{"text": "y"}\n')  # a BOM anywhere else is not one
    with pytest.raises(cli.CLIError, match=r"bom.jsonl:2: not valid JSON"):
        cli.read_jsonl_texts(path)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model: its input checks come first."""
    def load(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(cli.learned, "_load", load)


def _divmerge_a(files, *extra):
    return ["divmerge", "--base", files["base"], "--model", f"a={files['a']}", "--data", f"a={files['good']}",
            "--out", files["out"], *extra]


@pytest.mark.parametrize("where", ["under_a_file", "deep_under_a_file", "proc"])
def test_unwritable_out_is_refused_before_loading(files, tmp_path, capsys, no_loading, where):
    (tmp_path / "afile").write_text("x")
    # paths no process can create a directory in, root included (tests may run as root, where modes do not bind)
    out = {"under_a_file": tmp_path / "afile" / "out", "deep_under_a_file": tmp_path / "afile" / "sub" / "out",
           "proc": "/proc/pymerge-test-out"}[where]
    code, _, err = _run(["divmerge", "--base", files["base"], "--model", f"a={files['a']}", "--data",
                         f"a={files['good']}", "--out", out, "--steps", "0"], capsys)
    assert code == 2, err
    assert err.startswith(f"pymerge divmerge: error: --out {out}: ") and err.count("\n") == 1
    reason = "is not a directory" if where != "proc" else "cannot create a directory in /proc"
    assert reason in err
    assert (tmp_path / "afile").read_text() == "x"


def test_unwritable_cache_dir_is_refused_before_loading(files, tmp_path, capsys, no_loading):
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(_divmerge_a(files, "--cache-dir", tmp_path / "afile" / "cache"), capsys)
    assert code == 2 and f"--cache-dir {tmp_path / 'afile' / 'cache'}: " in err and "not a directory" in err
    code, _, err = _run(_divmerge_a(files, "--cache-dir", tmp_path / "afile" / "cache", "--no-cache",
                                    "--device", "nope"), capsys)
    assert code == 2 and "--cache-dir" not in err  # --no-cache: the cache directory is never used


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: CUDA is not available"),
    ("cuda:0", "--device cuda:0: CUDA is not available"),
    ("auto-ish", "--device 'auto-ish': expected cpu, cuda, cuda:N or auto"),
    ("meta", "--device 'meta': expected cpu, cuda, cuda:N or auto"),
])
def test_unavailable_device_is_refused_before_loading(files, capsys, monkeypatch, no_loading, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    for command in ("divmerge", "adamerging"):
        code, _, err = _run([command, *_divmerge_a(files, "--device", device)[1:]], capsys)
        assert code == 2 and err.startswith(f"pymerge {command}: error: {message}") and err.count("\n") == 1, err
    assert not files["out"].exists()


def _config_dir(path, architectures, model_type):
    """A model directory holding only config.json: the kind checks read nothing else."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": architectures, "model_type": model_type}))
    return path


def test_kind_mismatch_is_refused_before_loading(bert_dirs, llama_dirs, tmp_path, capsys, no_loading):
    def divmerge(models, *extra, base=bert_dirs / "base"):
        argv = ["divmerge", "--base", base, "--out", tmp_path / "out", *extra]
        for name, path in models.items():
            argv += ["--model", f"{name}={path}", "--data", f"{name}={bert_dirs / 'a.jsonl'}"]
        return _run(argv, capsys)

    a, b, x = bert_dirs / "a", bert_dirs / "b", llama_dirs / "x"
    # BERT classifiers as causal LMs: the LM head would be random and the classifiers dropped
    code, _, err = divmerge({"a": a, "b": b}, "--kind", "causal-lm", base=llama_dirs / "base")
    assert code == 2 and err.count("\n") == 1, err
    assert (f"--model a={a}: config.json architectures ['BertForSequenceClassification'] make it a classification "
            f"model, not causal-lm (--kind causal-lm)") in err
    code, _, err = divmerge({"x": x}, "--kind", "classification", base=llama_dirs / "base")
    assert code == 2 and f"--model x={x}: " in err and "make it a causal-lm model, not classification" in err
    # auto: the first model decides, the others must agree
    code, _, err = divmerge({"a": a, "x": x}, base=llama_dirs / "base")
    assert code == 2 and f"--model x={x}: " in err and "not classification (--kind auto: classification from " \
                                                          f"--model a={a})" in err
    # a causal-LM merge needs a base with an LM head (BertModel has none)
    code, _, err = divmerge({"x": x}, "--kind", "causal-lm")
    assert code == 2 and f"--base {bert_dirs / 'base'}: config.json architectures ['BertModel'] " in err
    assert "hold no causal-lm head (BertLMHeadModel for model_type 'bert'; --kind causal-lm)" in err
    # a fine-tuned model without the kind's head (a masked LM): its head would be initialised at random
    mlm = _config_dir(tmp_path / "mlm", ["BertForMaskedLM"], "bert")
    code, _, err = divmerge({"m": mlm}, "--kind", "classification")
    assert code == 2 and f"--model m={mlm}: config.json architectures ['BertForMaskedLM'] hold no " \
                         "classification head (BertForSequenceClassification for model_type 'bert'; --kind " \
                         "classification)" in err
    code, _, err = _run(["adamerging", "--base", bert_dirs / "base", "--model", f"a={a}", "--model", f"m={mlm}",
                         "--data", f"a={bert_dirs / 'a.jsonl'}", "--data", f"m={bert_dirs / 'a.jsonl'}",
                         "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"--model m={mlm}: " in err and "hold no classification head" in err
    assert not (tmp_path / "out").exists()


def test_bad_regex_and_sizes_are_refused_before_loading(files, capsys, no_loading):
    for extra, message in ((["--task-specific-keys", "classifier("], "--task-specific-keys 'classifier(': not a "
                                                                      "valid regular expression"),
                           (["--layer-groups", "[a"], "--layer-groups '[a': not a valid regular expression"),
                           (["--max-length", "0"], "--max-length 0: must be an int >= 1"),
                           (["--batch-size", "0"], "--batch-size 0: must be an int >= 1"),
                           (["--epochs", "0"], "--epochs 0: must be an int >= 1"),
                           (["--max-new-tokens", "0"], "--max-new-tokens 0: must be an int >= 1"),
                           (["--top-k", "-1"], "--top-k -1: must be an int >= 0"),
                           (["--lr", "0"], "--lr 0.0: must be a positive finite number"),
                           (["--temperature", "nan"], "--temperature nan: must be a positive finite number")):
        code, _, err = _run(_divmerge_a(files, *extra), capsys)
        assert code == 2 and err.startswith(f"pymerge divmerge: error: {message}"), err
