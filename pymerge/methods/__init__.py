"""Static merging methods, one per file, registered by name.

Each module pymerge/methods/<name>.py defines SPEC (a MethodSpec) and never does IO; heavy math goes
through pymerge.ops only. The data-driven methods (divmerge.py, adamerging.py) are functions, not specs.
"""
import importlib

from .spec import BACKEND_PARAM, KeyGroup, KeyInfo, MethodSpec, Param, key_seed

_MODULES = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv_m", "iso_c", "iso_cts",
            "cart")


def available():
    """Names of the registered static methods."""
    return list(_MODULES)


def get(name) -> MethodSpec:
    """The MethodSpec registered under `name`."""
    if name not in _MODULES:
        raise ValueError(f"unknown merging method {name!r}; available: {available()}")
    return importlib.import_module(f"{__name__}.{name}").SPEC


__all__ = ["available", "get", "BACKEND_PARAM", "KeyGroup", "KeyInfo", "MethodSpec", "Param", "key_seed"]
