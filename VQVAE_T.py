#!/usr/bin/env python
"""One-command front end with the original VQVAE_T.py flags: ``--train`` (stages 1-3) and/or
``--sample``. See ``python VQVAE_T.py --help`` and vqgen/pipeline.py."""

import sys

from vqgen.cli import run_cli
from vqgen.config import PipelineConfig

if __name__ == "__main__":
    sys.exit(run_cli("vqgen.pipeline:run", PipelineConfig))
