"""pymerge: fast model merging (CART, DivMerge and relatives) over fused CPU/CUDA/Triton kernels."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops"]
