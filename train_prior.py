#!/usr/bin/env python
"""Thin entry point: flags -> vqgen.train_prior.main(args). See `python train_prior.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.train.prior_task import build_parser, main

if __name__ == "__main__":
    sys.exit(run_cli(main, build_parser()))
