"""Backend choice for every pymerge op, in one function.

Backends: "reference" (plain torch, pymerge.reference), "cpu" (C++ kernels in pymerge._C), "cuda" (CUDA
kernels in pymerge._C, built only against a CUDA torch), "triton" (kernels/ = pymerge.kernels; on CPU
tensors only under TRITON_INTERPRET=1). "auto" picks the fastest one available for the tensors' device.
"""
import functools
import importlib
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


@functools.lru_cache(maxsize=None)
def extension_loaded():
    """True when pymerge._C imported (it registers torch.ops.pymerge.*)."""
    try:
        importlib.import_module("pymerge._C")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_kernels_built():
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "pymerge::center_task_vectors", "CUDA")


@functools.lru_cache(maxsize=None)
def triton_available():
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend, device, op):
    """Return the concrete backend that runs `op` on tensors of `device`, or raise ValueError saying why not."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if extension_loaded() else "reference"
        if device.type == "cuda":
            if cuda_kernels_built():
                return "cuda"
            return "triton" if triton_available() else "reference"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got {device}")
        if not extension_loaded():
            raise ValueError(f"{op}: backend 'cpu' needs the compiled extension pymerge._C (run `make build`)")
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got {device}")
        if not cuda_kernels_built():
            raise ValueError(f"{op}: pymerge._C was built without CUDA kernels (needs a CUDA torch and nvcc)")
    elif backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend 'triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(f"{op}: backend 'triton' runs on CPU tensors only with TRITON_INTERPRET=1 "
                             "set before pymerge is imported")
    return backend
