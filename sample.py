#!/usr/bin/env python
"""Thin entry point: flags -> vqgen.sample.main(args). See `python sample.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.sample import build_parser, main

if __name__ == "__main__":
    sys.exit(run_cli(main, build_parser()))
