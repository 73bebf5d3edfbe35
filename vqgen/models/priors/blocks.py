"""Transformer pieces every prior kind builds on: pre-norm blocks, attention (causal or not, with a KV cache),
LLaMA's RMSNorm / SwiGLU and 2D rotary positions (``--prior_norm rms``, ``--prior_mlp swiglu``, ``--rope``).

SwiGLU's hidden width is ``2/3 * mlp_ratio * dim`` (rounded up to a multiple of 8): the GELU MLP's parameter count.
2D RoPE: half of each head's pairs rotate with the token's row, half with its column; input position 0 (the class
token) is not rotated.
Adapted from: nanoGPT / gpt-fast (blocks, ``KVCache``), LlamaGen ``autoregressive/models/gpt.py`` (``RMSNorm``,
``FeedForward``, ``precompute_freqs_cis_2d``, ``apply_rotary_emb``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import PriorConfig


class KVCache(nn.Module):
    """Preallocated keys/values of one attention layer: ``(max_batch, heads, max_seq_len, head_dim)``.

    Two ways to address it: a Python-int ``start`` (eager decoding: the filled prefix is returned, its length grows)
    or a tensor of positions (the static cache of compiled decoding: every shape is fixed, the mask hides the slots
    not yet written, so one compiled graph serves every step)."""

    def __init__(self, max_batch: int, max_seq_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_batch, heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_seq_len, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v (B, heads, t, head_dim)`` at positions ``[start, start+t)``; return the filled prefix
        ``(B, heads, start+t, head_dim)`` (a view: no copy, no mask needed over unused slots)."""
        b, _, t, _ = k.shape
        end = start + t
        if b > self.k_cache.shape[0] or end > self.k_cache.shape[2]:
            raise RuntimeError(f"KV cache too small: need batch {b} x len {end}, have {tuple(self.k_cache.shape)}")
        self.k_cache[:b, :, start:end] = k
        self.v_cache[:b, :, start:end] = v
        return self.k_cache[:b, :, :end], self.v_cache[:b, :, :end]

    def update_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write ``k, v (B, heads, t, head_dim)`` at positions ``pos (t,)``; return the whole cache
        ``(B, heads, max_seq_len, head_dim)`` and the mask ``(t, max_seq_len)`` of the slots each query may see."""
        b = k.shape[0]
        k_all, v_all = self.k_cache[:b], self.v_cache[:b]
        k_all.index_copy_(2, pos, k.to(k_all.dtype))
        v_all.index_copy_(2, pos, v.to(v_all.dtype))
        return k_all, v_all, self.slots[None, :] <= pos[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig, causal: bool = True):
        super().__init__()
        d = cfg.attn_layers_dim
        self.heads, self.head_dim, self.causal = cfg.attn_layers_heads, cfg.head_dim, causal
        self.qkv = nn.Linear(d, 3 * d, bias=False)   # one fused matmul: fewer ops per decode step
        self.proj = nn.Linear(d, d, bias=False)
        self.dropout = cfg.attn_dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, start: int | torch.Tensor | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        """``start``: None (no cache), the int position of ``x``'s first row, or its positions ``(t,)`` (static
        cache, :meth:`KVCache.update_at`)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, heads, t, hd)
        if rope is not None:                    # angles (t, hd/2) of these t input positions
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if start is None:                       # full sequence, no cache (training / reference path)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        elif self.kv_cache is None:
            raise RuntimeError("call Prior.setup_caches(...) before prefill/decode_one_token")
        elif isinstance(start, torch.Tensor):   # static cache: attend to the slots written so far
            k, v, mask = self.kv_cache.update_at(start, k, v)  # (B, heads, max_seq_len, hd), (t, max_seq_len)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        else:
            k, v = self.kv_cache.update(start, k, v)            # (B, heads, start+t, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)                 # cache dtype may differ under autocast
            if t == 1:                                          # one query sees the whole prefix: no mask
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:                                               # a chunk after a prefix: explicit mask
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, d)                  # (B, t, dim)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, cfg: PriorConfig, causal: bool = True):
        super().__init__()
        d = cfg.attn_layers_dim
        hidden = int(d * cfg.mlp_ratio)
        self.ln1 = make_norm(cfg.prior_norm, d)
        self.attn = Attention(cfg, causal)
        self.ln2 = make_norm(cfg.prior_norm, d)
        if cfg.prior_mlp == "swiglu":
            self.mlp = SwiGLU(d, cfg.mlp_ratio)
        else:
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.drop = nn.Dropout(cfg.attn_dropout)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), start, rope))
        return x + self.drop(self.mlp(self.ln2(x)))


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
