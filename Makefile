# dmgl — make targets. `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to a pair that works together on CPU and CUDA machines.
TORCH ?= torch==2.14.1 torchvision==0.29.1
SEEDS ?= 3

.PHONY: setup demo test ui lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	touch $@

demo: setup
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/dmgl prepare synthetic
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/dmgl train --recipe synthetic --strategy lb --seeds $(SEEDS)
	@echo "Browse the runs: make ui   (or $(BIN)/dmgl ui)"

test: setup
	MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

ui: setup
	$(BIN)/dmgl ui

lint: setup
	$(BIN)/ruff check dmgl_cli tests bench

bench: setup
	$(BIN)/python bench/imbalance.py --seeds $(SEEDS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
