"""PatchGAN discriminator of the VQGAN recipe (``train_vqvae.py --disc_weight > 0``).

(B, C, H, W) images in [-1, 1] -> (B, 1, h, w) logits, one per overlapping patch: ``n_layers`` 4x4 convs (stride 2
except the last), then a 1-channel 4x4 conv. For 32x32 inputs, 2 layers give a 6x6 logit map (3 layers: 2x2).
Norm "batch" is taming's and LlamaGen's choice; "group" keeps samples independent (no running statistics that
differ between ranks).

Adapted from: taming-transformers ``taming/modules/discriminator/model.py`` (``NLayerDiscriminator``,
``weights_init``), itself from pix2pix.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DISC_NORMS
from ..errors import ConfigError
from .optim import adamw

NORMS = DISC_NORMS


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 1, channels: int = 64, n_layers: int = 2, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        if channels < 1 or n_layers < 1:
            raise ConfigError(f"need discriminator channels >= 1 and layers >= 1, got {channels}, {n_layers}")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       norm_layer(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits

    def configure_optimizer(self, lr: float, weight_decay: float, device_type: str) -> torch.optim.Optimizer:
        """AdamW with GAN betas (0.5, 0.9), taming's discriminator optimizer."""
        return adamw(self, lr, weight_decay, (0.5, 0.9), device_type)


def _weights_init(m: nn.Module) -> None:
    """DCGAN init (taming's ``weights_init``): N(0, 0.02) convs, N(1, 0.02) norm scales, zero norm shifts."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
