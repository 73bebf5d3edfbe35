#!/usr/bin/env python
"""Thin entry point: flags -> vqgen.train_vqvae.main(args). See `python train_vqvae.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.train.vqvae_task import build_parser, main

if __name__ == "__main__":
    sys.exit(run_cli(main, build_parser()))
