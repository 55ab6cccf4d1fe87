"""A learned merge without a progress bar still reports: every N steps an INFO line through the logger
"pymerge.learn" (step, loss, elapsed, ETA), about ten a run by default, and one line per task read."""
import logging
import re

import pytest
import torch

import pymerge

from test_divmerge import TokenNet, finetunes, one_thread, teacher_cache_dir, token_data  # noqa: F401 (autouse: 1 thread, a per-test cache)




def run(method, caplog, **kw):
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pymerge.learn"):
        r = method(base, models, token_data(2), task_specific_keys=r"^head\.", progress=False, backend="reference",
                   **kw)
    steps = [rec.getMessage() for rec in caplog.records if rec.name == "pymerge.learn" and " step " in
             rec.getMessage()]
    return r, steps, [rec.getMessage() for rec in caplog.records if rec.name == "pymerge.learn"]


@pytest.mark.parametrize("method", [pymerge.divmerge, pymerge.adamerging])
def test_progress_lines_without_a_bar(method, caplog):
    r, steps, lines = run(method, caplog, steps=30)
    assert len(steps) == 10                                          # default: about ten lines a run
    pattern = re.compile(rf"{method.__name__}: step (\d+)/30, loss (\S+) \(running \S+\), [\d.]+ s elapsed, "
                         r"ETA [\d.]+ s")
    got = [pattern.fullmatch(m) for m in steps]
    assert all(got), steps
    assert [int(m.group(1)) for m in got] == list(range(3, 31, 3))
    assert float(got[-1].group(2)) == pytest.approx(r.losses[-1], rel=1e-3)
    assert sum("task 1/2 'task0' read: 12 examples" in m for m in lines) == 1
    assert sum(bool(re.search(r"models read in [\d.]+ s; 30 steps of \d+ examples", m)) for m in lines) == 1


def test_log_every(caplog):
    _, steps, _ = run(pymerge.divmerge, caplog, steps=7, log_every=3)
    assert [m.split(",")[0] for m in steps] == ["divmerge: step 3/7", "divmerge: step 6/7", "divmerge: step 7/7"]
    _, steps, lines = run(pymerge.divmerge, caplog, steps=7, log_every=0)
    assert not steps and not lines
