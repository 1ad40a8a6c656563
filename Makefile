# The two commands: `make demo` (the whole job on the local stack) and `make test` (lint, types, every test).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_INSTALLED := $(VENV)/.installed-demo

.PHONY: demo test install node stack-down lint bench clean validators

# The demo's install: the package with the stand-in and the sample photos only (no TensorFlow, no Azure ML SDK).
$(DEMO_INSTALLED): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[standin,samples]'
	touch $@

# Everything the tests need on top of the demo's install.
$(INSTALLED): pyproject.toml $(DEMO_INSTALLED)
	# The official FPGA client (tests send its exact requests to the stand-in). Its azureml-core pins older
	# pathspec/packaging than mypy needs, so it goes first and the dev install moves those two forward.
	$(BIN)/python -m pip install -q azureml-accel-models
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(INSTALLED)

node_modules/.bin/azurite-blob: package.json
	npm install --no-save --no-package-lock --no-audit --no-fund --loglevel=error
	touch $@

node: node_modules/.bin/azurite-blob

demo: $(DEMO_INSTALLED) node
	$(BIN)/blobscore stack up
	$(BIN)/blobscore demo --container demo
	@echo "The local stack keeps running in the background; stop it with: make stack-down"

stack-down:
	$(BIN)/blobscore stack down

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

validators: install
	bash scripts/ensure-validators.sh

test: install node lint validators
	sh scripts/ensure-tools.sh
	sh scripts/ensure-prometheus.sh
	$(BIN)/pytest

bench: install node
	$(BIN)/python bench/standin_latency.py

clean:
	rm -rf $(VENV) node_modules .blobscore
