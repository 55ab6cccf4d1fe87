"""Task examples and running a module on them: an iterable of batches split into per-example inputs
(``collect_examples``), per-example inputs collated back into one batch (``collate``, right-padding where
lengths differ; ``concat_batches`` joins batches of equal ``batch_signature``; ``trim_padding`` drops the
trailing columns that are padding in every row), a batch handed to a module (``call_model``, under
``evaluating``: eval mode and no_grad), its logits read (``logits_of``), and ``TaskExamples``: one task's
inputs with their cached per-example targets.
"""
import contextlib
from dataclasses import dataclass
from typing import Mapping, Optional

import torch


def _batch_size_of(batch):
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


def split_batch(batch, task="?") -> list:
    """One batch -> a list of per-example inputs (tensor rows; dict/tuple entries split alike; non-tensor
    dict values and 0-d tensors are shared by every example)."""
    if not isinstance(batch, (torch.Tensor, Mapping, list, tuple)):
        raise ValueError(f"data for task {task!r}: a batch must be a Tensor, a dict or a tuple of tensors, "
                         f"got {type(batch).__name__}")
    B = _batch_size_of(batch)
    if B is None:
        raise ValueError(f"data for task {task!r}: a batch holds no tensor with a batch dimension")

    def row(v, i):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] != B:
                raise ValueError(f"data for task {task!r}: batch entries disagree on the batch size "
                                 f"({v.shape[0]} vs {B})")
            return v[i]
        return v
    if isinstance(batch, torch.Tensor):
        return list(batch.unbind(0))
    if isinstance(batch, Mapping):
        return [{k: row(v, i) for k, v in batch.items()} for i in range(B)]
    return [type(batch)(row(v, i) for v in batch) if isinstance(batch, tuple) else [row(v, i) for v in batch]
            for i in range(B)]


def collect_examples(batches, task="?", limit=None) -> list:
    """The first `limit` examples (all when None) of an iterable of batches, as per-example inputs."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    try:
        it = iter(batches)
    except TypeError:
        raise ValueError(f"data for task {task!r} must be an iterable of batches, got {type(batches).__name__}")
    out = []
    for batch in it:
        out.extend(split_batch(batch, task))
        if limit is not None and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        raise ValueError(f"data for task {task!r} is empty (no examples)")
    return out


def _pad_stack(tensors, pad_value):
    shape = tensors[0].shape
    if all(t.shape == shape for t in tensors):
        return torch.stack(tensors)
    if any(t.dim() != len(shape) for t in tensors):
        raise ValueError(f"collate: examples have different numbers of dims {sorted({t.dim() for t in tensors})}")
    size = [max(t.shape[d] for t in tensors) for d in range(len(shape))]
    out = tensors[0].new_full((len(tensors), *size), pad_value)
    for i, t in enumerate(tensors):
        out[(i, *[slice(0, s) for s in t.shape])] = t
    return out


def collate(examples, pad_value=0, device=None):
    """Per-example inputs -> one batch (inverse of split_batch). Tensors of different shapes are right-padded
    with pad_value (an int/float, or {dict key: value}) along every dim: 0 suits input_ids/attention_mask
    (masked positions). device: move tensors there."""
    first = examples[0]

    def pad_for(key):
        return pad_value.get(key, 0) if isinstance(pad_value, Mapping) else pad_value

    def one(values, key):
        v0 = values[0]
        if isinstance(v0, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
            if v0.dim() == 0 and all(v is v0 for v in values):
                out = v0
            else:
                out = _pad_stack(list(values), pad_for(key))
            return out.to(device, non_blocking=True) if device is not None else out
        return v0
    if isinstance(first, torch.Tensor):
        return one(examples, None)
    if isinstance(first, Mapping):
        return {k: one([e[k] for e in examples], k) for k in first}
    if isinstance(first, (list, tuple)):
        cols = [one([e[i] for e in examples], i) for i in range(len(first))]
        return tuple(cols) if isinstance(first, tuple) else cols
    raise ValueError(f"collate: unsupported example type {type(first).__name__}")


def _mask_of(batch):
    """The [B, L] attention_mask of a dict batch (None when it has none, or not of that shape)."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def real_length(example):
    """The length an example's attention_mask says it has (1 + the last unmasked position; the whole mask
    when every position is masked), or None for an example without a 1-D attention_mask."""
    mask = example.get("attention_mask") if isinstance(example, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 1:
        return None
    nz = mask.nonzero()
    return int(nz[-1, 0]) + 1 if nz.numel() else mask.shape[0]


def trim_padding(batch):
    """A collated dict batch without its trailing columns that are padding in every row (attention_mask 0
    there): the tensors whose first two dims are the mask's [B, L] are cut to the longest row's last unmasked
    position. Examples handed over as rows of a padded batch (a tokenizer's padding=True) keep their batch's
    padding; a task's forward then costs its own longest example, not the longest of the batch it came from.
    A model whose outputs at unmasked positions do not depend on masked ones (what collate's right-padding
    already relies on) gives the same outputs. Other batches are returned as they are."""
    mask = _mask_of(batch)
    if mask is None or mask.shape[1] == 0:
        return batch
    cols = mask.ne(0).any(0).nonzero()
    keep = int(cols[-1, 0]) + 1 if cols.numel() else mask.shape[1]
    if keep == mask.shape[1]:
        return batch
    B, L = mask.shape
    return {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == B and v.shape[1] == L
            else v for k, v in batch.items()}


def batch_signature(batch):
    """The shapes (batch dim excluded), dtypes and structure of a collated batch: batches of equal signature
    can be concatenated along the batch dim (concat_batches) without padding."""
    if isinstance(batch, torch.Tensor):
        return ("t", tuple(batch.shape[1:]) if batch.dim() else None, batch.dtype)
    if isinstance(batch, Mapping):
        return ("d",) + tuple((k, batch_signature(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__,) + tuple(batch_signature(v) for v in batch)
    return ("v", id(batch))


def concat_batches(batches):
    """Collated batches of one signature -> one batch, rows in order (tensors of dim >= 1 concatenated along
    dim 0; 0-d tensors and other values from the first batch, as collate shares them)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches, 0) if first.dim() else first
    if isinstance(first, Mapping):
        return {k: concat_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        cols = [concat_batches([b[i] for b in batches]) for i in range(len(first))]
        return tuple(cols) if isinstance(first, tuple) else cols
    return first


def call_model(module, batch):
    """module(**batch) for a dict, module(*batch) for a tuple/list, module(batch) for a tensor."""
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (list, tuple)):
        return module(*batch)
    return module(batch)


def logits_of(outputs):
    """outputs.logits, outputs["logits"], outputs[0] of a tuple, or the tensor itself."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in the model's output of type {type(outputs).__name__}")


def module_device(module):
    """The device of a module's first parameter (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(module):
    """Eval mode and no_grad for the block; the module's training mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


@dataclass
class TaskExamples:
    """One task's unlabelled examples (per-example model inputs) and cached per-example targets (or None)."""
    name: str
    inputs: list
    targets: Optional[list] = None

    def __len__(self):
        return len(self.inputs)

