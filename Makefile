# Two commands do all the set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make run` parameters: PROFILE=auto picks laptop on a CPU and mnist-gpu on CUDA.
PROFILE ?= auto
DEVICE ?= auto
# Extra notebook parameters, e.g. PARAMS="-p schedule cosine -p seed 1"
PARAMS ?=
# Where `make test` runs the notebooks on the smoke profile (fake MNIST, never ./runs or figures/)
SMOKE := $(abspath build/smoke)

.PHONY: run test test-unit test-notebooks test-browser chromium test-slow bench bench-gpu lab clean

# The project, installed (editable) into .venv on first use or when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

# ... plus the test-only tools (pytest, nbval, and diffusers as the independent oracle).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(VENV)/.installed-lab: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[lab]'
	touch $@

# The project's main job: every numbered notebook in order, headless, executed copies in
# build/notebooks, figures in figures/. MNIST is downloaded into ./data on first use.
run: $(VENV)/.installed
	$(PY) -m ddpm_core notebooks --profile $(PROFILE) --device $(DEVICE) $(PARAMS)

test: test-unit test-notebooks test-browser

test-unit: $(VENV)/.installed-test
	$(PY) -m pytest

# nbval executes each notebook (lax: the notebooks' own asserts are the checks) with the
# smoke profile's parameters injected by papermill.
test-notebooks: $(VENV)/.installed-test
	rm -rf $(SMOKE)
	$(PY) tests/fake_data.py $(SMOKE)/data
	$(PY) -m ddpm_core notebooks --prepare-only --no-progress --out $(SMOKE)/notebooks --profile smoke \
		-p data_root $(SMOKE)/data -p runs_root $(SMOKE)/runs -p figures_dir $(SMOKE)/figures \
		-p num_samples 8 -p compare_samples 2 -p free_guidance True -p ddpm_rows True -p sampler_steps 10 -p fid_samples 4 -p watch True -p ablation True
	$(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider $(SMOKE)/notebooks

# JupyterLab in a real browser: Playwright drives Debian's headless Chromium (no browser
# download), runs notebooks 01, 03 and 04 on smoke and moves their sliders. Chromium comes
# from apt-get when it is missing; without it the tests are skipped and say why.
CHROMIUM ?= /usr/bin/chromium
test-browser: $(VENV)/.installed-test
	@test -x $(CHROMIUM) || $(MAKE) --no-print-directory chromium
	DDPM_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -m browser -p no:cacheprovider tests/test_lab.py

chromium:
	@if ! command -v apt-get >/dev/null; then echo "no apt-get here: install Chromium yourself and pass CHROMIUM=/path/to/chromium"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || echo "apt-get could not install chromium: the browser tests will skip"; \
	elif sudo -n true 2>/dev/null; then sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || echo "apt-get could not install chromium: the browser tests will skip"; \
	else echo "Chromium is missing and apt-get needs root: sudo apt-get install chromium (the browser tests skip without it)"; fi

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -m slow

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_unet.py

# The paper's CIFAR-10 UNet on one GPU: training images/s (fp32 against bf16 + channels_last +
# compile), the hours for 800k steps, sampling images/s.
bench-gpu: $(VENV)/.installed
	$(PY) benchmarks/bench_train_gpu.py

# JupyterLab with working sliders, on this machine only (127.0.0.1) and behind a token (the
# URL to open, token included, is printed); start with notebooks/01_forward_noising.ipynb.
# As root (a container on a GPU box), JupyterLab wants --allow-root.
lab: $(VENV)/.installed-lab
	$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results build
