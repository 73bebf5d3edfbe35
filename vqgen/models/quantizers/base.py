"""What every quantizer returns and shares: the output tuple, usage counters, the rank helpers."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor   # (B, D, H, W) straight-through: forward = codes, backward = identity to z
    loss: torch.Tensor        # scalar fp32, already weighted (commitment, entropy...)
    indices: torch.Tensor     # (B, H, W) long
    perplexity: torch.Tensor  # scalar fp32, this (local) batch
    counts: torch.Tensor      # (K,) long, this (local) batch's assignments per code


def dist_world() -> int:
    """World size when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_rank0() -> bool:
    return dist_world() == 1 or dist.get_rank() == 0


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    if dist_world() > 1:
        dist.broadcast(t, src=0)
    return t


class Quantizer(nn.Module):
    """Base of every quantizer kind: ``forward(z) -> QuantizerOutput``, ``indices_of(z) -> (B, H, W)``,
    ``embed(indices) -> (B, D, H, W)`` fp32, ``codebook_size``, ``code_dim``, and a non-persistent ``usage`` (K,)
    buffer counting training assignments since :meth:`reset_usage`. Built with ``from_config(VQVAEConfig)``."""

    codebook_size: int
    code_dim: int

    def usage_fraction(self) -> float:
        """Fraction of codes used at least once (training forwards) since the last :meth:`reset_usage`."""
        return float((self.usage > 0).float().mean())

    def reset_usage(self) -> None:
        self.usage.zero_()

    @staticmethod
    def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
        """exp(entropy) of the average code distribution; equals K for a uniform assignment over K codes."""
        p = counts.float() / counts.sum().clamp_min(1).float()
        return torch.exp(torch.special.entr(p).sum())
