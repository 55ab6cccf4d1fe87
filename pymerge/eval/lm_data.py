"""Text domains of the generative suite and the held-out perplexity every one of its tables is made of: the
domains' texts and fixed splits, their token encoding, and next-token NLL / perplexity of a causal LM on them.
One home for these definitions, so that the experts' manifests (lm_experts.py) and the merged models' scores
(lm_harness.py) count the same tokens the same way.

    domains = [load_domain("vader_tweets"), domain_from_jsonl("mine", "mine.jsonl")]
    domain_perplexity(model, tokenizer, domains[1], "test", max_length=128)
    nll, tokens = token_nll(model, encode(tokenizer, domains[1].split("test"), 128), pad=pad_id(tokenizer))

Domains: the text of a packaged classification task (tasks.py: same texts, same seeded splits; the labels are
not used) or of a user's JSONL file (`{"text": ...}` per line, other fields ignored). A text is one sequence:
its tokens after a start token (the tokenizer's bos, else its eos) and followed by eos when it fits, truncated
to max_length. Perplexity of a model on a domain's split = exp(total next-token NLL / number of predicted
tokens) over its texts (every token after the start token, eos included): token-weighted, so long texts count
by their length.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..io.jsonl import jsonl_objects
from ..teachers.cache import data_fingerprint
from .experts import collate
from .tasks import Task, load_task, stratified_splits

# The three domains: short informal text, long news articles, transcribed speech.
DEFAULT_DOMAINS = ("vader_tweets", "bbc_news", "debates_party")
SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------------------ domains
@dataclass(frozen=True)
class Domain:
    """The texts of one domain and their fixed splits ({"train", "validation", "test"} -> tuple of indices)."""
    name: str
    texts: tuple
    splits: Mapping[str, tuple] = field(repr=False)
    seed: int = 0
    source: str = ""

    def split(self, split: str, limit: int | None = None) -> list:
        """The texts of one split (its first `limit` ones when given)."""
        if split not in SPLITS:
            raise ValueError(f"domain {self.name!r}: unknown split {split!r} (one of {', '.join(SPLITS)})")
        return [self.texts[i] for i in self.splits[split][:limit]]

    def fingerprint(self) -> str:
        return data_fingerprint({"name": self.name, "texts": list(self.texts),
                                 "splits": {k: list(v) for k, v in self.splits.items()}})


def domain_from_task(task: Task) -> Domain:
    """A classification task's texts with its own splits (so the text and generative suites hold out the same
    examples)."""
    return Domain(task.name, task.texts, task.splits, task.seed, f"task {task.name}")


def load_domain(name: str, *, seed: int = 0, data_dir=None) -> Domain:
    """A packaged task's texts (tasks.load_task) as a domain."""
    return domain_from_task(load_task(name, seed=seed, data_dir=data_dir))


def domain_from_jsonl(name: str, path, *, seed: int = 0, **split_options) -> Domain:
    """A domain from a UTF-8 JSONL file of `{"text": str, ...}` objects (a "label" or any other field is
    ignored), split at random for `seed` (split_options: those of tasks.stratified_splits). Errors are
    ValueErrors naming the file and the 1-based line."""
    path = Path(path)
    texts = []
    for where, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or "text" not in obj:
            raise ValueError(f"{where}: expected an object with a \"text\" field")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError(f"{where}: \"text\" must be a non-empty string")
        texts.append(obj["text"])
    if not texts:
        raise ValueError(f"domain {name!r}: data file {path} has no texts")
    try:
        splits = stratified_splits([0] * len(texts), 1, seed, **split_options)
    except ValueError as e:
        raise ValueError(f"domain {name!r}: {e} (file {path})") from None
    return Domain(name, tuple(texts), splits, seed, str(path))


# ---------------------------------------------------------------------------------------------- sequences
def encode(tokenizer, texts: Sequence[str], max_length: int) -> list:
    """Token ids of each text: a start token (bos, else eos), the text's tokens, then eos when it fits, the
    whole truncated to max_length (>= 2)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if start is None or eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: needs an eos token (and a bos token, else eos "
                         f"starts each text)")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        seq = [start, *ids[:max_length - 1]]
        if len(seq) < max_length:
            seq.append(eos)
        out.append(seq)
    return out


def pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def _token_nll(model, ids, mask):
    """Summed next-token NLL (float64 scalar) and predicted-token count of one right-padded batch."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      ignore_index=-100, reduction="sum")
    return nll, int((target != -100).sum())


@torch.no_grad()
def token_nll(model: nn.Module, token_ids: Sequence[Sequence[int]], *, pad: int, batch_size: int = 8,
              device="cpu") -> tuple:
    """(total next-token NLL in nats, predicted tokens) of a causal LM over sequences (batched by length,
    right-padded, eval mode). exp(nll / tokens) is the perplexity."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    total, count = 0.0, 0
    try:
        for s in range(0, len(order), batch_size):
            ids, mask = collate([token_ids[i] for i in order[s:s + batch_size]], pad)
            nll, n = _token_nll(model, ids.to(device), mask.to(device))
            total += float(nll)
            count += n
    finally:
        model.train(was_training)
    return total, count


def domain_perplexity(model: nn.Module, tokenizer, domain: Domain, split: str = "test", *, max_length: int = 128,
                      limit: int | None = None, batch_size: int = 8, device="cpu") -> float:
    """Perplexity of a causal LM on a domain's split (its first `limit` texts): exp(total NLL / tokens)."""
    nll, n = token_nll(model, encode(tokenizer, domain.split(split, limit), max_length), pad=pad_id(tokenizer),
                       batch_size=batch_size, device=device)
    return math.exp(nll / n)
