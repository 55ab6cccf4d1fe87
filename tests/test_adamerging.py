"""AdaMerging on the pymerge.learn machinery: entropy objective, clamp, official defaults, errors."""
import importlib.metadata

import pytest
import torch
import yaml

import pymerge
from pymerge import learn
from pymerge.methods import adamerging as ada

from test_divmerge import TokenNet, finetunes, one_thread, token_data  # noqa: F401 (one_thread: autouse)


def setup(T=2, dtype=torch.float64):
    torch.manual_seed(0)
    base = TokenNet().to(dtype)
    return base, finetunes(base, T, scale=0.5, dtype=dtype), token_data(T, n=16)


def mean_entropy(result, models, data):
    """sum_t mean entropy of task t's merged model (own head) over all its examples."""
    total = 0.0
    for t, name in enumerate(result.tasks):
        m = TokenNet(models[t].head.out_features).to(models[t].head.weight.dtype)
        m.load_state_dict(result.task_state_dicts[name])
        batch = learn.collate(learn.collect_examples(data[t]))
        with torch.no_grad():
            total += float(pymerge.ops.entropy(m(**batch)["logits"], backend="reference"))
    return total


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_decreases_and_clamp_holds(granularity):
    base, models, data = setup()
    start = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", granularity=granularity, steps=0,
                               progress=False, backend="reference")
    assert (start.coefficients == 0.3).all()                        # official init
    r = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", granularity=granularity, lr=0.05,
                           steps=120, progress=False, backend="reference")
    assert mean_entropy(r, models, data) < mean_entropy(start, models, data) - 0.05
    assert float(r.coefficients.min()) >= 0.0 and float(r.coefficients.max()) <= 1.0
    # The unconstrained optimum lies outside [0, 1] here: some coefficients sit exactly on a bound.
    assert ((r.coefficients == 0.0) | (r.coefficients == 1.0)).any()
    # Without the clamp the same run leaves [0, 1].
    free = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", granularity=granularity,
                              lr=0.05, steps=120, clamp=None, progress=False, backend="reference")
    assert float(free.coefficients.max()) > 1.0 or float(free.coefficients.min()) < 0.0


def fusionbench_adamerging_config():
    """FusionBench's AdaMerging settings (fusion_bench_config/method/adamerging/clip.yaml, installed with
    fusion-bench by `make test`): an independent record of the official code's init, lr and batch size.
    FusionBench departs from the official code on steps (1000, not 500) and clamping (off), so those two are not
    compared with it (docs/METHODS.md §AdaMerging)."""
    dist = importlib.metadata.distribution("fusion-bench")      # PackageNotFoundError when it is not installed
    path = dist.locate_file("fusion_bench_config/method/adamerging/clip.yaml")
    return yaml.safe_load(path.read_text())


def test_defaults_follow_the_official_settings():
    """What a run with default options does, against FusionBench's record of the official settings."""
    official = fusionbench_adamerging_config()
    init, lr, per_task = float(official["init_values"]), float(official["lr"]), int(official["batch_size"])
    base, models, data = setup()
    kw = dict(task_specific_keys=r"^head\.", granularity="layer", progress=False, backend="reference")
    start = pymerge.adamerging(base, models, data, steps=0, **kw)
    assert (start.coefficients == init).all()
    one = pymerge.adamerging(base, models, data, steps=1, **kw)
    # Adam's first step moves every coefficient by lr * |g| / (|g| + eps): lr itself for gradients >> eps = 1e-8.
    moved = (one.coefficients - init).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-4, atol=0)
    assert one.config["batch_size"] == per_task * len(models) and one.method == "adamerging"


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_gradient_matches_finite_differences(granularity):
    base, models, data = setup()
    examples = [learn.collect_examples(d, limit=6) for d in data]
    merged = learn.MergedModel.build(base, models, task_specific_keys=r"^head\.", granularity=granularity)
    assert merged.verify([ex[:2] for ex in examples]) == {"gathered": True, "batched": True}
    tasks = [learn.TaskExamples(str(t), ex) for t, ex in enumerate(examples)]
    opt = learn.CoefficientOptimizer(merged, tasks, ada.EntropyObjective(backend="reference"))
    g = torch.Generator().manual_seed(1)
    gamma0 = torch.rand(merged.gamma.shape, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda gam: opt.loss(gamma=gam), (gamma0,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_init_from_starts_at_zero_and_cart_runs():
    base, models, data = setup()
    b = base.state_dict()
    avg = {k: sum(m.state_dict()[k] for m in models) / 2 for k in b if not k.startswith("head")}
    r = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", init_from=avg, steps=0,
                           progress=False)
    assert (r.coefficients == 0).all()
    for k, v in avg.items():
        torch.testing.assert_close(r.state_dict[k], v)
    c = pymerge.adamerging(base, models, data, task_specific_keys=r"^head\.", start="cart", granularity="task",
                           lr=0.05, steps=20, progress=False, backend="reference")
    assert c.config["start"] == "cart" and len(c.losses) == 20


@pytest.mark.parametrize("kw,match", [
    (dict(data={"task0": token_data(1)[0]}), r"have no data"),
    (dict(data={"task0": [], "task1": token_data(1)[0]}), r"task 'task0' is empty"),
    (dict(divergence="js"), r"unknown option\(s\) \['divergence'\]"),
    (dict(clamp=(1.0, 0.0)), "clamp"),
    (dict(temperature=0), "temperature"),
    (dict(granularity="model"), "granularity"),
])
def test_bad_inputs(kw, match):
    base, models, data = setup()
    args = dict(task_specific_keys=r"^head\.", steps=1, progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pymerge.adamerging(base, models, args.pop("data", data), **args)
