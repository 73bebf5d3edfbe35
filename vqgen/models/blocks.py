"""taming / LlamaGen encoder-decoder blocks for the VQ-VAE (opt-in ``--vq_arch resnet``, ``--vq_attention``).

The ``conv`` architecture's level structure (:mod:`vqgen.models.vqvae`: a strided conv per level down, a transposed
conv per level up, the same size flags, so the same sizes cost about the same) with VQGAN blocks inside each level:
pre-activation GroupNorm + swish ResNet blocks, self-attention at the latent resolution in encoder and decoder, and
GroupNorm + swish before the outer convs.
Adapted from: taming-transformers ``taming/modules/diffusionmodules/model.py`` and LlamaGen
``tokenizer/tokenizer_image/vq_model.py`` (``ResnetBlock``, ``AttnBlock``, ``Normalize``, ``nonlinearity``);
attention through ``F.scaled_dot_product_attention`` instead of two bmm calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (fewer when ``channels`` is not divisible: the largest divisor <= groups)."""
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (taming): ``x + conv2(swish(GN(conv1(swish(GN(x))))))``; same channels."""

    def __init__(self, channels: int, hidden: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(channels, groups)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm2 = group_norm(hidden, groups)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (taming ``AttnBlock``). (B, C, H, W) in/out."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)   # taming's q, k, v 1x1 convs fused into one
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))


def build_resnet_encoder(cfg) -> nn.Sequential:
    """Per level: strided conv, ``num_res_layers`` ResnetBlocks (+ attention at the last level); GN, swish, conv
    to ``code_dim``. ``cfg`` is a :class:`vqgen.config.VQVAEConfig`."""
    layers: list[nn.Module] = []
    prev, L = cfg.in_channels, cfg.num_levels
    for i, (ch, res, (s, k, d, p)) in enumerate(zip(cfg.num_channels, cfg.num_res_channels,
                                                     cfg.down_levels)):
        layers.append(nn.Conv2d(prev, ch, k, stride=s, padding=p, dilation=d))
        layers += [ResnetBlock(ch, res, cfg.norm_groups) for _ in range(cfg.num_res_layers)]
        if cfg.vq_attention and i == L - 1:
            layers.append(AttnBlock(ch, cfg.norm_groups))
        prev = ch
    layers += [group_norm(prev, cfg.norm_groups), nn.SiLU(), nn.Conv2d(prev, cfg.code_dim, 3, padding=1)]
    return nn.Sequential(*layers)


def build_resnet_decoder(cfg) -> nn.Sequential:
    """Mirror of :func:`build_resnet_encoder`: conv from ``code_dim``, attention + ResnetBlocks at the lowest
    level, a transposed conv per level; GN + swish before the last one (the output layer, ``decoder[-1]``)."""
    chans, res_chans = cfg.num_channels[::-1], cfg.num_res_channels[::-1]
    L = cfg.num_levels
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, chans[0], 3, padding=1)]
    for i, (s, k, d, p, op) in enumerate(cfg.up_levels):
        if cfg.vq_attention and i == 0:
            layers.append(AttnBlock(chans[0], cfg.norm_groups))
        layers += [ResnetBlock(chans[i], res_chans[i], cfg.norm_groups) for _ in range(cfg.num_res_layers)]
        last = i == L - 1
        out = cfg.in_channels if last else chans[i + 1]
        if last:
            layers += [group_norm(chans[i], cfg.norm_groups), nn.SiLU()]
        layers.append(nn.ConvTranspose2d(chans[i], out, k, stride=s, padding=p, output_padding=op, dilation=d))
        if not last:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)
