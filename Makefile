# `make test` and `make demo` create .venv when it is missing and install with constraints.txt
# (torch pinned to the CPU build; see constraints.txt for why each pin exists).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test demo bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,napari]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/bioadapt demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_patch_read.py
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_ray_scoring.py
	$(BIN)/python benchmarks/bench_rpc.py
	$(BIN)/python benchmarks/bench_fairness.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
