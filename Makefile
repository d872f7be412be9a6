# Postdesk — the two commands of the quick start are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
HTMX := src/postdesk/web/static/vendor/htmx.min.js

.PHONY: demo test check bench install system-packages clean

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

$(HTMX):
	@scripts/fetch-htmx.sh $(HTMX)

install: $(INSTALLED) $(HTMX)

## Run Postdesk with SQLite, sample tickets and the local Microsoft 365 sandbox.
demo: install
	@scripts/install-system-packages.sh demo
	$(BIN)/postdesk demo

## Install what the tests need (Debian packages included) and run the whole suite.
test: install system-packages
	$(BIN)/pytest

system-packages:
	@scripts/install-system-packages.sh

## Lint and type-check.
check: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## Benchmarks: each figure next to a baseline measured in the same run (needs Dovecot, like the tests).
bench: install system-packages
	PYTHONPATH=. $(BIN)/python -m bench

clean:
	rm -rf $(VENV) postdesk-demo .pytest_cache .mypy_cache .ruff_cache
