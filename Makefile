# Two commands matter: `make quickstart` and `make test`. Both build .venv from scratch when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install quickstart test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: a looser pin pulls GBs of CUDA wheels (DESIGN §6).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/ossforge train configs/quickstart.yaml
	$(BIN)/ossforge demo runs/quickstart --score 10

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --timeout 900 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/ossforge bench moe --device cpu

clean:
	rm -rf $(VENV) runs
