# Quick start: `make demo` trains a class-conditional DCGAN on the embedded digits; `make test` runs the tests.
# Both create ./.venv first. Override PYTHON=python3.11 or TORCH=... as needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, take PyTorch's CPU build (a plain `torch` requirement pulls a multi-GB CUDA build).
# A local CPU wheel (pip find-links) satisfies torch==2.13.0 as is; otherwise use PyTorch's CPU index.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || ls $$(pip config get global.find-links 2>/dev/null || echo /nonexistent)/torch-*+cpu* >/dev/null 2>&1 || echo --extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: venv demo test test-all lint bench clean

$(BIN)/distgan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/distgan

demo: venv
	$(BIN)/distgan train --preset digits-cgan --out runs/demo --resume auto
	$(BIN)/distgan sample --ckpt runs/demo --n 100 --out runs/demo/final-samples.png

test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

test-all: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n auto --dist loadfile -m ""

lint: venv
	$(BIN)/ruff check distgan kernels tests benchmarks
	$(BIN)/ruff format --check distgan kernels tests benchmarks

bench: venv
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/data_stream.py

clean:
	rm -rf $(VENV) runs *.egg-info
