"""Build pymerge and its extension pymerge._C.

C++ CPU kernels are always built. CUDA kernels (csrc/*.cu: raw kernels behind a C-ABI launcher, no torch
headers) are added when torch is a CUDA build and nvcc is on the PATH; each csrc/<op>.cpp then also
compiles its CUDA glue (guarded by PYMERGE_WITH_CUDA).

Environment:
  PYMERGE_MARCH    -march value for the C++ code (default x86-64-v3; AVX-512 paths are chosen at run time)
  PYMERGE_NATIVE=1 shorthand for PYMERGE_MARCH=native (local opt-in only: the binary then runs only here)
  PYMERGE_NO_CUDA=1 skip the CUDA sources even where they could be built
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _march():
    if os.environ.get("PYMERGE_NATIVE") == "1":
        return "native"
    return os.environ.get("PYMERGE_MARCH", "x86-64-v3")


def _with_cuda():
    if os.environ.get("PYMERGE_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    include = [os.path.join(HERE, "csrc")]
    # -fopenmp: ATen's at::parallel_for is an inline `#pragma omp parallel`; without it every kernel runs serially.
    cxx = ["-O3", f"-march={_march()}", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    if _with_cuda():
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return CUDAExtension(
            "pymerge._C", cpp + sorted(glob.glob("csrc/*.cu")), include_dirs=include,
            define_macros=[("PYMERGE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    return CppExtension("pymerge._C", cpp, include_dirs=include, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


setup(
    name="pymerge",
    version="0.1.0",
    description="Fast model merging: CART, DivMerge and their relatives over fused CPU/CUDA/Triton kernels",
    python_requires=">=3.10",
    packages=["pymerge", "pymerge.cli", "pymerge.ops", "pymerge.methods", "pymerge.learn", "pymerge.teachers",
              "pymerge.peers", "pymerge.eval", "pymerge.io", "pymerge.adapters", "pymerge.kernels"],
    package_dir={"pymerge": "pymerge", "pymerge.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # The ranges the test suite has passed with (README, "Tested with"); requirements-dev.txt pins the rest.
    install_requires=["torch>=2.13.0,<2.14", "numpy>=2.4.6,<2.5", "safetensors>=0.8.0,<0.9", "tqdm>=4.70.1,<4.71",
                      "pyyaml>=6.0.4,<6.1"],
    # The adapters' data files: FusionBench's Hydra configs of pymerge's algorithms (method=pymerge/<name>).
    package_data={"pymerge.adapters": ["fusionbench_config/method/pymerge/*.yaml"]},
    extras_require={"triton": ["triton>=3.9.0,<3.10"], "hf": ["transformers>=5.25.0,<5.26"],
                    "eval": ["transformers>=5.25.0,<5.26", "matplotlib>=3.11.2,<3.12", "gguf>=0.19.0,<0.20"],
                    # pymerge inside the peers' tools (pymerge/adapters, pymerge.functional)
                    "mergekit": ["mergekit==0.1.5"], "fusionbench": ["fusion-bench==0.2.33"],
                    "peft": ["peft>=0.21.2,<0.22", "transformers>=5.25.0,<5.26"]},
    # pymerge-mergekit-yaml: mergekit-yaml with pymerge's methods registered (mergekit 0.1.5 has no plugin
    # discovery: its method registry is a dict filled at import).
    entry_points={"console_scripts": ["pymerge=pymerge.cli:main",
                                      "pymerge-mergekit-yaml=pymerge.adapters.mergekit:main"]},
)
