"""Triton kernels of pymerge, one op per file; importable as pymerge.kernels.

Reached only through pymerge.ops (backend="triton"). On CPU tensors they run under TRITON_INTERPRET=1.

This folder is never a top-level package. `kernels` is the name of Hugging Face's package (transformers 5
imports it); a Python started in the repository root has this folder first on sys.path, so an `import kernels`
lands here. It then steps aside: the real `kernels` is loaded from the rest of sys.path and takes this module's
place in sys.modules, or the import fails as it would without this folder.
"""
if __name__ != "pymerge.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the folder {os.path.dirname(__file__)} is "
                                  "pymerge.kernels, not a top-level package)", name=__name__)
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real
    _spec.loader.exec_module(_real)
