# Two entry points: `make demo` (the main job) and `make test` (the suite). Both bootstrap .venv.
# TORCH_VERSION: 2.13.0 is the CPU wheel on disk here; the GPU build of vLLM pins its own torch,
# so set it to that version there, e.g. `make demo TORCH_VERSION=2.9.0 EXTRAS=dev,vllm`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-torch$(TORCH_VERSION)-$(subst $(comma),_,$(EXTRAS))
comma := ,
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
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/target-sft demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests benchmarks
	$(BIN)/ruff format --check pipeline flows tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
