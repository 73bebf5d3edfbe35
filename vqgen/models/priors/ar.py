"""The autoregressive prior (``--prior_kind ar``): a decoder-only, pre-norm Transformer over the token grid read in
raster order, sampled token by token with a KV cache.

Input position 0 holds the class embedding (the start token), input position ``i > 0`` token ``i - 1``; the output
at position ``i`` predicts token ``i``.
Adapted from: nanoGPT (model), gpt-fast / LlamaGen ``generate.py`` (``KVCache``, ``prefill``, ``decode_one_token``,
``decode_n_tokens``, CFG as one batch of cond ‖ null rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...config import PriorConfig
from ...errors import ConfigError
from ..prior import Prior, PriorOutput
from ..sampling import apply_cfg, guidance_at, sample_logits
from .blocks import Block, KVCache, make_norm, rope_2d_table
from .heads import token_embedding, token_head


class ARPrior(Prior):
    def __init__(self, config: PriorConfig):
        super().__init__(config)
        d = config.attn_layers_dim
        self.tok_emb = token_embedding(config)                       # one table, or --token_factors small ones
        self.cls_emb = nn.Embedding(config.num_classes + 1, d)       # start token; last row = null class
        self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len, d))  # learned absolute, raster order
        self.drop = nn.Dropout(config.attn_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.attn_layers_depth))
        self.ln_f = make_norm(config.prior_norm, d)
        if config.rope:  # (1 + seq_len, head_dim // 2) rotation angles; not saved (a function of the config)
            self.register_buffer("rope_angles", rope_2d_table(config.latent_h, config.latent_w, config.head_dim),
                                 persistent=False)
        else:
            self.rope_angles = None
        self.head = token_head(config)          # untied (the input table also holds no BOS); or factorised
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        for name, p in self.named_parameters():               # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.attn_layers_depth))

    # ---- the network ----------------------------------------------------------------------------------------
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

    def _hidden(self, x: torch.Tensor, start: int | None) -> torch.Tensor:
        """The blocks over ``x (B, t, dim)`` at input positions from ``start`` (None: no cache) -> (B, t, dim)."""
        rope = self._rope(start, x.shape[1])
        for block in self.blocks:
            x = block(x, start, rope)
        return x

    def _last_logits(self, x: torch.Tensor, start: int | None) -> torch.Tensor:
        """Logits ``(B, vocab)`` of the last of ``x``'s positions (a factorised head: its hidden state, (B, dim))."""
        return self.head.next_state(self.ln_f(self._hidden(x, start)[:, -1]))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> PriorOutput:
        """``tokens (B, T)`` in raster order (or (B, h, w)) -> next-token logits ``(B, T, vocab)`` (a factorised
        head: per sub-token) and ``tokens``."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        b, t = tokens.shape
        if t > self.config.seq_len:
            raise ConfigError(f"sequence of {t} tokens is longer than the prior's {self.config.seq_len}")
        labels = self.training_labels(labels, b, tokens.device)
        h = self.ln_f(self._hidden(self._embed(tokens[:, :-1], labels), None))     # (B, T, dim)
        return PriorOutput(self.head(h, tokens), tokens)

    # ---- sampling -------------------------------------------------------------------------------------------
    def logits_for_prefix(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, vocab)`` after ``prefix (B, n)``, recomputing everything (no cache)."""
        return self._last_logits(self._embed(prefix, labels), None)

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

    def release_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    clear_caches = release_caches

    def prefill(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fill the caches with ``[start(labels)] + prefix (B, n)``; return next-token logits ``(B, vocab)``."""
        return self._last_logits(self._embed(prefix, labels), 0)

    def decode_one_token(self, token: torch.Tensor, input_pos: int) -> torch.Tensor:
        """Feed ``token (B,)`` at input position ``input_pos`` (= its raster index + 1); logits ``(B, vocab)``."""
        x = self.drop(self.tok_emb(token.reshape(-1, 1)) + self.pos_emb[:, input_pos: input_pos + 1])  # (B,1,dim)
        return self._last_logits(x, input_pos)

    def sample_tokens(self, labels: torch.Tensor, use_cfg: bool, cfg_scale: float, cfg_schedule: str,
                      sample_kw: dict, use_cache: bool = True, cache_dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
        """Raster-order decoding of ``(B, T)`` tokens. ``use_cache=False`` recomputes the whole prefix at every
        step (the reference path): the same random draws in the same order, so the same tokens."""
        n = self.config.seq_len
        rows = labels.shape[0]
        b = rows // 2 if use_cfg else rows
        if use_cache:
            self.setup_caches(rows, n, cache_dtype or self.pos_emb.dtype, labels.device)
        out = torch.empty(b, n, dtype=torch.long, device=labels.device)
        empty = out[:, :0].repeat(2, 1) if use_cfg else out[:, :0]
        logits = self.prefill(empty, labels) if use_cache else self.logits_for_prefix(empty, labels)
        for i in range(n):
            g = guidance_at(cfg_scale, cfg_schedule, i, n)
            tok = self.head.draw(logits, lambda lg: sample_logits(apply_cfg(lg, g) if use_cfg else lg, **sample_kw))
            out[:, i] = tok
            if i == n - 1:
                break
            if use_cache:
                logits = self.decode_one_token(tok.repeat(2) if use_cfg else tok, i + 1)
            else:
                prefix = out[:, : i + 1]
                logits = self.logits_for_prefix(prefix.repeat(2, 1) if use_cfg else prefix, labels)
        return out
