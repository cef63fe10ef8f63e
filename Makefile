# The short verbs. Each one creates .venv and installs the project first, so
# `make dev` and `make test` work on a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint bench fuzz clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/broker dev

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

# System packages the tests need, installed with apt where we are root on Debian: Redis
# (the shared rate limits; without it that test skips), and Chromium with its driver (the
# console's browser tests; nothing downloads a browser at run time, so without them those
# tests fail and say what to install). Each entry is package:command, since a package's
# command may have another name (chromium-driver installs chromedriver).
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium chromium-driver:chromedriver
system-deps:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  command -v $${entry#*:} >/dev/null 2>&1 || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; } \
	      || echo "could not install$$missing (the tests that need them will skip or fail)"; \
	  else \
	    echo "not installed:$$missing (install them; the tests that need them will skip or fail)"; \
	  fi; \
	fi

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
