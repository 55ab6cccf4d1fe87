"""pymerge.eval.harness and pymerge.eval.report on tiny BERTs (2 layers, hidden 32, from test_eval_experts) and
tiny synthetic JSONL tasks: ANP and its references, merges against pymerge.merge, tuning on validation, the
learned methods' inputs, subsets, reports, a user's Hugging Face model directories."""
import csv
import json
import math

import pytest
import torch

import pymerge
from pymerge.eval import build_experts, classifier_state, evaluate, task_from_jsonl
from pymerge.eval import experts as ex
from pymerge.eval import harness as hn
from pymerge.eval import report
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)
from test_eval_experts import SETTINGS, _sentiment_jsonl, backbone, backbone_dir  # noqa: F401 (fixtures)


@pytest.fixture
def tasks(tmp_path):
    """Three tiny tasks of different data (seeds) and sizes."""
    return [task_from_jsonl(f"t{i}", _sentiment_jsonl(tmp_path / f"t{i}.jsonl", n=40 + 8 * i, seed=i))
            for i in range(3)]


# Experts that learn their tasks (test_eval_experts' SETTINGS stop near chance): merges then differ.
LEARNING = {**SETTINGS, "epochs": 8, "learning_rate": 3e-3}


@pytest.fixture
def experts(tasks, backbone, tmp_path):
    return build_experts(tasks, tmp_path / "cache", backbone=backbone, **LEARNING)


def _suite(experts, tasks, backbone):
    return hn.suite_from_experts(experts, tasks, backbone)


def _run(experts, tasks, backbone, rows, sizes=(2,), **kw):
    return hn.run_evaluation(_suite(experts, tasks, backbone), rows, sizes, **kw)


def _rows(result, variant):
    return [r for r in result.rows if r.variant == variant]


@pytest.fixture
def evaluated(monkeypatch):
    """The shared weights evaluated on test, in order: [(task, {key: tensor})]."""
    seen = []
    real = hn._Evaluator.accuracy

    def spy(self, name, shared, split):
        if split == "test":
            seen.append((name, {k: v.clone() for k, v in shared.items()}))
        return real(self, name, shared, split)

    monkeypatch.setattr(hn._Evaluator, "accuracy", spy)
    return seen


def _same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ----------------------------------------------------------------------------------------------- ANP
def test_expert_row_is_evaluate_and_has_anp_one(experts, tasks, backbone):
    result = _run(experts, tasks, backbone, [], sizes=(1, 3))
    for name, expert in experts.items():
        task = next(t for t in tasks if t.name == name)
        want = evaluate(expert.state_dict(), task, "test", backbone=backbone, max_length=SETTINGS["max_length"])
        assert result.experts[name]["test"] == want == expert.accuracy["test"]
        pretrained = classifier_state(backbone.body_state(), expert.head_state())
        assert result.experts[name]["pretrained_test"] == evaluate(pretrained, task, "test", backbone=backbone,
                                                                   max_length=SETTINGS["max_length"])
    for r in _rows(result, "expert"):
        assert r.anp == 1.0 and r.accuracy == {n: result.experts[n]["test"] for n in r.subset}
    # pretrained row: the mean of the ratios, computed here from the experts' numbers
    for r in _rows(result, "pretrained"):
        want = sum(result.experts[n]["pretrained_test"] / result.experts[n]["test"] for n in r.subset) / len(r.subset)
        assert r.anp == pytest.approx(want, abs=1e-12)
    assert sorted(len(r.subset) for r in _rows(result, "expert")) == [1, 1, 1, 3]


def test_merging_an_expert_with_itself_gives_the_expert(tasks, backbone, experts, tmp_path):
    """Two tasks whose models share one fine-tuned body: weight averaging returns that body, ANP 1; a single
    task merged by weight averaging is its own expert."""
    a, b = experts["t0"], experts["t1"]
    body = a.body_state()
    suite = _suite(experts, tasks, backbone)
    twin = {**classifier_state(body, b.head_state())}
    suite.members["t1"].state = lambda: {k: v.clone() for k, v in twin.items()}
    result = hn.run_evaluation(suite, [hn.Variant("weight_average", "weight_average")], (1, 2),
                               subsets_per_size=3)
    for r in _rows(result, "weight_average"):
        if r.subset == ("t0", "t1") or len(r.subset) == 1:
            assert r.anp == 1.0, r
        if len(r.subset) == 1:
            assert r.accuracy == {r.subset[0]: result.experts[r.subset[0]]["test"]}


def test_static_rows_are_pymerge_merge_evaluated_with_each_head(experts, tasks, backbone):
    result = _run(experts, tasks, backbone, [hn.Variant("task_arithmetic", "task_arithmetic", {"lam": 0.7})],
                  sizes=(2,), subsets_per_size=1)
    row = _rows(result, "task_arithmetic")[0]
    base = backbone.body_state()
    merged = pymerge.merge("task_arithmetic", base, [experts[n].body_state() for n in row.subset], lam=0.7)
    for n in row.subset:
        task = next(t for t in tasks if t.name == n)
        assert row.accuracy[n] == evaluate(classifier_state(merged, experts[n].head_state()), task, "test",
                                           backbone=backbone, max_length=SETTINGS["max_length"])
    assert row.anp == pytest.approx(sum(row.accuracy[n] / result.experts[n]["test"] for n in row.subset) / 2)
    assert row.params == {"lam": 0.7} and row.merge_seconds > 0
    assert math.isnan(row.gap_closed) if row.anp == 1 else row.gap_closed == 0.0  # it is the reference itself


def test_grid_choice_is_the_best_validation_anp(experts, tasks, backbone, monkeypatch):
    seen = []
    real = hn._SubsetRun.anp

    def spy(self, shared, split):
        value = real(self, shared, split)
        seen.append((split, value))
        return value

    monkeypatch.setattr(hn._SubsetRun, "anp", spy)
    grid = {"lam": (0.1, 0.5, 1.0)}
    result = _run(experts, tasks, backbone, [hn.Variant("task_arithmetic", "task_arithmetic", {}, grid)],
                  subsets_per_size=1)
    row = _rows(result, "task_arithmetic")[0]
    scores = [v for s, v in seen if s == "validation"]
    assert len(scores) == 3
    best = max(range(3), key=lambda i: (scores[i], -i))
    assert row.params == {"lam": grid["lam"][best]} and row.validation_anp == scores[best]
    assert row.tune_seconds >= row.merge_seconds > 0


def test_gap_closed_against_task_arithmetic(experts, tasks, backbone):
    rows = [hn.Variant("task_arithmetic", "task_arithmetic", {"lam": 0.3}),
            hn.Variant("ties", "ties", {"lam": 1.0})]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=2)
    for subset in {r.subset for r in result.rows}:
        by = {r.variant: r for r in result.rows if r.subset == subset}
        ta = by["task_arithmetic"].anp
        if ta < 1:
            assert by["ties"].gap_closed == pytest.approx((by["ties"].anp - ta) / (1 - ta))
            assert by["expert"].gap_closed == pytest.approx(1.0)
        else:
            assert math.isnan(by["ties"].gap_closed)


def test_cart_exact_reuses_carts_chosen_parameters(experts, tasks, backbone):
    rows = [v for v in hn.variants(["cart"], grids={"cart": {"lam": (1.0, 2.0)}}) if v.method == "cart"]
    assert [v.label for v in rows] == ["cart", "cart-exact"]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=1, grids={"cart": {"lam": (1.0, 2.0)}})
    cart, exact = _rows(result, "cart")[0], _rows(result, "cart-exact")[0]
    assert exact.params == {**cart.params, "svd": "exact"} and cart.params["lam"] in (1.0, 2.0)


# --------------------------------------------------------------------------------------------- learned
def test_learned_rows_get_train_texts_and_the_heads_stay_apart(experts, tasks, backbone, monkeypatch):
    calls = []

    from pymerge.methods import divmerge as dm
    original = dm.divmerge

    def spy(base, models, data, **kw):
        calls.append((base, models, data, kw))
        return original(base, models, data, **kw)

    monkeypatch.setattr(dm, "divmerge", spy)
    rows = [hn.Variant("divmerge", "divmerge", {"steps": 2, "granularity": "task"})]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=1, unlabelled_per_task=6)
    (base, models, data, kw), = calls
    row = _rows(result, "divmerge")[0]
    assert list(models) == list(row.subset) and kw["task_specific_keys"] == r"^head\." and kw["steps"] == 2
    tok = backbone.tokenizer
    for n in row.subset:
        task = next(t for t in tasks if t.name == n)
        texts, _ = task.split("train", 6)
        got = [tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
               for batch in data[n] for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
        assert got == [tok.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in texts]
    assert row.merge_seconds > 0 and 0 < row.anp


def test_divmerge_zero_steps_from_task_arithmetic_is_task_arithmetic(experts, tasks, backbone, evaluated):
    """init_from at the tuned λ with Γ = 0 and no step reproduces the task-arithmetic row exactly."""
    grids = {"task_arithmetic": {"lam": (0.4, 0.8)}}
    rows = [hn.Variant("task_arithmetic", "task_arithmetic", {}, grids["task_arithmetic"]),
            hn.Variant("dm", "divmerge", {"steps": 0}, start="task_arithmetic")]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=1, grids=grids, unlabelled_per_task=4)
    ta, dm = _rows(result, "task_arithmetic")[0], _rows(result, "dm")[0]
    assert dm.params["init_from_params"] == ta.params
    assert dm.accuracy == ta.accuracy
    # a learned row is scored on validation too (the same weights: the same validation ANP)
    assert not math.isnan(dm.validation_anp) and dm.validation_anp == ta.validation_anp
    # the last two rows' weights (after the expert / pretrained references): task arithmetic, then DivMerge
    (_, w_ta), (_, w_dm) = evaluated[-4], evaluated[-2]
    _same_weights(w_dm, w_ta, atol=1e-6)


def test_divmerge_zero_steps_from_cart_is_exact_cart(experts, tasks, backbone, evaluated):
    """start="cart" with Γ at CART's tuned λ and no step is static CART (exact SVD, same rank) on the test set."""
    grids = {"cart": {"lam": (1.0, 2.0), "rank_ratio": (0.25,)}}
    rows = [hn.Variant("cart", "cart", {"svd": "exact"}, grids["cart"]),
            hn.Variant("dm", "divmerge", {"steps": 0, "cart_svd": "exact"}, start="cart")]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=1, grids=grids, unlabelled_per_task=4)
    cart, dm = _rows(result, "cart")[0], _rows(result, "dm")[0]
    assert dm.params["init"] == cart.params["lam"] and dm.params["cart_rank_ratio"] == 0.25
    assert dm.accuracy == cart.accuracy
    (_, w_cart), (_, w_dm) = evaluated[-4], evaluated[-2]
    _same_weights(w_dm, w_cart, atol=1e-5)
    pretrained = {f"body.{k}": v for k, v in backbone.body_state().items()}
    assert any(not torch.equal(w_cart[k], pretrained[k]) for k in w_cart)  # a merge that moved weights


def test_divmerge_zero_steps_from_cart_merge_is_cart(experts, tasks, backbone, evaluated):
    """start="cart_merge" (the divmerge-from-cart row): init_from static CART at its tuned λ and rank, Γ = 0; with
    no step it is the CART row exactly."""
    grids = {"cart": {"lam": (1.0, 2.0), "rank_ratio": (0.25, 0.5)}}
    rows = [hn.Variant("cart", "cart", {}, grids["cart"]),
            hn.Variant("dm", "divmerge", {"steps": 0}, start="cart_merge")]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=1, grids=grids, unlabelled_per_task=4)
    cart, dm = _rows(result, "cart")[0], _rows(result, "dm")[0]
    assert dm.params["init_from"] == "cart" and dm.params["init_from_params"] == cart.params
    assert dm.accuracy == cart.accuracy
    (_, w_cart), (_, w_dm) = evaluated[-4], evaluated[-2]
    _same_weights(w_dm, w_cart, atol=1e-6)


def test_adamerging_rows_run_at_both_granularities(experts, tasks, backbone):
    rows = [v for v in hn.variants(["adamerging"], learned={"adamerging": {"steps": 2}}) if v.method == "adamerging"]
    result = _run(experts, tasks, backbone, rows, subsets_per_size=1, unlabelled_per_task=4)
    for label in ("adamerging", "adamerging-task"):
        row, = _rows(result, label)
        assert row.params["steps"] == 2 and 0 < row.anp and row.merge_seconds > 0


# ------------------------------------------------------------------------------------- variants, subsets
def test_variants_rows_and_errors():
    labels = [v.label for v in hn.variants(["cart", "divmerge", "adamerging"])]
    assert labels == ["task_arithmetic", "cart", "cart-exact", "divmerge", "divmerge-task", "divmerge-kl",
                      "divmerge-from-ta", "divmerge-from-cart", "divmerge-cart-space", "adamerging",
                      "adamerging-task"]
    assert [v.label for v in hn.variants(["ties", "divmerge"], with_variants=False)] == \
        ["task_arithmetic", "ties", "divmerge"]
    assert {v.label for v in hn.variants(["all"])} >= set(pymerge.methods.available("all"))
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['cartt'\]"):
        hn.variants(["cartt"])


def test_subsets_are_seeded_distinct_and_complete_when_few():
    names = [f"t{i}" for i in range(6)]
    assert hn.subsets(names, 6, 3) == [tuple(names)]
    a = hn.subsets(names, 2, 4, seed=1)
    assert a == hn.subsets(names, 2, 4, seed=1) and len(set(a)) == 4
    assert all(list(s) == sorted(s) for s in a)
    assert len(hn.subsets(names[:3], 2, 5)) == 3
    with pytest.raises(ValueError, match="subset size 7"):
        hn.subsets(names, 7, 1)


def test_bad_subset_size_names_the_tasks(experts, tasks, backbone):
    with pytest.raises(ValueError, match=r"subset size 4: must be between 1 and the number of tasks \(3: t0, t1"):
        _run(experts, tasks, backbone, [], sizes=(4,))


# --------------------------------------------------------------------------------------------- reports
def test_reports_hold_the_numbers(experts, tasks, backbone, tmp_path):
    rows = [hn.Variant("task_arithmetic", "task_arithmetic", {"lam": 0.5}), hn.Variant("ties", "ties")]
    result = _run(experts, tasks, backbone, rows, sizes=(2, 3), subsets_per_size=2)
    paths = report.write_reports(result, tmp_path / "out", command="pymerge eval --x")
    with open(paths["csv"]) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(result.rows)
    for line, r in zip(lines, result.rows):
        assert line["variant"] == r.variant and float(line["anp"]) == pytest.approx(r.anp, abs=1e-6)
        for n, acc in r.accuracy.items():
            assert float(line[f"acc:{n}"]) == pytest.approx(acc, abs=1e-6)
        assert json.loads(line["params"]) == r.params
    md = paths["markdown"].read_text()
    assert md.index("$ pymerge eval --x") < md.index("## Summary")
    summary = result.summary()
    ties3 = summary["ties", 3]["anp"]
    assert f"| ties | {100 * summary['ties', 2]['anp']:.1f} | {100 * ties3:.1f} |" in md
    for p in ("anp_plot", "per_task_plot"):
        assert paths[p].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.console_table(result)
    assert f"{100 * ties3:.1f}" in table.splitlines()[[l.split()[0] for l in table.splitlines()].index("ties")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["results.csv", "results.md", "anp_vs_tasks.png", "per_task.png"])


def test_a_second_run_reuses_the_experts(tasks, backbone, tmp_path, monkeypatch):
    first = build_experts(tasks, tmp_path / "c", backbone=backbone, **LEARNING)
    a = _run(first, tasks, backbone, [hn.Variant("ties", "ties")], subsets_per_size=1)

    def no_training(*args, **kwargs):
        raise AssertionError("fine_tune called although the experts are cached")

    monkeypatch.setattr(ex, "fine_tune", no_training)
    again = build_experts(tasks, tmp_path / "c", backbone=backbone, **LEARNING)
    assert not any(e.built for e in again.values())
    b = _run(again, tasks, backbone, [hn.Variant("ties", "ties")], subsets_per_size=1)
    assert [(r.variant, r.accuracy, r.anp) for r in a.rows] == [(r.variant, r.accuracy, r.anp) for r in b.rows]


# ------------------------------------------------------------------------------------------------ resuming
RESUME_ROWS = [hn.Variant("task_arithmetic", "task_arithmetic", grid={"lam": (0.3, 1.0)}),
               hn.Variant("weight_average", "weight_average")]


class _Stop(Exception):
    pass


@pytest.fixture
def computed(monkeypatch):
    """The subsets the harness computes (not read back from a checkpoint), in order."""
    seen = []
    real = hn._subset_rows

    def spy(h, rows, size, subset, experts):
        seen.append(tuple(subset))
        return real(h, rows, size, subset, experts)

    monkeypatch.setattr(hn, "_subset_rows", spy)
    return seen


def _outcome(result):
    """Everything of the rows but the wall times (which a rerun measures anew), as JSON (NaN equals NaN)."""
    return json.dumps([(r.size, r.subset, r.variant, r.method, r.params, r.accuracy, r.anp, r.gap_closed,
                        r.validation_anp, r.note) for r in result.rows])


def _interrupted(experts, tasks, backbone, path, after, **kw):
    """A checkpointed run stopped once `after` subsets are done."""
    done = []

    def on_row(r):
        if r.variant == "expert":
            done.append(r.subset)
        if len(done) == after:
            raise _Stop

    with pytest.raises(_Stop):
        _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2), checkpoint=path, on_row=on_row, **kw)


def test_an_interrupted_run_resumes_with_the_next_subset(experts, tasks, backbone, tmp_path, computed):
    clean = _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2))
    order = [r.subset for r in clean.rows if r.variant == "expert"]
    assert len(order) == 6 and computed == order
    path = tmp_path / "progress.jsonl"
    computed.clear()
    _interrupted(experts, tasks, backbone, path, after=4)
    assert computed == order[:4]
    computed.clear()
    resumed = _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2), checkpoint=path)
    assert computed == order[4:]                                   # only the subsets not finished before
    assert _outcome(resumed) == _outcome(clean)
    computed.clear()
    again = _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2), checkpoint=path)
    assert computed == [] and _outcome(again) == _outcome(clean)
    assert [r.merge_seconds for r in again.rows] == [r.merge_seconds for r in resumed.rows]


def test_a_checkpoint_of_other_settings_is_not_reused(experts, tasks, backbone, tmp_path, computed):
    path = tmp_path / "progress.jsonl"
    _interrupted(experts, tasks, backbone, path, after=3)
    computed.clear()
    other = _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2), checkpoint=path, test_limit=5)
    assert len(computed) == 6                                      # another test limit: nothing reused
    assert _outcome(other) == _outcome(_run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2), test_limit=5))
    computed.clear()
    _run(experts, tasks, backbone, RESUME_ROWS[:1], sizes=(1, 2), checkpoint=path, test_limit=5)
    assert len(computed) == 6                                      # other rows: nothing reused either
    computed.clear()
    _run(experts, tasks, backbone, RESUME_ROWS[:1], sizes=(1, 2), checkpoint=path, test_limit=5)
    assert computed == []


def test_a_line_cut_short_is_computed_again(experts, tasks, backbone, tmp_path, computed):
    clean = _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2))
    order = [r.subset for r in clean.rows if r.variant == "expert"]
    path = tmp_path / "progress.jsonl"
    _interrupted(experts, tasks, backbone, path, after=3)
    text = path.read_text()
    path.write_text(text[:text.rstrip("\n").rindex("\n") + 40])  # the third subset's line, cut short
    computed.clear()
    resumed = _run(experts, tasks, backbone, RESUME_ROWS, sizes=(1, 2), checkpoint=path)
    assert computed == order[2:]
    assert _outcome(resumed) == _outcome(clean)
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line) for line in lines)   # the key, then six subsets


def test_a_last_line_without_its_newline_is_kept_and_the_next_starts_on_its_own(tmp_path):
    from pymerge.eval.resume import SubsetLog
    path = tmp_path / "progress.jsonl"
    rows = {n: [hn.Row(1, (n,), "expert", "expert", {"lam": 0.5}, {n: 0.5}, 1.0, 0.0, 1.5, 0.25, 0.0)]
            for n in "ab"}
    SubsetLog(path, {"seed": 0}, hn.Row).add(1, ("a",), rows["a"])
    path.write_text(path.read_text().rstrip("\n"))                 # interrupted before the newline
    log = SubsetLog(path, {"seed": 0}, hn.Row)
    assert log.done(1, ("a",)) == rows["a"] and log.done(1, ("b",)) is None
    log.add(1, ("b",), rows["b"])
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and [json.loads(line)["subset"] for line in lines[1:]] == [["a"], ["b"]]
    assert SubsetLog(path, {"seed": 0}, hn.Row).done(1, ("b",)) == rows["b"]
    assert SubsetLog(path, {"seed": 1}, hn.Row).done(1, ("a",)) is None   # another key: replaced
    assert path.read_text().splitlines() == [json.dumps({"key": {"seed": 1}})]


# ------------------------------------------------------------------------------------- a user's models
def _hf_models(backbone_dir, tmp_path, tasks, experts):
    """Each expert's body saved as a BertForSequenceClassification (its own classifier head), as a user would
    have fine-tuned it."""
    from transformers import BertForSequenceClassification
    dirs = {}
    for task in tasks:
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(backbone_dir, num_labels=task.num_classes)
        body = experts[task.name].body_state()
        model.bert.load_state_dict(body, strict=False)
        dirs[task.name] = tmp_path / f"hf-{task.name}"
        model.save_pretrained(dirs[task.name])
    return dirs


def test_model_dirs_suite_merges_the_body_and_keeps_each_classifier(backbone_dir, tmp_path, tasks, experts):
    dirs = _hf_models(backbone_dir, tmp_path, tasks, experts)
    suite = hn.suite_from_model_dirs(backbone_dir, dirs, tasks, max_length=SETTINGS["max_length"])
    assert all(not k.startswith("classifier.") for k in suite.base_state)
    assert any(k.startswith("bert.pooler.") for k in suite.base_state)
    result = hn.run_evaluation(suite, [hn.Variant("task_arithmetic", "task_arithmetic", {"lam": 0.0})], (2,),
                               subsets_per_size=1)
    # λ = 0: the pretrained backbone with each model's classifier, as the pretrained row
    row, pre = _rows(result, "task_arithmetic")[0], _rows(result, "pretrained")[0]
    assert row.accuracy == pre.accuracy
    from transformers import BertForSequenceClassification, BertTokenizer
    tok = BertTokenizer.from_pretrained(backbone_dir)
    for n in row.subset:
        model = BertForSequenceClassification.from_pretrained(dirs[n]).eval()
        task = next(t for t in tasks if t.name == n)
        texts, labels = task.split("test")
        with torch.no_grad():
            pred = [model(**tok(t, truncation=True, max_length=SETTINGS["max_length"], return_tensors="pt"))
                    .logits.argmax(-1).item() for t in texts]
        assert result.experts[n]["test"] == sum(p == y for p, y in zip(pred, labels)) / len(labels)


def test_model_dirs_errors_name_the_directory(backbone_dir, tmp_path, tasks, experts):
    dirs = _hf_models(backbone_dir, tmp_path, tasks[:1], experts)
    with pytest.raises(ValueError, match="model t1=.*no task named 't1'"):
        hn.suite_from_model_dirs(backbone_dir, {"t1": dirs["t0"]}, tasks[:1])
    three = task_from_jsonl("t3", tmp_path / "t0.jsonl")
    object.__setattr__(three, "class_names", ("a", "b", "c"))
    with pytest.raises(ValueError, match="model t3=.*2 labels, task 't3' has 3 classes"):
        hn.suite_from_model_dirs(backbone_dir, {"t3": dirs["t0"]}, [three])
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        hn.suite_from_model_dirs(backbone_dir, {"t0": tmp_path}, tasks[:1])


def test_plot_colours_stay_distinct_beyond_the_default_cycle():
    """A suite with every method has 11+ rows: the default colour cycle (10) would give two rows one colour."""
    plt = report._pyplot()
    for n in (3, 10, 12, 20):
        colours = report._colors(plt, n)
        assert len(colours) == n and len(set(colours)) == n
