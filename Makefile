# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python 3.11:
# they create .venv, install the CPU build of torch 2.13.0 first (a bare `torch` requirement would pull
# a multi-GB CUDA build), then this package with its pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tilenorm-installed

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,onnx]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tilenorm-bmz demo

# default suite (not slow, not gpu); pytest exit code 5 (no tests collected) counts as success
test: setup
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	cd benchmarks && ../$(PY) bench_batchrenorm.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
