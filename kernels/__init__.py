"""Triton kernels of pymerge, one op per file; importable as pymerge.kernels.

Reached only through pymerge.ops (backend="triton"). On CPU tensors they run under TRITON_INTERPRET=1.
"""
