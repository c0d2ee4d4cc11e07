# The front door. A newcomer needs two commands: `make run` and `make test`.
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
STAMP   := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install run test test-fast lint format bench clean

$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(PIP) -q -e '.[gpu,dev]'
	-bash scripts/install-system-deps.sh
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)          ## create .venv and install Spool with the gpu and dev extras

run: install               ## start the whole platform (embedded PostgreSQL/Redis unless URLs are set)
	$(BIN)/spool up

test: install              ## every test: unit, integration, end-to-end, faults
	$(BIN)/pytest

test-fast: install         ## everything but the slow fault/load tests
	$(BIN)/pytest -m "not slow"

lint: install              ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy api spool workers

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install             ## every benchmark, one summary table each (see BENCHMARKS.md)
	for b in bench/bench_*.py; do $(BIN)/python -m bench.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
