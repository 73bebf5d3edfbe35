"""Models: the VQ-VAE tokenizer (+ its EMA quantizer) and the autoregressive Transformer prior."""
