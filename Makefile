# Two commands do all the set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FIGURES ?= figures

.PHONY: run test test-slow bench clean

# The project, installed (editable) into .venv on first use or when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

# ... plus the test-only tools (pytest, and diffusers as the independent oracle).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m ddpm_core demo --out $(FIGURES)

test: $(VENV)/.installed-test
	$(PY) -m pytest

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -m slow

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_unet.py

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results
