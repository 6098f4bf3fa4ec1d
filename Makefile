# Circus — the two commands of the quick start:
#   make run    set up everything, start a single-machine instance
#   make test   set up everything, run lint, type checks and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# two workers, one test file each at a time: files share module-scoped daemons; files in
# collection order, which puts those with slow tests first (tests/conftest.py); the 40
# slowest tests are listed at the end, for keeping the suite within its 15 minutes
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=40

.PHONY: run test setup system venv lint typecheck docs-check pytest api-docs bench clean

run: setup
	CIRCUS_CONFIG_FILE="$(CIRCUS_CONFIG_FILE)" CIRCUS_STATE_DIR="$(CIRCUS_STATE_DIR)" \
		$(BIN)/circus up

test: setup lint typecheck docs-check pytest

setup: system venv

system: .stamp-system
.stamp-system: scripts/setup-system.sh
	./scripts/setup-system.sh
	@touch $@

venv: .stamp-venv
.stamp-venv: setup.cfg pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
	@touch $@

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

# docs/API.md is generated from the OpenAPI document; fails when they drift
docs-check:
	$(BIN)/circus-admin dev api-docs --check

api-docs:
	$(BIN)/circus-admin dev api-docs

pytest:
	$(BIN)/pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .stamp-* .mypy_cache .ruff_cache .pytest_cache
