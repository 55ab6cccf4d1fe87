"""pymerge.divmerge / adamerging on what a user holds (pymerge.learn.model_sources): Hugging Face model
directories (read offline), state dicts with a model factory, texts with a tokenizer; each gives the result of
the same merge run on modules and token batches built by hand."""
import pytest
import torch

import pymerge
from pymerge.learn.inputs import align_base_keys
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer  # noqa: E402

WORDS = "the a movie film good bad great plot story was is and not very boring fun".split()
TEXTS = ["the movie was good", "a very boring plot", "the story is fun and great", "not a good film",
         "bad plot", "the film was very fun and the plot was great", "good", "boring"]
CFG = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           max_position_embeddings=32)


def _tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """base = BertModel (no head, keys without the "bert." prefix), a / b = classifiers with 2 / 3 labels."""
    root = tmp_path_factory.mktemp("bert")
    tok = _tokenizer()
    cfg = dict(CFG, vocab_size=len(tok))
    torch.manual_seed(0)
    base = BertModel(BertConfig(**cfg))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for name, labels in (("a", 2), ("b", 3)):
        m = BertForSequenceClassification(BertConfig(**cfg, num_labels=labels))
        m.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.bert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / name)
    return root


def _by_hand(root, tok, max_length):
    """The same merge's inputs built the long way: modules, the base under the models' prefix, token batches."""
    base = {"bert." + k: v for k, v in BertModel.from_pretrained(root / "base").state_dict().items()}
    models = {n: BertForSequenceClassification.from_pretrained(root / n).eval() for n in "ab"}
    data = {}
    for n, texts in (("a", TEXTS), ("b", TEXTS[::-1])):
        data[n] = [{k: torch.tensor([v]) for k, v in tok(t, truncation=True, max_length=max_length).items()}
                   for t in texts]
    return base, models, data


OPTS = dict(task_specific_keys=r"^classifier\.", steps=6, lr=0.05, progress=False, backend="reference")


@pytest.mark.parametrize("method", [pymerge.divmerge, pymerge.adamerging])
def test_model_directories_and_texts(tiny_bert, method):
    got = method(tiny_bert / "base", {"a": tiny_bert / "a", "b": str(tiny_bert / "b")},
                 {"a": TEXTS, "b": TEXTS[::-1]}, text_max_length=6, **OPTS)     # the base directory's tokenizer
    base, models, data = _by_hand(tiny_bert, _tokenizer(), 6)
    want = method(base, models, data, **OPTS)
    assert got.losses == pytest.approx(want.losses, rel=1e-6)
    torch.testing.assert_close(got.coefficients, want.coefficients)
    for n in "ab":
        for k, v in want.task_state_dicts[n].items():
            torch.testing.assert_close(got.task_state_dicts[n][k], v)
    # the result loads into the user's model class
    m = BertForSequenceClassification.from_pretrained(tiny_bert / "b")
    m.load_state_dict(got.task_state_dicts["b"])


def test_state_dicts_with_a_model_factory(tiny_bert):
    tok = _tokenizer()
    sds = {n: BertForSequenceClassification.from_pretrained(tiny_bert / n).state_dict() for n in "ab"}
    base_sd = BertModel.from_pretrained(tiny_bert / "base").state_dict()     # keys without "bert."
    made = []

    def factory(sd):     # the head's width from the state dict
        made.append(sd["classifier.weight"].shape[0])
        return BertForSequenceClassification(BertConfig(**CFG, vocab_size=len(tok),
                                                        num_labels=sd["classifier.weight"].shape[0]))
    got = pymerge.divmerge(base_sd, sds, {"a": TEXTS, "b": TEXTS[::-1]}, model_factory=factory, tokenizer=tok,
                           text_max_length=6, **OPTS)
    assert made == [2, 3]
    base, models, data = _by_hand(tiny_bert, tok, 6)
    want = pymerge.divmerge(base, models, data, **OPTS)
    assert got.losses == pytest.approx(want.losses, rel=1e-6)
    torch.testing.assert_close(got.coefficients, want.coefficients)


def test_clear_errors(tiny_bert, tmp_path):
    sds = {n: BertForSequenceClassification.from_pretrained(tiny_bert / n).state_dict() for n in "ab"}
    with pytest.raises(ValueError, match=r"model 'a' is a state dict: pass model_factory="):
        pymerge.divmerge(tiny_bert / "base", sds, {"a": TEXTS, "b": TEXTS}, **OPTS)
    with pytest.raises(ValueError, match=r"is no Hugging Face model directory \(no config.json there\)"):
        pymerge.divmerge(tmp_path, {"a": tiny_bert / "a"}, {"a": TEXTS}, **OPTS)
    with pytest.raises(ValueError, match=r"data for task 'a' are texts: pass tokenizer="):   # no directory
        pymerge.divmerge(BertModel.from_pretrained(tiny_bert / "base"),
                         {"a": BertForSequenceClassification.from_pretrained(tiny_bert / "a")}, {"a": TEXTS}, **OPTS)
    with pytest.raises(ValueError, match="model_factory = 3: must be a callable"):
        pymerge.divmerge(tiny_bert / "base", {"a": tiny_bert / "a"}, {"a": TEXTS}, model_factory=3, **OPTS)


def test_base_keys_aligned_by_one_prefix():
    t = torch.zeros(1)
    aligned, note = align_base_keys({"x.w": t, "y": t}, ["bert.x.w", "bert.y"])
    assert list(aligned) == ["bert.x.w", "bert.y"] and "added the prefix 'bert.'" in note
    aligned, note = align_base_keys({"body.x.w": t, "body.y": t, "head.w": t}, ["x.w", "y"])
    assert list(aligned) == ["x.w", "y"] and "removed the prefix 'body.'" in note
    same = {"x.w": t}
    assert align_base_keys(same, ["x.w"]) == (same, None)
    assert align_base_keys(same, ["z.w"]) == (same, None)          # no prefix fits: the usual error follows
