# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python 3.11:
# they create .venv, install the CPU build of torch 2.13.0 first (a bare `torch` requirement would pull
# a multi-GB CUDA build), then this package with its pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tilenorm-installed

LEGACY_VENV ?= .venv-legacy

.PHONY: setup demo test test-all test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,onnx]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tilenorm-bmz demo

# default suite (not slow, not gpu), on 2 worker processes (pytest-xdist; each test runs torch single-threaded,
# tests/conftest.py); pytest exit code 5 (no tests collected) counts as success
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# the slow tests: the model_zoo packages pass the gate and the bioimage.io tests, the demo runs, packages are
# read by ilastik's bioimage.io stack (core 0.10.2 / spec 0.5.9.1, installed side by side), ONNX export, dask
test-slow: setup
	bash scripts/legacy_env.sh $(LEGACY_VENV)
	TILENORM_LEGACY_VENV=$(LEGACY_VENV) $(PY) -m pytest -q -p no:cacheprovider -n 2 -m "slow and not gpu"

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	cd benchmarks && ../$(PY) bench_batchrenorm.py

clean:
	rm -rf $(VENV) $(LEGACY_VENV) build *.egg-info .pytest_cache
