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

# System packages the tests need, installed with apt where we are root on Debian: Redis
# (the shared rate limits; without it that test skips), Chromium with its driver (the
# console's browser tests; nothing downloads a browser at run time, so without them those
# tests fail and say what to install) and wrk (the bench's own test). Each entry is
# package:command, since a package's command may have another name (chromium-driver
# installs chromedriver).
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium chromium-driver:chromedriver wrk:wrk
system-deps:
	@$(call apt_install,$(SYSTEM_PACKAGES),the tests that need them will skip or fail)

# wrk, the load generator for the broker and the Vault floor alike (C, not Python).
bench-deps:
	@$(call apt_install,wrk:wrk,make bench needs it)

# $(call apt_install,package:command ...,what happens without them): installs with apt,
# where we are root, the packages whose command is not on PATH.
define apt_install
missing=""; for entry in $(1); do \
  command -v $${entry#*:} >/dev/null 2>&1 || missing="$$missing $${entry%%:*}"; done; \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    echo "installing system packages:$$missing"; \
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; } \
      || echo "could not install$$missing ($(2))"; \
  else \
    echo "not installed:$$missing (install them; $(2))"; \
  fi; \
fi
endef

# Figures, not assertions: see bench/README.md. BENCH_QUICK=1 for a smoke run;
# `make bench BENCH_ONLY=issue18` for issue 18's figures alone, at full size.
bench: $(STAMP) bench-deps
	$(BIN)/python -m bench.run

# A long property-based run against the OpenAPI document, before a release.
fuzz: $(STAMP)
	FUZZ_EXAMPLES=500 $(BIN)/python -m pytest tests/fuzz -q

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench tools
	$(BIN)/ruff format --check broker tests bench tools
	$(BIN)/mypy
	$(BIN)/python tools/function_length.py broker tests bench

clean:
	rm -rf $(VENV) .broker .pytest_cache
