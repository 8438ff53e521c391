# `make test` and `make demo` create .venv when it is missing and install with constraints.txt
# (see constraints.txt for why each pin exists). `make test-cellpose3` runs the Cellpose tests again in a second
# environment, .venv-cp3, with Cellpose 3 (cellpose<4, numpy<2.1), so both Cellpose generations stay tested.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
VENV_CP3 := .venv-cp3
STAMP_CP3 := $(VENV_CP3)/.installed-stamp
CELLPOSE_TESTS := tests/test_adapters_cellpose.py tests/test_export.py
PYTEST_ARGS ?=

.PHONY: test test-install test-cellpose3 gpu-check-cpu demo bench env env-cellpose3 clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,napari]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Only what the Cellpose tests import: bioadapt itself, Cellpose 3 and the test tools (no napari extras).
$(STAMP_CP3): pyproject.toml constraints.txt
	test -x $(VENV_CP3)/bin/python || $(PYTHON) -m venv $(VENV_CP3)
	$(VENV_CP3)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_CP3)/bin/python -m pip install --quiet -c constraints.txt -e . "cellpose<4" "numpy<2.1" \
		"pytest>=8" "pytest-timeout>=2.3" "pyyaml>=6"
	touch $(STAMP_CP3)

env-cellpose3: $(STAMP_CP3)

test-cellpose3: $(STAMP_CP3)
	$(VENV_CP3)/bin/python -m pytest $(PYTEST_ARGS) -k cellpose $(CELLPOSE_TESTS)

# the GPU check's script (benchmarks/gpu/README.md) in its small CPU setting, so it keeps working without a GPU
gpu-check-cpu: $(STAMP) $(STAMP_CP3)
	PYTHON=$(BIN)/python PYTHON_CP3=$(VENV_CP3)/bin/python benchmarks/gpu/run.sh --cpu

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
	$(BIN)/python benchmarks/bench_fairness.py

clean:
	rm -rf $(VENV) $(VENV_CP3) demo-output .pytest_cache
