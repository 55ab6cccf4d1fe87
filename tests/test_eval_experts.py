"""pymerge.eval.experts on a tiny BERT written here (2 layers, hidden 32) and tiny synthetic JSONL tasks:
evaluation against a direct torch loop, the cache (reuse without training, rebuild of corrupt entries, a new
entry per request), determinism, the floors, progress and logging."""
import json
import logging
import random

import pytest
import torch

from pymerge.eval import entry_cache as ec
from pymerge.eval import experts as ex
from pymerge.eval import Backbone, FineTuneSettings, build_experts, classifier_state, evaluate, task_from_jsonl
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)

from transformers import BertConfig, BertModel, BertTokenizer

POSITIVE = "good great fun fine nice".split()
NEGATIVE = "bad awful boring dull poor".split()
NEUTRAL = "the a movie film plot story was is and very".split()
SETTINGS = dict(max_length=12, max_train_examples=24, epochs=2, batch_size=8, learning_rate=1e-3,
                head_learning_rate=1e-2)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A BertModel (with its pooler, as BERT checkpoints come) + tokenizer, saved like a Hugging Face model."""
    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture
def backbone(backbone_dir):
    return Backbone(backbone_dir)


def _sentiment_jsonl(path, n=40, seed=0):
    """Texts of 1 to 7 neutral words (lengths vary: batches are padded) plus two sentiment words of the
    label's kind."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        words = rng.sample(NEUTRAL, rng.randint(1, 7)) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def task(tmp_path):
    return task_from_jsonl("sentiment", _sentiment_jsonl(tmp_path / "sentiment.jsonl"))


@pytest.fixture
def fine_tune_calls(monkeypatch):
    """Counts the fine-tunings of build_experts (the real trainer still runs)."""
    calls = []
    real = ex.fine_tune

    def counting(task, *args, **kwargs):
        calls.append(task.name)
        return real(task, *args, **kwargs)

    monkeypatch.setattr(ex, "fine_tune", counting)
    return calls


def _build(task, backbone, cache, **extra):
    return build_experts([task], cache, backbone=backbone, **{**SETTINGS, **extra})[task.name]


# ------------------------------------------------------------------------------------------------ evaluate
def _direct_logits(state, backbone_dir, texts, max_length):
    """One text at a time, no padding: a plain BertModel, the mean of its last hidden states, the head."""
    tok = BertTokenizer.from_pretrained(backbone_dir)
    body = BertModel(BertConfig.from_pretrained(backbone_dir), add_pooling_layer=False)
    body.load_state_dict({k[len("body."):]: v for k, v in state.items() if k.startswith("body.")})
    body.eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            pooled = body(input_ids=ids).last_hidden_state[0].mean(0)
            out.append(pooled @ state["head.weight"].T + state["head.bias"])
    return torch.stack(out)


def test_expert_accuracy_on_its_test_split_equals_a_direct_torch_loop(task, backbone, backbone_dir, tmp_path):
    expert = _build(task, backbone, tmp_path)
    state = expert.state_dict()
    texts, labels = task.split("test")
    direct = _direct_logits(state, backbone_dir, texts, SETTINGS["max_length"])
    want = (direct.argmax(-1) == torch.tensor(labels)).double().mean().item()
    got = evaluate(state, task, "test", backbone=backbone, max_length=SETTINGS["max_length"], batch_size=3)
    assert got == want == expert.accuracy["test"]
    # the batched, length-sorted, padded logits are the unpadded ones (padding masked out of the mean)
    model = backbone.classifier(task.num_classes, state)
    batched = ex.predict_logits(model, backbone.tokenizer, texts, max_length=SETTINGS["max_length"], batch_size=3)
    torch.testing.assert_close(batched, direct, atol=1e-5, rtol=1e-5)


def test_the_separable_task_is_learned(task, backbone, tmp_path):
    """It fits its training examples (24 of them: a tiny random BERT generalises only so far) and beats the
    majority class on test."""
    expert = _build(task, backbone, tmp_path, epochs=10, learning_rate=3e-3)
    losses = [h["train_loss"] for h in expert.manifest["history"]]
    assert len(losses) == 10 and losses[-1] < 0.2 * losses[0]
    assert evaluate(expert.state_dict(), task, "train", backbone=backbone, max_length=SETTINGS["max_length"],
                    limit=SETTINGS["max_train_examples"]) == 1.0
    assert expert.accuracy["test"] > expert.manifest["majority_accuracy"]["test"] == 0.5


def test_classifier_state_of_body_and_head_is_the_expert(task, backbone, tmp_path):
    expert = _build(task, backbone, tmp_path)
    rebuilt = classifier_state(expert.body_state(), expert.head_state())
    assert rebuilt.keys() == expert.state_dict().keys()
    assert all(torch.equal(rebuilt[k], v) for k, v in expert.state_dict().items())
    assert set(expert.head_state()) == {"weight", "bias"} and expert.head_state()["weight"].shape == (2, 32)


def test_evaluate_refuses_a_state_of_another_shape(task, backbone, tmp_path):
    state = _build(task, backbone, tmp_path).state_dict()
    with pytest.raises(ValueError, match=r"2 classes; the model state's head.weight is \(3, 32\)"):
        evaluate({**state, "head.weight": torch.zeros(3, 32)}, task, backbone=backbone)
    missing = {k: v for k, v in state.items() if k != "body.encoder.layer.1.output.dense.weight"}
    with pytest.raises(ValueError, match="missing keys \\['body.encoder.layer.1.output.dense.weight'\\]"):
        evaluate(missing, task, backbone=backbone)
    with pytest.raises(ValueError, match="'body.embeddings.word_embeddings.weight': shape"):
        evaluate({**state, "body.embeddings.word_embeddings.weight": torch.zeros(3, 32)}, task, backbone=backbone)


def test_backbone_body_state_drops_the_pooler_and_keeps_the_weights(backbone, backbone_dir):
    saved = BertModel.from_pretrained(backbone_dir).state_dict()
    body = backbone.body_state()
    assert not any(k.startswith("pooler.") for k in body) and any(k.startswith("pooler.") for k in saved)
    assert all(torch.equal(v, saved[k]) for k, v in body.items())


# -------------------------------------------------------------------------------------------------- cache
def test_second_build_reuses_the_cache_without_training(task, backbone, tmp_path, monkeypatch):
    first = _build(task, backbone, tmp_path)
    assert first.built

    def no_training(*args, **kwargs):
        raise AssertionError("fine_tune called although the expert is cached")

    monkeypatch.setattr(ex, "fine_tune", no_training)
    second = _build(task, backbone, tmp_path)
    assert not second.built and second.path == first.path and second.manifest == first.manifest
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in second.state_dict().items())


def test_another_request_is_another_entry(task, backbone, tmp_path, fine_tune_calls):
    a = _build(task, backbone, tmp_path)
    b = _build(task, backbone, tmp_path, epochs=1)
    other_split = task_from_jsonl("sentiment", _sentiment_jsonl(tmp_path / "s.jsonl"), seed=1)
    c = _build(other_split, backbone, tmp_path)
    assert fine_tune_calls == ["sentiment"] * 3
    assert len({a.path, b.path, c.path}) == 3
    assert _build(task, backbone, tmp_path, epochs=1).path == b.path and len(fine_tune_calls) == 3


def _flip_a_weight_byte(path):
    data = bytearray((path / ex.WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x40
    (path / ex.WEIGHTS_FILE).write_bytes(bytes(data))


def _retitle_request(path):
    manifest = json.loads((path / ec.MANIFEST_FILE).read_text())
    manifest["request"]["settings"]["epochs"] = 7
    (path / ec.MANIFEST_FILE).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "manifest not JSON": lambda p: (p / ec.MANIFEST_FILE).write_text('{"request": '),
    "manifest missing": lambda p: (p / ec.MANIFEST_FILE).unlink(),
    "manifest of another request": _retitle_request,
    "weights missing": lambda p: (p / ex.WEIGHTS_FILE).unlink(),
    "weights truncated": lambda p: (p / ex.WEIGHTS_FILE).write_bytes((p / ex.WEIGHTS_FILE).read_bytes()[:1000]),
    "a weight altered": _flip_a_weight_byte,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_entry_is_detected_and_rebuilt(task, backbone, tmp_path, fine_tune_calls, corruption, caplog):
    good = _build(task, backbone, tmp_path)
    reference = {k: v.clone() for k, v in good.state_dict().items()}  # load_file maps the file: copy it
    CORRUPTIONS[corruption](good.path)
    with caplog.at_level(logging.WARNING, logger="pymerge.eval"):
        rebuilt = _build(task, backbone, tmp_path)
    assert fine_tune_calls == ["sentiment", "sentiment"] and rebuilt.built and rebuilt.path == good.path
    assert f"rebuilding the cache entry {good.path}" in caplog.text
    # deterministic training: the rebuilt expert is the original one, and the entry checks out again
    assert all(torch.equal(v, reference[k]) for k, v in rebuilt.state_dict().items())
    assert not _build(task, backbone, tmp_path).built and len(fine_tune_calls) == 2
    assert sorted(p.name for p in good.path.parent.iterdir()) == [good.path.name]  # no temporary leftovers


def test_a_failed_write_leaves_no_entry(task, backbone, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _build(task, backbone, tmp_path)
    assert list((tmp_path / "experts").iterdir()) == []


# ------------------------------------------------------------------------------------- training, manifest
def test_training_is_deterministic_and_leaves_the_global_rng_alone(task, backbone, tmp_path):
    torch.manual_seed(123)
    a = _build(task, backbone, tmp_path / "a")
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # build_experts drew nothing from the global generator
    b = _build(task, backbone, tmp_path / "b")
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in b.state_dict().items())
    c = _build(task, backbone, tmp_path / "c", seed=1)
    assert not torch.equal(c.head_state()["weight"], a.head_state()["weight"])


def test_the_manifest_records_request_accuracies_floors_and_costs(task, backbone, backbone_dir, tmp_path):
    expert = _build(task, backbone, tmp_path)
    m = expert.manifest
    assert m["request"] == ex.expert_request(task, backbone, FineTuneSettings(**SETTINGS))
    assert expert.settings == FineTuneSettings(**SETTINGS)
    assert m["task"] == "sentiment" and m["num_classes"] == 2 and m["class_names"] == ["neg", "pos"]
    assert m["split_sizes"] == {"train": 28, "validation": 4, "test": 8} and m["train_examples"] == 24
    assert m["majority_accuracy"]["test"] == task.majority_accuracy("test")
    assert m["accuracy"]["validation"] == evaluate(expert.state_dict(), task, "validation", backbone=backbone,
                                                   max_length=SETTINGS["max_length"])
    # floor: the pretrained body with the expert's own head, computed here directly
    pretrained = classifier_state(backbone.body_state(), expert.head_state())
    assert m["floor"]["pretrained_body_expert_head"]["test"] == evaluate(
        pretrained, task, "test", backbone=backbone, max_length=SETTINGS["max_length"])
    assert set(m["floor"]["linear_probe"]) == {"validation", "test"}
    assert m["wall_seconds"]["total"] >= m["wall_seconds"]["fine_tune"] > 0
    assert m["weights_sha256"] == ec.file_sha256(expert.path / ex.WEIGHTS_FILE)


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 8, generator=g)
    y = torch.arange(60) % 3
    x = centers[y] + 0.3 * torch.randn(60, 8, generator=g)
    predict = ex._linear_probe(x, y.tolist(), 3)
    assert (predict(x).argmax(-1) == y).all()
    x_new = centers[y] + 0.3 * torch.randn(60, 8, generator=g)
    assert (predict(x_new).argmax(-1) == y).float().mean() > 0.95


def test_a_log_line_per_epoch_and_no_bar_off_a_terminal(task, backbone, tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="pymerge.eval"):
        _build(task, backbone, tmp_path)
    epochs = [r.getMessage() for r in caplog.records if ": epoch" in r.getMessage()]
    assert len(epochs) == 2 and epochs[0].startswith("expert sentiment: epoch 1/2, train loss ")
    assert "ETA" in epochs[0] and "cached at" in caplog.records[-1].getMessage()
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest: no progress bar


def test_progress_bar_when_asked(task, backbone, tmp_path, capsys):
    _build(task, backbone, tmp_path, progress=True)
    assert "expert sentiment" in capsys.readouterr().err


def test_bad_arguments_are_value_errors(task, backbone, tmp_path):
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        _build(task, backbone, tmp_path, epochs=0)
    with pytest.raises(ValueError, match="unexpected keyword argument 'epoch'"):
        build_experts([task], tmp_path, backbone=backbone, epoch=1)
    with pytest.raises(ValueError, match="not both"):
        build_experts([task], tmp_path, backbone=backbone, settings=FineTuneSettings(), epochs=1)
    with pytest.raises(ValueError, match="unique"):
        build_experts([task, task], tmp_path, backbone=backbone)
    with pytest.raises(ValueError, match="no config.json"):
        Backbone(tmp_path)


def test_default_cache_is_pymerge_cache(task, backbone, teacher_cache_dir):  # noqa: F811
    expert = build_experts([task], backbone=backbone, **SETTINGS)["sentiment"]
    assert expert.path.parent == teacher_cache_dir / "experts"
