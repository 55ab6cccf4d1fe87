"""`pymerge eval` on tiny BERTs and tiny JSONL tasks: a run's reports and printed table, a user's own model
directories, and every input error as one line with exit status 2, before anything is trained."""
import csv
import json

import pytest
import torch

from pymerge import cli
from pymerge.eval import experts as ex
from pymerge.eval import lm_experts
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)
from test_eval_experts import _sentiment_jsonl, backbone_dir  # noqa: F401 (fixture)
from test_eval_generative import WORDS_A, WORDS_B, _jsonl, lm_dir  # noqa: F401 (fixture)


@pytest.fixture
def files(tmp_path):
    return {n: _sentiment_jsonl(tmp_path / f"{n}.jsonl", n=40, seed=i) for i, n in enumerate(("a", "b", "c"))}


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _task_args(files, names=("a", "b", "c")):
    return [w for n in names for w in ("--task", f"{n}={files[n]}")]


@pytest.fixture
def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fine-tuned although the command line is wrong")

    monkeypatch.setattr(ex, "fine_tune", boom)
    monkeypatch.setattr(lm_experts, "fine_tune_lm", boom)


def test_eval_writes_reports_with_the_numbers_it_prints(files, backbone_dir, tmp_path, capsys,  # noqa: F811
                                                        teacher_cache_dir):  # noqa: F811
    out = tmp_path / "report"
    code, stdout, err = _run(["eval", "--methods", "weight_average,ties", "--backbone", backbone_dir,
                              *_task_args(files), "--subsets", "2,3", "--subsets-per-size", "2", "--out", out],
                             capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["anp_vs_tasks.png", "per_task.png", "results.csv",
                                                     "results.md"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    variants = {r["variant"] for r in rows}
    assert variants == {"expert", "pretrained", "task_arithmetic", "weight_average", "ties"}
    assert {r["size"] for r in rows} == {"2", "3"} and len([r for r in rows if r["variant"] == "ties"]) == 3
    three = {r["variant"]: r for r in rows if r["size"] == "3"}
    line = next(l for l in stdout.splitlines() if l.startswith("ties "))
    assert line.split()[-2] == f"{100 * float(three['ties']['anp']):.1f}"
    md = (out / "results.md").read_text()
    assert "$ pymerge eval --suite text --methods weight_average,ties --subsets 2,3" in md
    assert stdout.startswith("$ pymerge eval --suite text")
    # the experts were built into PYMERGE_CACHE (the tests' own cache)
    assert len(list((teacher_cache_dir / "experts").iterdir())) == 3
    # ANP of the expert row is 1 and its accuracies are each expert's
    for r in rows:
        if r["variant"] == "expert":
            assert float(r["anp"]) == 1.0


def test_an_interrupted_eval_resumes_and_fresh_starts_again(files, backbone_dir, tmp_path, capsys,  # noqa: F811
                                                             monkeypatch, teacher_cache_dir):  # noqa: F811
    from pymerge.eval import harness as hn
    out = tmp_path / "r"
    argv = ["eval", "--methods", "weight_average", "--backbone", backbone_dir, *_task_args(files), "--subsets",
            "1,2", "--subsets-per-size", "2", "--out", out]
    real, computed, stop_at = hn._subset_rows, [], [3]

    def spy(h, rows, size, subset, experts):
        if len(computed) + 1 == stop_at[0]:
            raise RuntimeError("interrupted")
        computed.append(subset)
        return real(h, rows, size, subset, experts)

    monkeypatch.setattr(hn, "_subset_rows", spy)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(argv, capsys)
    assert [p.name for p in out.iterdir()] == ["rows-in-progress.jsonl"]   # two subsets done, no reports
    first_two, stop_at[0] = list(computed), 0
    computed.clear()
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert len(computed) == 2 and not set(computed) & set(first_two)   # the other two subsets only
    assert "resuming from" in err and not (out / "rows-in-progress.jsonl").exists()
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 4 * 4   # expert, pretrained, TA, WA each
    stop_at[0] = 2
    computed.clear()
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(argv, capsys)
    stop_at[0] = 0
    computed.clear()
    code, _, err = _run([*argv, "--fresh"], capsys)
    assert code == 0, err
    assert len(computed) == 4 and "resuming" not in err                # --fresh: every subset again


def test_eval_with_a_users_model_dirs(files, backbone_dir, tmp_path, capsys):  # noqa: F811
    from transformers import BertForSequenceClassification
    dirs = {}
    for i, n in enumerate(("a", "b")):
        torch.manual_seed(i)
        model = BertForSequenceClassification.from_pretrained(backbone_dir, num_labels=2)
        with torch.no_grad():
            for name, p in model.bert.named_parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.config.id2label = {0: "pos", 1: "neg"}  # columns named: mapped onto the task's sorted classes
        model.config.label2id = {"pos": 0, "neg": 1}
        dirs[n] = tmp_path / f"m{n}"
        model.save_pretrained(dirs[n])
    out = tmp_path / "r"
    code, stdout, err = _run(["eval", "--methods", "task_arithmetic", "--backbone", backbone_dir,
                              *_task_args(files, ("a", "b")), "--model", f"a={dirs['a']}", "--model",
                              f"b={dirs['b']}", "--subsets", "2", "--out", out, "--max-length", "12"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["variant"] for r in rows} == {"expert", "pretrained", "task_arithmetic"}
    md = (out / "results.md").read_text()
    assert str(dirs["a"]) in md
    # the expert row: each model on its task's test split, its columns mapped by name onto the task's classes
    from pymerge.eval import task_from_jsonl
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(backbone_dir)
    expert = {r["subset"]: r for r in rows if r["variant"] == "expert"}["a+b"]
    for n in ("a", "b"):
        task = task_from_jsonl(n, files[n])
        texts, labels = task.split("test")
        model = BertForSequenceClassification.from_pretrained(dirs[n]).eval()
        with torch.no_grad():
            names = [model.config.id2label[model(**tok(t, truncation=True, max_length=12, return_tensors="pt"))
                                           .logits.argmax(-1).item()] for t in texts]
        want = sum(task.class_names[y] == name for y, name in zip(labels, names)) / len(labels)
        assert float(expert[f"acc:{n}"]) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "cartt"], "--methods 'cartt': unknown method(s) ['cartt']"),
    (["--methods", ""], "--methods: give at least one method"),
    (["--methods", "ties", "--subsets", "2,x"], "--subsets '2,x': expected comma-separated integers"),
    (["--methods", "ties", "--subsets", "2,5"], "--subsets 2,5: size 5 is not between 1 and the number of tasks "
                                                "(3: a, b, c)"),
    (["--methods", "ties", "--subsets", "0"], "size 0 is not between 1"),
    (["--methods", "ties", "--subsets-per-size", "0"], "--subsets-per-size 0: must be a positive integer"),
    (["--methods", "ties", "--tasks", "rt_polarity,imdb"], "--tasks: unknown task(s) ['imdb']"),
    (["--methods", "ties", "--suite", "nope"], "--suite 'nope': one of text, generative"),
    (["--methods", "ties,adamerging", "--suite", "generative"], "--methods 'ties,adamerging': adamerging does not "
                                                                 "merge causal LMs"),
    (["--methods", "ties", "--finetune-steps", "3"], "--finetune-steps: only with --suite generative"),
    (["--methods", "ties", "--suite", "generative", "--finetune-steps", "0"], "--finetune-steps 0: must be a "
                                                                              "positive integer"),
    (["--methods", "ties", "--suite", "generative", "--subsets", "4"], "size 4 is not between 1 and the number of "
                                                                       "tasks (3: a, b, c)"),
    (["--methods", "ties", "--model", "a=/nonexistent/model", "--model", "b=/tmp", "--model", "c=/tmp"],
     "--model a=/nonexistent/model: not a Hugging Face model directory (no config.json)"),
    (["--methods", "ties", "--model", "zzz=/tmp"], "--model zzz=...: no data for task 'zzz'"),
    (["--methods", "ties", "--model", "a=/tmp"], "--model is given for ['a'] but not for ['b', 'c']"),
    (["--methods", "ties", "--task", "a=x.jsonl"], "--task: task 'a' given twice"),
    (["--methods", "ties", "--task", "bad name=x.jsonl"], "NAME may hold letters"),
    (["--methods", "ties", "--steps", "0"], "--steps 0: must be a positive integer"),
    (["--methods", "cart,divmerge", "--rows", "cart,divmerge-js"], "--rows 'cart,divmerge-js': no such row(s) "
                                                                    "['divmerge-js']; --methods gives: "
                                                                    "task_arithmetic, cart, cart-exact, divmerge"),
    (["--methods", "ties", "--rows", ","], "--rows ',': give at least one row"),
])
def test_input_errors_exit_2_naming_the_input(files, capsys, no_training, argv, message):
    code, out, err = _run(["eval", *_task_args(files), *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("pymerge eval: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_rows_keeps_the_named_rows_and_the_gaps_reference(files):
    from pymerge.cli import build_parser
    from pymerge.cli import eval as eval_cli
    args = build_parser().parse_args(["eval", *_task_args(files), "--methods", "cart,divmerge", "--rows",
                                      "divmerge-kl,cart-exact,divmerge-from-cart"])
    _, _, rows, _ = eval_cli._checked(args)
    assert [v.label for v in rows] == ["task_arithmetic", "cart-exact", "divmerge-kl", "divmerge-from-cart"]
    assert "--rows divmerge-kl,cart-exact,divmerge-from-cart" in eval_cli.command_line(args, ["a", "b", "c"], [3])
    args = build_parser().parse_args(["eval", *_task_args(files), "--methods", "cart,divmerge"])
    assert len(eval_cli._checked(args)[2]) == 9   # without --rows: every row


def test_missing_or_bad_task_file_is_named(tmp_path, capsys, no_training):
    code, _, err = _run(["eval", "--methods", "ties", "--task", f"x={tmp_path / 'missing.jsonl'}"], capsys)
    assert code == 2 and f"--task x={tmp_path / 'missing.jsonl'}" in err and "does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    code, _, err = _run(["eval", "--methods", "ties", "--task", f"x={bad}"], capsys)
    assert code == 2 and f"{bad}:2: expected an object with \"text\" and \"label\"" in err


def test_unwritable_out_is_refused_before_training(files, tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _run(["eval", "--methods", "ties", *_task_args(files), "--out", blocker / "sub"], capsys)
    assert code == 2 and f"--out {blocker / 'sub'}: {blocker} is not a directory" in err


def test_generative_suite_end_to_end(lm_dir, tmp_path, capsys, teacher_cache_dir):  # noqa: F811
    files = {"a": _jsonl(tmp_path / "a.jsonl", WORDS_A, seed=1), "b": _jsonl(tmp_path / "b.jsonl", WORDS_B, seed=2)}
    out = tmp_path / "report"
    code, stdout, err = _run(["eval", "--suite", "generative", "--backbone", lm_dir, *_task_args(files, ("a", "b")),
                              "--methods", "weight_average", "--subsets", "1,2", "--finetune-steps", "3",
                              "--test-limit", "5", "--validation-limit", "3", "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["per_domain.png", "results.csv", "results.md",
                                                     "rps_vs_domains.png"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["variant"] for r in rows} == {"expert", "base", "task_arithmetic", "weight_average"}
    assert {r["subset"] for r in rows} == {"a", "b", "a+b"}
    for r in rows:
        if r["variant"] == "expert" or r["size"] == "1" and r["variant"] == "weight_average":
            assert float(r["rps"]) == pytest.approx(1, abs=1e-5)   # an expert, or the average of one expert
    two = {r["variant"]: r for r in rows if r["size"] == "2"}
    line = next(l for l in stdout.splitlines() if l.startswith("weight_average "))
    assert line.split()[-3] == f"{float(two['weight_average']['rps']):.4f}"
    command = ("pymerge eval --suite generative --methods weight_average --subsets 1,2 --subsets-per-size 3 "
               f"--seed 0 --task a={files['a']} --task b={files['b']} --test-limit 5 --validation-limit 3 "
               "--unlabelled 100")
    assert stdout.startswith(f"$ {command}") and f"$ {command}" in (out / "results.md").read_text()
    assert "--finetune-steps 3" in stdout.splitlines()[0]
    entries = list((teacher_cache_dir / "lm_experts").iterdir())
    assert len(entries) == 2 and all(json.loads((e / "manifest.json").read_text())["request"]["settings"]["steps"]
                                      == 3 for e in entries)


def test_the_command_is_listed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "--subsets" in capsys.readouterr().out
