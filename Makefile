# `make test` and `make demo` create .venv when it is missing and install with constraints.txt
# (torch pinned to the CPU build; see constraints.txt for why each pin exists).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test test-install demo bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,napari]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A newcomer's install, apart from `make test` (CI runs both): build the sdist and wheel, install the wheel into a
# fresh venv with the constraints (the whole stack again, torch included: ~6.6 GB; 10-19 min on 2 cores shared
# with other test runs, less alone; pip reuses its cache), check `bioadapt --help` and the package data, and fetch
# the page from that venv's `bioadapt serve`.
test-install: $(STAMP)
	BIOADAPT_TEST_INSTALL=1 $(BIN)/python -m pytest tests/test_wheel_install.py -s $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/bioadapt demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_patch_read.py
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_ray_scoring.py
	$(BIN)/python benchmarks/bench_rpc.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
