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

.PHONY: setup demo lint test test-fast test-distributed bench bench-chaos bench-demo bench-gpu bench-quality eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	$(PIP) install -q -e ".[test,bench]"
	touch $(STAMP)

# The demo: the whole pipeline on the offline digits dataset (sklearn's 1797 real handwritten digits, 16x16),
# through the one-command front end, then the evaluation (offline classifier features). Small model sizes so that
# it finishes in about 5 minutes on 2 CPU cores (292 s without AMX); rerunning skips finished stages. Values:
# configs/digits_demo.yaml (bench/demo_time.py compares it with faster candidates: docs/RESULTS.md section 6).
DEMO_CONFIG := configs/digits_demo.yaml

demo: $(STAMP)
	$(PY) VQVAE_T.py --config $(DEMO_CONFIG) --output_dir $(DEMO_DIR)
	$(PY) evaluate.py --config $(DEMO_CONFIG) --run_dir $(DEMO_DIR)
	@echo "samples: $(DEMO_DIR)/samples/grid.png   reconstructions: $(DEMO_DIR)/vqvae/samples/"

# ruff with the small rule set of pyproject.toml ([tool.ruff]); `$(PY) -m ruff check --fix .` sorts imports
lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not slow" tests

test-distributed: $(STAMP)
	$(PY) -m pytest -q -m distributed tests

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/sampling.py
	$(PY) bench/decode.py
	$(PY) bench/train_step.py
	$(PY) bench/default_speed.py
	$(PY) bench/reader_scale.py

# Correctness under faults: every stage SIGKILLed 20 times and resumed, a checkpoint and a shard damaged, duplicate
# jobs refused; the results must equal an uninterrupted run's bitwise (docs/FAILURES.md: figures and runtime).
bench-chaos: $(STAMP)
	$(PY) bench/chaos.py

# The side-by-side quality benchmark on real Fashion-MNIST (the original recipe on MONAI, its frozen variant,
# vqgen uncond/cond), 30 minutes per row for stages 1-3 plus sampling/evaluation (run time: docs/NOTES.md).
BENCH_QUALITY_FLAGS ?= --budget_minutes 30 --samples 5000
bench-quality: $(STAMP)
	$(PY) bench/quality.py $(BENCH_QUALITY_FLAGS)

# The prepared GPU benchmark at the ImageNet-256 recipe's shapes (~8 min on one H100; CPU: --device cpu --tiny)
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py --json gpu_bench.json

# `make demo` candidates side by side (seconds per stage + the demo's metrics) and the start-up times.
BENCH_DEMO_FLAGS ?= --candidates shipped no_dropout batch128_20ep
bench-demo: $(STAMP)
	$(PY) bench/demo_time.py $(BENCH_DEMO_FLAGS)
	$(PY) bench/first_step.py

eval: $(STAMP)
	$(PY) evaluate.py --run_dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs
