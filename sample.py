#!/usr/bin/env python
"""Sample images from a prior + tokenizer export. Flags: `python sample.py --help`."""

import sys

from vqgen.cli import run_cli
from vqgen.config import SampleConfig

if __name__ == "__main__":
    sys.exit(run_cli("vqgen.sample:run", SampleConfig))
