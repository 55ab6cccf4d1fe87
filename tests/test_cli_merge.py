"""`pymerge merge` end to end on tiny Hugging Face models written here (Llama with tied embeddings, saved whole
and sharded, also as .bin; Bert with per-task heads): transformers loads the output and its logits equal those of
pymerge.merge on the same state dicts in memory; mergekit configs run unchanged and give mergekit's result; every
bad input is exit status 2 with a message naming it, no output, no debris, inputs untouched; SIGTERM mid-merge
leaves nothing; a merge holds no more than the key group in flight."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pymerge
import pymerge.io as pio
from pymerge import cli
from pymerge.io import open_model
from pymerge.peers import mergekit
from test_divmerge import one_thread  # noqa: F401 (autouse: 1 thread)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, BertConfig, BertForSequenceClassification,  # noqa: E402
                          BertTokenizer, LlamaConfig, LlamaForCausalLM)

transformers.utils.logging.set_verbosity_error()
T = 3
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])




def tree_hash(root):
    """{relative path: sha256} of every file under root (what must not change)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """base (one model.safetensors) and m1..m3 (sharded at 20KB): a tied-embedding Llama and fine-tunes."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    (root / "base" / "chat_template.jinja").write_text("{{ messages }}")
    for t in range(1, T + 1):
        m = LlamaForCausalLM(LlamaConfig(**LLAMA))
        m.load_state_dict(base.state_dict())
        _perturb(m, t).save_pretrained(root / f"m{t}", max_shard_size="20KB")
    assert (root / "m1" / "model.safetensors.index.json").exists()
    before = tree_hash(root)
    yield root
    assert tree_hash(root) == before             # no test ever modified an input


def model_sd(path):
    """The state dict of a saved model, read with the safetensors package (not pymerge.io)."""
    path = Path(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def in_memory(method, base_dir, model_dirs, **params):
    base = model_sd(base_dir)
    order = list(open_model(base_dir).keys())          # the command's key order (the same groups)
    base = OrderedDict((k, base[k]) for k in order)
    return pymerge.merge(method, base, [model_sd(d) for d in model_dirs], **params)


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def logits(path, dtype=None, state_dict=None):
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return model.eval()(IDS).logits


def models(root):
    return [root / f"m{t}" for t in range(1, T + 1)]


# ---------------------------------------------------------------------------------------------- round trips
def test_yaml_ties_round_trip_transformers_logits_equal(llama, tmp_path, capsys):
    config = tmp_path / "ties.yml"
    config.write_text(f"""
merge_method: ties
base_model: {llama / 'base'}
models:
  - model: {llama / 'base'}
  - model: {llama / 'm1'}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {llama / 'm2'}
    parameters: {{weight: 0.3, density: 0.4}}
  - model: {llama / 'm3'}
    parameters: {{weight: 1.0, density: 0.6}}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""")
    out = tmp_path / "out"
    code, stdout, err = run(["merge", config, out, "--quiet"], capsys)
    assert code == 0, err
    assert "pymerge merge: ties of 3 model(s)" in stdout and "peak RSS" in stdout and "read" in stdout
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                      "model.safetensors", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ref = in_memory("ties", llama / "base", models(llama), density=[0.5, 0.4, 0.6], weights=[0.7, 0.3, 1.0],
                    lam=1.0, out_dtype=torch.bfloat16)
    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref) and "lm_head.weight" not in got          # tied: written once
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]) for k in ref)
    ours = logits(out)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, logits(llama / "base", torch.bfloat16, ref))
    assert not torch.equal(ours, logits(llama / "base", torch.bfloat16))


@pytest.mark.parametrize("method,params", [
    ("weight_average", ["weights=1,2,3"]),
    ("task_arithmetic", ["lam=0.5"]),
    ("ties", ["density=0.5"]),
    ("dare_linear", ["p=0.3"]),
    ("dare_ties", ["p=0.3", "weights=[1, 0.5, 2]"]),
    ("tsv_m", []),
    ("iso_c", []),
    ("iso_cts", ["common_space_fraction=0.5"]),
    ("cart", ["rank_ratio=0.25"]),
])
def test_every_static_method_runs_from_flags(llama, tmp_path, capsys, method, params):
    assert set(pymerge.methods.available()) == {"weight_average", "task_arithmetic", "ties", "dare_linear",
                                                "dare_ties", "tsv_m", "iso_c", "iso_cts", "cart"}
    out = tmp_path / "out"
    argv = ["merge", "--method", method, "--base", llama / "base", *sum((["--model", m] for m in models(llama)), []),
            *sum((["--param", p] for p in params), []), "--out", out, "--max-shard-size", "10KB", "--seed", 7]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    kw = {p.split("=")[0]: json.loads(p.split("=")[1].join("[]") if "," in p and "[" not in p
                                      else p.split("=")[1]) for p in params}
    if any(p.name == "seed" for p in pymerge.methods.get(method).params):
        kw["seed"] = 7                                                   # --seed
    ref = in_memory(method, llama / "base", models(llama), **kw)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got = model_sd(out)
    assert set(got) == set(ref) == set(index["weight_map"])
    assert all(torch.equal(got[k], ref[k]) for k in ref), method
    assert torch.equal(logits(out), logits(llama / "base", None, ref))


def test_tied_bin_checkpoints_are_merged_and_written_once(llama, tmp_path, capsys):
    """.bin inputs hold the tied lm_head as a second name of the embedding storage: merged once, written once."""
    dirs = []
    for name in ("base", "m1", "m2"):
        model = AutoModelForCausalLM.from_pretrained(str(llama / name), local_files_only=True)
        d = tmp_path / name
        d.mkdir()
        sd = model.state_dict()
        assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
        torch.save(sd, d / "pytorch_model.bin")
        (d / "config.json").write_bytes((llama / name / "config.json").read_bytes())
        dirs.append(d)
    assert open_model(dirs[0]).aliases() == {"lm_head.weight": "model.embed_tokens.weight"}
    out = tmp_path / "out"
    code, _, err = run(["merge", "--method", "task_arithmetic", "--base", dirs[0], "--model", dirs[1],
                        "--model", dirs[2], "--out", out, "--quiet"], capsys)
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in got
    ref = in_memory("task_arithmetic", llama / "base", [llama / "m1", llama / "m2"])
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(logits(out), logits(llama / "base", None, ref))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Sequence classifiers (2 labels) sharing a body: a base and two fine-tunes with their own heads."""
    root = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "a b c d e f".split()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for t in (1, 2):
        m = BertForSequenceClassification(cfg)
        m.load_state_dict(base.state_dict())
        _perturb(m, 10 + t).save_pretrained(root / f"m{t}", max_shard_size="30KB")
    before = tree_hash(root)
    yield root
    assert tree_hash(root) == before


def test_bert_heads_exempted_keep_the_bases_and_tokenizer_is_copied(bert, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["merge", "--method", "ties", "--base", bert / "base", "--model", bert / "m1", "--model",
                        bert / "m2", "--task-specific-keys", r"^classifier\.", "--param", "density=0.5",
                        "--out", out, "--dtype", "float16"], capsys)
    assert code == 0, err
    assert set(os.listdir(bert / "base")) <= set(os.listdir(out))       # config, tokenizer files
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok("a b c")["input_ids"] == [2, 5, 6, 7, 3]
    base_sd, sds = model_sd(bert / "base"), [model_sd(bert / f"m{t}") for t in (1, 2)]
    body = [k for k in base_sd if not k.startswith("classifier.")]
    order = [k for k in open_model(bert / "base").keys() if k in body]
    ref = pymerge.merge("ties", OrderedDict((k, base_sd[k]) for k in order), [{k: sd[k] for k in body} for sd in sds],
                        density=0.5, out_dtype=torch.float16)
    ref.update({k: base_sd[k].half() for k in base_sd if k.startswith("classifier.")})
    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    ours = BertForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    theirs = BertForSequenceClassification.from_pretrained(str(bert / "base"), local_files_only=True,
                                                           dtype=torch.float16).eval()
    theirs.load_state_dict(ref, strict=False)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert ours.dtype == torch.float16


def test_overwrite_copy_from_and_tokenizer_source(llama, bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("old")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((llama / "m2" / "config.json").read_text())
    (other / "tokenizer_config.json").write_text('{"from": "other"}')
    code, _, err = run(["merge", "--method", "task_arithmetic", "--base", llama / "base", "--model", llama / "m1",
                        "--out", out, "--overwrite", "--copy-from", other, "--tokenizer-source", bert / "base",
                        "--quiet"], capsys)
    assert code == 0, err
    files = set(os.listdir(out))
    assert "stale" not in files and "model.safetensors" in files
    assert (out / "config.json").read_text() == (other / "config.json").read_text()
    assert (out / "tokenizer.json").read_bytes() == (bert / "base" / "tokenizer.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text()) == \
        json.loads((bert / "base" / "tokenizer_config.json").read_text())          # not the copy-from's
    assert "chat_template.jinja" not in files                                       # the base's tokenizer files: no
    assert not any("pymerge-" in p for p in os.listdir(tmp_path))


def test_linear_without_base_averages_every_listed_model(llama, tmp_path, capsys):
    config = tmp_path / "linear.yml"
    config.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in ((llama / "base", 1), (llama / "m1", 3))))
    out = tmp_path / "out"
    code, _, err = run(["merge", config, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    base, m1 = model_sd(llama / "base"), model_sd(llama / "m1")
    got = load_file(out / "model.safetensors")
    for k in base:
        assert torch.allclose(got[k], (base[k] + 3 * m1[k]) / 4, atol=1e-6, rtol=1e-6), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_cuda_matches_cpu(llama, tmp_path, capsys):
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        code, _, err = run(["merge", "--method", "ties", "--base", llama / "base",
                            *sum((["--model", m] for m in models(llama)), []), "--param", "density=0.5",
                            "--out", outs[device], "--device", device, "--quiet"], capsys)
        assert code == 0, err
    cpu, gpu = load_file(outs["cpu"] / "model.safetensors"), load_file(outs["cuda"] / "model.safetensors")
    assert set(cpu) == set(gpu)
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], rtol=1e-5, atol=1e-6), k


# --------------------------------------------------------------------------------------- mergekit's configs
@pytest.mark.parametrize("mk_method,model_params,global_params", [
    ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}], {}),               # lambda 1.0
    ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}], {"lambda": 0.4, "normalize": True}),
    ("ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 2.0, "density": 0.5}],
     {}),
    ("linear", [{"weight": 1.0}, {"weight": 3.0}, {"weight": 0.5}], {}),
    ("dare_linear", [{"weight": 0.6}, {"weight": 0.5}, {"weight": 0.8}], {"density": 1.0}),
    ("dare_ties", [{"weight": 0.6}, {"weight": 0.5}, {"weight": 0.8}], {"density": 1.0, "normalize": True}),
])
def test_mergekit_configs_run_unchanged_and_match_mergekit(llama, tmp_path, capsys, mk_method, model_params,
                                                           global_params):
    entries = "".join(f"  - model: {m}\n    parameters: {json.dumps(p)}\n"
                      for m, p in zip(models(llama), model_params))
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: {mk_method}\nbase_model: {llama / 'base'}\nmodels:\n{entries}"
                      f"parameters: {json.dumps(global_params)}\ndtype: float32\n")
    out = tmp_path / "out"
    code, _, err = run(["merge", config, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    base = model_sd(llama / "base")
    params = {k: [p[k] for p in model_params] for k in model_params[0]}
    params.update(global_params)
    theirs = mergekit.merge(mk_method, None if mk_method == "linear" else base,
                            [model_sd(m) for m in models(llama)], dtype=torch.float32, **params)
    assert set(got) == set(theirs)
    for k in theirs:
        err = (got[k] - theirs[k]).norm() / theirs[k].norm()
        assert err <= 1e-6, (k, float(err))


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_prints_the_plan_and_writes_nothing(llama, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["merge", "--method", "cart", "--base", llama / "base", "--model", llama / "m1",
                             "--model", llama / "m2", "--out", out, "--dry-run", "--max-shard-size", "10KB"], capsys)
    assert code == 0, err
    assert not out.exists() and os.listdir(tmp_path) == []
    for part in ("dry run", "keys:", "merged in", "read:", "write:", "shard(s)", "estimated peak memory"):
        assert part in stdout, part


# -------------------------------------------------------------------------------------------------- memory
class Counting:
    """A reader that counts the bytes of the tensors it handed out that are still alive."""
    live = peak = 0

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def keys(self):
        return self.model.keys()

    def __iter__(self):
        return iter(self.model)

    def __len__(self):
        return len(self.model)

    def __contains__(self, key):
        return key in self.model

    def __getitem__(self, key):
        t = self.model[key]
        n = t.numel() * t.element_size()
        Counting.live += n
        Counting.peak = max(Counting.peak, Counting.live)
        weakref.finalize(t, Counting._free, n)
        return t

    @staticmethod
    def _free(n):
        Counting.live -= n


def test_a_merge_holds_only_the_group_in_flight(llama, tmp_path, capsys, monkeypatch):
    Counting.live = Counting.peak = 0
    opened = []
    real_open = pio.open_model

    def counting_open(path):
        opened.append(Counting(real_open(path)))
        return opened[-1]
    monkeypatch.setattr(pio, "open_model", counting_open)
    written = []
    real_write = pio.ShardWriter.write

    def write(self, key, tensor):
        written.append(weakref.ref(tensor))
        alive = sum(r().numel() * r().element_size() for r in written if r() is not None)
        Counting.out_peak = max(getattr(Counting, "out_peak", 0), alive)
        return real_write(self, key, tensor)
    monkeypatch.setattr(pio.ShardWriter, "write", write)
    group = 16 << 10
    code, _, err = run(["merge", "--method", "ties", "--base", llama / "base",
                        *sum((["--model", m] for m in models(llama)), []), "--out", tmp_path / "out",
                        "--max-group-size", str(group), "--quiet"], capsys)
    assert code == 0, err
    base = opened[0].model
    total = (T + 1) * sum(base.key_info(k).nbytes for k in base.keys())
    largest = (T + 1) * max(base.key_info(k).nbytes for k in base.keys())
    assert sum(m.model.bytes_read for m in opened) == total          # every input read once
    assert 0 < Counting.peak <= max(group, largest)                   # ... but one group at a time
    assert Counting.peak * 5 < total                                  # (a fifth of the inputs)
    assert Counting.out_peak <= max(group, largest)
    assert Counting.live == 0


# --------------------------------------------------------------------------------------------- bad inputs
def corrupt_copy(llama, tmp_path, how):
    """A copy of m1 (sharded) broken in one way; returns its directory."""
    d = tmp_path / "bad"
    d.mkdir()
    for f in (llama / "m1").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    shard = d / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if how == "truncated":
        shard.write_bytes(raw[:len(raw) // 2])
    elif how == "header":
        shard.write_bytes(raw[:8] + b"#" * n + raw[8 + n:])
    elif how == "offsets":
        header = json.loads(raw[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"] = [header[key]["data_offsets"][0], len(raw)]
        text = json.dumps(header).encode()
        shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    elif how == "index":
        index = json.loads((d / "model.safetensors.index.json").read_text())
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = "../m2/model-00001-of-00002.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, shard


def variant(llama, tmp_path, how):
    """A model directory that does not match the base in one way."""
    d = tmp_path / how
    sd = model_sd(llama / "m1")
    if how == "keys":
        sd.pop("model.norm.weight")
        sd["extra.weight"] = torch.zeros(2)
    elif how == "dtypes":
        sd = {k: v.half() for k, v in sd.items()}
    elif how == "shapes":
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(33, 16)
    d.mkdir()
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_bytes((llama / "m1" / "config.json").read_bytes())
    return d


def evil_bin(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"model.norm.weight": torch.zeros(16), "x": Payload()}, d / "pytorch_model.bin")
    return d, marker


def flags(llama, *extra, model=None, out=None, method="ties"):
    return ["merge", "--method", method, "--base", llama / "base", "--model", model or llama / "m1",
            "--out", out, *extra]


@pytest.mark.parametrize("case", [
    "missing", "truncated", "header", "offsets", "index", "pickle", "keys", "shapes", "dtypes", "method",
    "misspelled", "range", "exists", "inside", "unwritable", "file_parent", "empty", "not_mapping",
    "mergekit_only", "normalize", "gradient", "both_forms", "learned", "bad_regex", "per_model_global",
])
def test_bad_input_exit_2_clear_message_nothing_left(llama, tmp_path, capsys, case):
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    config = work / "c.yml"
    marker = None
    if case == "missing":
        argv, expect = flags(llama, model=work / "nope", out=out), f"{work / 'nope'}: does not exist"
    elif case in ("truncated", "header", "offsets", "index"):
        d, shard = corrupt_copy(llama, work, case)
        argv = flags(llama, model=d, out=out)
        expect = {"truncated": f"{shard}: truncated", "header": f"{shard}: corrupt safetensors header",
                  "offsets": f"{shard}: truncated safetensors file (or a corrupt header): tensor",
                  "index": "points outside the model directory"}[case]
    elif case == "pickle":
        d, marker = evil_bin(work)
        argv, expect = flags(llama, model=d, out=out), f"{d / 'pytorch_model.bin'}: refused"
    elif case in ("keys", "shapes", "dtypes"):
        d = variant(llama, work, case)
        argv = flags(llama, model=d, out=out, method="task_arithmetic")
        expect = {"keys": "missing 1 key(s) of the base: ['model.norm.weight']",
                  "shapes": "key 'model.layers.0.mlp.up_proj.weight' has shape (33, 16), the base's is (32, 16)",
                  "dtypes": "has dtype float16, the base's is float32"}[case]
        if case == "keys":
            argv += ["--model", variant(llama, work, "dtypes")]     # two models, all mismatches in one error
            expect = "the base lacks: ['extra.weight']"
    elif case == "method":
        argv, expect = flags(llama, out=out, method="tiez"), "unknown merging method (did you mean 'ties'?)"
    elif case == "misspelled":
        argv, expect = flags(llama, "--param", "densty=0.5", out=out), "unknown parameter of ties (did you mean " \
                                                                       "'density'?)"
    elif case == "range":
        argv, expect = flags(llama, "--param", "density=1.5", out=out), "density = 1.5: must be in (0, 1]"
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("mine")
        argv, expect = flags(llama, out=out), "already exists (pass --overwrite"
    elif case == "inside":
        argv, expect = flags(llama, out=llama / "m1" / "merged"), "inside the input directory"
    elif case == "unwritable":
        argv, expect = flags(llama, out=Path("/proc/pymerge-test-out")), "cannot create a directory in /proc"
    elif case == "file_parent":
        (work / "afile").write_text("x")
        argv, expect = flags(llama, out=work / "afile" / "out"), "is not a directory"
    elif case == "empty":
        config.write_text(f"merge_method: ties\nbase_model: {llama / 'base'}\nmodels: []\n")
        argv, expect = ["merge", config, out], "models must be a non-empty list"
    elif case == "not_mapping":
        config.write_text("- merge_method: ties\n- models: []\n")
        argv, expect = ["merge", config, out], "expected a YAML mapping"
    elif case == "mergekit_only":
        config.write_text(f"merge_method: slerp\nbase_model: {llama / 'base'}\nmodels:\n  - model: {llama / 'm1'}\n")
        argv, expect = ["merge", config, out], "mergekit's slerp is not available in pymerge"
    elif case == "normalize":
        config.write_text(f"merge_method: dare_ties\nbase_model: {llama / 'base'}\nmodels:\n"
                          f"  - model: {llama / 'm1'}\n    parameters: {{weight: 1, density: 0.5}}\n")
        argv, expect = ["merge", config, out], "add `normalize: true` under parameters"
    elif case == "gradient":
        config.write_text(f"merge_method: task_arithmetic\nbase_model: {llama / 'base'}\nmodels:\n"
                          f"  - model: {llama / 'm1'}\n    parameters: {{weight: [0, 0.5, 1]}}\n")
        argv, expect = ["merge", config, out], "per-layer gradient) is not supported"
    elif case == "both_forms":
        config.write_text("merge_method: ties\n")
        argv, expect = ["merge", config, out, "--method", "ties"], "not both"
    elif case == "learned":
        argv, expect = flags(llama, out=out, method="divmerge"), "run `pymerge divmerge`"
    elif case == "bad_regex":
        argv, expect = flags(llama, "--task-specific-keys", "([", out=out), "not a regular expression"
    elif case == "per_model_global":
        config.write_text(f"merge_method: ties\nbase_model: {llama / 'base'}\nmodels:\n"
                          f"  - model: {llama / 'm1'}\n    parameters: {{lambda: 0.5}}\n")
        argv, expect = ["merge", config, out], "lam is one value for all models"
    before = tree_hash(work)
    listing = sorted(os.listdir(tmp_path))
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert err.startswith("pymerge merge: error: ") and err.count("\n") == 1, err
    assert expect in err, err
    if case == "exists":
        assert os.listdir(out) == ["keep"]
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == listing                         # no debris
    assert not any("pymerge-tmp" in p for p in os.listdir(llama / "m1"))
    assert tree_hash(work) == before                                       # inputs byte-identical
    if marker is not None:
        assert not marker.exists()


def test_internal_error_is_exit_1_and_leaves_nothing(llama, tmp_path, monkeypatch):
    def boom(self, keys):
        raise RuntimeError("boom")
    monkeypatch.setattr(sys.modules["pymerge.merge"].MergePlan, "merge_group", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main([str(a) for a in flags(llama, "--quiet", out=tmp_path / "out")])
    assert os.listdir(tmp_path) == []
    env = dict(os.environ, PYTHONSAFEPATH="1")
    p = subprocess.run([sys.executable, "-P", "-m", "pymerge", "merge", "--method", "ties", "--base",
                        str(llama / "base"), "--model", str(llama / "m1"), "--out", str(tmp_path / "o"),
                        "--max-shard-size", "1.5.GB"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "--max-shard-size" in p.stderr


def test_write_error_in_the_write_behind_thread_leaves_nothing(llama, tmp_path, monkeypatch):
    """A full disk while the output shards are written (in pymerge.io.write_behind's thread): the error reaches
    the command, the temporary directory is removed, the inputs are untouched."""
    import errno

    import pymerge.io.write_behind as wb
    real, calls = wb.pwrite_all, []

    def full_disk(fd, view, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, view, offset)
    monkeypatch.setattr(wb, "pwrite_all", full_disk)
    before = tree_hash(llama)
    with pytest.raises(OSError, match="No space left"):
        cli.main([str(a) for a in flags(llama, "--quiet", "--max-group-size", "10KB", out=tmp_path / "out")])
    assert len(calls) == 3 and os.listdir(tmp_path) == []
    assert tree_hash(llama) == before


# ------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_mid_merge_leaves_no_output(tmp_path):
    """A merge slow enough to be caught mid-way (exact SVDs of many keys, one key per group): SIGTERM once its
    temporary directory exists -> exit 143, no output, no temporary directory, inputs untouched."""
    g = torch.Generator().manual_seed(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    base = {f"layer{i}.weight": torch.randn(192, 192, generator=g) for i in range(120)}
    save_file(base, inputs / "base.safetensors")
    for t in (1, 2):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  inputs / f"m{t}.safetensors")
    before = tree_hash(inputs)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-P", "-m", "pymerge", "merge", "--method", "cart", "--base",
                             str(inputs / "base.safetensors"), "--model", str(inputs / "m1.safetensors"), "--model",
                             str(inputs / "m2.safetensors"), "--param", "svd=exact", "--param", "rank_ratio=0.5",
                             "--out", str(out), "--max-group-size", "1MB", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    def started():     # the temporary directory holds the shard: the merge is under way
        tmp = [p for p in os.listdir(tmp_path) if ".out.pymerge-tmp-" in p]
        return tmp and os.path.exists(tmp_path / tmp[0] / "model.safetensors")
    while time.time() < deadline and not started():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM; no output written" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["in"]
    assert tree_hash(inputs) == before
