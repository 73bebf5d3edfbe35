"""Quantizers with an implicit codebook (FSQ, LFQ): the interface of :class:`vqgen.models.quantizer.VectorQuantizerEMA`,
so a VQ-VAE can hold any of them (see :mod:`.base`)."""
