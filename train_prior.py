#!/usr/bin/env python
"""Stage 3: train the Transformer prior on token shards. Flags: `python train_prior.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.config import PriorStageConfig

if __name__ == "__main__":
    sys.exit(run_cli("vqgen.train.prior_task:run", PriorStageConfig))
