"""Quantizers: encoder outputs (B, D, H, W) -> tokens (B, H, W). One module per kind; the registry of kinds and
their settings is :data:`vqgen.config.QUANTIZERS` / :class:`vqgen.config.VQVAEConfig`."""
