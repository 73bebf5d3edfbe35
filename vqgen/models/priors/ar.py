"""The autoregressive prior (``--prior_kind ar``): a decoder-only, pre-norm Transformer over the token grid read in
raster order, sampled token by token with a KV cache.

Input position 0 holds the class embedding (the start token), input position ``i > 0`` token ``i - 1``; the output
at position ``i`` predicts token ``i``. ``--order random`` (RAR) trains on permuted sequences: each input also gets
the embedding of the position of the token it predicts (target-aware), which sampling in raster order adds too.
Adapted from: nanoGPT (model), gpt-fast / LlamaGen ``generate.py`` (``KVCache``, ``prefill``, ``decode_one_token``,
``decode_n_tokens``, CFG as one batch of cond ‖ null rows), RAR ``modeling/rar.py`` (random orders, target-aware
positions).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...config import CFG_POWER, PriorConfig
from ...errors import ConfigError
from ..prior import Prior, PriorOutput
from ..sampling import apply_cfg, guidance_at, sample_logits
from .blocks import Block, KVCache, make_norm, rope_2d_table


class ARPrior(Prior):
    def __init__(self, config: PriorConfig):
        super().__init__(config)
        d = config.attn_layers_dim
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.cls_emb = nn.Embedding(config.num_classes + 1, d)       # start token; last row = null class
        # learned absolute positions: 0 = start token, 1 + j = token j (the last token is an input only when permuted)
        permuted = config.order == "random"
        self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len + permuted, d))
        # --order random: the position of the token each input predicts (RAR's target-aware position embedding)
        self.target_pos_emb = nn.Parameter(torch.zeros(1, config.seq_len, d)) if permuted else None
        self.drop = nn.Dropout(config.attn_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.attn_layers_depth))
        self.ln_f = make_norm(config.prior_norm, d)
        if config.rope:  # (1 + seq_len, head_dim // 2) rotation angles; not saved (a function of the config)
            self.register_buffer("rope_angles", rope_2d_table(config.latent_h, config.latent_w, config.head_dim),
                                 persistent=False)
        else:
            self.rope_angles = None
        self.head = nn.Linear(d, config.vocab_size, bias=False)       # untied: the input table also holds no BOS
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.target_pos_emb is not None:
            nn.init.normal_(self.target_pos_emb, std=0.02)
        for name, p in self.named_parameters():               # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.attn_layers_depth))

    # ---- the network ----------------------------------------------------------------------------------------
    def _embed(self, prefix: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
        """``[start(labels)] + prefix`` -> embeddings ``(B, 1 + n, dim)`` with positions ``0..n``, or, with
        ``orders (B, T)`` (the raster index of each token of a permuted ``prefix``), the positions of those tokens."""
        x = self.cls_emb(labels).unsqueeze(1)                       # (B, 1, dim)
        if prefix.shape[1]:
            x = torch.cat([x, self.tok_emb(prefix)], dim=1)         # (B, 1 + n, dim)
        t = x.shape[1]
        if orders is None:
            pos = self.pos_emb[:, :t]
            if self.target_pos_emb is not None:                     # input i predicts token i
                pos = pos + self.target_pos_emb[:, :t]
        else:                                                       # input i holds token orders[i-1], predicts orders[i]
            src = torch.cat([torch.zeros_like(orders[:, :1]), orders[:, : t - 1] + 1], dim=1)   # (B, t)
            pos = self.pos_emb[0][src] + self.target_pos_emb[0][orders[:, :t]]                 # (B, t, dim)
        return self.drop(x + pos)

    def _training_orders(self, batch: int, progress: float | None, device: torch.device) -> torch.Tensor | None:
        """``--order random`` in training: ``(B, T)`` raster indices, each row a random permutation with the annealed
        probability (else raster); None when every row is raster. Drawn from torch's RNG, which checkpoints save."""
        share = self.config.random_order_share(progress) if self.training else 0.0
        if share <= 0:
            return None
        n = self.config.seq_len
        perm = torch.rand(batch, n, device=device).argsort(dim=1)                   # (B, T) random permutations
        permuted = torch.rand(batch, device=device) < share                         # (B,)
        return torch.where(permuted[:, None], perm, torch.arange(n, device=device))

    def _rope(self, start: int | None, t: int) -> torch.Tensor | None:
        """Rotation angles of input positions ``[start, start + t)`` (``start=None``: from 0), or None."""
        if self.rope_angles is None:
            return None
        s = start or 0
        return self.rope_angles[s: s + t]

    def _hidden(self, x: torch.Tensor, start: int | None, rope: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks over ``x (B, t, dim)`` at input positions from ``start`` (None: no cache) -> (B, t, dim);
        ``rope``: the rotation angles when they are not those of positions ``start..`` (permuted inputs)."""
        rope = self._rope(start, x.shape[1]) if rope is None else rope
        for block in self.blocks:
            x = block(x, start, rope)
        return x

    def _last_logits(self, x: torch.Tensor, start: int | None) -> torch.Tensor:
        """Logits ``(B, vocab)`` of the last of ``x``'s positions."""
        return self.head(self.ln_f(self._hidden(x, start)[:, -1]))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                progress: float | None = None) -> PriorOutput:
        """``tokens (B, T)`` in raster order (or (B, h, w)) -> next-token logits ``(B, T, vocab)`` and the tokens
        they predict: ``tokens``, or in training with ``--order random`` the rows permuted at ``progress``."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        b, t = tokens.shape
        if t > self.config.seq_len:
            raise ConfigError(f"sequence of {t} tokens is longer than the prior's {self.config.seq_len}")
        labels = self.training_labels(labels, b, tokens.device)
        orders = self._training_orders(b, progress, tokens.device) if t == self.config.seq_len else None
        rope = None
        if orders is not None:
            tokens = tokens.gather(1, orders)                                        # (B, T) in each row's order
            if self.rope_angles is not None:                                         # (B, 1, T, head_dim // 2)
                src = torch.cat([torch.zeros_like(orders[:, :1]), orders[:, :-1] + 1], dim=1)
                rope = self.rope_angles[src].unsqueeze(1)
        x = self._embed(tokens[:, :-1], labels, orders)
        return PriorOutput(self.head(self.ln_f(self._hidden(x, None, rope))), tokens)

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
        pos = self.pos_emb[:, input_pos: input_pos + 1]                                               # (1,1,dim)
        if self.target_pos_emb is not None:
            pos = pos + self.target_pos_emb[:, input_pos: input_pos + 1]   # raster: it predicts token input_pos
        x = self.drop(self.tok_emb(token.reshape(-1, 1)) + pos)                                        # (B,1,dim)
        return self._last_logits(x, input_pos)

    def sample_tokens(self, labels: torch.Tensor, use_cfg: bool, cfg_scale: float, cfg_schedule: str,
                      sample_kw: dict, cfg_power: float = CFG_POWER, use_cache: bool = True,
                      cache_dtype: torch.dtype | None = None) -> torch.Tensor:
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
            guided = apply_cfg(logits, guidance_at(cfg_scale, cfg_schedule, i, n, cfg_power)) if use_cfg else logits
            tok = sample_logits(guided, **sample_kw)                                              # (B,)
            out[:, i] = tok
            if i == n - 1:
                break
            if use_cache:
                logits = self.decode_one_token(tok.repeat(2) if use_cfg else tok, i + 1)
            else:
                prefix = out[:, : i + 1]
                logits = self.logits_for_prefix(prefix.repeat(2, 1) if use_cfg else prefix, labels)
        return out
