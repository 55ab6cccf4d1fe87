"""pymerge's methods inside FusionBench 0.2.33 (pymerge/adapters/fusionbench.py, fusionbench_learned.py and their
Hydra configs).

Oracles: pymerge.merge / pymerge.divmerge / pymerge.adamerging on the same state dicts and data (the adapters
must add nothing but the pool bookkeeping: bitwise equal), and FusionBench's own TaskSingularVectorMerging /
ISO_C_Merge / ISO_CTS_Merge run on the same pool (float64, exact SVDs: FusionBench's config semantics, exact key
names and per-task alphas included). `make test` installs FusionBench: a missing one is an error, not a skip.
"""
import contextlib
import copy
import importlib
import io
import os
import re

import pytest
import torch
from torch import nn

import pymerge
from pymerge.adapters import fusionbench as fb
from pymerge.adapters import fusionbench_learned as fbl
from test_divmerge import TokenNet, finetunes, one_thread, teacher_cache_dir  # noqa: F401 (autouse fixtures)

from fusion_bench.modelpool import BaseModelPool  # noqa: E402 (after pymerge: the adapter's import is under test)
from fusion_bench.utils import instantiate as fusionbench_instantiate  # noqa: E402
from fusion_bench.utils.instantiate_utils import set_print_function_call  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(fb.__file__), "fusionbench_config")
METHOD_DIR = os.path.join(CONFIG_DIR, "method", "pymerge")
NAMES = ("t0", "t1", "t2")
QUIET = {"teacher_cache": False, "progress": False}


# ---------------------------------------------------------------------------------------------- models
def mlp(norm="batch"):
    """2-D keys of two shapes, 1-D keys, and with BatchNorm its int64 num_batches_tracked (passed through;
    FusionBench's own algorithms cannot subtract it, so they get LayerNorm)."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8),
                         nn.BatchNorm1d(8) if norm == "batch" else nn.LayerNorm(8), nn.Linear(8, 3))


def family(T=3, dtype=torch.float64, seed=0, norm="batch"):
    """A base and T fine-tunes = base + perturbations (every float entry, buffers included)."""
    torch.manual_seed(seed)
    base = mlp(norm).to(dtype)
    if norm == "batch":
        with torch.no_grad():
            base[3].running_var.uniform_(0.5, 2.0)
    models = []
    for _ in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for v in m.state_dict().values():
                if v.is_floating_point():
                    v.add_(0.1 * torch.randn_like(v))
        models.append(m)
    return base, models


def pool_of(base, models, **datasets):
    return BaseModelPool({"_pretrained_": base, **dict(zip(NAMES, models))}, **datasets)


def sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------------------------ static algorithms
STATIC = [
    (fb.CARTAlgorithm, dict(scaling_factor=1.5, rank=2, seed=3), "cart", dict(lam=1.5, rank=2, seed=3)),
    (fb.CARTAlgorithm, dict(rank_ratio=0.3, svd="exact", exclude_keys=["2.weight"]), "cart",
     dict(rank_ratio=0.3, svd="exact", exclude_keys=(r"^2\.weight$",))),
    (fb.TSVMAlgorithm, dict(alpha=0.7, seed=5), "tsv_m", dict(alpha=0.7, seed=5, exclude_keys=())),
    (fb.TSVMAlgorithm, dict(alpha=None, exclude_keys=["0.weight", "0.bias"], svd="exact"), "tsv_m",
     dict(alpha=1.0, svd="exact", exclude_keys=(r"^0\.weight$",))),
    (fb.IsoCAlgorithm, dict(scaling_factor=1.2), "iso_c", dict(alpha=1.2, exclude_keys=())),
    (fb.IsoCTSAlgorithm, dict(scaling_factor=1.2, common_space_fraction=0.5, seed=1), "iso_cts",
     dict(alpha=1.2, common_space_fraction=0.5, seed=1, svd="auto", exclude_keys=())),
    (fb.IsoCTSAlgorithm, dict(svd="randomized", pymerge_options={"power_iters": 1, "oversample": 2}), "iso_cts",
     dict(alpha=1.5, exclude_keys=(), svd="randomized", power_iters=1, oversample=2)),
    (fb.IsoCAlgorithm, dict(pymerge_options={"exclude_keys": [r"^4\."]}), "iso_c",        # pymerge's regexes
     dict(alpha=1.5, exclude_keys=(r"^4\.",))),
    (fb.TIESAlgorithm, dict(scaling_factor=0.8, threshold=30), "ties", dict(lam=0.8, density=0.3)),
    (fb.TIESAlgorithm, dict(threshold=0.5, pymerge_options={"weights": [1.0, 2.0, 0.5]}), "ties",
     dict(lam=1.0, density=0.5, weights=[1.0, 2.0, 0.5])),
]


@pytest.mark.parametrize("cls,fields,method,params", STATIC,
                         ids=[f"{c.__name__}-{i}" for i, (c, *_) in enumerate(STATIC)])
def test_static_algorithm_equals_pymerge_merge(cls, fields, method, params):
    base, models = family()
    before = [sd(m) for m in [base, *models]]
    merged = cls(**fields).run(pool_of(base, models))
    assert isinstance(merged, nn.Module) and merged is not base
    assert_same(sd(merged), pymerge.merge(method, sd(base), [sd(m) for m in models], **params))
    for m, b in zip([base, *models], before):        # the pool's models are not written
        assert_same(sd(m), b)


def test_static_algorithm_on_a_device_view_equals_the_plain_merge():
    base, models = family()
    got = fb.CARTAlgorithm(rank=2, device="cpu").run(pool_of(base, models))
    assert_same(sd(got), pymerge.merge("cart", sd(base), [sd(m) for m in models], rank=2))


def test_static_algorithm_takes_a_mapping_of_modules():
    base, models = family()
    got = fb.IsoCAlgorithm().run({"_pretrained_": base, **dict(zip(NAMES, models))})
    assert_same(sd(got), pymerge.merge("iso_c", sd(base), [sd(m) for m in models], alpha=1.5, exclude_keys=()))


def _rel(a, ref, base):
    num = sum(float((a[k] - ref[k]).square().sum()) for k in ref if ref[k].is_floating_point())
    den = sum(float((ref[k] - base[k]).square().sum()) for k in ref if ref[k].is_floating_point())
    return (num / den) ** 0.5


def _fusionbench_run(algorithm, pool):
    with contextlib.redirect_stdout(io.StringIO()):    # FusionBench prints per key
        return algorithm.run(pool)


@pytest.mark.parametrize("case", ["tsv_m", "tsv_m-alphas", "iso_c", "iso_cts"])
def test_agrees_with_fusionbenchs_own_algorithm_on_the_same_pool(case):
    from fusion_bench.method import ISO_C_Merge, ISO_CTS_Merge, TaskSingularVectorMerging
    base, models = family(seed=4, norm="layer")
    # "2.bias" is not 2-D: FusionBench's exclude_keys entry changes nothing there, and neither may ours
    exclude = ["2.weight", "2.bias"]
    ref, ours = {
        "tsv_m": (TaskSingularVectorMerging(alpha=0.7, exclude_keys=exclude),
                  fb.TSVMAlgorithm(alpha=0.7, exclude_keys=exclude, svd="exact")),
        "tsv_m-alphas": (TaskSingularVectorMerging(alpha=[0.5, 1.0, 2.0]),
                         fb.TSVMAlgorithm(alpha=[0.5, 1.0, 2.0], svd="exact")),
        "iso_c": (ISO_C_Merge(scaling_factor=1.2, exclude_keys=exclude),
                  fb.IsoCAlgorithm(scaling_factor=1.2, exclude_keys=exclude)),
        "iso_cts": (ISO_CTS_Merge(scaling_factor=1.2, common_space_fraction=0.5),
                    fb.IsoCTSAlgorithm(scaling_factor=1.2, common_space_fraction=0.5, svd="exact")),
    }[case]
    want = sd(_fusionbench_run(ref, pool_of(copy.deepcopy(base), models)))
    got = sd(ours.run(pool_of(base, models)))
    assert list(got) == list(want) and _rel(got, want, sd(base)) < 1e-9


def test_ties_remove_keys_stay_pretrained_and_the_rest_is_merged():
    base, models = family()
    got = sd(fb.TIESAlgorithm(remove_keys=["4.weight", "3.running_mean"]).run(pool_of(base, models)))
    keep = {"4.weight", "3.running_mean"}
    want = pymerge.merge("ties", {k: v for k, v in sd(base).items() if k not in keep},
                         [{k: v for k, v in sd(m).items() if k not in keep} for m in models], density=0.2)
    for k in keep:
        assert torch.equal(got[k], base.state_dict()[k])
    assert_same({k: got[k] for k in want}, want)


def test_exclude_keys_name_the_model_lacks_warns_and_is_ignored():
    base, models = family()
    with pytest.warns(UserWarning, match="'no.such.key'"):
        got = fb.TSVMAlgorithm(exclude_keys=["no.such.key"]).run(pool_of(base, models))
    assert_same(sd(got), pymerge.merge("tsv_m", sd(base), [sd(m) for m in models], exclude_keys=()))


@pytest.mark.parametrize("build,match", [
    (lambda: fb.TIESAlgorithm(merge_func="sum"), "merge_func = 'sum'"),
    (lambda: fb.TIESAlgorithm(threshold=0), "threshold = 0"),
    (lambda: fb.TSVMAlgorithm(return_single_task_models=True), "return_single_task_models"),
    (lambda: fb.TSVMAlgorithm(alpha=["x"]), "alpha"),
    (lambda: fb.CARTAlgorithm(rank=0), "rank = 0"),                       # pymerge's own check, at construction
    (lambda: fb.TIESAlgorithm(pymerge_options={"weights": [1.0, float("nan")]}), "weights = nan"),
    (lambda: fb.IsoCAlgorithm(scaling_fator=1.0), r"unknown config field\(s\) \['scaling_fator'\]"),
    (lambda: fb.IsoCAlgorithm(pymerge_options={"alpha": 2.0}), r"pymerge_options sets \['alpha'\]"),
    (lambda: fb.TSVMAlgorithm(exclude_keys=["a"], pymerge_options={"exclude_keys": ["b"]}), "exclude_keys"),
    (lambda: fb.IsoCAlgorithm(pymerge_options={"bogus": 1}), "unknown parameter"),
    (lambda: fb.TIESAlgorithm(remove_keys="4.weight"), "remove_keys"),
    (lambda: fbl.DivMergeAlgorithm(data_split="validation"), "data_split = 'validation'"),
    (lambda: fbl.DivMergeAlgorithm(divergence="l2"), "divergence = 'l2'"),
    (lambda: fbl.DivMergeAlgorithm(examples_per_task=0), "examples_per_task = 0"),
    (lambda: fbl.AdaMergingCARTAlgorithm(pymerge_options={"init_from": "ties"}), "start='cart'"),
])
def test_bad_config_fails_when_the_algorithm_is_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_pool_without_pretrained_model_is_refused():
    base, models = family()
    with pytest.raises(ValueError, match="no '_pretrained_' model"):
        fb.IsoCAlgorithm().run(BaseModelPool(dict(zip(NAMES, models))))


# ----------------------------------------------------------------------------------- learned algorithms
def token_family(labels=(3, 2, 4)):
    """TokenNet base and three fine-tunes with heads of their own widths (task-specific keys ^head\\.)."""
    torch.manual_seed(0)
    base = TokenNet().double()
    return base, finetunes(base, 3, labels=labels)


def token_ids(n=10, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randint(1, 23, (n, L), generator=g) for name in NAMES}


def tensor_datasets(ids):
    """(input_ids, label) items, as torchvision / TensorDataset datasets give them."""
    return {name: {"_target_": "torch.utils.data.TensorDataset",
                   "_args_": [x, torch.arange(len(x)) % 2]} for name, x in ids.items()}


def load(pool_builder):
    with set_print_function_call(False):
        return pool_builder()


@pytest.mark.parametrize("shuffle", [False, True])
def test_divmerge_algorithm_equals_pymerge_divmerge(shuffle):
    base, models = token_family()
    ids = token_ids()
    pool = pool_of(base, models, train_datasets=tensor_datasets(ids))
    alg = fbl.DivMergeAlgorithm(examples_per_task=6, shuffle_examples=shuffle, max_steps=3, granularity="task", seed=7,
                                lr=0.05, divergence="kl", task_specific_keys=r"^head\.", pymerge_options=QUIET)
    with set_print_function_call(False):
        out = alg.run(pool)
    # the documented selection: the first 6 items, or a torch.randperm(len, seed) subset of 6
    pick = torch.randperm(10, generator=torch.Generator().manual_seed(7))[:6] if shuffle else torch.arange(6)
    ref = pymerge.divmerge(base, dict(zip(NAMES, models)), {n: [ids[n][pick]] for n in NAMES}, examples_per_task=6,
                           steps=3, granularity="task", seed=7, lr=0.05, divergence="kl",
                           task_specific_keys=r"^head\.", **QUIET)
    assert torch.equal(alg.result.coefficients, ref.coefficients)
    assert alg.result.losses == ref.losses and len(ref.losses) == 3
    assert isinstance(out, dict) and list(out) == list(NAMES)          # one model per task: own heads
    for n, m in zip(NAMES, models):
        assert type(out[n]) is TokenNet and out[n] is not m
        assert_same(sd(out[n]), dict(ref.task_state_dicts[n]))


def test_divmerge_reads_dict_items_without_labels_or_metadata(tmp_path):
    """HF-style rows {"input_ids", "attention_mask", "label", "idx"} (lists, not tensors): the model gets
    input_ids and attention_mask only (TokenNet.forward would refuse label / idx)."""
    base, models = token_family()
    ids = token_ids(n=8, L=4, seed=2)
    rows = {n: {"_target_": "datasets.Dataset.from_dict", "_convert_": "all",
                "mapping": {"input_ids": ids[n].tolist(), "attention_mask": torch.ones_like(ids[n]).tolist(),
                            "label": [0] * 8, "idx": list(range(8))}} for n in NAMES}
    pool = pool_of(base, models, val_datasets=rows)
    path = tmp_path / "gamma.json"
    alg = fbl.DivMergeAlgorithm(data_split="val", examples_per_task=5, shuffle_examples=False, max_steps=2,
                                task_specific_keys=r"^head\.", merging_weights_save_path=str(path),
                                pymerge_options=QUIET)
    with set_print_function_call(False):
        alg.run(pool)
    data = {n: [{"input_ids": ids[n][:5], "attention_mask": torch.ones(5, 4, dtype=torch.long)}] for n in NAMES}
    ref = pymerge.divmerge(base, dict(zip(NAMES, models)), data, examples_per_task=5, steps=2,
                           task_specific_keys=r"^head\.", **QUIET)
    assert torch.equal(alg.result.coefficients, ref.coefficients)
    assert path.is_file() and '"coefficients"' in path.read_text()


def test_divmerge_on_a_tiny_bert_pool_of_tokenized_rows():
    """A Hugging Face classifier (forward(input_ids, attention_mask, token_type_ids, ..., labels)) on rows holding
    label, idx and the raw sentence besides the tokens: only the token tensors reach the model."""
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    models = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    ids = token_ids(n=6, L=5, seed=3)
    rows = {n: {"_target_": "datasets.Dataset.from_dict", "_convert_": "all",
                "mapping": {"input_ids": ids[n].tolist(), "attention_mask": [[1] * 5] * 6,
                            "token_type_ids": [[0] * 5] * 6, "label": [1] * 6, "idx": list(range(6)),
                            "sentence": ["some text"] * 6}} for n in NAMES[:2]}
    alg = fbl.DivMergeAlgorithm(examples_per_task=4, shuffle_examples=False, granularity="task", max_steps=2,
                                pymerge_options=QUIET)
    with set_print_function_call(False):
        out = alg.run(pool_of(base, models, train_datasets=rows))
    data = {n: [{"input_ids": ids[n][:4], "attention_mask": torch.ones(4, 5, dtype=torch.long),
                 "token_type_ids": torch.zeros(4, 5, dtype=torch.long)}] for n in NAMES[:2]}
    ref = pymerge.divmerge(base, dict(zip(NAMES[:2], models)), data, examples_per_task=4, granularity="task",
                           steps=2, **QUIET)
    assert torch.equal(alg.result.coefficients, ref.coefficients)
    assert isinstance(out, BertForSequenceClassification)
    assert_same(sd(out), dict(ref.state_dict))


def test_adamerging_cart_algorithm_equals_pymerge_adamerging_from_cart():
    base, models = token_family(labels=(3,))                          # one head width: a single merged model
    ids = token_ids()
    pool = pool_of(base, models, test_datasets=tensor_datasets(ids))
    alg = fbl.AdaMergingCARTAlgorithm(data_split="test", examples_per_task=8, shuffle_examples=False, max_steps=3,
                                      granularity="layer", seed=1, pymerge_options={"progress": False})
    with set_print_function_call(False):
        out = alg.run(pool)
    ref = pymerge.adamerging(base, dict(zip(NAMES, models)), {n: [ids[n][:8]] for n in NAMES}, start="cart",
                             examples_per_task=8, steps=3, granularity="layer", seed=1, progress=False)
    assert alg.result.config["start"] == "cart"
    assert torch.equal(alg.result.coefficients, ref.coefficients)
    assert isinstance(out, TokenNet) and out is not base
    assert_same(sd(out), dict(ref.state_dict))


def test_learned_algorithm_names_the_missing_dataset():
    base, models = token_family()
    pool = pool_of(base, models, train_datasets=tensor_datasets(token_ids()))
    with pytest.raises(ValueError, match=r"no val dataset named 't0'.*val datasets: \[\]"):
        fbl.DivMergeAlgorithm(data_split="val", pymerge_options=QUIET).run(pool)


@pytest.mark.parametrize("item,keys,want", [
    ((torch.tensor([1, 2]), torch.tensor(0)), None, torch.tensor([1, 2])),
    ({"input_ids": [1, 2], "labels": [0, 1], "sentence": "a b", "idx": 3}, None, {"input_ids": torch.tensor([1, 2])}),
    ({"input_ids": [1, 2], "extra": [5]}, ["extra"], {"extra": torch.tensor([5])}),
    ({"text": "hello", "label": 1}, None, "hello"),
    ("plain text", None, "plain text"),
])
def test_dataset_items_become_unlabelled_inputs(item, keys, want):
    got = fbl._DatasetInputs("X", "t0", keys, fbl.LABEL_KEYS, None)(item, 0)
    if isinstance(want, dict):
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def test_dataset_item_that_is_no_tensor_is_refused():
    with pytest.raises(ValueError, match=r"task 't0', dataset item 4, key 'image', holds a object"):
        fbl._DatasetInputs("X", "t0", ["image"], fbl.LABEL_KEYS, None)({"image": object()}, 4)


# --------------------------------------------------------------------------------------- Hydra configs
YAMLS = sorted(f[:-5] for f in os.listdir(METHOD_DIR) if f.endswith(".yaml"))


def test_every_algorithm_has_a_config():
    assert YAMLS == ["adamerging_cart", "cart", "divmerge", "iso_c", "iso_cts", "ties", "tsv_m"]


@pytest.mark.parametrize("name", YAMLS)
def test_config_instantiates_with_the_classes_defaults_and_runs(name):
    import hydra.utils
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(os.path.join(METHOD_DIR, f"{name}.yaml"))
    module, _, cls_name = cfg._target_.rpartition(".")
    learned = cls_name in ("DivMergeAlgorithm", "AdaMergingCARTAlgorithm")
    assert module == ("pymerge.adapters.fusionbench_learned" if learned else "pymerge.adapters.fusionbench")
    cls = getattr(importlib.import_module(module), cls_name)
    assert cls.__module__ == module                 # defined there, not a re-export
    with set_print_function_call(False):
        alg = fusionbench_instantiate(cfg, _recursive_=cfg.get("_recursive_", False))   # as FusionBench's program
    assert type(alg) is cls and type(hydra.utils.instantiate(cfg)) is cls
    # the config lists every field of the class, each at the class's default
    defaults = OmegaConf.to_container(cls().config)
    fields = {k: v for k, v in defaults.items() if k not in ("_target_", "_recursive_", "_usage_", "_version_")}
    assert {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"} == fields
    if not learned:
        base, models = family()
        assert_same(sd(alg.run(pool_of(base, models))), sd(cls().run(pool_of(base, models))))
        return
    small = OmegaConf.merge(cfg, {"examples_per_task": 4, "max_steps": 2, "task_specific_keys": r"^head\.",
                                  "pymerge_options": QUIET if name == "divmerge" else {"progress": False}})
    with set_print_function_call(False):
        alg = fusionbench_instantiate(small, _recursive_=False)
        base, models = token_family()
        out = alg.run(pool_of(base, models, train_datasets=tensor_datasets(token_ids())))
    assert len(alg.result.losses) == 2 and list(out) == list(NAMES)
    for n in NAMES:
        assert_same(sd(out[n]), dict(alg.result.task_state_dicts[n]))


def test_fusionbench_root_config_selects_a_pymerge_method_by_name():
    """What `fusion_bench --config-dir <pymerge>/adapters/fusionbench_config method=pymerge/tsv_m ...` composes."""
    from hydra import compose, initialize_config_dir
    from fusion_bench.utils.hydra_utils import get_default_config_path
    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        cfg = compose("fabric_model_fusion", overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]",
                                                        "method=pymerge/tsv_m", "method.alpha=0.5",
                                                        "method.exclude_keys=[2.weight]"])
    with set_print_function_call(False):
        alg = fusionbench_instantiate(cfg.method, _recursive_=False)
    base, models = family()
    got = alg.run(pool_of(base, models))
    want = pymerge.merge("tsv_m", sd(base), [sd(m) for m in models], alpha=0.5, exclude_keys=(re.escape("2.weight"),))
    assert_same(sd(got), want)
