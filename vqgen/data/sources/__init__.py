"""One small module per kind of image source; :func:`vqgen.data.build_dataset` picks one."""
