# emarec — GNU make.  `make demo` and `make test` are the two set-up commands;
# both create and fill .venv on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k mlflow -x"`.
PYTEST_ARGS ?=
# MovieLens-100K folder for the demo; empty means the CLI's own lookup
# (EMAREC_DATA, then ../shared/datasets/ml-100k, then download).
DATA ?=

# MLflow's usage telemetry would call out of the machine; keep it off for
# everything make runs (tests, demo, bench). Override on the command line.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.DEFAULT_GOAL := test
.PHONY: install .venv test demo bench lint clean

# The interpreter is the marker that the venv exists at all.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstall only when the lock or the project metadata change.
# torchrec goes in with --no-deps: its metadata asks for the CUDA fbgemm-gpu,
# the lock carries fbgemm-gpu-cpu and torchrec's other requirements instead.
$(STAMP): requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -r requirements.lock
	$(BIN)/python -m pip install --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

install .venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/emarec demo $(if $(DATA),--data $(DATA))

bench: $(STAMP)
	$(BIN)/python -m bench

# ruff is not part of the lock; use it when it is on PATH or in the venv.
lint:
	@if [ -x $(BIN)/ruff ]; then $(BIN)/ruff check . && $(BIN)/ruff format --check .; \
	elif command -v ruff >/dev/null 2>&1; then ruff check . && ruff format --check .; \
	else echo "ruff is not installed; skipping lint (pip install ruff to enable)"; fi

clean:
	rm -rf runs/ mlruns/ mlartifacts/ mlflow.db .pytest_cache/ .ruff_cache/ \
	       build/ dist/ *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
