# edge-runtime developer entry points. Everything installs itself into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
OUT ?= out

.PHONY: setup demo test lint typecheck bench soak models clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,convert]'
	touch $(STAMP)

setup: $(STAMP)

## make demo: run the daemon offline on the shipped demo bundles (camera video + vibration sensor file)
demo: setup
	@mkdir -p $(OUT)
	$(BIN)/python scripts/demo.py --out $(OUT)

## make test: set up and run every test
test: setup
	bash scripts/ensure-mosquitto.sh
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

typecheck: lint

bench: setup
	$(BIN)/python bench/pipeline.py

## make soak: 30 minutes of one daemon with fleet sync, broker outages and model updates; flags growth
## of RSS, fds, threads, outbox and latency (not part of make test; bench/soak.py --minutes N to shorten)
soak: setup
	bash scripts/ensure-mosquitto.sh
	$(BIN)/python bench/soak.py --minutes 30

## make models: retrain the demo models and rebuild the demo bundles (needs the convert extra)
models: setup
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -r models/requirements.txt
	$(BIN)/python models/shapes/recipe.py
	$(BIN)/python models/vibration/recipe.py
	$(BIN)/python models/build_bundles.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
