"""Merging methods, one per file, registered by name.

Each module pymerge/methods/<name>.py defines SPEC (a MethodSpec) and never does IO; heavy math goes
through pymerge.ops only.
"""
import importlib

from .spec import BACKEND_PARAM, KeyGroup, KeyInfo, MethodSpec, Param, key_seed

_MODULES = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv_m", "iso_c", "iso_cts",
            "cart")


def available():
    """Names of the registered methods."""
    return [name for name in _MODULES if _spec_or_none(name) is not None]


def _spec_or_none(name):
    try:
        return importlib.import_module(f"{__name__}.{name}").SPEC
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            return None
        raise


def get(name) -> MethodSpec:
    """The MethodSpec registered under `name`."""
    spec = _spec_or_none(name) if name in _MODULES else None
    if spec is None:
        raise ValueError(f"unknown merging method {name!r}; available: {available()}")
    return spec


__all__ = ["available", "get", "BACKEND_PARAM", "KeyGroup", "KeyInfo", "MethodSpec", "Param", "key_seed"]
