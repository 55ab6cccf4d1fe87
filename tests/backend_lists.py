"""The backends the test modules parametrize over, decided once at import (collection) time.

Two kinds of list:
  * op_backends(): for the op tests - "reference" always, "cpu" where pymerge._C is built, "triton" where
    Triton runs in the interpreter (tests/conftest.py asks for it); kernel_backends() is the same less
    "reference";
  * method_backends(*ops): for the merging-method tests - "reference" always, "auto" once every op the method
    calls has a CPU kernel registered (the C++ extension is built).
"""
import torch

from pymerge.ops.backend import extension_loaded, triton_available, triton_interpreted


def op_backends():
    backends = ["reference"]
    if extension_loaded():
        backends.append("cpu")
    if triton_available() and triton_interpreted():
        backends.append("triton")
    return backends


def kernel_backends(backends):
    """`backends` without the plain-torch reference: the ones whose result is compared with it."""
    return [b for b in backends if b != "reference"]


def kernels_ready(*ops):
    """True when every pymerge::<op> has a CPU kernel registered."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"pymerge::{op}", "CPU") for op in ops)


def method_backends(*ops):
    return ["reference"] + (["auto"] if kernels_ready(*ops) else [])
