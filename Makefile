# Two commands for a fresh machine (README "Start"):
#   make demo   sets up .venv (the package alone) and embeds the built-in demo, offline
#   make test   sets up .venv with the dev extras and runs the test suite (what CI runs)
# Each step runs only when what it depends on changed; delete .venv to start over.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

demo: $(VENV)/.installed-base
	$(BIN)/clipbatch demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check clipbatch flows tasks tests bench
	$(BIN)/ruff format --check clipbatch flows tasks tests bench

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The package and what it needs to run (torch, Prefect, clip): enough for the demo.
# Prefect's local database is migrated at set-up, once (about 8 s), not in the first demo.
PREPARE_PREFECT_DB = PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect --no-prompt server database upgrade -y >/dev/null

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(PREPARE_PREFECT_DB)
	touch $@

# Everything the tests use: every model family, kNN, blocks, moto, Dask.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(PREPARE_PREFECT_DB)
	touch $(VENV)/.installed-base $@

clean:
	rm -rf $(VENV) build dist *.egg-info clipbatch-demo
