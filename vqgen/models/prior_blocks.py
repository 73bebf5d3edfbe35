"""LLaMA-style pieces for the prior (``PriorConfig.norm / mlp / rope``; opt-in flags --prior_norm, --prior_mlp,
--rope) and an EMA of its weights.

* ``norm="rms"``: ``torch.nn.RMSNorm`` instead of LayerNorm (no mean subtraction, no bias).
* ``mlp="swiglu"``: ``w2(silu(w1 x) * w3 x)`` with hidden width ``2/3 * mlp_ratio * dim`` (rounded up to a
  multiple of 8) so the parameter count matches the GELU MLP's.
* ``rope=True``: 2D rotary position embedding on queries and keys: half of each head's pairs rotate with the
  token's row, half with its column. The class/start token (input position 0) is not rotated. Token ``j`` sits at
  input position ``j + 1`` and at grid cell ``divmod(j, latent_w)``. The learned absolute position embedding stays.
* :func:`ema_model`: an exponential moving average of the weights (torch's ``AveragedModel``), for sampling.

Adapted from: LlamaGen ``autoregressive/models/gpt.py`` (``RMSNorm``, ``FeedForward`` with ``find_multiple``,
``precompute_freqs_cis_2d``, ``apply_rotary_emb``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-5) if kind == "rms" else nn.LayerNorm(dim)


class SwiGLU(nn.Module):
    """(B, T, dim) -> (B, T, dim): ``w2(silu(w1 x) * w3 x)``; ``w1``/``w3`` fused into one matmul."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        hidden = (hidden + 7) // 8 * 8
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def rope_2d_table(latent_h: int, latent_w: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``(1 + h*w, head_dim // 2)`` for input positions 0 (class token: angle 0) .. h*w.

    The first half of the ``head_dim // 2`` rotated pairs turns with the row, the second half with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    n = head_dim // 4                                                   # frequencies per axis
    inv = 1.0 / base ** (torch.arange(n, dtype=torch.float64) / n)      # (n,)
    j = torch.arange(latent_h * latent_w)
    rows, cols = (j // latent_w).double(), (j % latent_w).double()
    ang = torch.cat([rows[:, None] * inv, cols[:, None] * inv], dim=1)  # (h*w, 2n) = (h*w, head_dim // 2)
    return torch.cat([torch.zeros(1, 2 * n, dtype=torch.float64), ang]).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x (B, heads, t, head_dim)`` by ``angles (t, head_dim // 2)``."""
    x2 = x.float().reshape(*x.shape[:-1], -1, 2)                        # (B, heads, t, hd/2, 2)
    cos, sin = angles.cos(), angles.sin()                               # (t, hd/2)
    out = torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def ema_model(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An EMA copy of ``model``: call ``.update_parameters(model)`` after every optimizer step; ``.module`` is it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
