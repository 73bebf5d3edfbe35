"""vqgen: VQ-VAE tokenizer -> WebDataset code shards -> autoregressive Transformer prior.

Stages (one direction): ``train_vqvae`` -> ``extract_codes`` -> ``train_prior`` -> ``sample``.
Each top-level script only parses flags and calls ``vqgen.<stage>.main(args)``.
"""

__version__ = "0.1.0"
