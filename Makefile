# Two commands for a new user: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch 2.13.0 lies on disk here; point pip at it explicitly so that no other
# torch (a multi-GB CUDA build) can be picked, even when PIP_FIND_LINKS is not set.
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := $(if $(WHEELS),--find-links $(WHEELS))

.PHONY: demo test lint bench clean venv

venv: $(STAMP)

# Byte-compiled on both cores after pip (pip compiles one file at a time). Processes read the
# .pyc files even where PYTHONDONTWRITEBYTECODE keeps them from writing any, so the package's
# own modules are compiled too (the tests start many processes). As pip's own step does, files
# that do not compile for this Python (torch ships one for Python 3.12 only) are skipped.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile $(PIP_FLAGS) -e '.[dev]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib src > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnlab run mnist

# The suite in TEST_WORKERS pytest-xdist workers; tests/conftest.py compiles the kernels first.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py && $(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
