# vqgen: `make demo` and `make test` work on a fresh machine with Python 3.11 and access to PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch/torchvision: the versions tested here. deepspeed ships as an sdist whose build imports torch,
# so it is installed without build isolation after torch (otherwise pip fetches a second torch to build it).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast test-distributed bench eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	$(PIP) install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --output_dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not slow" tests

test-distributed: $(STAMP)
	$(PY) -m pytest -q -m distributed tests

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/sampling.py
	$(PY) bench/prior_epoch.py
	$(PY) bench/train_step.py

eval: $(STAMP)
	$(PY) evaluate.py --run_dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs
