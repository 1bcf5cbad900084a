# reviewapp: `make demo` runs the app; `make test` runs the whole suite. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: install demo test lint format chromium bench clean chaos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch first and pinned: with it in place, pip never resolves another (CUDA) build for the `torch` range.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

demo: install
	REVIEWAPP_ENV=demo $(BIN)/python manage.py demo --serve

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# The suite runs against the real services (PostgreSQL, Redis, a live worker), by default the local ones;
# set DATABASE_URL / CELERY_BROKER_URL / REVIEWAPP_SHARED_DATA to point elsewhere.
test: install chromium
	$(BIN)/ruff check .
	REVIEWAPP_ENV=test \
	DATABASE_URL="$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}" \
	TEST_DATABASE_NAME="$${TEST_DATABASE_NAME:-test_reviewapp}" \
	CELERY_BROKER_URL="$${CELERY_BROKER_URL:-redis://127.0.0.1:6379/15}" \
	REVIEWAPP_SHARED_DATA="$${REVIEWAPP_SHARED_DATA:-$(abspath ..)/shared/data}" \
	$(BIN)/python -m pytest

# Fault injection and concurrency at full size (10,000-item batch), then the figures into docs/reliability.md.
# Full sizes (CHAOS_FULL=1): 10,000-item batch, 3 PostgreSQL restarts, 25 schemathesis examples per operation.
# The figures are rendered into docs/reliability.md at the end (tests/security records some after the folder).
chaos: install
	REVIEWAPP_ENV=test CHAOS_FULL=1 SCHEMATHESIS_MAX_EXAMPLES=25 UPDATE_RELIABILITY_DOC=1 $(BIN)/python -m pytest -p no:cacheprovider tests/reliability tests/security
	$(BIN)/python tests/reliability/render.py

bench: install
	@echo "see docs/benchmarks.md for each script and its arguments"

clean:
	rm -rf var .pytest_cache
