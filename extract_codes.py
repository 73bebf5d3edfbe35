"""Stage 2: encode a dataset with a trained VQ-VAE export into WebDataset token shards + manifest.json.

    python extract_codes.py --checkpoint runs/demo/vqvae/export --dataset digits --split train test \\
        --output_dir shards/digits
    accelerate launch extract_codes.py ...   # any number of processes / nodes; each writes its own shards
"""

import sys

from vqgen.cli import run_cli
from vqgen.config import ExtractConfig

if __name__ == "__main__":
    sys.exit(run_cli("vqgen.extract:run", ExtractConfig))
