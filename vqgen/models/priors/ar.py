"""The autoregressive prior (``--prior_kind ar``): a decoder-only Transformer over the token grid read in raster
order (input 0: the class token; input i > 0: token i - 1), sampled token by token with a KV cache; ``compile=True``
runs a static cache and compiled decode steps (CUDA graphs on GPU, no host sync per token). ``--order random`` (RAR)
trains on permuted sequences, each input told the position of the token it predicts. Details: docs/NOTES.md.
Adapted from: nanoGPT (model), gpt-fast / LlamaGen ``generate.py`` (``KVCache``, ``prefill``, ``decode_one_token``,
``decode_n_tokens``, CFG as one batch of cond ‖ null rows), RAR ``modeling/rar.py`` (random orders, target-aware
positions).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import CFG_POWER, PriorConfig
from ...errors import ConfigError
from ..prior import Prior, PriorOutput
from ..sampling import apply_cfg, exponential_noise, guidance_at, sample_logits
from .blocks import Block, KVCache, make_norm, rope_2d_table
from .heads import token_embedding, token_head


class ARPrior(Prior):
    compile_backend = "inductor"  # torch.compile's backend for decoding (tests check the graphs with aot_eager)

    @property
    def compiled_decoding(self) -> bool:
        """The compiled step draws from one head's logits: plain heads only (a factorised head decodes eagerly)."""
        return self.config.token_factors == 1

    def __init__(self, config: PriorConfig):
        super().__init__(config)
        d = config.attn_layers_dim
        self.tok_emb = token_embedding(config)                       # one table, or --token_factors small ones
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
        self.head = token_head(config)          # untied (the input table also holds no BOS); or factorised
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.target_pos_emb is not None:
            nn.init.normal_(self.target_pos_emb, std=0.02)
        for name, p in self.named_parameters():               # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.attn_layers_depth))
        self._compiled: dict[tuple, tuple] = {}  # compiled decoding: (first, step) per sampling setting

    # ---- the network ----------------------------------------------------------------------------------------
    def _embed(self, prefix: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
        """``[start(labels)] + prefix`` -> embeddings ``(B, 1 + n, dim)`` with positions ``0..n``, or, with
        ``orders (B, T)`` (the raster index of each token of a permuted ``prefix``), the positions of those tokens."""
        x = self.cls_emb(labels).unsqueeze(1)                       # (B, 1, dim)
        if prefix.shape[1]:
            x = torch.cat([x, self.tok_emb(prefix)], dim=1)         # (B, 1 + n, dim)
        t = x.shape[1]
        if orders is None:
            pos = self._raster_pos(slice(0, t))
        else:                                                       # input i holds token orders[i-1], predicts orders[i]
            src = torch.cat([torch.zeros_like(orders[:, :1]), orders[:, : t - 1] + 1], dim=1)   # (B, t)
            # F.embedding, not pos_emb[0][src]: indexing's backward sums repeated rows in a varying order on CPU
            pos = F.embedding(src, self.pos_emb[0]) + F.embedding(orders[:, :t], self.target_pos_emb[0])  # (B, t, dim)
        return self.drop(x + pos)

    def _raster_pos(self, index: slice | torch.Tensor) -> torch.Tensor:
        """Position embeddings ``(1, t, dim)`` of raster-order inputs ``index`` (input i holds token i - 1 and, with
        ``--order random``'s target-aware table, predicts token i)."""
        pos = self.pos_emb[:, index]
        return pos if self.target_pos_emb is None else pos + self.target_pos_emb[:, index]

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

    def _rope(self, start: int | torch.Tensor | None, t: int) -> torch.Tensor | None:
        """Rotation angles of input positions ``[start, start + t)`` (``start=None``: from 0; a tensor: those
        positions), or None."""
        if self.rope_angles is None:
            return None
        if isinstance(start, torch.Tensor):
            return self.rope_angles[start]
        s = start or 0
        return self.rope_angles[s: s + t]

    def _hidden(self, x: torch.Tensor, start: int | torch.Tensor | None, rope: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks over ``x (B, t, dim)`` at input positions from ``start`` (None: no cache) -> (B, t, dim);
        ``rope``: the rotation angles when they are not those of positions ``start..`` (permuted inputs)."""
        rope = self._rope(start, x.shape[1]) if rope is None else rope
        for block in self.blocks:
            x = block(x, start, rope)
        return x

    def _last_logits(self, x: torch.Tensor, start: int | torch.Tensor | None) -> torch.Tensor:
        """Logits ``(B, vocab)`` of the last of ``x``'s positions (a factorised head: its hidden state, (B, dim))."""
        return self.head.next_state(self.ln_f(self._hidden(x, start)[:, -1]))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                progress: float | None = None) -> PriorOutput:
        """``tokens (B, T)`` in raster order (or (B, h, w)) -> next-token logits ``(B, T, vocab)`` (a factorised
        head: per sub-token) and the tokens they predict: ``tokens``, or in training with ``--order random`` the rows permuted at ``progress``."""
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
        return PriorOutput(self.head(self.ln_f(self._hidden(x, None, rope)), tokens), tokens)

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
        pos = self._raster_pos(slice(input_pos, input_pos + 1))                                       # (1,1,dim)
        x = self.drop(self.tok_emb(token.reshape(-1, 1)) + pos)                                        # (B,1,dim)
        return self._last_logits(x, input_pos)

    def sample_tokens(self, labels: torch.Tensor, use_cfg: bool, cfg_scale: float, cfg_schedule: str,
                      sample_kw: dict, cfg_power: float = CFG_POWER, use_cache: bool = True,
                      cache_dtype: torch.dtype | None = None, compile: bool = False) -> torch.Tensor:
        """Raster-order decoding of ``(B, T)`` tokens. ``use_cache=False`` recomputes the whole prefix at every
        step (the reference path), ``compile=True`` runs the compiled static-cache step (:meth:`_sample_compiled`):
        the same random draws in the same order, so the same tokens (up to float rounding)."""
        n = self.config.seq_len
        rows = labels.shape[0]
        b = rows // 2 if use_cfg else rows
        if use_cache or compile:
            self.setup_caches(rows, n, cache_dtype or self.pos_emb.dtype, labels.device)
        if compile:
            return self._sample_compiled(labels, use_cfg, cfg_scale, cfg_schedule, cfg_power, sample_kw)
        out = torch.empty(b, n, dtype=torch.long, device=labels.device)
        empty = out[:, :0].repeat(2, 1) if use_cfg else out[:, :0]
        logits = self.prefill(empty, labels) if use_cache else self.logits_for_prefix(empty, labels)
        for i in range(n):
            g = guidance_at(cfg_scale, cfg_schedule, i, n, cfg_power)
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

    # ---- compiled decoding ----------------------------------------------------------------------------------
    def _sample_compiled(self, labels: torch.Tensor, use_cfg: bool, cfg_scale: float, cfg_schedule: str,
                         cfg_power: float, sample_kw: dict) -> torch.Tensor:
        """Decoding with the compiled functions of :meth:`_compiled_fns`. Per token, outside the graphs: the noise
        of the draw from the caller's generator (a generator cannot enter a graph) and views of precomputed
        position and guidance tensors; nothing waits for the device."""
        n, device = self.config.seq_len, labels.device
        b = labels.shape[0] // 2 if use_cfg else labels.shape[0]
        kw = dict(sample_kw)
        generator = kw.pop("generator", None)
        first, step = self._compiled_fns(use_cfg, device, **kw)
        for block in self.blocks:  # written in place by the graphs: fixed addresses (CUDA graphs), no guard on them
            for cache in (block.attn.kv_cache.k_cache, block.attn.kv_cache.v_cache):
                torch._dynamo.mark_static_address(cache, guard=False)
        scales = torch.tensor([guidance_at(cfg_scale, cfg_schedule, i, n, cfg_power) for i in range(n)],
                              device=device)                                                               # (n,)
        positions = torch.arange(n, device=device)                                                           # (n,)

        def noise():  # what sample_logits draws eagerly, in the same order: the same tokens
            return None if kw["temperature"] == 0 else \
                exponential_noise((b, self.config.vocab_size), device, generator)

        out = torch.empty(b, n, dtype=torch.long, device=device)
        mark_step = torch.compiler.cudagraph_mark_step_begin if device.type == "cuda" else (lambda: None)
        mark_step()
        out[:, 0] = first(labels, scales[0], noise())
        for i in range(1, n):
            mark_step()  # CUDA graphs: the last step's outputs are consumed (copied into ``out``)
            out[:, i] = step(out[:, i - 1], positions[i: i + 1], scales[i], noise())
        return out

    def _compiled_fns(self, use_cfg: bool, device: torch.device, temperature: float, top_k: int | None,
                      top_p: float | None):
        """(first, step) for one sampling setting, compiled on first use (then once per batch and dtype):
        ``first(labels (R,), scale (), noise)`` feeds the start tokens at position 0 and draws token 0;
        ``step(tokens (B,), pos (1,), scale (), noise)`` feeds token ``pos - 1`` at input position ``pos`` and draws
        token ``pos``. ``R = 2B`` rows (cond ‖ null) with CFG. The setting is closed over: constants of the graph."""
        key = (use_cfg, device.type, temperature, top_k, top_p)
        if key not in self._compiled:
            def draw(logits: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
                guided = apply_cfg(logits, scale) if use_cfg else logits                      # (B, vocab)
                return sample_logits(guided, temperature, top_k, top_p, noise=noise)         # (B,)

            def first(labels, scale, noise):
                x = self.drop(self.cls_emb(labels).unsqueeze(1) + self._raster_pos(slice(0, 1)))  # (R, 1, dim)
                return draw(self._last_logits(x, self._zero(labels.device)), scale, noise)

            def step(tokens, pos, scale, noise):
                tok = tokens.repeat(2) if use_cfg else tokens                                 # (R,)
                x = self.drop(self.tok_emb(tok.unsqueeze(1)) + self._raster_pos(pos))         # (R, 1, dim)
                return draw(self._last_logits(x, pos), scale, noise)

            # CUDA graphs replay the step without a launch per kernel; on CPU, Inductor's fused kernels.
            backend = self.compile_backend
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            self._compiled[key] = (torch.compile(first, backend=backend, fullgraph=True, dynamic=False),
                                   torch.compile(step, backend=backend, mode=mode, fullgraph=True, dynamic=False))
        return self._compiled[key]

    @staticmethod
    def _zero(device: torch.device) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.long, device=device)

