#!/usr/bin/env python
"""Evaluate a run (reconstruction, samples, bits/token). Flags: `python evaluate.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.config import EvalConfig

if __name__ == "__main__":
    sys.exit(run_cli("vqgen.eval.evaluate:run", EvalConfig))
