#!/usr/bin/env python
"""Stage 1: train the VQ-VAE tokenizer. Flags: `python train_vqvae.py --help` (vqgen/config.py)."""

import sys

from vqgen.cli import run_cli
from vqgen.config import VQVAEStageConfig

if __name__ == "__main__":
    sys.exit(run_cli("vqgen.train.vqvae_task:run", VQVAEStageConfig))
