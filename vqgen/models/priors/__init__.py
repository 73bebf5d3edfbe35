"""Prior kinds, one module each (``ar``: raster or random-order autoregressive, ``maskgit``: masked tokens); the registry and their settings are :data:`vqgen.config.PRIORS` /
:class:`vqgen.config.PriorConfig`, the family's base and loaders :mod:`vqgen.models.prior`."""
