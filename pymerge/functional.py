"""pymerge.functional: peft's functional merge API (`peft.utils.merge_utils`, peft 0.21) over pymerge's own code,
so that `from pymerge import functional as merge_utils` swaps in; plus CART and TSV-M in the same per-tensor style.

Every merge function merges ONE tensor. task_tensors: the T task vectors (deltas theta_t - theta_0) of that
tensor, as peft takes them (a sequence of T same-shape tensors), or one stacked Tensor [T, *S]. weights: one
number per task: a Tensor [T] as peft takes it, a 0-d Tensor (the same weight for every task), a sequence or a
number. The result is the merged DELTA [*S] (add it to theta_0). peft's conventions, checked against peft itself
in tests/test_functional.py:

  task_arithmetic   sum_t w_t tau_t                              (no lam: the weights are the scaling)
  magnitude_prune   sum_t w_t trim(tau_t)
  ties              elect a sign per entry from the UNWEIGHTED trimmed tau_t ("total": sign of sum_t tau_t,
                    "frequency": sign of sum_t sign(tau_t); a zero elects +), then sum_t w_t tau_t [agree_t]
                    divided by the COUNT of agreeing tasks (at least 1)
  dare_linear       sum_t w_t drop(tau_t)
  dare_ties         ties' election and disjoint merge on drop(tau_t), no trim

trim keeps the k = int(density * numel) largest |entries| of each task (none below density 1 / numel), drop keeps
each entry with probability density (torch.bernoulli) and divides the survivors by density; density >= 1 does
neither (no random numbers drawn: deterministic). The output dtype is peft's: the task tensors' dtype promoted
with a Tensor weights' dtype; fp16/bf16 are computed in fp32, fp64 in fp64 (peft computes in the dtype itself).

Where pymerge.merge's methods differ (they follow mergekit and docs/METHODS.md; this module follows peft):
- ties / dare_ties: pymerge's weights scale tau_t BEFORE the sign election and its disjoint mean divides by
  sum_t w_t [agree_t] (mergekit's normalize=True); peft elects on unweighted tensors and divides by the count.
  The two agree for equal positive weights.
- trim count: pymerge keeps max(1, int(density * numel)), peft int(density * numel) (zero below 1 / numel).
- DARE: pymerge takes the drop probability p = 1 - density and draws its masks per key and task from seeded
  generators (uniforms < 1 - p, reproducible whatever the grouping); here torch.bernoulli draws them in peft's
  order from torch's global generator, so `torch.manual_seed(s)` before either call gives peft's masks exactly,
  or from generator= / seed= (a keyword peft does not have).
- pymerge's methods return theta_0 + lam * merged; these functions return the delta, without lam.
- Among entries tied at the trim threshold, pymerge keeps the lowest flat indices (peft's torch.topk: any).

Differences from peft itself: density >= 1 gives no UserWarning; DARE with density 0 raises ValueError (peft
returns 0 / 0 = NaN); an unknown majority_sign_method raises ValueError (peft: RuntimeError); weights must be
one value per task (peft also broadcasts weights of more dims); results never carry an autograd graph (they are
computed under torch.no_grad()).

The work is pymerge's: the weighted sums are pymerge.ops.center_task_vectors (one fused pass over the T tensors,
accumulating in fp32), the trim is methods/ties.py's MagnitudeTrim (a radix select per task, no sort) applied
to cache-sized chunks, and the election runs over the same chunks, so no [T, *S] stack of pruned copies is built
(peft stacks them). cart() and tsv_m() run pymerge.merge on a one-key state dict with a zero base, so their
result equals pymerge.merge("cart" / "tsv_m", {key: 0}, [{key: tau_t}])[key] bitwise (for a nonzero base:
merge(...)[key] - base up to rounding).
"""
import math
from numbers import Real
from typing import Literal, Optional, Sequence, Union

import torch

from . import methods as _methods
from .dtypes import FLOAT_DTYPES, accumulation_dtype
from .merge import merge as _merge
from .methods.ties import CHUNK, MagnitudeTrim
from .ops import center_task_vectors
from .ops.center import as_tensor_list

TaskTensors = Union[torch.Tensor, Sequence[torch.Tensor]]
Weights = Union[torch.Tensor, Sequence[float], float]
SIGN_METHODS = ("total", "frequency")

__all__ = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "cart", "tsv_m", "prune",
           "magnitude_based_pruning", "random_pruning", "calculate_majority_sign_mask", "disjoint_merge",
           "reshape_weight_task_tensors"]


# ------------------------------------------------------------------------------------------------ inputs
def _tasks(task_tensors, op):
    """task_tensors -> list of T same-shape, same-dtype float tensors on one device (ValueError otherwise)."""
    if task_tensors is None:
        raise ValueError(f"{op}: task_tensors is None; pass the T task vectors (deltas) of one tensor")
    return as_tensor_list(task_tensors, op, name="task_tensors")


def _weights(weights, T, op):
    """(T floats, the dtype a Tensor weights promotes the output to, or None)."""
    if weights is None:
        raise ValueError(f"{op}: weights is None; pass one weight per task (a Tensor [{T}] as peft takes it)")
    dtype = None
    if isinstance(weights, torch.Tensor):
        if weights.is_complex():
            raise ValueError(f"{op}: weights must be real, got dtype {weights.dtype}")
        dtype = weights.dtype
        if weights.dim() > 1:
            raise ValueError(f"{op}: weights must be a Tensor [T] (one weight per task) or 0-d, got shape "
                             f"{tuple(weights.shape)}")
        values = [float(v) for v in weights.detach().reshape(-1).tolist()]
        if weights.dim() == 0:
            values = values * T
    elif isinstance(weights, Real) and not isinstance(weights, bool):
        values = [float(weights)] * T
    else:
        try:
            values = [float(v) for v in weights]
        except (TypeError, ValueError):
            raise ValueError(f"{op}: weights must be a Tensor, a sequence of numbers or a number, got "
                             f"{type(weights).__name__}") from None
    if len(values) != T:
        raise ValueError(f"{op}: weights has {len(values)} values for T = {T} task tensors")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{op}: weights must be finite, got {values}")
    return values, dtype


def _density(density, op, *, positive=False):
    if isinstance(density, torch.Tensor) and density.numel() == 1:
        density = density.item()
    if not isinstance(density, Real) or isinstance(density, bool) or not math.isfinite(float(density)):
        raise ValueError(f"{op}: density must be a finite number, got {density!r}")
    density = float(density)
    if density < 0:
        raise ValueError(f"{op}: density must be >= 0 (the fraction of entries kept), got {density}")
    if positive and density == 0:
        raise ValueError(f"{op}: density must be > 0: DARE divides the kept entries by it (peft returns NaN)")
    return density


def _sign_method(method, op):
    if method not in SIGN_METHODS:
        raise ValueError(f"{op}: majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    return method


def _out_dtype(tasks, weights_dtype):
    """peft's result dtype: the tasks' dtype promoted with a Tensor weights' dtype (weights * task_tensors)."""
    dtype = tasks[0].dtype
    return dtype if weights_dtype is None else torch.promote_types(dtype, weights_dtype)


def _generator(generator, seed, device, op):
    """The generator DARE draws its masks from: generator, a fresh one seeded with seed, or None (torch's global
    generator of the device, as peft)."""
    if generator is not None and seed is not None:
        raise ValueError(f"{op}: pass generator or seed, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{op}: seed must be an int, got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


# ------------------------------------------------------------------------------------ shared machinery
def _trim(flats, density, acc):
    """MagnitudeTrim of the flattened tasks at peft's count k = int(density * numel) >= 1; None when nothing is
    trimmed (density >= 1). The caller handles k = 0 (every entry pruned)."""
    if density >= 1:
        return None
    n = flats[0].numel()
    # MagnitudeTrim measures |theta_t - theta_0|; a zero base (a stride-0 scalar, no buffer) makes it |tau_t|.
    zero = torch.zeros((), dtype=acc, device=flats[0].device).expand(n)
    trim = MagnitudeTrim(zero, flats, [density] * len(flats), acc)
    return trim if trim.active else None


def _keeps_nothing(density, numel):
    return density < 1 and int(density * numel) == 0


def _chunks(flats, acc, trim):
    """Yield (start, end, chunk [T, C] in acc) over the flattened tasks, trimmed when trim is given."""
    T, n = len(flats), flats[0].numel()
    buf = torch.empty(T, min(CHUNK, n), dtype=acc, device=flats[0].device)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        chunk = buf[:, :e - s]
        for t in range(T):
            chunk[t].copy_(flats[t][s:e])
        if trim is not None:
            trim.apply_(chunk, s)
        yield s, e, chunk


def _weighted_sum(flats, weights, acc, trim):
    """sum_t w_t tau_t (tau_t trimmed by trim) -> [n] in acc."""
    if trim is None:
        return center_task_vectors(flats, weights, out_dtype=acc, return_centered=False)[0]
    w = torch.tensor(weights, dtype=acc, device=flats[0].device)
    out = torch.empty(flats[0].numel(), dtype=acc, device=flats[0].device)
    for s, e, chunk in _chunks(flats, acc, trim):
        torch.mv(chunk.mT, w, out=out[s:e])
    return out


def _elect_and_merge(flats, weights, method, acc, trim):
    """peft's TIES core on the flattened tasks (after trim): the sign elected from the unweighted values, then
    sum_t w_t tau_t [agree_t] / max(1, #agree) -> [n] in acc. agree_t: sign(tau_t) equals the elected sign, so a
    zero entry never agrees."""
    w = torch.tensor(weights, dtype=acc, device=flats[0].device).unsqueeze(1)
    out = torch.empty(flats[0].numel(), dtype=acc, device=flats[0].device)
    for s, e, chunk in _chunks(flats, acc, trim):
        sgn = chunk.sign()
        score = chunk.sum(0) if method == "total" else sgn.sum(0)
        elected = torch.where(score >= 0, 1.0, -1.0).to(acc)
        agree = (sgn == elected).to(acc)
        count = agree.sum(0).clamp_min_(1)
        torch.div(agree.mul_(chunk).mul_(w).sum(0), count, out=out[s:e])
    return out


def _random_prune(tensor, density, rescale, generator):
    """peft's random pruning, drawn the same way (one torch.bernoulli per tensor, in the tensor's dtype), so the
    same generator state gives the same mask."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def _dare_inputs(task_tensors, weights, density, generator, seed, op):
    tasks = _tasks(task_tensors, op)
    w, w_dtype = _weights(weights, len(tasks), op)
    density = _density(density, op, positive=True)
    out_dtype = _out_dtype(tasks, w_dtype)
    if density < 1:
        gen = _generator(generator, seed, tasks[0].device, op)
        tasks = [_random_prune(t, density, True, gen) for t in tasks]
    else:
        _generator(generator, seed, tasks[0].device, op)      # still check the arguments
    return tasks, w, out_dtype


def _flat(tasks, acc):
    """Flat views of the tasks; in acc where acc is wider than fp32 for a narrower input (fp64 weights)."""
    return [(t if accumulation_dtype(t.dtype) == acc else t.to(acc)).reshape(-1) for t in tasks]


# ------------------------------------------------------------------------------------------- the merges
def task_arithmetic(task_tensors: TaskTensors, weights: Weights) -> torch.Tensor:
    """sum_t w_t tau_t: one fused weighted sum (pymerge.ops.center_task_vectors), accumulated in fp32 (fp64 for
    fp64). peft.utils.merge_utils.task_arithmetic."""
    op = "task_arithmetic"
    with torch.no_grad():
        tasks = _tasks(task_tensors, op)
        w, w_dtype = _weights(weights, len(tasks), op)
        out_dtype = _out_dtype(tasks, w_dtype)
        acc = accumulation_dtype(out_dtype)
        merged = _weighted_sum(_flat(tasks, acc), w, acc, None)
        return merged.reshape(tasks[0].shape).to(out_dtype)


def magnitude_prune(task_tensors: TaskTensors, weights: Weights, density: float) -> torch.Tensor:
    """sum_t w_t trim(tau_t): each task keeps its int(density * numel) largest |entries|.
    peft.utils.merge_utils.magnitude_prune."""
    op = "magnitude_prune"
    with torch.no_grad():
        tasks = _tasks(task_tensors, op)
        w, w_dtype = _weights(weights, len(tasks), op)
        density = _density(density, op)
        out_dtype = _out_dtype(tasks, w_dtype)
        if _keeps_nothing(density, tasks[0].numel()):
            return torch.zeros(tasks[0].shape, dtype=out_dtype, device=tasks[0].device)
        acc = accumulation_dtype(out_dtype)
        flats = _flat(tasks, acc)
        merged = _weighted_sum(flats, w, acc, _trim(flats, density, acc))
        return merged.reshape(tasks[0].shape).to(out_dtype)


def ties(task_tensors: TaskTensors, weights: Weights, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES as peft: trim each task to its int(density * numel) largest |entries|, elect the sign per entry from
    the unweighted trimmed tensors, then sum_t w_t tau_t [agree_t] / max(1, #agree). peft.utils.merge_utils.ties
    (pymerge.merge("ties") weights before the election and divides by the agreeing weights: module doc)."""
    op = "ties"
    with torch.no_grad():
        tasks = _tasks(task_tensors, op)
        w, w_dtype = _weights(weights, len(tasks), op)
        density = _density(density, op)
        method = _sign_method(majority_sign_method, op)
        out_dtype = _out_dtype(tasks, w_dtype)
        if _keeps_nothing(density, tasks[0].numel()):
            return torch.zeros(tasks[0].shape, dtype=out_dtype, device=tasks[0].device)
        acc = accumulation_dtype(out_dtype)
        flats = _flat(tasks, acc)
        merged = _elect_and_merge(flats, w, method, acc, _trim(flats, density, acc))
        return merged.reshape(tasks[0].shape).to(out_dtype)


def dare_linear(task_tensors: TaskTensors, weights: Weights, density: float, *,
                generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """DARE + task arithmetic as peft: each entry kept with probability density (torch.bernoulli) and the kept
    ones divided by density, then sum_t w_t dropped(tau_t). generator / seed (beyond peft's signature): where the
    masks come from; neither: torch's global generator, drawn exactly as peft draws them. density >= 1 draws
    nothing. peft.utils.merge_utils.dare_linear."""
    op = "dare_linear"
    with torch.no_grad():
        tasks, w, out_dtype = _dare_inputs(task_tensors, weights, density, generator, seed, op)
        acc = accumulation_dtype(out_dtype)
        merged = _weighted_sum(_flat(tasks, acc), w, acc, None)
        return merged.reshape(tasks[0].shape).to(out_dtype)


def dare_ties(task_tensors: TaskTensors, weights: Weights, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *,
              generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """DARE's drop-and-rescale (as dare_linear), then ties' election and disjoint merge (no trim).
    peft.utils.merge_utils.dare_ties."""
    op = "dare_ties"
    with torch.no_grad():
        method = _sign_method(majority_sign_method, op)
        tasks, w, out_dtype = _dare_inputs(task_tensors, weights, density, generator, seed, op)
        acc = accumulation_dtype(out_dtype)
        merged = _elect_and_merge(_flat(tasks, acc), w, method, acc, None)
        return merged.reshape(tasks[0].shape).to(out_dtype)


# ---------------------------------------------------------------------------- CART and TSV-M, per tensor
def _scaled_tasks(tasks, weights, op):
    """The tasks, each scaled by its weight (in fp32, fp64 for fp64) unless weights is None or all ones."""
    if weights is not None:
        w, _ = _weights(weights, len(tasks), op)
        if any(v != 1.0 for v in w):
            acc = accumulation_dtype(tasks[0].dtype)
            tasks = [t.to(acc) * v for t, v in zip(tasks, w)]
    return tasks


def _one_key_merge(method, tasks, dtype, key, params, op):
    """pymerge.merge(method, {key: 0}, [{key: tau_t}], **params)[key]: the merged delta in dtype."""
    if not isinstance(key, str):
        raise ValueError(f"{op}: key must be a str (the state-dict key the randomized SVD is seeded with), "
                         f"got {type(key).__name__}")
    base = {key: torch.zeros_like(tasks[0])}
    return _merge(method, base, [{key: t} for t in tasks], out_dtype=dtype, **params)[key]


def cart(task_tensors: TaskTensors, weights: Optional[Weights] = None, rank_ratio: Optional[float] = None,
         lam: float = 2.0, *, rank: Optional[int] = None, energy: Optional[float] = None, key: str = "weight",
         **options) -> torch.Tensor:
    """CART of one tensor in delta form: tau_avg + lam * sum_t SVD_k(tau_t - tau_avg) (theta_avg - theta_0 +
    lam * ..., since theta_t - theta_avg = tau_t - tau_avg: no base needed) for tensors of >= 2 dims (conv
    kernels as [shape[0], prod(rest)]); tau_avg for 1-D tensors (what CART gives every key it does not
    approximate). docs/METHODS.md §CART.

    rank_ratio / rank / energy (exclusive; none: rank_ratio 0.08), lam and options (svd, tol, oversample,
    power_iters, seed, backend) are pymerge.merge("cart")'s parameters with its defaults; key: the state-dict key
    the tensor stands for, which seeds the randomized SVD (key_seed(seed, key)), so the result equals
    pymerge.merge("cart", {key: 0}, [{key: tau_t}], low_rank_keys=lambda k: True, ...)[key] bitwise.
    weights: None (CART has none) or one per task, scaling tau_t before the merge (the fine-tuned models
    theta_0 + w_t tau_t).
    Returns the merged delta in the tasks' dtype."""
    op = "cart"
    for name in ("low_rank_keys", "exclude_keys"):
        if name in options:
            raise ValueError(f"{op}: {name} selects keys of a state dict; the functional cart merges one tensor "
                             f"(>= 2 dims: low rank, 1-D: the mean of the deltas)")
    params = dict(rank_ratio=rank_ratio, rank=rank, energy=energy, lam=lam, **options)
    with torch.no_grad():
        tasks = _tasks(task_tensors, op)
        dtype = tasks[0].dtype
        tasks = _scaled_tasks(tasks, weights, op)
        if tasks[0].dim() >= 2:
            return _one_key_merge("cart", tasks, dtype, key, {**params, "low_rank_keys": lambda k: True}, op)
        # A key CART does not approximate stays at theta_avg: the mean delta, computed by the same op call as
        # methods/cart.py's. The parameters are still checked.
        resolved = _methods.get("cart").resolve_params(params, len(tasks))
        acc = accumulation_dtype(tasks[0].dtype)
        avg = center_task_vectors(tasks, out_dtype=acc, return_centered=False, backend=resolved["backend"])[0]
        return avg.to(dtype)


def tsv_m(task_tensors: TaskTensors, weights: Optional[Weights] = None, alpha: float = 1.0, *, key: str = "weight",
          **options) -> torch.Tensor:
    """TSV-M of one tensor in delta form: alpha * polar(X) diag(s) polar(Y)^T from each task's top int(r / T)
    singular triplets (2-D tensors, min(m, n) >= T), alpha * mean_t tau_t otherwise. docs/METHODS.md §TSV-M.

    alpha and options (svd, oversample, power_iters, seed, polar, backend) are pymerge.merge("tsv_m")'s
    parameters with its defaults; key seeds the randomized SVD as in cart(), so the result equals
    pymerge.merge("tsv_m", {key: 0}, [{key: tau_t}], exclude_keys=(), ...)[key] bitwise. weights: None or one
    per task, scaling tau_t before the merge. Returns the merged delta in the tasks' dtype."""
    op = "tsv_m"
    if "exclude_keys" in options:
        raise ValueError(f"{op}: exclude_keys selects keys of a state dict; the functional tsv_m merges one tensor")
    with torch.no_grad():
        tasks = _tasks(task_tensors, op)
        dtype = tasks[0].dtype
        tasks = _scaled_tasks(tasks, weights, op)
        return _one_key_merge("tsv_m", tasks, dtype, key, {"alpha": alpha, "exclude_keys": (), **options}, op)


# ---------------------------------------------------------------------- peft's helpers, same semantics
def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights viewed with trailing singleton dims so that it broadcasts against the stacked task_tensors."""
    return weights.reshape(tuple(weights.shape) + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """tensor with all but its int(density * numel) largest |entries| set to 0 (a new tensor). Radix select
    (methods/ties.py's MagnitudeTrim), no sort; among entries tied at the threshold the lowest indices stay."""
    op = "magnitude_based_pruning"
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: tensor must be a float Tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    density = _density(density, op)
    with torch.no_grad():
        if _keeps_nothing(density, tensor.numel()):
            return torch.zeros_like(tensor)
        if density >= 1 or tensor.numel() == 0:
            return tensor.clone()
        acc = accumulation_dtype(tensor.dtype)
        values = tensor.reshape(1, -1).to(acc, copy=True)
        _trim([values[0]], density, acc).apply_(values, 0)
        # The kept entries are exact copies (fp16/bf16 widen exactly to fp32), the others 0.
        return values.reshape(tensor.shape).to(tensor.dtype)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool, *,
                   generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """tensor with each entry kept with probability density (torch.bernoulli, drawn as peft draws it), divided
    by density when rescale. generator / seed: as dare_linear."""
    op = "random_pruning"
    density = _density(density, op, positive=rescale)
    with torch.no_grad():
        return _random_prune(tensor, density, rescale, _generator(generator, seed, tensor.device, op))


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False, *,
          generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """magnitude_based_pruning or random_pruning; density >= 1 returns tensor itself (as peft, without its
    warning)."""
    op = "prune"
    if method not in ("magnitude", "random"):
        raise ValueError(f"{op}: method must be 'magnitude' or 'random', got {method!r}")
    if _density(density, op) >= 1:
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale, generator=generator, seed=seed)


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Boolean mask [T, *S] of the entries of the stacked tensor [T, *S] whose sign equals the elected one
    ("total": the sign of the sum over dim 0, "frequency": of the summed signs; + where that is 0)."""
    _sign_method(method, "calculate_majority_sign_mask")
    sgn = tensor.sign()
    score = tensor.sum(0) if method == "total" else sgn.sum(0)
    return sgn == torch.where(score >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 of the stacked task_tensors where the mask holds, divided by the count of such tasks
    (at least 1)."""
    total = (task_tensors * majority_sign_mask).sum(0)
    return total / majority_sign_mask.sum(0).clamp(min=1.0)
