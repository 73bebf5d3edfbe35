"""Autoregressive prior over VQ-VAE token grids: a decoder-only, pre-norm Transformer.

The grid ``[h, w]`` is read in raster order as a sequence of ``T = h*w`` tokens. Input position 0 holds a
class embedding (the start token; the last of its ``num_classes + 1`` rows is the "null" class used by
unconditional models and by classifier-free guidance), input position ``i > 0`` holds token ``i - 1``; the
output at position ``i`` predicts token ``i``. Attention is ``F.scaled_dot_product_attention`` (``is_causal``
in training); sampling uses a preallocated :class:`KVCache` per layer.

Adapted from: nanoGPT (config dataclass + module), gpt-fast / LlamaGen (``KVCache``, ``setup_caches``,
``prefill``, ``decode_one_token``, class token + CFG null class).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..export import Export, Exportable
from ..hub import HubMixin
from .optim import adamw
from .prior_blocks import SwiGLU, apply_rope, make_norm, rope_2d_table

PRIOR_NORMS, PRIOR_MLPS = ("layer", "rms"), ("gelu", "swiglu")


@dataclass
class PriorConfig:
    vocab_size: int                 # codebook size of the tokenizer
    latent_h: int
    latent_w: int
    dim: int = 96
    depth: int = 12
    heads: int = 8
    dropout: float = 0.0            # attention-probability and residual dropout (training only)
    num_classes: int = 0            # 0 = unconditional
    class_dropout: float = 0.1      # P(label -> null class) in training: enables classifier-free guidance
    mlp_ratio: float = 4.0
    norm: str = "layer"             # "layer" | "rms" (LLaMA RMSNorm)
    mlp: str = "gelu"               # "gelu" | "swiglu"
    rope: bool = False              # 2D rotary embedding on q/k (prior_blocks.py), on top of the learned positions

    @property
    def seq_len(self) -> int:
        return self.latent_h * self.latent_w

    @property
    def null_class(self) -> int:
        """Index of the unconditional ("null") row of the class/start embedding."""
        return self.num_classes

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown prior config keys {unknown} (written by a newer vqgen?)")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ConfigError(f"prior config lacks required keys {missing}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"prior config: {msg}")
        need(isinstance(self.vocab_size, int) and self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        need(self.latent_h >= 1 and self.latent_w >= 1, f"latent grid must be >= 1x1, got {self.latent_h}x{self.latent_w}")
        need(self.dim >= 1 and self.depth >= 1 and self.heads >= 1,
             f"dim/depth/heads must be >= 1, got {self.dim}/{self.depth}/{self.heads}")
        need(self.dim % self.heads == 0,
             f"attn_layers_dim ({self.dim}) must be divisible by attn_layers_heads ({self.heads})")
        need(0.0 <= self.dropout < 1.0, f"attn_dropout must be in [0, 1), got {self.dropout}")
        need(0.0 <= self.class_dropout < 1.0, f"class_dropout must be in [0, 1), got {self.class_dropout}")
        need(self.num_classes >= 0, f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        need(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        need(self.norm in PRIOR_NORMS, f"norm must be one of {PRIOR_NORMS}, got {self.norm!r}")
        need(self.mlp in PRIOR_MLPS, f"mlp must be one of {PRIOR_MLPS}, got {self.mlp!r}")
        need(not self.rope or (self.dim // self.heads) % 4 == 0,
             f"rope needs a head dimension (attn_layers_dim / heads = {self.dim // self.heads}) divisible by 4")


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of next-token ``logits (B, T, vocab)`` against ``tokens (B, T)``, in fp32 (bf16 logits
    would lose the small probabilities). The one definition behind the training loss, validation bits/token and
    evaluate.py; callers pass the logits of the model they hold (a DDP-wrapped model must run its own forward)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction=reduction)


class KVCache(nn.Module):
    """Preallocated keys/values of one attention layer: ``(max_batch, heads, max_seq_len, head_dim)``."""

    def __init__(self, max_batch: int, max_seq_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_batch, heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

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


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)   # one fused matmul: fewer ops per decode step
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, start: int | None = None, rope: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, heads, t, hd)
        if rope is not None:                    # angles (t, hd/2) of these t input positions
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if start is None:                       # full sequence, no cache (training / reference path)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            if self.kv_cache is None:
                raise RuntimeError("call Prior.setup_caches(...) before prefill/decode_one_token")
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

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.ln1 = make_norm(cfg.norm, cfg.dim)
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg.norm, cfg.dim)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLU(cfg.dim, cfg.mlp_ratio)
        else:
            self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, start: int | None = None, rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), start, rope))
        return x + self.drop(self.mlp(self.ln2(x)))


class Prior(Exportable, nn.Module, HubMixin, tags=["autoregressive", "image-generation"]):
    """Token prior. ``from_pretrained``/``save_pretrained``/``push_to_hub``: see :mod:`vqgen.hub`."""

    EXPORT_KIND = "prior"

    def __init__(self, config: PriorConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.dim
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.cls_emb = nn.Embedding(config.num_classes + 1, d)       # start token; last row = null class
        self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len, d))  # learned absolute, raster order
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = make_norm(config.norm, d)
        if config.rope:  # (1 + seq_len, head_dim // 2) rotation angles; not saved (a function of the config)
            self.register_buffer("rope_angles", rope_2d_table(config.latent_h, config.latent_w, d // config.heads),
                                 persistent=False)
        else:
            self.rope_angles = None
        self.head = nn.Linear(d, config.vocab_size, bias=False)       # untied: the input table also holds no BOS
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        for name, p in self.named_parameters():               # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.depth))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- inputs -------------------------------------------------------------------------------------------
    def resolve_labels(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """``None`` or ``-1`` -> the null class; class ids are checked against ``num_classes``."""
        null = self.config.null_class
        if labels is None:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.numel() != batch:
            raise ConfigError(f"got {labels.numel()} labels for a batch of {batch}")
        labels = torch.where(labels < 0, torch.full_like(labels, null), labels)
        # The range check syncs with the device: done for user-facing calls (eval/sampling), not per training
        # step, whose labels come from shards validated at extraction.
        if not self.training and bool((labels > null).any()):
            raise ConfigError(f"labels must be -1 or in [0, {self.config.num_classes}) for this prior "
                              f"(num_classes={self.config.num_classes}); got {labels.tolist()}")
        return labels

    def _embed(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[start(labels)] + prefix`` -> embeddings ``(B, 1 + n, dim)`` with positions ``0..n``."""
        x = self.cls_emb(labels).unsqueeze(1)                       # (B, 1, dim)
        if prefix.shape[1]:
            x = torch.cat([x, self.tok_emb(prefix)], dim=1)         # (B, 1 + n, dim)
        return self.drop(x + self.pos_emb[:, : x.shape[1]])

    def _rope(self, start: int | None, t: int) -> torch.Tensor | None:
        """Rotation angles of input positions ``[start, start + t)`` (``start=None``: from 0), or None."""
        if self.rope_angles is None:
            return None
        s = start or 0
        return self.rope_angles[s: s + t]

    def _logits(self, x: torch.Tensor, start: int | None) -> torch.Tensor:
        rope = self._rope(start, x.shape[1])
        for block in self.blocks:
            x = block(x, start, rope)
        return self.head(self.ln_f(x))

    # ---- training -----------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens (B, T) long`` (raster order, T = h*w; or (B, h, w)) -> logits ``(B, T, vocab)``."""
        tokens = tokens.reshape(tokens.shape[0], -1)
        b, t = tokens.shape
        if t > self.config.seq_len:
            raise ConfigError(f"sequence of {t} tokens is longer than the prior's {self.config.seq_len}")
        labels = self.resolve_labels(labels, b, tokens.device)
        if self.training and self.config.class_dropout > 0 and self.config.num_classes > 0:
            drop = torch.rand(b, device=tokens.device) < self.config.class_dropout   # torch RNG: reproducible
            labels = labels.masked_fill(drop, self.config.null_class)
        return self._logits(self._embed(tokens[:, :-1], labels), None)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per token."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        return token_cross_entropy(self(tokens, labels), tokens)

    # ---- inference ----------------------------------------------------------------------------------------
    def logits_for_prefix(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, vocab)`` after ``prefix (B, n)``, recomputing everything (no cache)."""
        x = self._embed(prefix, labels)
        rope = self._rope(None, x.shape[1])
        for block in self.blocks:
            x = block(x, None, rope)
        return self.head(self.ln_f(x[:, -1]))

    def setup_caches(self, max_batch: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate (or reuse, when large enough and alike) one :class:`KVCache` per layer."""
        max_seq_len = max_seq_len or self.config.seq_len
        ref = self.pos_emb
        dtype, device = dtype or ref.dtype, torch.device(device) if device is not None else ref.device
        c = self.blocks[0].attn.kv_cache
        if (c is not None and c.k_cache.shape[0] >= max_batch and c.k_cache.shape[2] >= max_seq_len
                and c.k_cache.dtype == dtype and c.k_cache.device == device
                # inference-mode tensors cannot be written outside inference mode
                and (torch.is_inference_mode_enabled() or not c.k_cache.is_inference())):
            return
        for block in self.blocks:
            a = block.attn
            a.kv_cache = KVCache(max_batch, max_seq_len, a.heads, a.head_dim, dtype, device)

    def clear_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def prefill(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fill the caches with ``[start(labels)] + prefix (B, n)``; return next-token logits ``(B, vocab)``."""
        x = self._embed(prefix, labels)
        rope = self._rope(0, x.shape[1])
        for block in self.blocks:
            x = block(x, 0, rope)
        return self.head(self.ln_f(x[:, -1]))

    def decode_one_token(self, token: torch.Tensor, input_pos: int) -> torch.Tensor:
        """Feed ``token (B,)`` at input position ``input_pos`` (= its raster index + 1); logits ``(B, vocab)``."""
        x = self.drop(self.tok_emb(token.reshape(-1, 1)) + self.pos_emb[:, input_pos: input_pos + 1])  # (B,1,dim)
        rope = self._rope(input_pos, 1)
        for block in self.blocks:
            x = block(x, input_pos, rope)
        return self.head(self.ln_f(x[:, -1]))

    def configure_optimizer(self, lr: float, weight_decay: float, device_type: str) -> torch.optim.Optimizer:
        """AdamW with GPT's betas (0.9, 0.95): a lower beta2 steadies Transformer training (GPT-3, nanoGPT)."""
        return adamw(self, lr, weight_decay, (0.9, 0.95), device_type)

    # ---- exports ------------------------------------------------------------------------------------------
    @classmethod
    def from_loaded_export(cls, exp: Export) -> "Prior":
        try:
            cfg = PriorConfig.from_dict(dict(exp.config))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{exp.path}: bad prior config: {e}") from None
        model = cls(cfg)
        try:
            model.load_state_dict(exp.state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{exp.path}: weights do not fit the prior config: {e}") from None
        return model
