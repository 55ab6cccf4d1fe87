"""What a caller holds, turned into what a learned merge reads: models as Hugging Face directories or state dicts
(with a model factory) become loaders, a base directory a state dict, texts token ids.

    pymerge.divmerge("base_dir", {"sst2": "sst2_dir", "mnli": "mnli_dir"}, {"sst2": texts, "mnli": texts},
                     task_specific_keys=r"^classifier\\.")            # tokenizer: the base's (or a model's)
    pymerge.divmerge(base_sd, {"a": sd_a, "b": sd_b}, data, model_factory=make_model, tokenizer=tok, ...)

- A model entry (and the base) may be an nn.Module, a zero-argument loader, a state dict (built with
  ``model_factory(state_dict) -> nn.Module`` and loaded strictly; the factory sees the state dict, so it can
  size a head from it), or the path of a local Hugging Face model directory (config.json + weights), loaded
  offline with the class its config.json names (``architectures``; AutoModel when none is importable).
  Models are loaded one at a time, when the merge reads them.
- The base's keys may differ from the models' by a prefix (a BertModel directory as the base of
  BertForSequenceClassification models: "embeddings." vs "bert.embeddings."): MergedModel aligns them
  (pymerge.learn.inputs.align_base_keys).
- A task's data may be a list of texts: each is tokenized on its own (truncated to ``max_length``; None = the
  tokenizer's model_max_length, at most 512) into {"input_ids", "attention_mask", ...} 1-D tensors, padded per
  batch with the tokenizer's pad token. tokenizer: a tokenizer (text -> {"input_ids": [...]}) or the path of a
  directory AutoTokenizer reads; None = the first of the base's and the models' directories that holds one.
Nothing is downloaded: every load is local_files_only.
"""
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

MAX_TEXT_TOKENS = 512


def is_model_dir(obj):
    """True for a str / PathLike naming a directory with a config.json."""
    return isinstance(obj, (str, os.PathLike)) and (Path(obj) / "config.json").is_file()


def _check_dir(obj, what):
    if isinstance(obj, (str, os.PathLike)) and not is_model_dir(obj):
        raise ValueError(f"{what}: {str(obj)!r} is no Hugging Face model directory (no config.json there); a model "
                         "must be an nn.Module, a loader, a state dict (with model_factory=) or a model directory")


def architectures(path):
    """config.json's architectures of a model directory ([] when it names none)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable config.json ({e})") from None
    return [str(a) for a in config.get("architectures") or []]


def load_model_dir(path, what="model"):
    """The model of a local Hugging Face directory, offline, with the class its config.json names (else
    AutoModel), in eval mode."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{what}: loading the model directory {str(path)!r} needs transformers") from None
    cls = next((getattr(transformers, a) for a in architectures(path) if hasattr(transformers, a)),
               transformers.AutoModel)
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the message says what is wrong
        raise ValueError(f"{what}: cannot load {str(path)!r} with {cls.__name__}: {type(e).__name__}: {e}") from None
    return model.eval()


def _from_state_dict(sd, factory, what):
    module = factory(sd)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{what}: model_factory returned a {type(module).__name__}, expected an nn.Module")
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{what}: the state dict does not fit the model_factory's module: {e}") from None
    return module.eval()


def model_entry(entry, model_factory, what):
    """One fine-tuned model as MergedModel.build takes it: an nn.Module or a zero-argument loader (model
    directories and state dicts become loaders)."""
    if isinstance(entry, (str, os.PathLike)):
        _check_dir(entry, what)
        return lambda: load_model_dir(entry, what)
    if isinstance(entry, Mapping) and not isinstance(entry, nn.Module):
        if model_factory is None:
            raise ValueError(f"{what} is a state dict: pass model_factory=f(state_dict) -> nn.Module to build it")
        return lambda: _from_state_dict(entry, model_factory, what)
    return entry


def resolve_models(base, models, model_factory=None, what="learned merge"):
    """(base, models) with directories and state dicts resolved (see the module docstring): the base as an
    nn.Module or a state dict, the models as modules or loaders, in the container they came in."""
    if model_factory is not None and not callable(model_factory):
        raise ValueError(f"{what}: model_factory must be a callable state_dict -> nn.Module, "
                         f"got {type(model_factory).__name__}")
    if isinstance(base, (str, os.PathLike)):
        _check_dir(base, f"{what}: base")
        base = load_model_dir(base, f"{what}: base").state_dict()
    if isinstance(models, Mapping):
        models = {k: model_entry(v, model_factory, f"{what}: model {k!r}") for k, v in models.items()}
    elif isinstance(models, (list, tuple)):
        models = [model_entry(v, model_factory, f"{what}: model {t}") for t, v in enumerate(models)]
    return base, models


def model_dirs(base, models):
    """The model directories among the base and the models, base first."""
    entries = list(models.values()) if isinstance(models, Mapping) else \
        list(models) if isinstance(models, (list, tuple)) else []
    return [e for e in [base, *entries] if is_model_dir(e)]


def load_tokenizer(tokenizer, dirs=(), what="learned merge"):
    """tokenizer as given when callable; a directory path: AutoTokenizer of it (offline); None: the first of
    `dirs` AutoTokenizer can read (None when none can)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    candidates = [tokenizer] if tokenizer is not None else list(dirs)
    errors = []
    for path in candidates:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{path}: {type(e).__name__}")
            continue
        if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
            tok.pad_token = tok.eos_token  # padding is masked; any id will do
        return tok
    if tokenizer is not None:
        raise ValueError(f"{what}: tokenizer = {str(tokenizer)!r}: no tokenizer there ({'; '.join(errors)})")
    return None


def is_text_list(source):
    """True for a non-empty list / tuple of str (a task's data given as texts)."""
    return isinstance(source, (list, tuple)) and len(source) > 0 and all(isinstance(s, str) for s in source)


def text_examples(texts, tokenizer, max_length=None, task="?"):
    """Per-example inputs of texts: the tokenizer's output for each text (truncated to max_length; None = the
    tokenizer's model_max_length, at most 512) as 1-D int64 tensors."""
    if tokenizer is None:
        raise ValueError(f"data for task {task!r} are texts: pass tokenizer= (a tokenizer or its directory)")
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_length = min(int(limit), MAX_TEXT_TOKENS) if isinstance(limit, int) and limit > 0 else MAX_TEXT_TOKENS
    out = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=int(max_length))
        ex = {k: torch.as_tensor(v, dtype=torch.long) for k, v in dict(enc).items()
              if isinstance(v, (list, tuple, torch.Tensor))}
        if "input_ids" not in ex:
            raise ValueError(f"data for task {task!r}: the tokenizer returned no input_ids")
        if "attention_mask" not in ex:
            ex["attention_mask"] = torch.ones_like(ex["input_ids"])
        out.append({k: v.reshape(-1) for k, v in ex.items()})
    return out


def pad_token_id(tokenizer):
    """The tokenizer's pad token id (0 when it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0
