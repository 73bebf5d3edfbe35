"""One loader for every tokenizer vqgen stages accept: a vqgen VQ-VAE export or a diffusers ``VQModel`` folder.

``ref`` is an export folder, a run folder holding ``export/``, a legacy weights file, a diffusers VQModel folder,
or ``hf:<user>/<repo>[/<subfolder>][@<revision>]`` for either kind in the local Hub cache (:mod:`vqgen.hub`).
The model has ``encode_to_indices``, ``decode_indices``, ``config.{codebook_size, latent_size, image_size,
in_channels}`` and, like every loaded export, ``sha256`` / ``export_meta`` / ``export_path``, which
:func:`vqgen.export.check_compatible` compares with shard manifests and priors. The returned
:class:`~vqgen.export.Export` record holds the config that shard manifests store.
"""

from __future__ import annotations

from torch import nn

from ..export import Export, load_export
from ..fsutil import recover_directory
from ..hub import resolve_model_path
from .diffusers_vq import is_diffusers_vqmodel, load_diffusers_tokenizer
from .vqvae import VQVAE


def load_tokenizer(ref) -> tuple[nn.Module, Export]:
    """(tokenizer in eval mode on the CPU, its Export record). CheckpointError for anything else."""
    path = recover_directory(resolve_model_path(ref))
    if is_diffusers_vqmodel(path):
        return load_diffusers_tokenizer(path)
    export = load_export(path, expected_kind=VQVAE.EXPORT_KIND)
    return VQVAE.from_export(export), export
