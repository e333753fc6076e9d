# `make run` and `make test` set up everything they need (idempotently) and then do their job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed

.PHONY: setup lock run test faults lint check-artifacts compile bench-gas bench-verify bench-ingest bench-e2e bench-scale bench-x402 bench-flood bench-store bench-journal bench-processes simulate clean

setup: $(PY_STAMP) $(NPM_STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

# Not quiet: the first install takes ~30 s and a silent terminal looks stuck. Every package at the version
# constraints.txt names: a fresh clone installs what the suite last passed with, not whatever was released since.
$(PY_STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "Installing the Python packages into $(VENV) (first run only, ~30 s)"
	$(PY) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[dev]'
	@touch $@

# constraints.txt anew: the newest release of every package that pyproject.toml's ranges allow, resolved in a
# venv of its own; then `make test` (which installs them) and commit the file with what it took to pass.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	{ grep '^#' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -i '^pip=='; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# anvil's npm package brings its binary in a package per platform, which installs on Node 20 and newer only: on Node
# 18 `npm ci` skipped it without a word, and `make run` then said "anvil not found: run `npm ci`". Checked here. An
# anvil of one's own (SETTLEMENT_ANVIL_PATH) counts where Settings read it: the environment or `.env` (any case).
$(NPM_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node 20+) is required"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	@[ -n "$$SETTLEMENT_ANVIL_PATH" ] || [ -x node_modules/.bin/anvil ] \
	  || grep -qsiE '^[[:space:]]*(export[[:space:]]+)?SETTLEMENT_ANVIL_PATH[[:space:]]*=[[:space:]]*[^[:space:]#]' .env \
	  || { echo "npm ci installed no anvil:" \
	  "its npm package needs Node 20+ (this is node $$(node --version)), on Linux or macOS (x64, arm64) or Windows x64;" \
	  "or set SETTLEMENT_ANVIL_PATH (in the environment or .env) to an anvil binary"; exit 1; }
	@touch $@

# Fails when the committed artifacts are not what the sources compile to.
check-artifacts: setup
	$(PY) scripts/compile_contracts.py --check

compile: setup
	$(PY) scripts/compile_contracts.py

lint: setup
	$(VENV)/bin/ruff check settlement tests scripts examples
	$(VENV)/bin/ruff format --check settlement tests scripts examples
	$(VENV)/bin/mypy

# `make run PORT=8001` when 8000 is taken.
run: check-artifacts
	$(VENV)/bin/settlement demo $(if $(PORT),--port $(PORT))

# One worker per core, each test file on one worker (its fixtures and processes stay together): 8-15 min on 2 cores
# (three workers were slower: the cores are busy), 18 min on a machine twice as slow (a Python loop of 3 M additions
# 0.35-0.49 s, against 0.20-0.29), 19-21 min in all with the set-up on 2026-12-04's slow machine (three workers: 23 min,
# and a timing test failed); since the operator commands' tests fork instead of starting interpreters, 10-11 min in
# all on a slow machine (loop 0.40-0.43 s, 2026-12-05), 12.5 with a CPU-bound process beside it. The 40 slowest are
# listed at the end. `.venv/bin/python -m pytest tests/test_x.py` runs one file alone.
test: lint
	$(PY) -m pytest -n auto --dist loadfile --durations=40

# The fault-injection scenarios alone (docs/reliability.md); `make test` runs them too.
faults: setup
	$(PY) -m pytest -m faults

bench-gas: setup
	$(PY) scripts/bench.py gas --save docs/gas.json

bench-verify: setup
	$(PY) scripts/bench.py verify

bench-ingest: setup
	$(PY) scripts/bench.py ingest

bench-e2e: setup
	$(PY) scripts/bench.py e2e

bench-scale: setup
	$(PY) scripts/bench.py scale

bench-x402: setup
	$(PY) scripts/bench.py x402

bench-flood: setup
	$(PY) scripts/bench.py flood

bench-store: setup
	$(PY) scripts/bench.py store

bench-journal: setup
	$(PY) scripts/bench.py journal

bench-processes: setup
	$(PY) scripts/bench.py processes

simulate: setup
	$(VENV)/bin/settlement simulate

clean:
	rm -rf $(VENV) $(LOCK_VENV) node_modules .settlement .pytest_cache .mypy_cache .ruff_cache
