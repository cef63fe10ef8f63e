# The short verbs. Each one creates .venv and installs the project first, so
# `make dev` and `make test` work on a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/broker dev

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Figures, not assertions: see bench/README.md. BENCH_QUICK=1 for a smoke run.
bench: $(STAMP)
	$(BIN)/python -m bench.run

# A long property-based run against the OpenAPI document, before a release.
fuzz: $(STAMP)
	FUZZ_EXAMPLES=500 $(BIN)/python -m pytest tests/fuzz -q

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .broker .pytest_cache
