#!/usr/bin/env python
"""Stage 1: train the VQ-VAE tokenizer. Flags: `python train_vqvae.py --help` (vqgen/config/)."""

import sys

from vqgen.cli import run_cli
from vqgen.config import VQVAEStageConfig
from vqgen.train.vqvae_task import run

if __name__ == "__main__":
    sys.exit(run_cli(run, VQVAEStageConfig))
