# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton is imported.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# CI draws the same hypothesis examples every run (a failure there is reproducible); local runs keep exploring.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
