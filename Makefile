# Two commands matter: `make quickstart` and `make test`. Both build .venv from scratch when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install quickstart test bench gpu-carry gpu-check clean

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

# GPU check (README, Development): `make gpu-carry` here downloads what the GPU machine lacks into
# .gpu-carry/ (< 64 MiB); `make gpu-check` there installs it into /tmp/site (DeepSpeed built without its
# C++ ops) and writes every GPU figure the open issues ask for to $(GPU_CHECK_OUT).
GPU_CARRY     ?= .gpu-carry
GPU_SITE      ?= /tmp/site
GPU_CHECK_OUT ?= gpu-check.json

gpu-carry: $(STAMP)
	$(BIN)/python -m ossforge.gpu_check carry $(GPU_CARRY)

gpu-check:
	python3 ossforge/gpu_check.py setup-and-run $(GPU_CARRY) --site $(GPU_SITE) --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) runs
