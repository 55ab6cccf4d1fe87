"""The repository's Triton folder kernels/ is pymerge.kernels and never shadows Hugging Face's `kernels`.

transformers 5 imports the top-level package `kernels`; a Python started in the repository root has the root
first on sys.path, where kernels/ would win the name. These run Python there, as a user would.
"""
import importlib.metadata
import os
import subprocess
import sys

import pymerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_in_root(code, *flags):
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_hf_kernels_is_installed_for_this_check():
    # make test installs transformers, which depends on it: without it the checks below prove nothing.
    assert importlib.metadata.distribution("kernels").version


def test_import_kernels_in_repository_root_gets_hugging_faces_package():
    run = _python_in_root("import sys, kernels; from kernels import CUDAProperties; print(kernels.__file__)")
    assert run.returncode == 0, run.stderr
    got = os.path.realpath(run.stdout.strip())
    assert not got.startswith(os.path.join(ROOT, "kernels") + os.sep), got
    assert os.path.realpath(str(importlib.metadata.distribution("kernels").locate_file("kernels"))) in got


def test_transformers_model_imports_in_repository_root():
    run = _python_in_root("import transformers.models.bert.modeling_bert as m; print(m.BertModel.__name__)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "BertModel"


def test_without_hugging_faces_package_import_kernels_fails_as_missing():
    # -S: no site-packages, so no real `kernels` anywhere; the folder must not pass for one.
    run = _python_in_root("import kernels", "-S")
    assert run.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in run.stderr


def test_pymerge_kernels_is_the_triton_folder():
    run = _python_in_root("import pymerge.kernels.center as c; print(c.__file__)")
    assert run.returncode == 0, run.stderr
    folder = os.path.realpath(os.path.dirname(run.stdout.strip()))
    # an editable install maps pymerge.kernels to kernels/; a wheel installs it as pymerge/kernels/
    installed = os.path.join(os.path.realpath(os.path.dirname(pymerge.__file__)), "kernels")
    assert folder in (os.path.join(ROOT, "kernels"), installed), folder
