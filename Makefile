# dmgl — make targets (`make help` lists them). `make demo` and `make test` set everything up themselves on a fresh
# machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every version `make setup` installs (torch/torchvision included) is pinned in one place: constraints.txt.
CONSTRAINTS ?= constraints.txt
SEEDS ?= 3
TEST_ENV := MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1

.PHONY: help setup demo test test-fast ui lint bench clean

setup: $(VENV)/.installed ## .venv with dmgl (editable) and its dev and postgres extras, pinned by constraints.txt

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,postgres]'
	touch $@

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

demo: setup ## prepare the synthetic dataset, train Ours-LB with SEEDS=3 seeds (CPU, ~1 min)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/dmgl prepare synthetic
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/dmgl train --recipe synthetic --strategy lb --seeds $(SEEDS)
	@echo "Browse the runs: make ui   (or $(BIN)/dmgl ui)"

test: setup ## the whole test suite (CPU, a few minutes)
	$(TEST_ENV) $(BIN)/python -m pytest -q

test-fast: setup ## the tests not marked slow or integration (under 90 s on 2 cores)
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow and not integration"

ui: setup ## MLflow UI on 127.0.0.1
	$(BIN)/dmgl ui

lint: setup ## ruff check, ruff format --check (dmgl_cli tests bench), pyright (basic) on dmgl_cli/
	$(BIN)/ruff check dmgl_cli tests bench
	$(BIN)/ruff format --check dmgl_cli tests bench
	$(BIN)/pyright --pythonpath $(BIN)/python

bench: setup ## the imbalance bench (bench/imbalance.py) with SEEDS=3 seeds
	$(BIN)/python bench/imbalance.py --seeds $(SEEDS)

clean: ## remove .venv and the caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
