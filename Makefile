# `make demo` and `make test` set themselves up on a fresh machine: they create .venv when
# missing and install the project with the extras they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to the releases that install from this machine's disk.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow test-cuda lint typecheck check readme compat clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,viz,vision,train,export]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/convattn compare

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the CUDA tests (tests/test_cuda.py): skipped on machines without a GPU, as in `make test`
test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

readme: $(STAMP)
	$(PY) scripts/update_readme.py

compat: $(STAMP)
	$(PY) scripts/update_compat.py --rerun

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
