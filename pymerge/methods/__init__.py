"""Merging methods, one per file, registered by name; each file's SPEC declares its parameters (Param).

Static methods (pymerge/methods/<name>.py defines SPEC, a MethodSpec) are run by pymerge.merge, never do IO
and do their heavy math through pymerge.ops only. Learned methods (divmerge.py, adamerging.py: SPEC is a
LearnedMethodSpec) train merge coefficients on models and unlabelled data and are run by their own function
(pymerge.divmerge, pymerge.adamerging). spec.kind tells them apart ("static" or "learned").
"""
import importlib

from .params import BACKEND_PARAM, Param
from .spec import KeyGroup, KeyInfo, LearnedMethodSpec, MethodSpec, key_seed

_STATIC = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv_m", "iso_c", "iso_cts",
           "cart")
_LEARNED = ("divmerge", "adamerging")
KINDS = ("static", "learned", "all")


def available(kind="static"):
    """Names of the registered methods of `kind`: "static" (default: what pymerge.merge runs), "learned"
    (pymerge.divmerge, pymerge.adamerging) or "all"."""
    if kind not in KINDS:
        raise ValueError(f"available: kind = {kind!r}; expected one of {KINDS}")
    return list({"static": _STATIC, "learned": _LEARNED, "all": _STATIC + _LEARNED}[kind])


def get(name):
    """The spec registered under `name`: a MethodSpec (static) or a LearnedMethodSpec (learned)."""
    if name not in _STATIC + _LEARNED:
        raise ValueError(f"unknown merging method {name!r}; available: {available('all')}")
    return importlib.import_module(f"{__name__}.{name}").SPEC


__all__ = ["available", "get", "BACKEND_PARAM", "KeyGroup", "KeyInfo", "LearnedMethodSpec", "MethodSpec", "Param",
           "key_seed"]
