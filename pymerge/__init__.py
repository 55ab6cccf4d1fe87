"""pymerge: fast model merging (CART, DivMerge and relatives) over fused CPU/CUDA/Triton kernels."""
from . import methods, ops
from .merge import merge
from .methods.divmerge import divmerge
from .methods.adamerging import adamerging

__version__ = "0.1.0"
__all__ = ["merge", "divmerge", "adamerging", "methods", "ops"]
