"""The masked-token prior (``--prior_kind maskgit``): a bidirectional Transformer that predicts masked tokens of the
grid, decoded in a few parallel steps instead of one step per token.

Training masks ``ceil(cos(pi/2 * r) * T)`` random positions per sequence (r ~ U[0, 1): the cosine schedule) and
scores the masked ones only. Decoding starts from an all-[MASK] grid; each step samples every masked position, keeps
the most confident and re-masks the rest (as many as the cosine schedule says), with Gumbel noise on the
confidence that decays to 0 over the steps; a token once kept is never changed. Input position 0 holds the class
embedding (the null class: unconditional and classifier-free guidance), as in the AR prior.
Adapted from: MaskGIT ``maskgit/libml/parallel_decode.py`` via open-muse ``muse/modeling_transformer.py``
(``generate2``, ``mask_by_random_topk``) and 1d-tokenizer ``modeling/maskgit.py`` (``masking_input_tokens``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import CFG_POWER, MASKGIT_CHOICE_TEMPERATURE, MASKGIT_DECODE_STEPS, PriorConfig
from ...errors import ConfigError
from ..prior import IGNORE, Prior, PriorOutput
from ..sampling import apply_cfg, guidance_at, top_k_filter, top_p_filter
from .blocks import Block, make_norm, rope_2d_table

EVAL_MASK_SEED = 0   # outside training, the masks of a forward pass come from this seed: a repeatable held-out score


class MaskGITPrior(Prior):
    exact_likelihood = False   # the masked-token cross-entropy is not the sequence's bits/token
    nll_name = "masked_bits_per_token"

    def __init__(self, config: PriorConfig):
        super().__init__(config)
        d = config.attn_layers_dim
        self.tok_emb = nn.Embedding(config.vocab_size + 1, d)             # last row: [MASK]
        self.cls_emb = nn.Embedding(config.num_classes + 1, d)            # last row: null class
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + config.seq_len, d))  # 0: class token, 1 + j: token j
        self.drop = nn.Dropout(config.attn_dropout)
        self.blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.attn_layers_depth))
        self.ln_f = make_norm(config.prior_norm, d)
        if config.rope:  # (1 + seq_len, head_dim // 2) angles of the class token and the grid; not saved
            self.register_buffer("rope_angles", rope_2d_table(config.latent_h, config.latent_w, config.head_dim),
                                 persistent=False)
        else:
            self.rope_angles = None
        self.head = nn.Linear(d, config.vocab_size, bias=False)          # no logit for [MASK]
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        for name, p in self.named_parameters():                          # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.attn_layers_depth))

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    # ---- the network ----------------------------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``tokens (B, T)`` with [MASK] where unknown, resolved ``labels (B,)`` -> logits ``(B, T, vocab)``."""
        x = torch.cat([self.cls_emb(labels).unsqueeze(1), self.tok_emb(tokens)], dim=1)   # (B, 1 + T, dim)
        x = self.drop(x + self.pos_emb)
        for block in self.blocks:
            x = block(x, None, self.rope_angles)
        return self.head(self.ln_f(x[:, 1:]))

    def mask_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool: ``ceil(cos(pi/2 * r) * T)`` random positions of each row (r ~ U[0, 1)). In training from
        torch's RNG (saved in checkpoints: exact resume), else from a fixed seed (the same score every time)."""
        g = None if self.training else torch.Generator(device=device).manual_seed(EVAL_MASK_SEED)
        n = self.config.seq_len
        r = torch.rand(batch, device=device, generator=g)                                  # (B,)
        count = torch.ceil(torch.cos(0.5 * math.pi * r) * n).clamp(1, n)                  # (B,) tokens masked
        perm = torch.rand(batch, n, device=device, generator=g).argsort(dim=1)            # (B, T) random permutation
        return perm < count[:, None]       # the positions holding the first `count` ranks: a random subset

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                progress: float | None = None) -> PriorOutput:
        """``tokens (B, T)`` (or (B, h, w)) -> logits ``(B, T, vocab)`` of a randomly masked copy and targets: the
        tokens at the masked positions, IGNORE elsewhere. ``progress`` is not used (no schedule over the run)."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        b, t = tokens.shape
        if t != self.config.seq_len:
            raise ConfigError(f"a MaskGIT prior reads whole grids of {self.config.seq_len} tokens, got {t}")
        labels = self.training_labels(labels, b, tokens.device)
        masked = self.mask_positions(b, tokens.device)                                    # (B, T)
        logits = self.logits(tokens.masked_fill(masked, self.mask_id), labels)
        return PriorOutput(logits, tokens.masked_fill(~masked, IGNORE))

    # ---- sampling -------------------------------------------------------------------------------------------
    def masked_after(self, step: int, steps: int, unknown: int) -> int:
        """Tokens still masked after decoding step ``step`` of ``steps`` (``unknown`` masked before it): the cosine
        schedule's ``floor(T * cos(pi/2 * (step + 1) / steps))``, at least 1 fewer than before and at least 1 until
        the last step, which leaves none."""
        if step == steps - 1:
            return 0
        target = math.floor(self.config.seq_len * math.cos(0.5 * math.pi * (step + 1) / steps))
        return max(1, min(unknown - 1, target))

    def sample_tokens(self, labels: torch.Tensor, use_cfg: bool, cfg_scale: float, cfg_schedule: str,
                      sample_kw: dict, cfg_power: float = CFG_POWER, decode_steps: int | None = None,
                      choice_temperature: float | None = None, cache_dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
        """Parallel decoding of ``(B, T)`` tokens in ``decode_steps`` steps (default :data:`MASKGIT_DECODE_STEPS`);
        the guidance schedule runs over the steps. ``cache_dtype`` is not used (no KV cache)."""
        steps = decode_steps or MASKGIT_DECODE_STEPS
        noise = MASKGIT_CHOICE_TEMPERATURE if choice_temperature is None else choice_temperature
        n, g = self.config.seq_len, sample_kw.get("generator")
        b = labels.shape[0] // 2 if use_cfg else labels.shape[0]
        ids = torch.full((b, n), self.mask_id, dtype=torch.long, device=labels.device)
        unknown_count = n
        for step in range(steps):
            logits = self.logits(ids.repeat(2, 1) if use_cfg else ids, labels)             # (rows, T, vocab)
            if use_cfg:
                logits = apply_cfg(logits, guidance_at(cfg_scale, cfg_schedule, step, steps, cfg_power))
            drawn, logp = _draw(logits.reshape(b * n, -1), **sample_kw)                    # (B*T,) each
            unknown = ids == self.mask_id                                                   # (B, T)
            ids = torch.where(unknown, drawn.view(b, n), ids)   # a kept token never changes
            keep_masked = self.masked_after(step, steps, unknown_count)
            if keep_masked == 0:
                break
            # re-mask the least confident of this step's new tokens; known tokens have infinite confidence
            ratio = (step + 1) / steps
            confidence = logp.view(b, n) + noise * (1.0 - ratio) * _gumbel(b, n, ids.device, g)
            confidence = confidence.masked_fill(~unknown, float("inf"))
            remask = confidence.argsort(dim=1)[:, :keep_masked]                             # (B, keep_masked)
            ids = ids.scatter(1, remask, self.mask_id)
            unknown_count = keep_masked
        return ids


def _draw(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits (N, vocab)`` -> tokens ``(N,)`` drawn as :func:`~vqgen.models.sampling.sample_logits` draws them and
    their log-probability under that distribution (MaskGIT's confidence; greedy: under the plain softmax)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        return tok, F.log_softmax(logits, dim=-1).gather(1, tok[:, None]).squeeze(1)
    logp = F.log_softmax(top_p_filter(top_k_filter(logits / temperature, top_k), top_p), dim=-1)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def _gumbel(b: int, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(b, n, device=device, generator=generator).clamp_(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp_(min=1e-20))
