"""Reconstruction and codebook metrics shared by training-time validation and ``evaluate.py``.

Images arrive in [-1, 1] and are compared in [0, 1] (data range 1), the convention of PSNR/SSIM tables in
the VQ-VAE literature. SSIM comes from torchmetrics (Gaussian window 11, or the largest odd size the image
allows) rather than a hand-written copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, fp32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1]; ``inf`` where identical."""
    mse = F.mse_loss(to_unit(x), to_unit(y), reduction="none").flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM for images in [-1, 1] (torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, min(x.shape[-2:]) // 2 * 2 - 1)
    return structural_similarity_index_measure(to_unit(x), to_unit(y), data_range=1.0, kernel_size=k)


def code_histogram(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1).long().cpu(), minlength=num_codes)


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((counts > 0).float().mean())


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution: the effective number of codes in use."""
    p = counts.double() / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return float(ent.exp())


def bits_per_token(nats_per_token: float) -> float:
    return nats_per_token / math.log(2)


class ReconstructionMeter:
    """Accumulates reconstruction metrics and code counts over batches; ``compute()`` returns a flat dict."""

    def __init__(self, num_codes: int):
        self.num_codes = num_codes
        self.n = 0
        self.sums = {"l1": 0.0, "mse": 0.0, "psnr": 0.0, "ssim": 0.0}
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    @torch.no_grad()
    def update(self, x: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor) -> None:
        b = x.shape[0]
        xu, ru = to_unit(x), to_unit(recon)
        self.sums["l1"] += float((xu - ru).abs().flatten(1).mean(1).sum())
        self.sums["mse"] += float(((xu - ru) ** 2).flatten(1).mean(1).sum())
        p = psnr(x, recon).clamp(max=100.0)  # identical images: cap inf so the mean stays finite
        self.sums["psnr"] += float(p.sum())
        self.sums["ssim"] += float(ssim(x, recon)) * b
        self.counts += code_histogram(indices, self.num_codes)
        self.n += b

    def compute(self) -> dict[str, float]:
        out = {k: v / max(1, self.n) for k, v in self.sums.items()}
        out["codebook_usage"] = codebook_usage(self.counts)
        out["perplexity"] = perplexity(self.counts)
        return out
