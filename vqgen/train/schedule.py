"""Deterministic data order and the learning-rate schedule of both trainers.

Exact resume rests on :func:`epoch_indices`: the data stream of an epoch is a pure function of (seed, epoch, rank,
world_size), so a resumed run rebuilds it and skips what was done.
"""

from __future__ import annotations

import math

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's data order (also seeds the epoch's DataLoader, see train_vqvae)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> list[int]:
    """This rank's sample indices for one epoch: a pure function of its arguments.

    One global permutation per (seed, epoch); rank r takes positions r, r+W, r+2W... of its first
    ``(n // W) * W`` entries, so every rank gets the same count (DDP needs equal batch counts), and the k-th
    global batch (all ranks' k-th batches together) holds the same samples whatever the world size: a run on 2
    processes sees the same global batches as a run on 1 process with twice the per-process batch.
    """
    if shuffle:
        g = epoch_generator(seed, epoch)
        perm = torch.randperm(n, generator=g).tolist()
    else:
        perm = list(range(n))
    per_rank = n // world_size
    return perm[rank: per_rank * world_size: world_size]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int):
    """Linear warm-up then constant or cosine to 10% of the peak. Stepped once per optimizer step."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine" and total > warmup:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
