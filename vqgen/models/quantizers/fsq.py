"""Finite scalar quantization (FSQ): each of D channels is bounded by a tanh and rounded to one of ``levels[d]``
values; the codebook is the grid of all combinations (K = prod(levels), e.g. [8, 5, 5, 5] = 1000 codes), so there
is no codebook to collapse, no auxiliary loss and no state.

Adapted from: google-research ``fsq/fsq.ipynb`` (Mentzer et al. 2023), with ``atanh`` for the even-level shift
(the notebook's ``tan`` is a known slip; it maps z = 0 to code 0 only with ``atanh``).
Own code, not vector-quantize-pytorch's FSQ: the math is these few lines, and a wrapper adapting it to the
quantizer interface (counts, usage, embed) would be longer and add einx, loguru and torch-einops-utils.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ...errors import ConfigError
from .implicit import MAX_CODEBOOK, ImplicitQuantizer


class FSQ(ImplicitQuantizer):
    """``FSQ(levels, eps=1e-3)``: ``code_dim = len(levels)``, ``codebook_size = prod(levels)``.

    Codes are ``round(bound(z)) / (L // 2)`` per channel, in [-1, 1]; index = sum_d level_d * prod(levels[:d]),
    level_d in [0, L_d). Gradients pass the rounding straight through (to the tanh bound).
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        levels = [int(v) for v in levels]
        if not levels or any(v < 3 for v in levels):
            raise ConfigError(f"FSQ levels must be >= 3 each (2 levels cannot be centred on 0: use LFQ for binary "
                              f"codes), got {levels}")
        if math.prod(levels) > MAX_CODEBOOK:
            raise ConfigError(f"FSQ levels {levels} give {math.prod(levels)} codes, more than {MAX_CODEBOOK}")
        if not 0 < eps < 0.5:
            raise ConfigError(f"FSQ eps must be in (0, 0.5), got {eps}")
        super().__init__(math.prod(levels), len(levels))
        self.levels, self.eps = tuple(levels), float(eps)
        basis = [math.prod(levels[:d]) for d in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "FSQ":
        """From a :class:`~vqgen.config.VQVAEConfig` (``--quantizer fsq``)."""
        return cls(cfg.fsq_levels)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}, eps={self.eps}"

    def bound(self, zf: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) fp32 → values in (-(L-1)/2 - offset, (L-1)/2 - offset) per channel, 0 at z = 0."""
        L = self._levels                                   # (1, D, 1, 1) long
        half_l = (L - 1) * (1 - self.eps) / 2              # fp32
        offset = (1 - L % 2) * 0.5                         # even L: levels sit at half-integers, shifted by 1/2
        shift = torch.atanh(offset / half_l)
        return torch.tanh(zf + shift) * half_l - offset

    def _quantize(self, zf: torch.Tensor):
        b = self.bound(zf)
        r = torch.round(b)                                 # integer-valued, in [-(L//2), (L-1)//2]
        half_width = (self._levels // 2).float()
        codes = r / half_width
        q_st = (r + (b - b.detach())) / half_width         # forward: exactly the codes; backward: through bound
        idx = ((r.long() + self._levels // 2) * self._basis).sum(1)  # (B, H, W)
        return codes, q_st, idx

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) long → (B, D, H, W) fp32, bitwise the codes the forward gives."""
        level = torch.div(indices.long()[:, None], self._basis, rounding_mode="floor") % self._levels
        half_width = self._levels // 2
        return (level - half_width).float() / half_width.float()
