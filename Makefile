# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt
# Re-install only when the project's metadata changes. `make demo` installs the base package only
# (what `distill demo` needs); `make test` / `make install` add the extras and the dev tools.
DEMO_STAMP := $(VENV)/.installed-demo-stamp
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(DEMO_STAMP): $(PY) pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/distill demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q tests

# Benchmarks that need nothing beyond .venv. benchmarks/train.py (needs its own TRL venv) and
# benchmarks/route.py (trains the demos' models) are run by hand; see their docstrings and docs/.
bench: $(STAMP)
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/store.py
	$(PY) benchmarks/generate.py --seconds 8

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
