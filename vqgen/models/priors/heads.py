"""A prior's token embedding and output head: one vocabulary x width table each, or factorised for large
vocabularies (``--token_factors K``).

Factorised: a token id's bits are K sub-tokens, most significant first. The input sums K small tables; the head
predicts the sub-tokens in turn, sub-token j from the backbone's hidden state and the embeddings of sub-tokens < j
through ``--factor_layers`` small causal blocks. The joint NLL is the sum of the factors' cross-entropies; sub-token
values that would make an id >= vocab (a vocabulary that is not a power of two) get no probability.
Adapted from: Open-MAGVIT2 ``src/Open_MAGVIT2/modules/transformer/gpt.py`` (summed sub-token embeddings, the
intra-token blocks over [hidden, sub-token embedding], one head per factor).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...config import PriorConfig
from .blocks import Block, make_norm

Pick = Callable[[torch.Tensor], torch.Tensor]  # logits (rows, n) -> drawn ids (B,), rows = B or 2B (cond ‖ null)


def token_embedding(cfg: PriorConfig) -> nn.Module:
    """``ids (...) -> (..., dim)``: an ``nn.Embedding`` or, with ``token_factors > 1``, a :class:`FactorEmbedding`."""
    if cfg.token_factors > 1:
        return FactorEmbedding(cfg.factor_bits, cfg.attn_layers_dim)
    return nn.Embedding(cfg.vocab_size, cfg.attn_layers_dim)


def token_head(cfg: PriorConfig) -> nn.Module:
    """:class:`LinearHead` or, with ``token_factors > 1``, :class:`FactorHead` (the same three methods)."""
    return FactorHead(cfg) if cfg.token_factors > 1 else LinearHead(cfg.attn_layers_dim, cfg.vocab_size)


def split_ids(ids: torch.Tensor, bits: tuple[int, ...]) -> torch.Tensor:
    """``ids (...)`` >= 0 -> sub-token ids ``(..., K)``, most significant first."""
    shifts = [sum(bits[j + 1:]) for j in range(len(bits))]
    return torch.stack([(ids >> s) & ((1 << b) - 1) for b, s in zip(bits, shifts)], dim=-1)


class LinearHead(nn.Linear):
    """The plain head, ``(..., dim) -> logits (..., vocab)``: an ``nn.Linear`` (its weight is ``head.weight``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``h (B, T, dim)`` -> logits ``(B, T, vocab)`` (``tokens``, the targets, are not needed)."""
        return super().forward(h)

    def next_state(self, h: torch.Tensor) -> torch.Tensor:
        """What :meth:`draw` reads for the next token, from its hidden state ``h (rows, dim)``: its logits."""
        return super().forward(h)

    def draw(self, state: torch.Tensor, pick: Pick) -> torch.Tensor:
        return pick(state)


class FactorEmbedding(nn.Module):
    """``ids (...) -> (..., dim)``: the sum of one small table per sub-token."""

    def __init__(self, bits: tuple[int, ...], dim: int):
        super().__init__()
        self.bits = tuple(bits)
        self.tables = nn.ModuleList(nn.Embedding(1 << b, dim) for b in self.bits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        subs = split_ids(ids, self.bits)                                    # (..., K)
        return sum(t(subs[..., j]) for j, t in enumerate(self.tables))


class FactorHead(nn.Module):
    """Sub-token j's logits ``(..., 2^bits_j)`` from the hidden state and sub-tokens < j (teacher-forced in
    :meth:`forward`, drawn in turn in :meth:`draw`)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        d, self.bits, self.vocab_size = cfg.attn_layers_dim, cfg.factor_bits, cfg.vocab_size
        self.pos = nn.Parameter(torch.randn(len(self.bits), d) * 0.02)     # which sub-token a position predicts
        self.sub_emb = nn.ModuleList(nn.Embedding(1 << b, d) for b in self.bits[:-1])  # sub-tokens fed back
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.factor_layers))
        self.norm = make_norm(cfg.prior_norm, d)
        self.heads = nn.ModuleList(nn.Linear(d, 1 << b, bias=False) for b in self.bits)
        self.partial = cfg.vocab_size < 1 << sum(self.bits)                # some sub-token values are not ids

    def _run(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq (N, n, dim)`` = [hidden, sub-token embeddings < n-1] -> normed outputs ``(N, n, dim)``."""
        x = seq + self.pos[: seq.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _mask(self, logits: torch.Tensor, j: int, high: torch.Tensor | None) -> torch.Tensor:
        """No probability for sub-token j's values that make an id >= vocab, given ``high (...)``, the value of the
        sub-tokens before it."""
        if not self.partial:
            return logits
        limit = (self.vocab_size - 1) >> sum(self.bits[j + 1:])           # the largest valid value of the prefix
        if high is not None:
            limit = limit - (high << self.bits[j])                          # (...)
        values = torch.arange(logits.shape[-1], device=logits.device)
        # the dtype's lowest finite value, not -inf: guidance subtracts two masked logits (-inf - -inf = nan)
        return logits.masked_fill(values > torch.as_tensor(limit, device=logits.device)[..., None],
                                  torch.finfo(logits.dtype).min)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``h (B, T, dim)``, ``tokens (B, T)`` (the targets; negative = unscored) -> K logits ``(B, T, 2^bits_j)``."""
        b, t, d = h.shape
        subs = split_ids(tokens.clamp_min(0), self.bits)                    # (B, T, K)
        seq = torch.stack([h, *(e(subs[..., j]).to(h.dtype) for j, e in enumerate(self.sub_emb))], 2)  # (B,T,K,dim)
        x = self._run(seq.reshape(b * t, len(self.bits), d)).view(b, t, len(self.bits), d)
        out, high = [], None
        for j, head in enumerate(self.heads):
            out.append(self._mask(head(x[:, :, j]), j, high))
            high = subs[..., j] if high is None else (high << self.bits[j]) | subs[..., j]
        return tuple(out)

    def next_state(self, h: torch.Tensor) -> torch.Tensor:
        """What :meth:`draw` reads for the next token: its hidden state ``h (rows, dim)`` itself."""
        return h

    def draw(self, state: torch.Tensor, pick: Pick) -> torch.Tensor:
        """``state (rows, dim)`` -> token ids ``(B,)``: each sub-token drawn by ``pick`` from its logits, then fed
        back (repeated to the rows: ``rows = 2B`` for cond ‖ null under classifier-free guidance)."""
        rows = state.shape[0]
        seq, high = state[:, None], None                                    # (rows, 1, dim)
        for j, head in enumerate(self.heads):
            logits = head(self._run(seq)[:, -1])                            # (rows, 2^bits_j); n <= K: no cache
            rep = None if high is None else high.repeat(rows // high.shape[0])
            sub = pick(self._mask(logits, j, rep))                          # (B,)
            high = sub if high is None else (high << self.bits[j]) | sub
            if j + 1 < len(self.heads):
                fed = self.sub_emb[j](sub.repeat(rows // sub.shape[0]))     # (rows, dim)
                seq = torch.cat([seq, fed[:, None].to(seq.dtype)], dim=1)
        return high
