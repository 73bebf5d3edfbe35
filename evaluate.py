#!/usr/bin/env python
"""Thin entry point: flags -> vqgen.evaluate.main(args). See `python evaluate.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.eval.evaluate import build_parser, main

if __name__ == "__main__":
    sys.exit(run_cli(main, build_parser()))
