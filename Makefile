# Set-up and the two entry points. Everything installs into .venv from the package registry.
# TORCH_SPEC pins the CPU build of PyTorch first; a GPU user can pass TORCH_SPEC=torch (or skip it
# when their own build is installed): the package itself only asks for a compatible range.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

## The main job: MAPA vs VAE vs IWAE on the built-in figure-8 data set (table + plot in runs/demo).
demo: setup
	$(BIN)/mapa-vae compare --data figure-8 --out runs/demo

## The test suite: lint, type check, then pytest (slow end-to-end tests included, small profile).
test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/passes.py
