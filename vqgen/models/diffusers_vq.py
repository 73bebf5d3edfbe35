"""A diffusers ``VQModel`` (taming/LDM and aMUSEd VQGANs on the Hub) as a vqgen tokenizer.

:class:`DiffusersVQTokenizer` exposes what stages 2 and 3, sampling and evaluation use from a tokenizer
(``encode_to_indices``, ``decode_indices``, a ``config`` with the sizes) and carries a content fingerprint like a
vqgen export, so :func:`vqgen.export.check_compatible` ties shards and priors to a published VQGAN too:
``extract_codes.py --checkpoint hf:amused/amused-256/vqvae`` -> ``train_prior.py`` -> ``sample.py``. diffusers is an
optional extra imported only when a diffusers folder is given (its import is slow); only safetensors are read.
Pixel ranges (aMUSEd's VQGAN works on [0, 1]), the fingerprint and the decode path: docs/NOTES.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..export import Export, ExportMeta, export_fingerprint

KIND = "diffusers-vqmodel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# diffusers pipelines whose image processor does not normalise to [-1, 1] (do_normalize=False)
UNIT_RANGE_PIPELINES = {"AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline"}


@dataclass(frozen=True)
class TokenizerGeometry:
    """The part of a tokenizer's config that vqgen's stages read (a vqgen VQVAEConfig has the same fields)."""

    in_channels: int
    image_size: int
    codebook_size: int
    code_dim: int
    latent_size: tuple[int, int]


def is_diffusers_vqmodel(folder: Path) -> bool:
    """True for a folder whose config.json was written by diffusers for a ``VQModel``."""
    cfg = Path(folder) / CONFIG_NAME
    try:
        return Path(folder).is_dir() and json.loads(cfg.read_text()).get("_class_name") == "VQModel"
    except (OSError, ValueError, AttributeError):
        return False


def geometry(config: dict) -> TokenizerGeometry:
    """From a VQModel config: each ``DownEncoderBlock2D`` but the last halves the resolution (diffusers Encoder)."""
    size = int(config.get("sample_size", 32))
    factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    if size % factor:
        raise CheckpointError(f"VQModel sample_size {size} is not divisible by its downsampling factor {factor}")
    dim = config.get("vq_embed_dim") or config.get("latent_channels", 3)
    return TokenizerGeometry(in_channels=int(config.get("in_channels", 3)), image_size=size,
                             codebook_size=int(config.get("num_vq_embeddings", 256)), code_dim=int(dim),
                             latent_size=(size // factor, size // factor))


def pixel_range(folder: Path) -> str:
    """"-1,1" (taming/LDM) or "0,1" (a VQModel of an aMUSEd pipeline repo, from the repo's model_index.json)."""
    try:
        pipeline = json.loads((Path(folder).parent / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        pipeline = None
    return "0,1" if pipeline in UNIT_RANGE_PIPELINES else "-1,1"


class DiffusersVQTokenizer(nn.Module):
    """``diffusers.VQModel`` behind vqgen's tokenizer interface (eval mode; never trains)."""

    EXPORT_KIND = KIND
    sha256: str | None = None             # set by load_diffusers_tokenizer, as Exportable.from_export does
    export_meta: ExportMeta = ExportMeta()
    export_path: Path | None = None

    def __init__(self, vqmodel: nn.Module, config: dict | None = None, pixel_range: str = "-1,1"):
        super().__init__()
        self.vq = vqmodel.eval()
        self.config = geometry(dict(config if config is not None else vqmodel.config))
        self.unit_range = pixel_range == "0,1"  # the model wants [0, 1] images: map vqgen's [-1, 1]

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> code indices (B, h, w) long."""
        h = self.vq.encode((x + 1) / 2 if self.unit_range else x).latents  # (B, D, h, w) after quant_conv
        with torch.autocast(device_type=h.device.type, enabled=False):
            _, _, (_, _, idx) = self.vq.quantize(h.float())    # idx: (B*h*w,) or (B, h, w), library-dependent
        b, _, lh, lw = h.shape
        if (lh, lw) != tuple(self.config.latent_size):
            raise CheckpointError(f"VQModel gave {lh}x{lw} codes for {tuple(x.shape[-2:])} images; its config says "
                                  f"{self.config.latent_size} for {self.config.image_size}px")
        return idx.reshape(b, lh, lw).long()

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) (or (B, h*w)) -> images (B, C, H, W)."""
        h, w = self.config.latent_size
        indices = indices.reshape(-1, h, w).long()
        k = self.config.codebook_size
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"code indices must be in [0, {k}), got [{int(indices.min())}, {int(indices.max())}]")
        shape = (indices.shape[0], h, w, self.config.code_dim)  # channels-last, as get_codebook_entry wants
        flat = indices.reshape(-1)
        if self.vq.config.lookup_from_codebook:
            out = self.vq.decode(flat, force_not_quantize=True, shape=shape).sample
        else:
            z = self.vq.quantize.get_codebook_entry(flat, shape)  # (B, D, h, w)
            out = self.vq.decode(z, force_not_quantize=True).sample
        return out * 2 - 1 if self.unit_range else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the codes."""
        return self.decode_indices(self.encode_to_indices(x))


def _import_vqmodel():
    try:
        from diffusers import VQModel
    except ImportError:
        raise CheckpointError("this tokenizer is a diffusers VQModel; install the extra: pip install "
                              "\"vqgen[diffusers]\" (or pip install diffusers)") from None
    return VQModel


def load_diffusers_tokenizer(folder: str | Path) -> tuple[DiffusersVQTokenizer, Export]:
    """(tokenizer in eval mode on the CPU, Export record with its fingerprint) of a diffusers VQModel folder."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} is a diffusers VQModel folder without {WEIGHTS_NAME} (vqgen reads "
                              f"safetensors weights only, never pickled .bin files)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    vq_cls = _import_vqmodel()
    try:
        vq = vq_cls.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the diffusers VQModel in {folder}: {str(e).splitlines()[0]}") from None
    rng = pixel_range(folder)
    tok = DiffusersVQTokenizer(vq, config, rng)
    # not _diffusers_version/_name_or_path: the fingerprint must not depend on where or by which version it was saved
    public = {**{k: v for k, v in config.items() if not k.startswith("_")}, "vqgen_pixel_range": rng}
    state = vq.state_dict()
    sha = export_fingerprint(KIND, public, state)
    meta = ExportMeta.from_dict({"source": "diffusers", "class": "VQModel",
                                 "diffusers_version": config.get("_diffusers_version")})
    tok.sha256, tok.export_meta, tok.export_path = sha, meta, folder
    return tok, Export(kind=KIND, config=public, meta=meta, state_dict=state, sha256=sha, path=folder)
