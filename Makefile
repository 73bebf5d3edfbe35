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

# The demo: the whole pipeline on the offline digits dataset (sklearn's 1797 real handwritten digits, 16x16),
# through the one-command front end, then the evaluation (offline classifier features). Small model sizes so that
# it finishes in minutes on 2 CPU cores; rerunning skips finished stages.
DEMO_FLAGS := --dataset digits --no_wandb --batch_size 64 --n_epochs 15 --lr 1e-3 \
	--num_channels 64 --num_res_channels 64 --num_res_layers 1 --num_embeddings 128 --embedding_dim 16 \
	--attn_layers_dim 128 --attn_layers_depth 4 --attn_layers_heads 4 --attn_dropout 0.1 --n_epochs_t 40 --lr_t 1e-3 \
	--sample_and_save_freq 5 --shard_size 500 --num_samples 64 --cfg_scale 2 --temperature 0.8

demo: $(STAMP)
	$(PY) VQVAE_T.py --train --sample $(DEMO_FLAGS) --output_dir $(DEMO_DIR)
	$(PY) evaluate.py --run_dir $(DEMO_DIR) --num_samples 500 --cfg_scale 2 --temperature 0.8
	@echo "samples: $(DEMO_DIR)/samples/grid.png   reconstructions: $(DEMO_DIR)/vqvae/samples/"

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not slow" tests

test-distributed: $(STAMP)
	$(PY) -m pytest -q -m distributed tests

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/sampling.py
	$(PY) bench/train_step.py

eval: $(STAMP)
	$(PY) evaluate.py --run_dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs
