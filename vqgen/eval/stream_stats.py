"""Sample-quality statistics accumulated batch by batch, in memory that does not grow with the number of images.

A :class:`FeatureSet` keeps, for one set of images, the running sums of FID (float64; the distance itself is
torchmetrics' ``_compute_fid``), the per-split sums of the Inception Score (torchmetrics' formula, without keeping
every logit), the features of the first ``pr_keep`` images for k-NN precision/recall, and classifier statistics.
A class of our own because one set is compared with several others (rFID, gFID, the reference) and reduced across
processes in one all-reduce (:meth:`FeatureSet.reduce`). What each statistic holds: docs/NOTES.md.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class FeatureSet:
    def __init__(self, total: int, is_splits: int = 10, pr_keep: int = 10000, num_classes: int = 0,
                 threshold: float = 0.9, world_size: int = 1):
        self.total, self.splits = max(1, int(total)), max(1, min(int(is_splits), int(total) or 1))
        self.pr_keep = max(2, int(pr_keep) // max(1, world_size))
        self.num_classes, self.threshold = int(num_classes), float(threshold)
        self.n = 0
        self.sum = self.outer = None               # (D,), (D, D) float64
        self.p_sum = None                          # (splits, C) float64: sum of p(y|x)
        self.plogp = torch.zeros(self.splits, dtype=torch.float64)
        self.count = torch.zeros(self.splits, dtype=torch.float64)
        self.kept: list[torch.Tensor] = []
        self.n_kept = 0
        self.cls = torch.zeros(4 + max(1, self.num_classes), dtype=torch.float64)  # conf>=t, conf sum, hits, asked

    def update(self, feats: torch.Tensor, logits: torch.Tensor | None = None, index: torch.Tensor | None = None,
               asked: torch.Tensor | None = None, class_logits: torch.Tensor | None = None) -> None:
        """``feats (B, D)``; ``logits (B, C)`` for IS; ``index (B,)`` global image indices (IS split);
        ``class_logits (B, K)`` of the dataset classifier and ``asked (B,)`` the requested labels, if any."""
        f = feats.detach().double().cpu()
        if self.sum is None:
            self.sum, self.outer = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(
                f.shape[1], f.shape[1], dtype=torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        if self.n_kept < self.pr_keep:
            take = f[: self.pr_keep - self.n_kept].float()
            self.kept.append(take)
            self.n_kept += len(take)
        if index is None:
            index = torch.arange(self.n, self.n + len(f))
        self.n += len(f)
        if logits is not None:
            self._update_is(logits.detach().double().cpu(), index.cpu())
        if class_logits is not None and self.num_classes:
            self._update_cls(class_logits.detach().double().cpu(), asked)

    def _update_is(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        if self.p_sum is None:
            self.p_sum = torch.zeros(self.splits, logits.shape[1], dtype=torch.float64)
        p, logp = logits.softmax(1), logits.log_softmax(1)
        split = (index * self.splits // self.total).clamp_(max=self.splits - 1)
        self.p_sum.index_add_(0, split, p)
        self.plogp.index_add_(0, split, (p * logp).sum(1))
        self.count.index_add_(0, split, torch.ones(len(index), dtype=torch.float64))

    def _update_cls(self, logits: torch.Tensor, asked: torch.Tensor | None) -> None:
        conf, pred = logits.softmax(1).max(1)
        self.cls[0] += float((conf >= self.threshold).sum())
        self.cls[1] += float(conf.sum())
        if asked is not None:
            keep = asked.cpu() >= 0
            self.cls[2] += float((pred[keep] == asked.cpu()[keep]).sum())
            self.cls[3] += float(keep.sum())
        self.cls[4:] += torch.bincount(pred, minlength=self.num_classes)[: self.num_classes].double()

    # -- across processes
    def reduce(self) -> None:
        """Sum the statistics over processes and gather the kept features (no-op without a process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = [torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.reshape(-1),
                self.plogp, self.count, self.cls] + ([self.p_sum.reshape(-1)] if self.p_sum is not None else [])
        sizes = [t.numel() for t in flat]
        parts = all_reduce_cpu(torch.cat(flat)).split(sizes)
        self.n = int(parts[0].item())
        self.sum, self.outer = parts[1].clone(), parts[2].reshape(self.outer.shape).clone()
        self.plogp, self.count, self.cls = parts[3].clone(), parts[4].clone(), parts[5].clone()
        if self.p_sum is not None:
            self.p_sum = parts[6].reshape(self.p_sum.shape).clone()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.features())
        self.kept, self.n_kept = [torch.cat(gathered)], sum(len(g) for g in gathered)

    # -- results
    def features(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.zeros(0, 0)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    def inception_score(self) -> tuple[float, float]:
        ok = self.count > 0
        m = self.p_sum[ok] / self.count[ok, None]
        ent_m = (m * m.clamp_min(1e-30).log()).sum(1)
        scores = (self.plogp[ok] / self.count[ok] - ent_m).exp()
        std = float(scores.std()) if len(scores) > 1 else 0.0
        return float(scores.mean()), std

    def classifier_stats(self, with_labels: bool) -> dict:
        counts = self.cls[4:4 + self.num_classes]
        out = {"confident_fraction": float(self.cls[0] / self.n), "confidence_threshold": self.threshold,
               "mean_confidence": float(self.cls[1] / self.n), "class_coverage": float((counts > 0).double().mean()),
               "class_counts": [int(c) for c in counts]}
        if with_labels and self.cls[3] > 0:
            out["label_accuracy"] = float(self.cls[2] / self.cls[3])
        return out


def collective_device() -> torch.device:
    """Where a tensor must be for a collective: the current GPU under NCCL (it reduces CUDA tensors only), else the
    CPU (gloo)."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_cpu(t: torch.Tensor) -> torch.Tensor:
    """Sum of a CPU tensor over all processes, returned on the CPU (float64 sums reduce exactly on NCCL and gloo)."""
    buf = t.to(collective_device())
    dist.all_reduce(buf)
    return buf.cpu()


def frechet(a: FeatureSet, b: FeatureSet) -> float:
    """FID between two accumulated sets (each >= 2 images)."""
    from torchmetrics.image.fid import _compute_fid
    (m1, s1), (m2, s2) = a.mean_cov(), b.mean_cov()
    return max(0.0, float(_compute_fid(m1, s1, m2, s2)))


def quality(real: FeatureSet, fake: FeatureSet, k: int) -> dict:
    """FID, IS (of ``fake``) and k-NN precision/recall of ``fake`` against ``real``."""
    from ..metrics import precision_recall
    out = {"fid": frechet(real, fake)}
    if fake.p_sum is not None:
        out["inception_score"], out["inception_score_std"] = fake.inception_score()
    out.update(precision_recall(real.features(), fake.features(), k=k))
    out["pr_images"] = [int(real.n_kept), int(fake.n_kept)]
    return out


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The images process ``rank`` handles: ``rank, rank + W, ...`` (union over ranks = ``range(n)``)."""
    return range(rank, n, world_size)


def is_finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
