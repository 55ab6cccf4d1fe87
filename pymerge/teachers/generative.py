"""Teacher targets of causal LMs (DivMerge's generative kind, docs/METHODS.md §DivMerge).

``generative_targets(model_t, prompts_t)`` -> GenerativeTargets. θ_t greedily generates a continuation ŷ (up to
max_new_tokens, stopping after eos, eos kept) for every prompt x; one teacher-forced pass over x+ŷ gives its
next-token log-probabilities at the ŷ positions, which are cached on disk (pymerge.teachers.cache): dense
[R, V], or for large vocabularies (top_k < V, default 64) the top-k log-probs, their indices and the log of
the remaining tail mass (pymerge.ops.topk_teacher). A batch (``GenerativeTargets.select`` -> GenerativeBatch)
is x+ŷ right-padded: input_ids [B, L], attention_mask [B, L], target_mask [B, L] (True at the positions whose
logits predict a ŷ token: position j predicts token j+1). ``GenerativeTargets.examples()`` gives the
per-example x+ŷ inputs and teacher rows pymerge.learn's TaskExamples hold (DivMerge's GenerativeObjective).
"""
import warnings
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import torch

from ..learn.batching import evaluating, logits_of, module_device
from ..ops.topk_divergence import topk_teacher
from .cache import data_fingerprint, entry_path, model_fingerprint, read_entry, write_entry
from .divergence import sequence_divergence, token_divergence


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)


def prompt_list(prompts, tokenizer) -> List[torch.Tensor]:
    """Prompts as a list of 1-D int64 token tensors. Accepts strings (with a tokenizer), token lists, 1-D
    tensors, 2-D tensors (one prompt per row) and dicts with input_ids [B, L] (+ attention_mask: the tokens
    where it is 1 are the prompt, so left or right padding both work)."""
    out = []

    def add(seq, where):
        t = torch.as_tensor(seq).reshape(-1).long().cpu() if not isinstance(seq, torch.Tensor) \
            else seq.detach().reshape(-1).long().cpu()
        if t.numel() == 0:
            raise ValueError(f"generative_targets: prompt {where} is empty")
        out.append(t)

    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("generative_targets: string prompts need tokenizer=")
            add(tokenizer(p, add_special_tokens=True)["input_ids"], i)
        elif isinstance(p, Mapping):
            ids = p.get("input_ids")
            if not isinstance(ids, torch.Tensor):
                raise ValueError(f"generative_targets: prompt batch {i} has no input_ids tensor")
            ids = ids if ids.dim() == 2 else ids[None]
            mask = p.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else (mask if mask.dim() == 2 else mask[None])
            for r in range(ids.shape[0]):
                add(ids[r][mask[r].bool()], f"{i}[{r}]")
        elif isinstance(p, torch.Tensor) and p.dim() == 2:
            for r in range(p.shape[0]):
                add(p[r], f"{i}[{r}]")
        else:
            add(p, i)
    if not out:
        raise ValueError("generative_targets: no prompts (empty data for this task)")
    return out


def _cut_at_eos(seq: torch.Tensor, eos_ids) -> torch.Tensor:
    if eos_ids:
        hit = torch.isin(seq, torch.tensor(sorted(eos_ids), dtype=seq.dtype))
        if hit.any():
            return seq[:int(hit.nonzero()[0, 0]) + 1]
    return seq


def _eos_set(eos_token_id):
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def greedy_generate(model, prompts: Sequence[torch.Tensor], *, max_new_tokens=32, eos_token_id=None,
                    pad_token_id=None, batch_size=8, use_generate=None, progress=False) -> List[torch.Tensor]:
    """Greedy continuations ŷ (1-D int64, 1..max_new_tokens tokens, ending at the first eos if one is
    produced, eos included) of 1-D int64 prompts, in prompt order.

    use_generate=None: a transformers model (has .generate and .config) generates with model.generate
    (KV cache), prompts left-padded with pad_token_id and sorted by length to keep padding small; otherwise
    (or use_generate=False) a plain loop calls model(input_ids=..., attention_mask=...) on batches of
    equal-length prompts (no padding: the model needs no position handling) and appends the argmax.
    """
    if max_new_tokens < 1:
        raise ValueError(f"greedy_generate: max_new_tokens = {max_new_tokens} must be >= 1")
    eos = _eos_set(eos_token_id)
    device = module_device(model)
    if use_generate is None:
        use_generate = callable(getattr(model, "generate", None)) and hasattr(model, "config")
    out: List[Optional[torch.Tensor]] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].numel(), i))
    if use_generate:
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    else:  # equal lengths only
        groups, cur = [], []
        for i in order:
            if cur and (len(cur) == batch_size or prompts[cur[0]].numel() != prompts[i].numel()):
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    with evaluating(model):
        for group in _progress(groups, progress, "generate"):
            L = max(prompts[i].numel() for i in group)
            ids = torch.full((len(group), L), pad, dtype=torch.long)
            mask = torch.zeros((len(group), L), dtype=torch.long)
            for r, i in enumerate(group):  # left padding: the last prompt token is at L-1 for every row
                n = prompts[i].numel()
                ids[r, L - n:] = prompts[i]
                mask[r, L - n:] = 1
            ids, mask = ids.to(device), mask.to(device)
            if use_generate:
                new = _hf_generate(model, ids, mask, max_new_tokens, sorted(eos) or None, pad)
            else:
                new = _loop_generate(model, ids, mask, max_new_tokens, eos)
            for r, i in enumerate(group):
                seq = _cut_at_eos(new[r].cpu(), eos)
                out[i] = seq if seq.numel() else new[r, :1].cpu()
    return out


def _hf_generate(model, ids, mask, max_new_tokens, eos, pad):
    from transformers import GenerationConfig
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False, num_beams=1,
                           eos_token_id=eos, pad_token_id=pad)
    # generate() fills settings left unset (eos_token_id=None: "never stop") from model.generation_config, so
    # for the call that config IS ours: the stop tokens are exactly `eos`.
    saved = getattr(model, "generation_config", None)
    model.generation_config = cfg
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    finally:
        model.generation_config = saved
    return full[:, ids.shape[1]:]


def _loop_generate(model, ids, mask, max_new_tokens, eos):
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        logits = logits_of(model(input_ids=ids, attention_mask=mask))
        nxt = logits[:, -1].argmax(-1)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        if eos:
            done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
            if bool(done.all()):
                break
    return torch.stack(new, 1)


@dataclass
class GenerativeBatch:
    """Teacher-forced student batch of one task: x+ŷ right-padded.

    input_ids [B, L] int64 (pad_token_id after each sequence), attention_mask [B, L] int64, target_mask
    [B, L] bool: True at the logit positions that predict a ŷ token (j predicts token j+1); its M True
    entries in row-major order match the teacher rows: either teacher_log_probs [M, V] fp32 (dense), or
    top_log_probs [M, k] fp32 + top_indices [M, k] int64 + tail_log_mass [M] fp32 (top-k cache).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    teacher_log_probs: Optional[torch.Tensor] = None
    top_log_probs: Optional[torch.Tensor] = None
    top_indices: Optional[torch.Tensor] = None
    tail_log_mass: Optional[torch.Tensor] = None
    temperature: float = 1.0

    def __len__(self):
        return self.input_ids.shape[0]

    @property
    def inputs(self):
        """What the merged causal LM is called with: model(**batch.inputs)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def teacher(self):
        if self.teacher_log_probs is not None:
            return {"teacher_log_probs": self.teacher_log_probs}
        return {"top_log_probs": self.top_log_probs, "top_indices": self.top_indices,
                "tail_log_mass": self.tail_log_mass}

    @property
    def is_topk(self):
        return self.teacher_log_probs is None

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GenerativeBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.target_mask),
                               mv(self.teacher_log_probs), mv(self.top_log_probs), mv(self.top_indices),
                               mv(self.tail_log_mass), self.temperature)

    def token_loss(self, outputs, divergence="js", **kw) -> torch.Tensor:
        """token_divergence [M] of the merged model's outputs (or logits [B, L, V]) on batch.inputs."""
        return token_divergence(logits_of(outputs), self.target_mask, self.teacher, divergence=divergence,
                                temperature=self.temperature, **kw)

    def loss(self, outputs, divergence="js", **kw) -> torch.Tensor:
        """sequence_divergence [B]: per sequence, the mean token divergence over its ŷ positions."""
        return sequence_divergence(logits_of(outputs), self.target_mask, self.teacher, divergence=divergence,
                                   temperature=self.temperature, **kw)


class GenerativeTargets:
    """Cached teacher continuations and per-token teacher distributions of one fine-tuned causal LM.

    tokens [N, Lmax] int64: prompt x_i then ŷ_i, right-padded with pad_token_id; prompt_lengths,
    response_lengths [N] int64; offsets [N+1]: the teacher rows of example i are rows offsets[i]:offsets[i+1]
    (one per ŷ token) of teacher_log_probs [R, V] (dense) or top_log_probs / top_indices (int32) [R, k] and
    tail_log_mass [R] (top-k).
    """

    def __init__(self, tokens, prompt_lengths, response_lengths, *, teacher_log_probs=None, top_log_probs=None,
                 top_indices=None, tail_log_mass=None, pad_token_id=0, temperature=1.0, cache_path=None,
                 loaded_from_cache=False):
        self.tokens = tokens
        self.prompt_lengths = prompt_lengths.long()
        self.response_lengths = response_lengths.long()
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.response_lengths.cumsum(0)])
        self.teacher_log_probs = teacher_log_probs
        self.top_log_probs = top_log_probs
        self.top_indices = top_indices
        self.tail_log_mass = tail_log_mass
        self.pad_token_id = int(pad_token_id)
        self.temperature = float(temperature)
        self.cache_path = cache_path
        self.loaded_from_cache = loaded_from_cache
        rows = teacher_log_probs if teacher_log_probs is not None else top_log_probs
        if rows is None or rows.shape[0] != int(self.offsets[-1]):
            raise ValueError(f"GenerativeTargets: {int(self.offsets[-1])} ŷ tokens but "
                             f"{None if rows is None else rows.shape[0]} teacher rows")

    def __len__(self):
        return self.tokens.shape[0]

    @property
    def is_topk(self):
        return self.teacher_log_probs is None

    def responses(self) -> List[torch.Tensor]:
        """The teacher's continuations ŷ_i (1-D int64)."""
        return [self.tokens[i, p:p + r] for i, (p, r) in
                enumerate(zip(self.prompt_lengths.tolist(), self.response_lengths.tolist()))]

    def select(self, indices, device=None) -> GenerativeBatch:
        """The examples `indices` (any order) as one right-padded batch, trimmed to its longest sequence."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("GenerativeTargets.select: no indices")
        if int(idx.min()) < 0 or int(idx.max()) >= len(self):
            raise ValueError(f"GenerativeTargets.select: indices must lie in [0, {len(self)})")
        p, r = self.prompt_lengths[idx], self.response_lengths[idx]
        total = p + r
        L = int(total.max())
        ids = self.tokens[idx, :L].clone()
        pos = torch.arange(L)[None]
        attn = (pos < total[:, None]).long()
        ids[attn == 0] = self.pad_token_id
        # logits at positions p-1 .. p+r-2 predict the ŷ tokens at p .. p+r-1
        target = (pos >= (p - 1)[:, None]) & (pos < (p + r - 1)[:, None])
        rows = torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx.tolist()])
        if self.is_topk:
            batch = GenerativeBatch(ids, attn, target, top_log_probs=self.top_log_probs[rows],
                                    top_indices=self.top_indices[rows].long(),
                                    tail_log_mass=self.tail_log_mass[rows], temperature=self.temperature)
        else:
            batch = GenerativeBatch(ids, attn, target, teacher_log_probs=self.teacher_log_probs[rows],
                                    temperature=self.temperature)
        return batch.to(device) if device is not None else batch

    def batches(self, batch_size, *, shuffle=False, generator=None, device=None, drop_last=False):
        """Mini-batches of batch_size examples (shuffled with `generator`)."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for s in range(0, len(self), batch_size):
            chunk = order[s:s + batch_size]
            if drop_last and chunk.numel() < batch_size:
                break
            yield self.select(chunk, device=device)

    def examples(self):
        """(inputs, targets): per-example lists in the form pymerge.learn's TaskExamples / collate use.
        inputs[i] = {"input_ids": [p+r] int64, "attention_mask": [p+r] int64} (x+ŷ, unpadded);
        targets[i] = {"target_mask": bool [p+r], and the teacher rows of ŷ: "teacher_log_probs" [r, V], or
        "top_log_probs" [r, k], "top_indices" [r, k] int64, "tail_log_mass" [r]}. Collated (right-padded with
        0) they give GenerativeObjective.loss what it reads."""
        inputs, targets = [], []
        for i in range(len(self)):
            p, r = int(self.prompt_lengths[i]), int(self.response_lengths[i])
            o0, o1 = int(self.offsets[i]), int(self.offsets[i + 1])
            ids = self.tokens[i, :p + r]
            inputs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            mask = torch.zeros(p + r, dtype=torch.bool)
            mask[p - 1:p + r - 1] = True
            tg = {"target_mask": mask}
            if self.is_topk:
                tg.update(top_log_probs=self.top_log_probs[o0:o1], top_indices=self.top_indices[o0:o1].long(),
                          tail_log_mass=self.tail_log_mass[o0:o1])
            else:
                tg["teacher_log_probs"] = self.teacher_log_probs[o0:o1]
            targets.append(tg)
        return inputs, targets

    def _tensors(self):
        t = {"tokens": self.tokens, "prompt_lengths": self.prompt_lengths,
             "response_lengths": self.response_lengths}
        if self.is_topk:
            t.update(top_log_probs=self.top_log_probs, top_indices=self.top_indices,
                     tail_log_mass=self.tail_log_mass)
        else:
            t["teacher_log_probs"] = self.teacher_log_probs
        return t


def _config_token(model, name):
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        v = getattr(holder, name, None) if holder is not None else None
        if v is not None:
            return v
    return None


def generative_targets(model, prompts, *, max_new_tokens=32, eos_token_id="auto", pad_token_id=None, top_k=64,
                       temperature=1.0, batch_size=8, tokenizer=None, use_generate=None, cache=True,
                       cache_dir=None, cache_key=None, progress=False) -> GenerativeTargets:
    """Teacher continuations and per-token teacher distributions of one fine-tuned causal LM.

    model: a causal LM called as model(input_ids=[B, L], attention_mask=[B, L]) returning logits [B, L, V]
    (or .logits); a transformers model generates with .generate. prompts: the unlabelled prompts of its
    task (strings with tokenizer=, token lists, 1-D tensors, [B, L] tensors, or dicts with input_ids and
    attention_mask). eos_token_id: "auto" (the model's generation_config / config eos), None (never stop
    early), an int or a list. pad_token_id: default the model's pad, else its eos, else 0 (only ever under
    attention_mask 0). top_k: cache the top-k log-probs + tail mass when k < V; None or k >= V caches the
    dense log-probs [R, V]. temperature: the teacher distribution is softmax(logits / temperature).
    Cached on disk unless cache=False, keyed by model_fingerprint (or cache_key) + data_fingerprint of the
    tokenised prompts + every setting here.
    """
    plist = prompt_list(prompts, tokenizer)
    if eos_token_id == "auto":
        eos_token_id = _config_token(model, "eos_token_id")
    eos = _eos_set(eos_token_id)
    if pad_token_id is None:
        pad_token_id = _config_token(model, "pad_token_id")
    if pad_token_id is None:
        pad_token_id = min(eos) if eos else 0
    if isinstance(pad_token_id, (list, tuple)):
        pad_token_id = pad_token_id[0]
    if top_k is not None and top_k < 1:
        raise ValueError(f"generative_targets: top_k = {top_k} must be >= 1 (or None for dense)")
    if max_new_tokens < 1:
        raise ValueError(f"generative_targets: max_new_tokens = {max_new_tokens} must be >= 1")
    path = None
    if cache:
        path = entry_path(cache_dir, "causal-lm", {
            "model": cache_key or model_fingerprint(model), "data": data_fingerprint(plist),
            "max_new_tokens": int(max_new_tokens), "eos": sorted(eos), "pad": int(pad_token_id),
            "top_k": top_k, "temperature": float(temperature)})
        got = read_entry(path)
        if got is not None:
            return GenerativeTargets(**got[0], pad_token_id=pad_token_id, temperature=temperature,
                                     cache_path=path, loaded_from_cache=True)
    responses = greedy_generate(model, plist, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                                pad_token_id=pad_token_id, batch_size=batch_size, use_generate=use_generate,
                                progress=progress)
    targets = _teacher_forced(model, plist, responses, top_k=top_k, temperature=temperature,
                              pad_token_id=pad_token_id, batch_size=batch_size, progress=progress)
    targets.cache_path = path
    if path is not None:
        write_entry(path, targets._tensors(), {"kind": "causal-lm", "top_k": str(top_k),
                                               "max_new_tokens": str(max_new_tokens)})
    return targets


def _teacher_forced(model, prompts, responses, *, top_k, temperature, pad_token_id, batch_size, progress):
    """One teacher-forced pass of the teacher over each x+ŷ: its log-probs at the ŷ positions."""
    N = len(prompts)
    plen = torch.tensor([p.numel() for p in prompts])
    rlen = torch.tensor([r.numel() for r in responses])
    Lmax = int((plen + rlen).max())
    tokens = torch.full((N, Lmax), int(pad_token_id), dtype=torch.long)
    for i in range(N):
        tokens[i, :plen[i]] = prompts[i]
        tokens[i, plen[i]:plen[i] + rlen[i]] = responses[i]
    stash = GenerativeTargets(tokens, plen, rlen, teacher_log_probs=torch.zeros(int(rlen.sum()), 0),
                              pad_token_id=pad_token_id, temperature=temperature)
    device = module_device(model)
    per_example = [None] * N
    order = sorted(range(N), key=lambda i: int(plen[i] + rlen[i]))
    with evaluating(model):
        for s in _progress(range(0, N, batch_size), progress, "teacher"):
            idx = order[s:s + batch_size]
            b = stash.select(idx)
            logits = logits_of(model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)))
            lp = torch.log_softmax(logits[b.target_mask.to(device)].float() / temperature, dim=-1).cpu()
            if top_k is not None and top_k < lp.shape[-1]:
                lp = topk_teacher(lp, top_k)
                lp = (lp[0], lp[1].to(torch.int32), lp[2])
            o = 0
            for i in idx:
                n = int(rlen[i])
                per_example[i] = tuple(t[o:o + n] for t in lp) if isinstance(lp, tuple) else lp[o:o + n]
                o += n
    if isinstance(per_example[0], tuple):
        top, ind, tail = (torch.cat([e[j] for e in per_example]) for j in range(3))
        return GenerativeTargets(tokens, plen, rlen, top_log_probs=top, top_indices=ind, tail_log_mass=tail,
                                 pad_token_id=pad_token_id, temperature=temperature)
    return GenerativeTargets(tokens, plen, rlen, teacher_log_probs=torch.cat(per_example),
                             pad_token_id=pad_token_id, temperature=temperature)

