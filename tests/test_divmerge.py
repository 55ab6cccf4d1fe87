"""DivMerge and the learned-coefficient machinery (pymerge.learn): gradients, recovery, starts, errors."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import pymerge
from pymerge import learn, teachers
from pymerge.methods.divmerge import DivergenceObjective
from pymerge.methods.learned_starts import learned_start


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: intra-op threads only add contention (several test processes share the machine; a
    # loaded 2-thread pool spins ~40 ms per tiny matmul).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def teacher_cache_dir(tmp_path_factory, monkeypatch):
    """divmerge caches its teachers on disk by default: a fresh cache per test, never ~/.cache."""
    path = tmp_path_factory.mktemp("teacher-cache")
    monkeypatch.setenv("PYMERGE_CACHE", str(path))
    return path


# ------------------------------------------------------------------------------------------- small models
class TokenNet(nn.Module):
    """Embedding -> mean over tokens -> MLP -> head (num_labels wide)."""

    def __init__(self, num_labels=3, vocab=23, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh())
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_labels)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return {"logits": self.head(self.norm(self.body(h.mean(1))))}


def finetunes(base, T, scale=0.3, labels=(3, 2, 4), seed=0, dtype=torch.float64):
    """T fine-tuned copies of base: random body deltas, own random head (widths `labels`)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(T):
        m = TokenNet(labels[t % len(labels)], base.emb.num_embeddings, base.emb.embedding_dim).to(dtype)
        sd = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
        m.load_state_dict(sd, strict=False)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not name.startswith("head."):
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        out.append(m)
    return out


def perturbed_copies(base, T, scale):
    """T deep copies of base, every parameter (tied ones once) plus scale * N(0, 1) noise."""
    models = []
    for _ in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn_like(p))
        models.append(m)
    return models


def token_data(T, n=12, L=5, vocab=23, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(T):
        batches = []
        for _ in range(n // batch):
            ids = torch.randint(1, vocab, (batch, L), generator=g)
            batches.append({"input_ids": ids, "attention_mask": torch.ones(batch, L, dtype=torch.long)})
        data.append(batches)
    return data


def make_problem(T=2, granularity="layer", divergence="js", dtype=torch.float64, gather=True, batch=True,
                 seed=0, **build):
    torch.manual_seed(seed)
    base = TokenNet().to(dtype)
    models = finetunes(base, T, seed=seed, dtype=dtype)
    data = token_data(T)
    examples = [learn.collect_examples(d, f"t{t}") for t, d in enumerate(data)]
    objective = DivergenceObjective(divergence, backend="reference")
    targets = [None] * T

    def on_model(t, module):
        targets[t] = teachers.teacher_targets(module, examples[t], objective, t)
    merged = learn.MergedModel.build(base, models, task_specific_keys=r"^head\.", granularity=granularity,
                                       gather_embeddings=gather, batch_tasks=batch, on_model=on_model, **build)
    merged.verify([ex[:2] for ex in examples])
    tasks = [learn.TaskExamples(f"t{t}", examples[t], targets[t]) for t in range(T)]
    opt = learn.CoefficientOptimizer(merged, tasks, objective, lr=1e-2)
    return base, models, merged, opt


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("granularity", ["task", "layer"])
@pytest.mark.parametrize("divergence", ["js", "kl"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast-paths", "dense-per-task"])
def test_gradient_matches_finite_differences(granularity, divergence, fast):
    _, _, merged, opt = make_problem(granularity=granularity, divergence=divergence, gather=fast, batch=fast)
    if fast:
        assert merged.gathered_keys == ["emb.weight"] and merged.batched is not None
    else:
        assert not merged.gathered_keys and merged.batched is None
    g = torch.Generator().manual_seed(3)
    gamma0 = (0.2 + 0.6 * torch.rand(merged.gamma.shape, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda gam: opt.loss(gamma=gam), (gamma0,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fast_paths_give_the_plain_loss_and_gradient():
    losses, grads = [], []
    for fast in (True, False):
        _, _, merged, opt = make_problem(gather=fast, batch=fast)
        loss = opt.loss()
        loss.backward()
        losses.append(loss.detach())
        grads.append(merged.gamma.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-13)


def test_merged_params_are_theta0_plus_gamma_tau():
    base, models, merged, _ = make_problem(T=3)
    gam = torch.randn(merged.gamma.shape, dtype=torch.float64)
    shared, per_task = merged.state_dicts(gam)
    b = base.state_dict()
    for k in b:
        if k.startswith("head."):
            continue
        want = b[k] + sum(gam[merged.groups.index(merged.group_of[k]), t] * (m.state_dict()[k] - b[k])
                          for t, m in enumerate(models))
        torch.testing.assert_close(shared[k], want)
    for t, m in enumerate(models):
        for k in ("head.weight", "head.bias"):
            assert per_task[t][k] is m.state_dict()[k] or torch.equal(per_task[t][k], m.state_dict()[k])
        assert "head.weight" not in shared


# ------------------------------------------------------------------------------------------------ recovery
# (granularity, divergence, optimiser): a small constant lr, and the defaults (lr 0.5 decayed by a cosine)
@pytest.mark.parametrize("granularity,divergence,optimiser", [
    ("task", "js", {"lr": 0.05, "lr_schedule": "constant"}), ("layer", "kl", {"lr": 0.05, "lr_schedule": "constant"}),
    ("layer", "js", {})])
def test_single_task_recovers_gamma_one(granularity, divergence, optimiser):
    torch.manual_seed(0)
    base = TokenNet().double()
    (model,) = finetunes(base, 1, scale=0.5)
    data = token_data(1, n=16)
    r = pymerge.divmerge(base, [model], data, task_specific_keys=r"^head\.", granularity=granularity,
                         divergence=divergence, init=0.2, steps=250 if granularity == "task" else 1000,
                         progress=False, backend="reference", **optimiser)
    assert r.losses[-1] < 1e-5 and r.losses[0] > 1e-2
    coef = r.coefficients
    if granularity == "task":
        assert coef.shape == (1,) and abs(float(coef[0]) - 1.0) < 0.02
    else:
        assert coef.shape == (len(r.groups), 1)
        assert (coef - 1).abs().max() < 0.05     # the loss is flat along some keys: slower, but there
    # The merged model reproduces the fine-tuned one.
    merged = TokenNet().double()
    merged.load_state_dict(r.task_state_dicts["task0"])
    x = data[0][0]
    torch.testing.assert_close(merged(**x)["logits"], model(**x)["logits"], rtol=1e-2, atol=1e-3)


def test_clamp_holds_gamma_inside_its_range():
    """clamp=(low, high) projects Γ after every step: the single-task optimum Γ = 1 lies above 0.6, so the
    clamped run ends on the bound (the unclamped one reaches 1: test_single_task_recovers_gamma_one)."""
    torch.manual_seed(0)
    base = TokenNet().double()
    (model,) = finetunes(base, 1, scale=0.5)
    r = pymerge.divmerge(base, [model], token_data(1, n=16), task_specific_keys=r"^head\.", granularity="task",
                         init=0.2, lr=0.05, steps=60, clamp=(0.0, 0.6), progress=False, backend="reference")
    assert float(r.coefficients[0]) == 0.6
    with pytest.raises(ValueError, match="clamp"):
        pymerge.divmerge(base, [model], token_data(1, n=16), clamp=(1.0, 0.0), progress=False)


class TwoBranch(nn.Module):
    """Two independent 4-wide branches packed in block-diagonal layers; head reads one branch's features."""

    def __init__(self, num_labels=2):
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.l2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, num_labels)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def two_branch_models():
    torch.manual_seed(0)
    base = TwoBranch().double()
    with torch.no_grad():
        base.l2.weight[:4, 4:] = 0
        base.l2.weight[4:, :4] = 0
    models = []
    for t, rows in enumerate((slice(0, 4), slice(4, 8))):
        m = TwoBranch(2 + t).double()
        m.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("head")}, strict=False)
        with torch.no_grad():
            m.l1.weight[rows] += 0.8 * torch.randn(4, 5, dtype=torch.float64)
            m.l1.bias[rows] += 0.8 * torch.randn(4, dtype=torch.float64)
            m.l2.weight[rows, rows] += 0.8 * torch.randn(4, 4, dtype=torch.float64)
            m.l2.bias[rows] += 0.8 * torch.randn(4, dtype=torch.float64)
            m.head.weight.zero_()
            m.head.weight[:, rows] = 2 * torch.randn(2 + t, 4, dtype=torch.float64)   # reads its branch only
        models.append(m)
    return base, models


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_disjoint_task_vectors_recover_gamma_one_one(granularity):
    base, models = two_branch_models()
    g = torch.Generator().manual_seed(5)
    data = [[torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(3)] for _ in models]
    r = pymerge.divmerge(base, models, data, task_specific_keys=r"^head\.", granularity=granularity, lr=0.05,
                         steps=200, progress=False, backend="reference")
    assert r.losses[-1] < 1e-6
    if granularity == "task":
        torch.testing.assert_close(r.coefficients, torch.ones(2, dtype=torch.float64), atol=0.03, rtol=0)
    else:
        assert (r.coefficients - 1).abs().max() < 0.05

    def js_of(state_dicts):
        total = 0.0
        for t, m in enumerate(models):
            merged = TwoBranch(2 + t).double()
            merged.load_state_dict(state_dicts[t])
            x = torch.cat(data[t])
            with torch.no_grad():
                total += float(pymerge.ops.js_divergence(merged(x), m(x), backend="reference"))
        return total
    b = base.state_dict()
    ta = []
    for m in models:   # task arithmetic with the common default lambda = 0.3
        sd = {k: b[k] + 0.3 * sum(mm.state_dict()[k] - b[k] for mm in models) for k in b if not k.startswith("head")}
        sd.update({k: v for k, v in m.state_dict().items() if k.startswith("head")})
        ta.append(sd)
    learned_js = js_of([r.task_state_dicts[n] for n in r.tasks])
    assert learned_js < 1e-6
    assert js_of(ta) > 1e-3


# ----------------------------------------------------------------------------------------- starting points
def test_cart_start_centered_low_rank():
    base, models, merged, _ = make_problem(T=3, start=learned_start("cart", cart_rank_ratio=0.34), gather=False)
    b = base.state_dict()
    thetas = [m.state_dict() for m in models]
    zero = torch.zeros(merged.gamma.shape, dtype=torch.float64)
    shared, _ = merged.state_dicts(zero)
    for k in shared:     # Gamma = 0: theta_avg
        if k in merged.shape_of:
            torch.testing.assert_close(shared[k], sum(th[k] for th in thetas) / 3)
    k = "body.0.weight"  # 6x6: rank max(1, int(0.34 * 6)) = 2
    for t in range(3):
        delta = merged.delta_of(k, t)
        assert torch.linalg.matrix_rank(delta, atol=1e-10) <= 2
        centered = thetas[t][k] - sum(th[k] for th in thetas) / 3
        U, S, Vh = torch.linalg.svd(centered)
        torch.testing.assert_close(delta, (U[:, :2] * S[:2]) @ Vh[:2])
    # Full rank: Gamma = e_t gives theta_avg + (theta_t - theta_avg) = theta_t.
    _, _, full, _ = make_problem(T=3, start=learned_start("cart", cart_rank_ratio=1.0))
    for t in range(3):
        e = torch.zeros(full.gamma.shape, dtype=torch.float64)
        e[:, t] = 1
        shared, _ = full.state_dicts(e)
        for k in full.merged_keys:
            torch.testing.assert_close(shared[k], thetas[t][k])


def test_cart_divmerge_runs_and_improves():
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    data = token_data(2)
    r = pymerge.divmerge(base, models, data, task_specific_keys=r"^head\.", start="cart", granularity="task",
                         lr=0.05, steps=40, progress=False, backend="reference")
    assert r.config["start"] == "cart"
    assert r.losses[-1] < r.losses[0]


def test_init_from_state_dict_and_callable():
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    data = token_data(2)
    b = base.state_dict()
    ta = {k: b[k] + 0.3 * sum(m.state_dict()[k] - b[k] for m in models) for k in b if not k.startswith("head")}
    seen = {}

    def static(base_sd, model_sds):
        seen["ok"] = all(torch.allclose(model_sds[t][k], models[t].state_dict()[k]) for t in range(2)
                         for k in base_sd)
        return {k: base_sd[k] + 0.3 * sum(sd[k] - base_sd[k] for sd in model_sds) for k in base_sd}
    for init_from in (ta, static):
        r = pymerge.divmerge(base, models, data, task_specific_keys=r"^head\.", init_from=init_from, steps=0,
                             progress=False, backend="reference")
        assert (r.coefficients == 0).all()                      # starts exactly at the static merge
        for k, v in ta.items():
            torch.testing.assert_close(r.state_dict[k], v)
    assert seen["ok"]
    r = pymerge.divmerge(base, models, data, task_specific_keys=r"^head\.", init_from=ta, lr=0.05, steps=30,
                         progress=False, backend="reference")
    assert r.losses[-1] < r.losses[0]


def test_init_from_method_name():
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    b = base.state_dict()
    r = pymerge.divmerge(base, models, token_data(2), task_specific_keys=r"^head\.", init_from="task_arithmetic",
                         init_from_params={"lam": 0.3, "backend": "reference"}, steps=0, progress=False,
                         backend="reference")
    for k in r.state_dict:
        if k in b and b[k].is_floating_point():
            want = b[k] + 0.3 * sum(m.state_dict()[k] - b[k] for m in models)
            torch.testing.assert_close(r.state_dict[k], want)


# ------------------------------------------------------------------------------------------ API & results
def test_result_state_dicts_coefficients_json(tmp_path):
    torch.manual_seed(0)
    base = TokenNet()
    models = finetunes(base, 2, dtype=torch.float32)
    data = {"sst2": token_data(1)[0], "mnli": token_data(1, seed=2)[0]}
    r = pymerge.divmerge(base, {"sst2": models[0], "mnli": models[1]}, data, task_specific_keys=r"^head\.",
                         layer_groups=r"^(body)\.", steps=5, progress=False)
    assert r.tasks == ["sst2", "mnli"] and len(r.losses) == 5
    assert "body" in r.groups and r.group_of["body.0.weight"] == "body" == r.group_of["body.2.bias"]
    assert r.coefficients.shape == (len(r.groups), 2)
    path = r.save_coefficients(tmp_path / "gamma.json")
    saved = json.loads(path.read_text())
    assert saved["method"] == "divmerge" and saved["tasks"] == ["sst2", "mnli"]
    assert math.isclose(saved["coefficients"]["mnli"]["body"], float(r.coefficients[r.groups.index("body"), 1]))
    # A task's complete state dict loads into its architecture (own head width) and is the merged model.
    m = TokenNet(2)
    m.load_state_dict(r.task_state_dicts["mnli"])
    assert r.heads["mnli"]["head.weight"].shape == (2, 6)
    assert "head.weight" not in r.state_dict


def test_loaders_dataloader_and_float32():
    torch.manual_seed(0)
    base = TwoBranch()
    made = []

    def loader(t):
        def load():
            m = TwoBranch(2 + t)
            m.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("head")}, strict=False)
            with torch.no_grad():
                m.l1.weight.add_(0.3 * torch.randn_like(m.l1.weight))
            made.append(t)
            return m
        return load
    ds = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(10, 5)), batch_size=4)
          for _ in range(2)]
    r = pymerge.divmerge(base, [loader(0), loader(1)], ds, task_specific_keys=r"^head\.", granularity="task",
                         steps=3, progress=False)
    assert made == [0, 1] and r.coefficients.dtype == torch.float32 and len(r.losses) == 3


def test_verify_switches_off_gathering_when_weight_is_read_elsewhere():
    class Projecting(TokenNet):      # reads the embedding table outside the embedding's forward
        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids).mean(1)
            return self.head(self.body(h)) + (h @ self.emb.weight.T)[:, :self.head.out_features]
    torch.manual_seed(0)
    base = Projecting().double()
    models = perturbed_copies(base, 2, 0.3)
    examples = [learn.collect_examples(d) for d in token_data(2)]
    merged = learn.MergedModel.build(base, models)
    assert merged.gathered_keys == ["emb.weight"]
    state = merged.verify([ex[:2] for ex in examples])
    assert state == {"gathered": False, "batched": True} and not merged.gathered_keys
    objective = DivergenceObjective(backend="reference")
    targets = [teachers.teacher_targets(m, ex, objective, t) for t, (m, ex) in enumerate(zip(models, examples))]
    opt = learn.CoefficientOptimizer(merged, [learn.TaskExamples(str(t), examples[t], targets[t])
                                                for t in range(2)], objective)
    gamma0 = merged.gamma.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda g: opt.loss(gamma=g), (gamma0,), eps=1e-6, atol=1e-7)


def test_tied_weights_are_merged_once_and_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.mix = nn.Linear(4, 4)
            self.out = nn.Linear(4, 11, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.mix(self.emb(ids).mean(1))))
    torch.manual_seed(0)
    base = Tied().double()
    models = perturbed_copies(base, 2, 0.2)
    data = [[torch.randint(0, 11, (4, 3))] for _ in range(2)]
    r = pymerge.divmerge(base, models, data, granularity="task", steps=3, progress=False, backend="reference")
    assert "out.weight" not in r.state_dict and "emb.weight" in r.state_dict
    m = Tied().double()
    m.load_state_dict(r.state_dict, strict=False)
    assert m.out.weight is m.emb.weight


# --------------------------------------------------------------------------------------------- bad inputs
def _bad(**kw):
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    args = dict(base=base, models=models, data=token_data(2), task_specific_keys=r"^head\.", steps=1,
                progress=False, backend="reference")
    args.update(kw)
    return pymerge.divmerge(args.pop("base"), args.pop("models"), args.pop("data"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(data={"task0": token_data(1)[0]}), r"task\(s\) \['task1'\] have no data"),
    (dict(data={"task0": token_data(1)[0], "task1": token_data(1)[0], "x": []}), r"unknown task\(s\) \['x'\]"),
    (dict(data=[token_data(1)[0], []]), r"task 'task1' is empty"),
    (dict(data=[token_data(1)[0], iter(())]), r"task 'task1' is empty"),
    (dict(data=[token_data(1)[0]]), r"1 data sources for 2 tasks"),
    (dict(data=None), "no data"),
    (dict(task_specific_keys=None), r"'head.weight' is \(2, 6\).*mismatched architectures or heads"),
    (dict(task_specific_keys=r"^nothing"), "matches no key"),
    (dict(task_specific_keys="("), "not a valid regular expression"),
    (dict(granularity="block"), "granularity"),
    (dict(divergence="tv"), "divergence"),
    (dict(batch_size=1), "smaller than the number of tasks"),
    (dict(wrong_option=1), r"unknown option\(s\) \['wrong_option'\]"),
    (dict(models=[]), r"T = 0"),
    (dict(start="cart", init_from={}), "exclusive"),
    (dict(init=torch.zeros(5)), "init has shape"),
    (dict(lr=-1.0), "lr"),
    (dict(kind="seq2seq"), "kind = 'seq2seq'"),
    (dict(max_new_tokens=4), r"divmerge \(classification\): unknown option\(s\) \['max_new_tokens'\]"),
    (dict(kind="causal-lm", pad_value=0), r"divmerge \(causal-lm\): unknown option\(s\) \['pad_value'\]"),
])
def test_bad_inputs(kw, match):
    with pytest.raises(ValueError, match=match):
        _bad(**kw)


def test_mismatched_architectures_and_heads():
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    wider = TokenNet(3, d=7).double()
    with pytest.raises(ValueError, match="mismatched architectures"):
        _bad(models=[models[0], wider])
    headless = nn.Module()
    headless.emb, headless.body, headless.norm = models[1].emb, models[1].body, models[1].norm
    with pytest.raises(ValueError, match="mismatched heads"):
        _bad(models=[models[0], headless])
    with pytest.raises(ValueError, match="base lacks merged key"):
        _bad(base={k: v for k, v in base.state_dict().items() if k != "norm.weight"})
    nan = copy.deepcopy(models[1])
    with torch.no_grad():
        nan.body[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _bad(models=[models[0], nan])
    inf = copy.deepcopy(models[1])
    with torch.no_grad():
        inf.body[2].bias[1] = -float("inf")
    with pytest.raises(ValueError, match="'body.2.bias' of model 'task1' contains NaN or Inf"):
        _bad(models=[models[0], inf])
    with pytest.raises(ValueError, match="must be an nn.Module"):
        _bad(models=[models[0], "x"])


def test_finite_weights_whose_sum_overflows_are_accepted():
    """The NaN / Inf check sums each tensor first: a sum that overflows (finite elements) falls back to the
    element-wise check and is accepted; the merged weights are still theta_0 + sum_t Gamma_t tau_t."""
    torch.manual_seed(0)
    base = TokenNet().float()
    models = finetunes(base, 2, dtype=torch.float32)
    with torch.no_grad():
        for m in (base, *models):
            m.body[0].weight.fill_(2e38)          # 36 elements of 2e38: the float32 sum is +inf
        models[1].body[0].weight[0, :3] = 1e38
    assert not torch.isfinite(models[1].body[0].weight.sum())
    merged = learn.MergedModel.build(base, models, task_specific_keys=r"^head\.")
    key = "body.0.weight"
    gam = merged.gamma.detach().double()[merged.groups.index(merged.group_of[key])]
    theta0 = base.state_dict()[key].double()
    want = theta0 + sum(gam[t] * (m.state_dict()[key].double() - theta0) for t, m in enumerate(models))
    torch.testing.assert_close(merged.merged_tensor(key).double(), want)


def test_teacher_cache_on_disk(teacher_cache_dir, tmp_path):
    """The fine-tuned models' log-probabilities are cached on disk: a rerun reads them (the fine-tuned
    models are never run) and learns the same Gamma; the entries are those of teachers.classification_targets."""
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    data = token_data(2)
    calls = []
    for m in models:   # the hook sees the fine-tuned module itself, not the skeletons copied from it
        m.register_forward_hook(lambda mod, args, out, m=m: calls.append(1) if mod is m else None)
    kw = dict(task_specific_keys=r"^head\.", granularity="task", steps=4, lr=0.05, progress=False,
              backend="reference")
    first = pymerge.divmerge(base, models, data, **kw)
    assert first.config["kind"] == "classification" and first.config["teacher_cache_hits"] == 0 and calls
    assert len(list((teacher_cache_dir / "teachers").glob("*.safetensors"))) == 2
    calls.clear()
    again = pymerge.divmerge(base, models, data, divergence="js", **kw)
    assert again.config["teacher_cache_hits"] == 2 and not calls
    assert torch.equal(again.coefficients, first.coefficients) and again.losses == first.losses
    # KL reuses the same teachers (log-probabilities); a new temperature is a new entry
    assert pymerge.divmerge(base, models, data, divergence="kl", **kw).config["teacher_cache_hits"] == 2
    assert pymerge.divmerge(base, models, data, temperature=2.0, **kw).config["teacher_cache_hits"] == 0
    # the same entries as the stand-alone classification teacher, which returns the model's log-probs
    examples = learn.collect_examples(data[1])
    got = teachers.classification_targets(models[1], examples)
    assert got.loaded_from_cache and got.cache_path.parent == teacher_cache_dir / "teachers"
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(got), torch.log_softmax(models[1](**learn.collate(examples))["logits"],
                                                                       -1))
    # teacher_cache=False neither reads nor writes; cache_dir= moves the cache
    calls.clear()
    off = pymerge.divmerge(base, models, data, teacher_cache=False, cache_dir=tmp_path / "off", **kw)
    assert off.config["teacher_cache_hits"] == 0 and calls and not (tmp_path / "off").exists()
    pymerge.divmerge(base, models, data, cache_dir=tmp_path / "moved", **kw)
    assert len(list((tmp_path / "moved" / "teachers").glob("*.safetensors"))) == 2


def test_kind_auto_is_classification_for_plain_modules():
    from pymerge.methods import divmerge as dm
    assert dm.infer_kind(TokenNet(), [TokenNet(), lambda: TokenNet()]) == "classification"
    assert dm.infer_kind({"w": torch.zeros(1)}, [lambda: TokenNet()]) == "classification"
    assert dm.kind_of_architecture("Qwen2ForCausalLM") == "causal-lm" == dm.kind_of_architecture("GPT2LMHeadModel")
    assert dm.kind_of_architecture("BertForSequenceClassification") == "classification"
    assert dm.kind_of_architecture("BertModel") is None


def test_bf16_models_keep_their_dtype_and_learn():
    torch.manual_seed(0)
    base = TokenNet().to(torch.bfloat16)
    models = finetunes(base, 2, dtype=torch.bfloat16)
    r = pymerge.divmerge(base, models, token_data(2), task_specific_keys=r"^head\.", steps=30, lr=0.05,
                         progress=False)
    assert r.coefficients.dtype == torch.float32 and r.state_dict["body.0.weight"].dtype == torch.bfloat16
    assert sum(r.losses[-5:]) < 0.8 * sum(r.losses[:5])


def test_default_batch_is_eight_per_task_for_classifiers_and_four_for_causal_lms():
    """batch_size=None: 8 examples per task and step for classification (chosen on validation, docs/RESULTS.md),
    the paper's 4 per task for causal LMs; epochs then count passes over each task's examples."""
    from pymerge.methods import divmerge as dm
    assert dm.BATCH_PER_TASK == {"classification": 8, "causal-lm": 4}
    torch.manual_seed(0)
    base = TokenNet().to(torch.float64)
    models = finetunes(base, 3)
    data = token_data(3, n=48, batch=8)   # 48 examples per task
    res = pymerge.divmerge(base, models, data, task_specific_keys=r"^head\.", epochs=2, teacher_cache=False,
                           progress=False)
    assert res.config["batch_size"] == 8 * 3
    assert res.config["steps"] == len(res.losses) == 2 * 48 // 8   # 2 passes of 6 steps over 48 per task
    explicit = pymerge.divmerge(base, models, data, task_specific_keys=r"^head\.", steps=2, batch_size=6,
                                teacher_cache=False, progress=False)
    assert explicit.config["batch_size"] == 6
