"""What FSQ and LFQ share: a codebook that is a fixed grid (no learned codes, no EMA state, nothing to restart).

A subclass implements ``_quantize(zf) -> (codes, straight-through codes, indices)``, ``embed`` and ``_aux_loss``;
this class runs them in fp32 with autocast off (the rounding / sign and the loss stay fp32 in a bf16 model),
counts codes without host syncs and keeps ``usage`` (K,) long: assignments of this rank's training forwards since
:meth:`Quantizer.reset_usage` (no collective; long, so ``model.bfloat16()`` cannot round it). Nothing is persistent: the
state_dict is empty, the config rebuilds the module exactly.
"""

from __future__ import annotations

import torch

from .base import Quantizer, QuantizerOutput

MAX_CODEBOOK = 1 << 20  # every forward builds (K,) counts; larger implicit codebooks need a sparse count


class ImplicitQuantizer(Quantizer):
    """Base of :class:`~.fsq.FSQ` and :class:`~.lfq.LFQ`: ``z`` (B, D, H, W) → :class:`QuantizerOutput`."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.codebook_size, self.code_dim = int(codebook_size), int(code_dim)
        self.register_buffer("usage", torch.zeros(self.codebook_size, dtype=torch.long), persistent=False)

    # ---- what a subclass provides ------------------------------------------------------------------------------
    def _quantize(self, zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 (B, D, H, W) → (codes fp32, codes straight-through to ``zf``, indices (B, H, W) long)."""
        raise NotImplementedError

    def _aux_loss(self, zf: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Scalar fp32, already weighted (``codes`` carry no gradient)."""
        return zf.new_zeros(())

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) long → (B, D, H, W) fp32 codes: the decoder input for given codes."""
        raise NotImplementedError

    # ---- the interface ------------------------------------------------------------------------------------------
    def _check(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"quantizer expects (B, {self.code_dim}, H, W), got {tuple(z.shape)}")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            codes, q_st, idx = self._quantize(zf)
            loss = self._aux_loss(zf, codes)
            counts = self.count(idx)
            if self.training:
                self.usage.add_(counts)
            perplexity = self.perplexity_from_counts(counts)
        return QuantizerOutput(q_st.to(z.dtype), loss, idx, perplexity, counts)

    @torch.no_grad()
    def indices_of(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) → (B, H, W) long code indices. No state change."""
        self._check(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z.detach().float())[2]

    def count(self, idx: torch.Tensor) -> torch.Tensor:
        """(K,) long assignments per code; index_add_ rather than bincount, which syncs to size its output."""
        flat = idx.reshape(-1)
        return torch.zeros(self.codebook_size, dtype=torch.long, device=idx.device).index_add_(
            0, flat, torch.ones_like(flat))
