"""Lookup-free quantization (LFQ): each of D = ``bits`` channels becomes its sign and the index is the bit pattern
(K = 2^bits); an entropy penalty (per-sample minus codebook entropy) spreads code use, a commitment term keeps z
near +-1. Adapted from: Open-MAGVIT2 ``taming/modules/vqvae/lookup_free_quantize.py``, MAGVIT-v2 (Yu et al. 2023).

Code distribution ``softmax(2 z.c / temperature)``, c in {-1, 1}^D: it factorises into independent bits (exact
per-sample entropy, O(N D)); the codebook entropy is summed over groups of <= ``entropy_group_bits`` bits
(Open-MAGVIT2's 2 x 9 at 2^18; exact for one group, an upper bound otherwise): memory N x 2^group, never N x K.
Own code, not vector-quantize-pytorch's LFQ: it builds (N, K) distances (infeasible at 2^18), disables autocast
for CUDA only, caches "is distributed" once, and adds einx, loguru and torch-einops-utils.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...errors import ConfigError
from .implicit import MAX_CODEBOOK, ImplicitQuantizer


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Forward: the mean of ``t`` over ranks (one all_reduce); backward: the local ``t`` carries the gradient of
    the shared value, so after DDP's gradient average the step is that of the whole global batch (what
    ``torch.distributed.nn.all_reduce`` gives, without its second collective in backward)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size() + (t - t.detach())


class LFQ(ImplicitQuantizer):
    """``LFQ(bits, commitment_cost=0.25, entropy_weight=0.1, diversity_gamma=1.0, temperature=0.01,
    entropy_group_bits=9)``: ``code_dim = bits``, ``codebook_size = 2**bits``; codes in {-1, +1}^bits, index =
    sum_d [z_d > 0] 2^d.

    loss = commitment_cost * mse(z, sg(codes)) + entropy_weight * (per-sample entropy - diversity_gamma *
    codebook entropy), in nats. In training the codebook entropy uses the code probabilities averaged over all
    ranks (one all_reduce per forward: every rank must run the same number of training forwards); eval forwards
    use the local batch and no collective.
    """

    def __init__(self, bits: int, commitment_cost: float = 0.25, entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, temperature: float = 0.01, entropy_group_bits: int = 9):
        bits, group = int(bits), int(entropy_group_bits)
        if not 1 <= bits or (1 << bits) > MAX_CODEBOOK:
            raise ConfigError(f"LFQ bits must be in [1, {MAX_CODEBOOK.bit_length() - 1}], got {bits}")
        if not 1 <= group <= 12:
            raise ConfigError(f"LFQ entropy_group_bits must be in [1, 12] (memory N x 2^group), got {group}")
        if temperature <= 0 or min(commitment_cost, entropy_weight, diversity_gamma) < 0:
            raise ConfigError(f"LFQ needs temperature > 0 and non-negative weights, got temperature={temperature}, "
                              f"commitment_cost={commitment_cost}, entropy_weight={entropy_weight}, "
                              f"diversity_gamma={diversity_gamma}")
        super().__init__(1 << bits, bits)
        self.bits, self.temperature = bits, float(temperature)
        self.commitment_cost, self.entropy_weight = float(commitment_cost), float(entropy_weight)
        self.diversity_gamma, self.entropy_group_bits = float(diversity_gamma), group
        n = -(-bits // group)                              # groups, sizes as equal as possible (18 -> 9 + 9)
        self.group_sizes = tuple(bits // n + (i < bits % n) for i in range(n))
        g = max(self.group_sizes)
        self.register_buffer("_shifts", torch.arange(bits).view(1, -1, 1, 1), persistent=False)   # (1, D, 1, 1)
        # (2^g, g) 0/1: bit j of code i; group codes of fewer bits use the top-left corner
        table = (torch.arange(1 << g)[:, None] >> torch.arange(g)) & 1
        self.register_buffer("_bit_table", table.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "LFQ":
        """From a :class:`~vqgen.config.VQVAEConfig` (``--quantizer lfq``)."""
        return cls(cfg.lfq_bits, cfg.commitment_cost, cfg.lfq_entropy_weight, cfg.lfq_diversity_gamma)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, commitment_cost={self.commitment_cost}, entropy_weight={self.entropy_weight}, "
                f"diversity_gamma={self.diversity_gamma}, temperature={self.temperature}, "
                f"group_sizes={list(self.group_sizes)}")

    def _quantize(self, zf: torch.Tensor):
        pos = zf > 0
        codes = pos.float() * 2 - 1
        q_st = codes + (zf - zf.detach())                  # forward: exactly the codes; backward: identity
        idx = (pos.long() << self._shifts).sum(1)          # (B, H, W)
        return codes, q_st, idx

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) long → (B, D, H, W) fp32 in {-1, +1}."""
        return ((indices.long()[:, None] >> self._shifts) & 1).float() * 2 - 1

    def _aux_loss(self, zf: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        loss = self.commitment_cost * F.mse_loss(zf, codes)
        if self.entropy_weight > 0:
            per_sample, codebook = self.entropy_terms(zf)
            loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
        return loss

    def entropy_terms(self, zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-sample entropy, codebook entropy) in nats, fp32 scalars, of ``zf`` (B, D, H, W)."""
        a = zf.permute(0, 2, 3, 1).reshape(-1, self.bits) * (4.0 / self.temperature)  # (N, D) logit of bit = 1
        p = torch.sigmoid(a)
        per_sample = -(p * F.logsigmoid(a) + torch.sigmoid(-a) * F.logsigmoid(-a)).sum(1).mean()
        table, avgs, start = self._bit_table.float(), [], 0
        for g in self.group_sizes:
            logits = a[:, start:start + g] @ table[: 1 << g, :g].t()   # (N, 2^g): log-odds of each group code
            avgs.append(torch.softmax(logits, dim=1).mean(0))
            start += g
        avg = torch.cat(avgs)                              # groups' code distributions, one after the other
        if self.training:
            avg = mean_over_ranks(avg)
        # sum of the groups' entropies; the clamp keeps the gradient finite at codes of probability 0 (entr' = inf)
        codebook = -(avg * torch.log(avg.clamp_min(torch.finfo(torch.float32).tiny))).sum()
        return per_sample, codebook
