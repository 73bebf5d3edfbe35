"""VQ-VAE tokenizer: conv encoder -> quantizer (any kind of ``--quantizer``) -> conv decoder, any number of levels.

Its config is :class:`vqgen.config.VQVAEConfig`. Adapted from: MONAI ``monai/networks/nets/vqvae.py`` (per level a
strided conv + residual units, a 3x3 conv to/from the code vectors, transposed convs back up), with plain
``nn.Conv2d``/``nn.ConvTranspose2d`` (channels-last friendly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..config import QUANTIZERS, VQVAEConfig
from ..errors import CheckpointError, ConfigError
from ..export import Export, Exportable
from ..hub import HubMixin
from .blocks import build_resnet_decoder, build_resnet_encoder
from .optim import adamw

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "silu": lambda: nn.SiLU()}


class ResidualUnit(nn.Module):
    """act(x + conv3x3(act(conv3x3(x)))) as in MONAI's VQVAEResidualUnit."""

    def __init__(self, channels: int, res_channels: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.act1 = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(res_channels, channels, 3, padding=1)
        self.act2 = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act1(self.conv1(x)))
        return self.act2(h.add_(x))  # in place on a fresh tensor: conv backward does not need its output


def build_encoder(cfg: VQVAEConfig) -> nn.Sequential:
    if cfg.vq_arch == "resnet":
        return build_resnet_encoder(cfg)
    layers: list[nn.Module] = []
    prev = cfg.in_channels
    for ch, res, (s, k, d, p) in zip(cfg.num_channels, cfg.num_res_channels, cfg.down_levels):
        layers += [nn.Conv2d(prev, ch, k, stride=s, padding=p, dilation=d), ACTIVATIONS[cfg.activation]()]
        layers += [ResidualUnit(ch, res, cfg.activation) for _ in range(cfg.num_res_layers)]
        prev = ch
    layers.append(nn.Conv2d(prev, cfg.code_dim, 3, padding=1))
    return nn.Sequential(*layers)


def build_decoder(cfg: VQVAEConfig) -> nn.Sequential:
    if cfg.vq_arch == "resnet":
        return build_resnet_decoder(cfg)
    chans, res_chans = cfg.num_channels[::-1], cfg.num_res_channels[::-1]
    L = cfg.num_levels
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, chans[0], 3, padding=1)]
    for i, (s, k, d, p, op) in enumerate(cfg.up_levels):
        layers += [ResidualUnit(chans[i], res_chans[i], cfg.activation) for _ in range(cfg.num_res_layers)]
        last = i == L - 1
        out = cfg.in_channels if last else chans[i + 1]
        layers.append(nn.ConvTranspose2d(chans[i], out, k, stride=s, padding=p, output_padding=op, dilation=d))
        if not last:
            layers.append(ACTIVATIONS[cfg.activation]())
    return nn.Sequential(*layers)


class VQVAEOutput(NamedTuple):
    recon: torch.Tensor       # (B, C, H, W)
    vq_loss: torch.Tensor     # scalar fp32 commitment loss
    indices: torch.Tensor     # (B, h, w) long
    perplexity: torch.Tensor  # scalar


class VQVAE(Exportable, nn.Module, HubMixin, tags=["vq-vae", "image-tokenizer"]):
    """Conv VQ-VAE tokenizer. ``from_pretrained``/``save_pretrained``/``push_to_hub``: see :mod:`vqgen.hub`."""

    EXPORT_KIND = "vqvae"

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = build_encoder(config)
        self.quantizer = QUANTIZERS[config.quantizer].load().from_config(config)
        self.decoder = build_decoder(config)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output layer: where the VQGAN adaptive weight compares gradient norms."""
        return self.decoder[-1].weight

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        q = self.quantizer(self.encoder(x))
        return VQVAEOutput(self.decoder(q.quantized), q.loss, q.indices, q.perplexity)

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → code indices (B, h, w) long. Never updates the codebook, in any mode."""
        return self.quantizer.indices_of(self.encoder(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) (or (B, h*w)) → images (B, C, H, W)."""
        h, w = self.config.latent_size
        if indices.dim() == 2 and indices.shape[1] == h * w:
            indices = indices.view(-1, h, w)
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (h, w):
            raise ValueError(f"decode_indices expects (B, {h}, {w}) code indices, got {tuple(indices.shape)}")
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.codebook_size):
            raise ValueError(f"code indices must be in [0, {self.config.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}] (tokens from another tokenizer?)")
        return self.decoder(self.quantizer.embed(indices))

    def configure_optimizer(self, lr: float, weight_decay: float, device_type: str) -> torch.optim.Optimizer:
        """AdamW with the usual betas (0.9, 0.999) of convolutional autoencoders (MONAI, taming)."""
        return adamw(self, lr, weight_decay, (0.9, 0.999), device_type)

    # ---- exports ---------------------------------------------------------------------------------------------
    @classmethod
    def from_loaded_export(cls, exp: Export) -> "VQVAE":
        try:
            cfg = VQVAEConfig.from_dict(dict(exp.config))
        except ConfigError as e:
            raise CheckpointError(f"{exp.path}: its config is not a valid VQ-VAE config ({e})") from None
        model = cls(cfg)
        _check_state_dict(model, exp.state_dict, exp.path)
        model.load_state_dict(exp.state_dict, strict=True)
        return model


def _check_state_dict(model: nn.Module, sd: dict, where) -> None:
    """A short, readable CheckpointError instead of load_state_dict's wall of keys."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    # The codebook first: its shape (K, D) is usually the most telling difference.
    keys = sorted(want, key=lambda k: not k.startswith("quantizer."))
    shapes = [f"{k}: export {list(sd[k].shape)} vs config {list(want[k].shape)}"
              for k in keys if k in sd and sd[k].shape != want[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 2} more)" if len(items) > 2 else ""
            parts.append(f"{len(items)} {label}: {'; '.join(items[:2])}{more}")
    raise CheckpointError(f"{where}: the weights do not match the VQ-VAE config stored with them ({' | '.join(parts)})."
                          f" The export is corrupt or was assembled from two different models; re-export it.")
