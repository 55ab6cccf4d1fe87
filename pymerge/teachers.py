"""Teacher outputs for DivMerge, computed once per (model, data, settings) and cached on disk: class
log-probabilities, and for causal LMs generated continuations with their per-token distributions; the top-k
teacher cache and its divergence.

DivMerge compares the merged model with each fine-tuned model θ_t on unlabelled inputs of task t
(docs/METHODS.md §DivMerge). The fine-tuned models are needed only to produce these targets: once computed (or
loaded from the cache) the optimisation of Γ needs θ_0, the τ_t and the targets.

- Classification: ``objective_targets(module, examples, objective)`` -> per example objective.teacher(...) of
  the fine-tuned model's outputs (pymerge.learned.teacher_targets) through the disk cache, keyed by
  objective.teacher_settings(); what pymerge.learned.learn uses for every objective with a teacher (DivMerge:
  the class log-probabilities [C]). ``classification_targets(module, examples, temperature=...)`` is that for
  DivMerge's objective; ``cached_targets(module, examples, compute, kind=..., settings=...)`` caches any
  per-example targets and returns a CachedTargets list (loaded_from_cache, cache_path).
- Causal LM: ``generative_targets(model_t, prompts_t)`` -> GenerativeTargets. θ_t greedily generates a
  continuation ŷ (up to max_new_tokens, stopping after eos, eos kept) for every prompt x; one teacher-forced
  pass over x+ŷ gives its next-token log-probabilities at the ŷ positions, which are cached: dense [R, V], or
  for large vocabularies (top_k < V, default 64) the top-k log-probs, their indices and the log of the
  remaining tail mass. A batch (``GenerativeTargets.select`` -> GenerativeBatch) is x+ŷ right-padded:
  input_ids [B, L], attention_mask [B, L], target_mask [B, L] (True at the positions whose logits predict a
  ŷ token: position j predicts token j+1). ``sequence_divergence`` averages the token divergence over the ŷ
  positions of each sequence -> [B]; the caller averages over sequences.
- ``topk_divergence``: the divergence on the teacher's top-k support plus one tail bucket (never above the
  dense value; exact when k = V; bound in its docstring), with a chunked backward.
- ``dense_divergence``: D(teacher || student) on dense cached teacher log-probs, on the fused pymerge.ops
  kernels (DivMerge's classification objective and the dense generative cache use it).
DivMerge for causal LMs (``pymerge.divmerge(..., kind="causal-lm")``) is pymerge.learned.learn with
pymerge.methods.divmerge.GenerativeObjective, whose prepare() calls generative_targets and hands learn the
per-example x+ŷ inputs and teacher rows (``GenerativeTargets.examples()``).

Disk cache: one safetensors file per (model fingerprint, data hash, settings) under
``cache_dir()/teachers`` (env PYMERGE_CACHE, default ~/.cache/pymerge), written atomically (temp file +
os.replace), so a rerun loads the targets and starts at the optimisation. The model fingerprint is cheap
(names, shapes, dtypes, 64 sampled values and a bit-pattern checksum per tensor; see model_fingerprint).
"""
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import torch

from . import ops
from .learned import evaluating, logits_of, module_device, op_backend

__all__ = [
    "cache_dir", "model_fingerprint", "data_fingerprint",
    "cached_targets", "CachedTargets", "objective_targets", "classification_targets",
    "generative_targets", "GenerativeTargets", "GenerativeBatch", "greedy_generate", "prompt_list",
    "topk_teacher", "topk_divergence", "topk_gap_bound", "dense_divergence", "token_divergence",
    "sequence_divergence", "DIVERGENCES",
]

CACHE_FORMAT = 1  # bump when the layout of a cache file changes: old files are then simply not found
DIVERGENCES = ("js", "kl")


def _check_divergence(divergence):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence = {divergence!r}; expected one of {DIVERGENCES}")


def _to(inputs, device):
    """Tensors (also inside dicts and lists) moved to device."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


# ---------------------------------------------------------------------------------------------------------
# disk cache
# ---------------------------------------------------------------------------------------------------------

def cache_dir(path=None) -> Path:
    """pymerge's cache directory: `path` if given, else $PYMERGE_CACHE, else ~/.cache/pymerge."""
    if path is not None:
        return Path(path)
    env = os.environ.get("PYMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pymerge"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_checksum(flat: torch.Tensor) -> int:
    """Wrapping integer sum of a 1-D tensor's raw bit patterns: exact and independent of summation order,
    so the same on every device and thread count; any single changed element changes it."""
    size = flat.element_size()
    if size not in _INT_VIEW:  # complex: checksum the bytes
        return int(flat.contiguous().view(torch.uint8).sum(dtype=torch.int64))
    bits = flat.contiguous().view(_INT_VIEW[size])
    return int(bits.sum(dtype=torch.int64 if size < 4 else bits.dtype))


def model_fingerprint(model, samples: int = 64) -> str:
    """A cheap fingerprint (hex sha256) of a model's weights: for every state-dict entry in name order its
    name, shape, dtype, `samples` evenly spaced values and a checksum of all its values (_bit_checksum: the
    wrapping integer sum of the raw bit patterns, computed where the tensor lives).

    Only O(samples) values per tensor move to the host and the checksum is one integer reduction per tensor
    on its device (no copy of the model, no float rounding: the fingerprint of a model is the same on CPU
    and GPU, so the cache is shared). Not a cryptographic hash: models that differ only in entries that are
    not sampled and whose bit-pattern sums cancel modulo 2^32 (2^64 for 8-byte dtypes) collide; a single
    changed value, or a dense fine-tune, never does. Where it matters pass cache=False or a cache_key.
    `model`: an nn.Module or a state dict (name -> tensor).
    """
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    h.update(type(model).__name__.encode() if isinstance(model, torch.nn.Module) else b"state_dict")
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        h.update(_tensor_bytes(flat[idx]))
        h.update(repr(_bit_checksum(flat)).encode())
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """A hex sha256 of all the data (tensors byte for byte, strings, numbers, nested dicts/lists)."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(_tensor_bytes(x))
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(f"{k!s}:".encode())
                visit(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                visit(v)
            h.update(b"]")
        elif isinstance(x, str):
            h.update(b"S" + x.encode())
        else:
            h.update(("R" + repr(x)).encode())

    visit(data)
    return h.hexdigest()


def _cache_path(directory, kind, parts) -> Path:
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "kind": kind, **parts}, sort_keys=True, default=repr)
                         .encode()).hexdigest()[:40]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(kind))
    return cache_dir(directory) / "teachers" / f"{safe}-{key}.safetensors"


def _save_atomic(path: Path, tensors, metadata):
    """Write a safetensors file so that readers see either no file or the complete one."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: Path):
    """(tensors, metadata) of a cache file, or None when it is absent or unreadable (then it is recomputed)."""
    if not path.exists():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged file is not fatal: the targets are recomputed and the file replaced
        warnings.warn(f"pymerge: ignoring unreadable teacher cache {path}: {e}")
        return None
    if meta.get("format") != str(CACHE_FORMAT):
        return None
    return tensors, meta


# ---------------------------------------------------------------------------------------------------------
# top-k teacher cache and its divergence
# ---------------------------------------------------------------------------------------------------------

def topk_teacher(teacher_log_probs: torch.Tensor, k: int):
    """Compress teacher log-probabilities [N, V] to (top_log_probs [N, k], top_indices [N, k] int64,
    tail_log_mass [N]), fp32 (fp64 for fp64 input): the k largest log-probs, their vocabulary indices, and the
    log of the probability mass outside them (a log-sum-exp over the tail itself, exact even when it is tiny;
    -inf when k = V)."""
    if teacher_log_probs.dim() != 2:
        raise ValueError(f"topk_teacher: expected log-probs [N, V], got {tuple(teacher_log_probs.shape)}")
    V = teacher_log_probs.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"topk_teacher: k = {k} must lie in [1, V = {V}]")
    lp = teacher_log_probs if teacher_log_probs.dtype == torch.float64 else teacher_log_probs.float()
    top, idx = torch.topk(lp, k, dim=-1)
    tail = torch.logsumexp(lp.scatter(-1, idx, float("-inf")), dim=-1)
    return top, idx, tail


def _bucket_terms(lz, L, logp_s, idx, tail_logp, kind, beta, need):
    """Per-row loss (and bucket gradients) on the k+1 buckets (top-k support + tail) for one chunk.

    lz: student logits / temperature [c, V] (a private copy: it is overwritten with the tail); L: their
    log-sum-exp [c]. Returns loss [c], log Q [c, k+1] and, when need, g [c, k+1] with
    d loss / d z_v = q_v (g_{b(v)} - sum_b Q_b g_b).
    """
    logq_s = lz.gather(-1, idx) - L[:, None]
    lz.scatter_(-1, idx, float("-inf"))
    logq_r = torch.logsumexp(lz, dim=-1) - L
    logP = torch.cat([logp_s, tail_logp[:, None]], dim=-1)
    logQ = torch.cat([logq_s, logq_r[:, None]], dim=-1)
    P, Q = logP.exp(), logQ.exp()
    zero = torch.zeros((), dtype=P.dtype, device=P.device)
    if kind == "kl":
        loss = torch.where(P > 0, P * (logP - logQ), zero).sum(-1)
        g = torch.where(P > 0, -(logP - logQ).exp(), zero) if need else None
    else:
        logM = torch.logaddexp(logP + math.log(beta), logQ + math.log1p(-beta))
        loss = (beta * torch.where(P > 0, P * (logP - logM), zero).sum(-1)
                + (1 - beta) * torch.where(Q > 0, Q * (logQ - logM), zero).sum(-1))
        g = torch.where(Q > 0, (1 - beta) * (logQ - logM), zero) if need else None
    return loss, logQ, g


class _TopKDivergence(torch.autograd.Function):
    """Rows of the top-k divergence; the backward recomputes per chunk, so only one chunk of [rows, V]
    temporaries is alive at a time (the logits and their gradient are the only full-size tensors)."""

    @staticmethod
    def forward(ctx, logits2d, rows, top_lp, top_idx, tail_lp, kind, beta, temperature, chunk):
        acc = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
        M = rows.numel()
        loss = torch.empty(M, dtype=acc, device=logits2d.device)
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            lz = logits2d.index_select(0, rows[s:e]).to(acc) / temperature
            L = torch.logsumexp(lz, dim=-1)
            loss[s:e], _, _ = _bucket_terms(lz, L, top_lp[s:e].to(acc), top_idx[s:e], tail_lp[s:e].to(acc),
                                            kind, beta, False)
        ctx.save_for_backward(logits2d, rows, top_lp, top_idx, tail_lp)
        ctx.cfg = (kind, beta, temperature, chunk)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits2d, rows, top_lp, top_idx, tail_lp = ctx.saved_tensors
        kind, beta, temperature, chunk = ctx.cfg
        acc = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
        grad = torch.zeros_like(logits2d)
        M = rows.numel()
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            r = rows[s:e]
            lz = logits2d.index_select(0, r).to(acc) / temperature
            L = torch.logsumexp(lz, dim=-1)
            idx = top_idx[s:e]
            _, logQ, g = _bucket_terms(lz, L, top_lp[s:e].to(acc), idx, tail_lp[s:e].to(acc), kind, beta, True)
            c0 = (logQ.exp() * g).sum(-1, keepdim=True)
            scale = grad_loss[s:e].to(acc)[:, None] / temperature
            # lz now holds the tail logits (support set to -inf): exp(lz - L) is q on the tail, 0 on the support.
            gz = lz.sub_(L[:, None]).exp_().mul_((g[:, -1:] - c0) * scale)
            gz.scatter_(-1, idx, logQ[:, :-1].exp() * (g[:, :-1] - c0) * scale)
            grad.index_add_(0, r, gz.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def topk_divergence(student_logits, top_log_probs, top_indices, tail_log_mass, *, divergence="js", beta=0.5,
                    temperature=1.0, rows=None, chunk_rows=None):
    """Divergence of a top-k-compressed teacher from the student, per row, on the teacher's top-k support
    plus one tail bucket.

    student_logits: [..., V] float (flattened to [N, V]); rows: int64 [M] indices into those N rows (default:
    all, M = N); top_log_probs [M, k], top_indices [M, k] (int, distinct per row), tail_log_mass [M] as from
    topk_teacher (teacher log-probs at the same temperature). divergence: "js" (generalised JS with beta,
    0.5 = Jensen-Shannon) or "kl" (teacher || student). Returns [M], fp32 (fp64 for fp64 logits);
    differentiable w.r.t. student_logits (gradient rows outside `rows` are 0).

    The student side: log q_v = z_v/T - logsumexp(z/T) over the FULL vocabulary for v in the support S, and
    the tail bucket q_R = sum of q outside S (a log-sum-exp over the tail, exact). Both distributions are
    thus coarsened to the same k+1 buckets P = (p_S, p_R), Q = (q_S, q_R), and D(P || Q) is returned.

    The approximation (exact when k = V, or whenever the tail is empty):
    - it never overestimates: coarsening cannot increase an f-divergence (data processing), so
      0 <= D_dense - D_topk for KL and JS;
    - KL: D_dense - D_topk = p_R * KL(p(.|R) || q(.|R)) exactly (chain rule): small when the teacher's tail
      mass p_R is small, but not bounded by cached quantities (the tail conditionals are not cached);
    - JS: D_dense - D_topk <= beta p_R log(m_R / (beta p_R)) + (1-beta) q_R log(m_R / ((1-beta) q_R))
      with m_R = beta p_R + (1-beta) q_R, i.e. <= m_R * ln 2 at most (topk_gap_bound computes it per row).

    Memory: rows are processed in chunks of chunk_rows (default: about 4M elements, i.e. 16 MiB of fp32,
    per chunk); forward and backward keep at most two [chunk_rows, V] temporaries besides the logits and
    their gradient.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"topk_divergence: divergence = {divergence!r}; expected one of {DIVERGENCES}")
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise ValueError("topk_divergence: student_logits must be a float tensor")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"topk_divergence: student_logits must have a vocabulary dim, got "
                         f"{tuple(student_logits.shape)}")
    if divergence == "js" and not 0.0 < beta < 1.0:
        raise ValueError(f"topk_divergence: beta = {beta} must lie in (0, 1)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"topk_divergence: temperature = {temperature} must be a positive finite number")
    V = student_logits.shape[-1]
    logits2d = student_logits.reshape(-1, V)
    N = logits2d.shape[0]
    dev = student_logits.device
    rows = torch.arange(N, device=dev) if rows is None else rows.to(device=dev, dtype=torch.long).reshape(-1)
    M = rows.numel()
    if top_log_probs.dim() != 2 or top_log_probs.shape[0] != M or top_indices.shape != top_log_probs.shape:
        raise ValueError(f"topk_divergence: top_log_probs {tuple(top_log_probs.shape)} and top_indices "
                         f"{tuple(top_indices.shape)} must both be [M = {M}, k]")
    if tail_log_mass.shape != (M,):
        raise ValueError(f"topk_divergence: tail_log_mass has shape {tuple(tail_log_mass.shape)}, expected ({M},)")
    k = top_log_probs.shape[1]
    if k > V:
        raise ValueError(f"topk_divergence: k = {k} exceeds the vocabulary V = {V}")
    if M and (int(rows.min()) < 0 or int(rows.max()) >= N):
        raise ValueError(f"topk_divergence: rows must index the {N} logit rows")
    idx = top_indices.to(device=dev, dtype=torch.long)
    if M and k:
        if int(idx.min()) < 0 or int(idx.max()) >= V:
            raise ValueError(f"topk_divergence: top_indices must lie in [0, V = {V})")
        srt = idx.sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("topk_divergence: top_indices repeat an index within a row")
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 22) // V)
    out = _TopKDivergence.apply(logits2d, rows, top_log_probs.to(dev), idx, tail_log_mass.to(dev),
                                divergence, float(beta), float(temperature), int(chunk_rows))
    bad = ~torch.isfinite(out.detach())
    if bad.any():
        raise ValueError(f"topk_divergence: non-finite result at row {int(bad.nonzero()[0, 0])} "
                         f"(NaN/Inf logits, or a teacher bucket the student gives probability 0 under KL?)")
    return out


def topk_gap_bound(student_logits, top_indices, tail_log_mass, *, divergence="js", beta=0.5, temperature=1.0,
                   rows=None):
    """Per-row upper bound on D_dense - D_topk >= 0 (see topk_divergence): for JS
    beta p_R log(m_R/(beta p_R)) + (1-beta) q_R log(m_R/((1-beta) q_R)), m_R = beta p_R + (1-beta) q_R
    (<= m_R ln 2); for KL there is none from cached quantities: +inf where the teacher tail p_R > 0, else 0.
    Shapes as topk_divergence. Not differentiable (a diagnostic)."""
    with torch.no_grad():
        V = student_logits.shape[-1]
        z = student_logits.reshape(-1, V)
        if rows is not None:
            z = z.index_select(0, rows.to(z.device, torch.long).reshape(-1))
        lz = z.double() / temperature
        L = torch.logsumexp(lz, -1)
        lz.scatter_(-1, top_indices.to(z.device, torch.long), float("-inf"))
        q_r = (torch.logsumexp(lz, -1) - L).exp()
        p_r = tail_log_mass.to(z.device).double().exp()
        if divergence == "kl":
            return torch.where(p_r > 0, torch.full_like(p_r, math.inf), torch.zeros_like(p_r))
        m_r = beta * p_r + (1 - beta) * q_r
        zero = torch.zeros_like(p_r)
        a = torch.where(p_r > 0, beta * p_r * torch.log(m_r / (beta * p_r)), zero)
        b = torch.where(q_r > 0, (1 - beta) * q_r * torch.log(m_r / ((1 - beta) * q_r)), zero)
        return a + b


def dense_divergence(student_logits, teacher_log_probs, *, divergence="js", beta=0.5, temperature=1.0,
                     reduction="mean", backend="auto"):
    """D(teacher || student) per row of the last dim on dense cached teacher log-probabilities (at the same
    temperature): student_logits [..., V], teacher_log_probs [..., V]; "js" (generalised with beta) or "kl".
    reduction "mean" (scalar), "sum" or "none" ([...]); fp32 (fp64 for fp64 logits), differentiable w.r.t.
    the student. The fused pymerge.ops kernel; backend "auto" falls back to the reference while no compiled
    kernel is registered (pymerge.learned.op_backend)."""
    _check_divergence(divergence)
    backend = op_backend(backend, student_logits.device, "pymerge::divergence")
    if divergence == "js":
        return ops.js_divergence(student_logits, teacher_log_probs, teacher_is_logits=False, beta=beta,
                                 temperature=temperature, reduction=reduction, backend=backend)
    return ops.kl_divergence(student_logits, teacher_log_probs, teacher_is_logits=False, temperature=temperature,
                             reduction=reduction, backend=backend)


# ---------------------------------------------------------------------------------------------------------
# per-example targets cached on disk (classification, and any objective with a teacher)
# ---------------------------------------------------------------------------------------------------------

def _flatten_targets(targets):
    """List of per-example tensors (or dicts of tensors) -> safetensors entries + the structure's name."""
    if not targets:
        raise ValueError("cached_targets: compute() returned no targets")
    is_dict = isinstance(targets[0], Mapping)
    fields = list(targets[0].keys()) if is_dict else [""]
    out = {}
    for f in fields:
        vals = [(e[f] if is_dict else e) for e in targets]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            raise ValueError("cached_targets: targets must be tensors or dicts of tensors")
        vals = [v.detach().cpu() for v in vals]
        if len({(tuple(v.shape), v.dtype) for v in vals}) == 1:
            out[f"{f}|stack"] = torch.stack(vals)
        else:
            out.update({f"{f}|{i}": v for i, v in enumerate(vals)})
    return out, ("dict" if is_dict else "tensor")


def _unflatten_targets(tensors, structure, n):
    fields = {}
    for name, t in tensors.items():
        f, _, where = name.rpartition("|")
        fields.setdefault(f, {})[where] = t
    per = {f: (list(d["stack"].unbind(0)) if "stack" in d else [d[str(i)] for i in range(n)])
           for f, d in fields.items()}
    if structure == "tensor":
        return per[""]
    return [{f: per[f][i] for f in per} for i in range(n)]


class CachedTargets(list):
    """Per-example targets (a list) with where they live on disk: cache_path (None when not cached) and
    loaded_from_cache (True on a cache hit)."""

    def __init__(self, items=(), cache_path=None, loaded_from_cache=False):
        super().__init__(items)
        self.cache_path = cache_path
        self.loaded_from_cache = loaded_from_cache


def cached_targets(module, examples, compute, *, kind, settings=None, cache=True, cache_dir=None, cache_key=None,
                   device=None) -> CachedTargets:
    """Per-example teacher targets, computed once by ``compute()`` and cached on disk.

    module: the fine-tuned model (fingerprinted with model_fingerprint unless cache_key is given); examples:
    its task's per-example inputs (hashed with data_fingerprint); compute(): -> list of per-example tensors
    (or dicts of tensors), e.g. pymerge.learned.teacher_targets(...). kind and settings (a JSON-able dict:
    temperature, objective, ...) are part of the key. Returns a CachedTargets list (tensors on `device`,
    default CPU as loaded, or as computed). A cache hit skips compute() altogether.
    """
    path = None
    if cache:
        path = _cache_path(cache_dir, kind, {"model": cache_key or model_fingerprint(module),
                                             "data": data_fingerprint(list(examples)), "settings": settings or {}})
        got = _load(path)
        if got is not None:
            out = _unflatten_targets(got[0], got[1].get("structure", "tensor"), int(got[1]["n"]))
            return CachedTargets(_to(out, device) if device is not None else out, path, True)
    out = list(compute())
    if path is not None:
        tensors, structure = _flatten_targets(out)
        _save_atomic(path, tensors, {"format": str(CACHE_FORMAT), "kind": kind, "structure": structure,
                                     "n": str(len(out))})
    return CachedTargets(out, path, False)


def objective_targets(module, examples, objective, t=0, *, batch_size=32, pad_value=0, cache=True,
                      cache_dir=None, cache_key=None, device=None) -> CachedTargets:
    """objective.teacher(t, outputs) of the fine-tuned `module` per example (pymerge.learned.teacher_targets:
    eval mode, no grad, chunks of batch_size collated with pad_value), through the disk cache keyed by the
    model, the examples, objective.teacher_settings() and pad_value (an objective whose teacher_settings() is
    None is never cached). batch_size is not part of the key: it only groups the computation (examples of
    different lengths rely on the model masking the padding, e.g. through an attention_mask input).
    Tensors on `device` (default: the module's)."""
    from .learned import teacher_targets
    device = module_device(module) if device is None else device
    settings = objective.teacher_settings()
    return cached_targets(
        module, examples,
        lambda: teacher_targets(module, examples, objective, t, batch_size=batch_size, pad_value=pad_value,
                                device=device),
        kind="classification", settings=dict(settings or {}, pad_value=pad_value),
        cache=cache and settings is not None, cache_dir=cache_dir, cache_key=cache_key, device=device)


def classification_targets(module, examples, *, temperature=1.0, batch_size=32, pad_value=0, cache=True,
                           cache_dir=None, cache_key=None, device=None) -> CachedTargets:
    """The fine-tuned classifier's class log-probabilities log softmax(logits / temperature), one fp32 (fp64
    for fp64 models) [C] tensor per example, computed once (eval mode, no grad) and cached on disk.

    examples: per-example inputs as pymerge.learned.collect_examples makes them (batched again with
    pymerge.learned.collate, right-padded with pad_value). objective_targets with DivMerge's
    DivergenceObjective: the same cache entries as pymerge.divmerge's classification teachers.
    """
    from .methods.divmerge import DivergenceObjective
    return objective_targets(module, examples, DivergenceObjective("js", temperature), 0, batch_size=batch_size,
                             pad_value=pad_value, cache=cache, cache_dir=cache_dir, cache_key=cache_key,
                             device=device)


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------------------------
# causal LM (generative)
# ---------------------------------------------------------------------------------------------------------

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


def _teacher_rows(teacher):
    """(dense [M, V] or None, top [M, k], idx [M, k] int64, tail [M]) from a dict of teacher rows."""
    if teacher.get("teacher_log_probs") is not None:
        return teacher["teacher_log_probs"], None, None, None
    return None, teacher["top_log_probs"], teacher["top_indices"].long(), teacher["tail_log_mass"]


def token_divergence(logits, target_mask, teacher, *, divergence="js", beta=0.5, temperature=1.0, backend="auto",
                     chunk_rows=None) -> torch.Tensor:
    """D(teacher || student) per ŷ token [M], in the row-major order of target_mask.

    logits: the student's [B, L, V] on x+ŷ; target_mask: bool [B, L], True at the M positions whose logits
    predict a ŷ token; teacher: {"teacher_log_probs": [M, V]} (dense) or {"top_log_probs": [M, k],
    "top_indices": [M, k], "tail_log_mass": [M]} (top-k; see topk_divergence for the approximation).
    Differentiable w.r.t. logits; fp32 (fp64 for fp64 logits).
    """
    _check_divergence(divergence)
    if logits.dim() != 3 or logits.shape[:2] != target_mask.shape:
        raise ValueError(f"token_divergence: logits {tuple(logits.shape)} do not match target_mask [B, L] = "
                         f"{tuple(target_mask.shape)}")
    dense, top, idx, tail = _teacher_rows(teacher)
    M = int(target_mask.sum())
    rows = dense if dense is not None else top
    if rows.shape[0] != M:
        raise ValueError(f"token_divergence: {M} target positions but {rows.shape[0]} teacher rows")
    dev = logits.device
    if dense is None:
        where = target_mask.reshape(-1).nonzero().reshape(-1).to(dev)
        return topk_divergence(logits, top.to(dev), idx.to(dev), tail.to(dev), divergence=divergence, beta=beta,
                               temperature=temperature, rows=where, chunk_rows=chunk_rows)
    if logits.shape[-1] != dense.shape[-1]:
        raise ValueError(f"token_divergence: student vocabulary {logits.shape[-1]} != teacher vocabulary "
                         f"{dense.shape[-1]}")
    return dense_divergence(logits[target_mask.to(dev)], dense.to(dev), divergence=divergence, beta=beta,
                            temperature=temperature, reduction="none", backend=backend)


def sequence_divergence(logits, target_mask, teacher, **kw) -> torch.Tensor:
    """Per-sequence mean of token_divergence over its ŷ positions [B] (docs/METHODS.md §DivMerge, generative: per
    sequence, then the caller averages over sequences). Every row of target_mask must have a True entry."""
    tok = token_divergence(logits, target_mask, teacher, **kw)
    counts = target_mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("sequence_divergence: a sequence has no target (ŷ) position")
    seq = target_mask.nonzero()[:, 0].to(tok.device)
    return torch.zeros(target_mask.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, seq, tok) / \
        counts.to(tok.device, tok.dtype)


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
        """(inputs, targets): per-example lists in the form pymerge.learned's TaskExamples / collate use.
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
        path = _cache_path(cache_dir, "causal-lm", {
            "model": cache_key or model_fingerprint(model), "data": data_fingerprint(plist),
            "max_new_tokens": int(max_new_tokens), "eos": sorted(eos), "pad": int(pad_token_id),
            "top_k": top_k, "temperature": float(temperature)})
        got = _load(path)
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
        _save_atomic(path, targets._tensors(), {"format": str(CACHE_FORMAT), "kind": "causal-lm",
                                                "top_k": str(top_k), "max_new_tokens": str(max_new_tokens)})
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
