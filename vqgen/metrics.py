"""Reconstruction, codebook and sample-quality metrics shared by training-time validation and ``evaluate.py``.

Images arrive in [-1, 1] and are compared in [0, 1] (data range 1), the convention of PSNR/SSIM tables in
the VQ-VAE literature. SSIM comes from torchmetrics (Gaussian window 11, or the largest odd size the image
allows) rather than a hand-written copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # ReconstructionMeter averages min(PSNR, 100 dB): identical images would give inf


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
        p = psnr(x, recon).clamp(max=PSNR_CAP_DB)  # identical images: cap inf so the mean stays finite
        self.sums["psnr"] += float(p.sum())
        self.sums["ssim"] += float(ssim(x, recon)) * b
        self.counts += code_histogram(indices, self.num_codes)
        self.n += b

    def compute(self) -> dict[str, float]:
        out = {k: v / max(1, self.n) for k, v in self.sums.items()}
        out["codebook_usage"] = codebook_usage(self.counts)
        out["perplexity"] = perplexity(self.counts)
        return out


# ------------------------------------------------------------------------------------------------------------
# Sample-quality metrics in a feature space (FID / IS / precision-recall / classifier statistics).
#
# The feature network runs once per image (:mod:`vqgen.eval.features`); its outputs are fed to torchmetrics'
# FrechetInceptionDistance / InceptionScore through :class:`PrecomputedFeatures`, a pass-through "feature
# extractor", so torchmetrics does the statistics (running mean/covariance, matrix square root, IS splits)
# while one forward pass serves FID, IS and precision/recall alike.



class PrecomputedFeatures(torch.nn.Module):
    """Identity "feature extractor" for torchmetrics: ``update(features (N, D), ...)`` instead of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets ``(N, D)``, ``(M, D)`` (N, M >= 2) via torchmetrics (float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), reset_real_features=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return max(0.0, float(fid.compute()))  # the matrix sqrt can leave -1e-9 for identical sets


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) Inception Score of class logits ``(N, C)`` via torchmetrics (``exp E[KL(p(y|x) || p(y))]``).

    torchmetrics shuffles with the global RNG before splitting; it is seeded here so the score is reproducible.
    """
    import warnings

    from torchmetrics.image.inception import InceptionScore

    state = torch.random.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saves all features in a buffer" (intended); std of 1 split is nan
            metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]),
                                    splits=max(1, min(splits, len(logits))))
            metric.update(logits.double())
            torch.manual_seed(seed)
            mean, std = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std) if torch.isfinite(std) else 0.0


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of ``x (N, D)`` to its k-th nearest other row: ``(N,)``."""
    k = min(k, x.shape[0] - 1)
    out = []
    for s in range(0, x.shape[0], chunk):
        d = torch.cdist(x[s:s + chunk], x)                        # (c, N); the zero self-distance is at rank 0
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside_any_ball(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Bool ``(M,)``: query row j lies within radii[i] of some centers[i]."""
    out = []
    for s in range(0, query.shape[0], chunk):
        d = torch.cdist(query[s:s + chunk], centers)              # (c, N)
        out.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al., NeurIPS 2019) of feature sets ``(N, D)``/``(M, D)``.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour in the same set. precision = fraction of fake points inside the real manifold (fidelity);
    recall = fraction of real points inside the fake manifold (coverage of the real distribution).
    """
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("precision/recall need at least 2 real and 2 fake samples")
    real, fake = real.double(), fake.double()
    precision = _inside_any_ball(fake, real, _kth_nn_radius(real, k)).double().mean()
    recall = _inside_any_ball(real, fake, _kth_nn_radius(fake, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def classifier_stats(logits: torch.Tensor, num_classes: int, threshold: float = 0.9,
                     labels: torch.Tensor | None = None) -> dict:
    """What a dataset classifier thinks of generated samples ``logits (N, C)``.

    confident_fraction: share of samples with max softmax >= ``threshold``; class_coverage: share of the
    ``num_classes`` classes predicted at least once; class_counts: predictions per class; mean_confidence.
    With ``labels`` (the classes a conditional prior was asked for), label_accuracy: share predicted as asked.
    """
    probs = logits.double().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    counts = torch.bincount(pred, minlength=num_classes)[:num_classes]
    out = {"confident_fraction": float((conf >= threshold).double().mean()),
           "confidence_threshold": threshold,
           "mean_confidence": float(conf.mean()),
           "class_coverage": float((counts > 0).double().mean()),
           "class_counts": [int(c) for c in counts]}
    if labels is not None:
        keep = labels >= 0
        if bool(keep.any()):
            out["label_accuracy"] = float((pred[keep] == labels[keep].to(pred.device)).double().mean())
    return out
