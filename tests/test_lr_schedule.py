"""The learning-rate schedule of a learned merge (lr_schedule): 'constant' (the default) or 'cosine', lr decayed
over the run's steps by half a cosine; applied before each step of run(), recorded in the result's config."""
import math

import pytest
import torch

import pymerge
from pymerge import learn
from pymerge.learn.optimizer import lr_at

from test_divmerge import TokenNet, finetunes, one_thread, teacher_cache_dir, token_data  # noqa: F401 (autouse)
from test_divmerge_batching import build


def test_lr_at():
    assert [lr_at(0.2, "constant", i, 5) for i in range(1, 6)] == [0.2] * 5
    got = [lr_at(0.2, "cosine", i, 4) for i in range(1, 5)]
    want = [0.2, 0.1 * (1 + math.sqrt(0.5)), 0.1, 0.1 * (1 - math.sqrt(0.5))]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lr_at(1.0, "cosine", 1, 1) == 1.0          # a one-step run runs at lr
    with pytest.raises(ValueError, match="lr_schedule = 'linear'"):
        lr_at(1.0, "linear", 1, 3)


def test_run_applies_the_schedule_before_each_step():
    """Γ after run(n) with the cosine schedule is Γ of n plain Adam steps whose lr the caller sets to
    lr (1 + cos(pi (i - 1) / n)) / 2 before step i (float64, the same batches)."""
    n, lr = 6, 0.05
    merged, opt = build([3, 3])
    scheduled = learn.CoefficientOptimizer(merged, opt.tasks, opt.objective, lr=lr, lr_schedule="cosine",
                                           batch_size=8)
    scheduled.run(n, progress=False, log_every=0)
    merged_ref, opt_ref = build([3, 3])
    ref = learn.CoefficientOptimizer(merged_ref, opt_ref.tasks, opt_ref.objective, lr=lr, batch_size=8)
    for i in range(n):
        ref.optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / n))
        ref.step()
    assert torch.equal(merged.gamma.detach(), merged_ref.gamma.detach())
    assert scheduled.losses == ref.losses
    # and it is not the constant run
    merged_c, opt_c = build([3, 3])
    constant = learn.CoefficientOptimizer(merged_c, opt_c.tasks, opt_c.objective, lr=lr, batch_size=8)
    constant.run(n, progress=False, log_every=0)
    assert not torch.allclose(merged_c.gamma.detach(), merged.gamma.detach())


@pytest.mark.parametrize("method,default", [(pymerge.divmerge, "cosine"), (pymerge.adamerging, "constant")])
def test_methods_take_and_record_the_schedule(method, default):
    base = TokenNet().double()
    models = finetunes(base, 2)
    kw = dict(task_specific_keys=r"^head\.", progress=False, backend="reference", steps=5, lr=0.05)
    assert method(base, models, token_data(2), **kw).config["lr_schedule"] == default
    constant = method(base, models, token_data(2), lr_schedule="constant", **kw)
    cosine = method(base, models, token_data(2), lr_schedule="cosine", **kw)
    assert constant.config["lr_schedule"] == "constant" and cosine.config["lr_schedule"] == "cosine"
    assert not torch.allclose(constant.coefficients, cosine.coefficients)
    with pytest.raises(ValueError, match="lr_schedule"):
        method(base, models, token_data(2), lr_schedule="linear", **kw)


def test_divmerge_defaults_per_model_kind():
    """lr=None / lr_schedule=None: 0.5 with the cosine for classification (the causal-LM default, 0.2 constant,
    is checked in test_divmerge_generative.py)."""
    base = TokenNet().double()
    r = pymerge.divmerge(base, finetunes(base, 2), token_data(2), task_specific_keys=r"^head\.", progress=False,
                         backend="reference", steps=1)
    assert (r.config["kind"], r.config["lr"], r.config["lr_schedule"]) == ("classification", 0.5, "cosine")
