# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton is imported.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
