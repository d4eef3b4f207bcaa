# Two commands for a fresh machine (README "Two commands"):
#   make demo   sets up .venv (the package alone) and embeds the built-in demo, offline
#   make test   sets up .venv with the dev extras and runs the test suite (what CI runs)
# Each step runs only when what it depends on changed; delete .venv to start over.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FLOOR ?= .venv-floor
FLOOR_PYARROW ?= 17.0.0

.PHONY: demo test lint bench clean system-deps

demo: $(VENV)/.installed-base
	$(BIN)/clipbatch demo

# Two pytest workers, a whole test file each (module fixtures such as a Prefect server
# and its worker stay in one process): about 10 minutes on 2 cores, against 15 in one.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev $(FLOOR)/.installed system-deps lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Lint, formatting and the generated reference pages (seconds): part of make test.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check clipbatch flows tasks tests bench docs
	$(BIN)/ruff format --check clipbatch flows tasks tests bench docs
	$(BIN)/python docs/generate.py --check

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

# The declared pyarrow floor, tested (tests/tables/test_floor_clients.py): a second venv
# with pyarrow at pyproject.toml's floor, numpy 1.x and pandas < 2.3 (as autofaiss users
# have them), autofaiss and embedding-reader. Everything else (torch, clip, Prefect, the
# package itself) comes from $(VENV): a .pth file adds its site-packages after the
# floor's own, so the floor's pyarrow, numpy and pandas win. The shared packages are
# constrained to $(VENV)'s versions, so none is shadowed by another release. About 20 s.
FLOOR_PACKAGES = "pyarrow==$(FLOOR_PYARROW)" "numpy<2" "pandas<2.3" autofaiss==2.18.0 embedding-reader faiss-cpu

$(FLOOR)/.installed: pyproject.toml $(VENV)/.installed-dev
	rm -rf $(FLOOR)
	$(BIN)/python -m venv $(FLOOR)
	$(BIN)/pip freeze --exclude-editable | grep -viE '^(numpy|pyarrow|pandas)==' > $(FLOOR)/constraints.txt
	$(FLOOR)/bin/pip install -q -c $(FLOOR)/constraints.txt $(FLOOR_PACKAGES)
	DEV_SITE=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	FLOOR_SITE=$$($(FLOOR)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$DEV_SITE')" > "$$FLOOR_SITE/zz-clipbatch-dev.pth"
	$(FLOOR)/bin/python -c "import numpy, pyarrow, torch, clipbatch; assert numpy.__version__ < '2' and pyarrow.__version__ == '$(FLOOR_PYARROW)'; torch.from_numpy(numpy.ones(2))"
	touch $@

# Debian packages the tests drive for real: chromium (the page's browser test),
# postgresql (the Prefect server's database under the deployment tests) and tini (the
# image's init, in front of the entrypoint's signal test). Installed when
# missing and this user may (root, with apt-get); otherwise those tests skip, saying so.
system-deps:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/tini ] || missing="$$missing tini"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing (Debian packages the tests use)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV) $(FLOOR) build dist *.egg-info clipbatch-demo
