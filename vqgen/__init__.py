"""vqgen: VQ-VAE tokenizer -> WebDataset code shards -> autoregressive Transformer prior.

Stages (one direction): ``train_vqvae`` -> ``extract_codes`` -> ``train_prior`` -> ``sample`` / ``evaluate``.
Each top-level script is ``run_cli(run, StageConfig)``: flags (and ``--config``) -> a typed stage config
(:mod:`vqgen.config`) -> that stage's ``run(config)``. Module map and contracts: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

from . import noise as _noise

_noise.silence()  # third-party messages a user cannot act on (vqgen/noise.py)
