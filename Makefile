# The short verbs. Each one creates .venv and installs the project first, so
# `make dev` and `make test` work on a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint bench fuzz clean system-deps bench-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/broker dev

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

# System packages some tests need (real Redis for the shared rate limits, wrk for the
# bench's own test), installed with apt where we are root on Debian; elsewhere those
# tests skip and say why.
SYSTEM_BINARIES := redis-server wrk
system-deps:
	@$(call apt_install,$(SYSTEM_BINARIES),the tests that need them will skip)

# wrk, the load generator for the broker and the Vault floor alike (C, not Python).
bench-deps:
	@$(call apt_install,wrk,make bench needs it)

# $(call apt_install,binaries,what happens without them): installs the Debian packages
# of the same names for the binaries not on PATH, where we are root with apt.
define apt_install
missing=""; for b in $(1); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    echo "installing system packages:$$missing"; \
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; } \
      || echo "could not install$$missing ($(2))"; \
  else \
    echo "not installed:$$missing ($(2))"; \
  fi; \
fi
endef

# Figures, not assertions: see bench/README.md. BENCH_QUICK=1 for a smoke run.
bench: $(STAMP) bench-deps
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
