"""evaluate.py's image passes, batch by batch: the split and its reconstructions, generated samples, the train
reference. Memory does not grow with the number of images: each batch goes into
:class:`vqgen.eval.stream_stats.FeatureSet` accumulators (and a reconstruction meter) and is dropped.

Under ``accelerate launch evaluate.py`` each process takes images ``i = rank mod W`` of every set and generates its
share of the samples (seed + rank); the statistics are then reduced across processes. On one process the samples
are the same as drawing them all at once (one generator, the chunking of ``generate``).
"""

from __future__ import annotations

import itertools

import torch

from .. import metrics as M
from ..config import EvalConfig
from ..errors import ConfigError, VQGenError
from ..models.sampling import class_labels, decode_to_images, generate
from . import stream_stats
from .features import FeatureSpace

GEN_CHUNK = 512  # samples generated per generate() call (the one-call path's batch_size, min(n, 512))


def open_split(dataset: str, split: str, data_dir: str, image_size: int, channels: int):
    """The split's dataset (map-style, or a WebDataset IterableDataset), checked against the tokenizer's input."""
    from ..data import build_dataset

    ds, info = build_dataset(dataset, split, data_dir, image_size=image_size, channels=channels)
    if (info.image_size, info.channels) != (image_size, channels):
        raise ConfigError(f"dataset {dataset} gives {info.channels}x{info.image_size}px images, the tokenizer "
                          f"expects {channels}x{image_size}px")
    return ds


def split_size(ds, max_images: int | None) -> int | None:
    if isinstance(ds, torch.utils.data.IterableDataset):
        return max_images
    return min(len(ds), max_images) if max_images else len(ds)


def split_batches(ds, max_images: int | None, batch_size: int, rank: int = 0, world_size: int = 1,
                  num_workers: int = 0):
    """This process's share of the first ``max_images`` images: ``(global indices (B,), x (B,C,H,W), y (B,))``.
    Unreadable images (label -2) are dropped. One batch in memory at a time."""
    from ..data.streaming import UNREADABLE

    if isinstance(ds, torch.utils.data.IterableDataset):  # a stream: read in order, strided by rank
        def own():
            for i, (x, y) in enumerate(ds):
                if max_images and i >= max_images:
                    return
                if i % world_size == rank:
                    yield i, x, int(y)
        it = own()
        while chunk := list(itertools.islice(it, batch_size)):
            idx, xs, ys = zip(*chunk)
            i, x, y = torch.tensor(idx), torch.stack(xs), torch.tensor(ys)
            keep = y != UNREADABLE
            yield i[keep], x[keep], y[keep]
        return
    idx = list(stream_stats.shard_indices(split_size(ds, max_images), rank, world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    for s, (x, y) in zip(range(0, len(idx), batch_size), loader):
        i = torch.tensor(idx[s:s + len(x)])
        keep = y != UNREADABLE
        yield i[keep], x[keep], y[keep].long()


def generate_batches(prior, tokenizer, cfg: EvalConfig, device, rank: int = 0, world_size: int = 1):
    """This process's generated images, decoded batch by batch: ``(global indices, images, asked labels | None)``."""
    sc, n = cfg.sampling, cfg.sampling.num_samples
    labels = class_labels(prior, n, None, sc.label_mode, sc.seed, unconditional=sc.unconditional)  # None: null
    mine = torch.tensor(list(stream_stats.shard_indices(n, rank, world_size)), dtype=torch.long)
    g = torch.Generator(device=device).manual_seed(sc.seed + rank)
    for s in range(0, len(mine), GEN_CHUNK):
        idx = mine[s:s + GEN_CHUNK]
        lab = labels[idx] if labels is not None else None
        tokens = generate(prior, len(idx), labels=lab.to(device) if lab is not None else None,
                          **sc.draw_kwargs(), generator=g, batch_size=len(idx), compile=sc.compile)
        for b in range(0, len(idx), cfg.batch_size):
            yield (idx[b:b + cfg.batch_size], decode_to_images(tokenizer, tokens[b:b + cfg.batch_size],
                                                               batch_size=cfg.batch_size),
                   lab[b:b + cfg.batch_size] if lab is not None else None)
    prior.release_caches()  # --compile keeps them from chunk to chunk


def new_set(cfg: EvalConfig, total: int | None, space: FeatureSpace, world_size: int) -> stream_stats.FeatureSet:
    k = space.classifier.config.num_classes if space.classifier is not None else 0
    return stream_stats.FeatureSet(total or 1, cfg.is_splits, cfg.pr_images, k, cfg.confidence_threshold,
                                   world_size)


def class_logits(space: FeatureSpace, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    if space.classifier is None:
        return None
    return logits if space.name == "classifier" else space.classifier(x.to(space.device)).double().cpu()


@torch.no_grad()
def eval_real(tokenizer, space: FeatureSpace, ds, cfg: EvalConfig, device, rank: int, world: int):
    """One pass over the split: reconstruction metrics, code counts, and the feature sets of the split and of its
    reconstructions (reduced over processes). Encodes through codes only (never updates the codebook)."""
    n = split_size(ds, cfg.max_images)
    meter = M.ReconstructionMeter(tokenizer.config.codebook_size)
    real, recon = new_set(cfg, n, space, world), new_set(cfg, n, space, world)
    for idx, x, _ in split_batches(ds, cfg.max_images, cfg.batch_size, rank, world, cfg.data.num_workers):
        x = x.to(device)
        codes = tokenizer.encode_to_indices(x)
        r = tokenizer.decode_indices(codes).float().clamp(-1, 1)
        meter.update(x, r, codes)
        for target, imgs in ((real, x), (recon, r)):
            f, lg = space.batch(imgs)
            target.update(f, lg, idx)
    reduce_meter(meter)
    real.reduce()
    recon.reduce()
    out = meter.compute()
    out.update(num_images=int(meter.n), codebook_size=int(tokenizer.config.codebook_size),
               codes_used=int((meter.counts > 0).sum()))
    return out, meter.counts, real, recon


def reduce_meter(meter: M.ReconstructionMeter) -> None:
    """Sum a reconstruction meter's statistics over processes (no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    keys = sorted(meter.sums)
    buf = stream_stats.all_reduce_cpu(torch.tensor([float(meter.n)] + [meter.sums[k] for k in keys],
                                                   dtype=torch.float64))
    meter.n, meter.counts = int(buf[0]), stream_stats.all_reduce_cpu(meter.counts.clone())
    meter.sums = {k: float(v) for k, v in zip(keys, buf[1:])}


@torch.no_grad()
def eval_samples(prior, tokenizer, space: FeatureSpace, cfg: EvalConfig, device, rank: int, world: int):
    """The feature set of ``--num_samples`` generated images (reduced over processes) and the first <= 64 of them."""
    fake = new_set(cfg, cfg.sampling.num_samples, space, world)
    grid: list[torch.Tensor] = []
    for idx, images, asked in generate_batches(prior, tokenizer, cfg, device, rank, world):
        f, lg = space.batch(images)
        fake.update(f, lg, idx, asked, class_logits(space, images, lg))
        room = 64 - sum(len(g) for g in grid)
        if room > 0:
            grid.append(images[:room].cpu())
    fake.reduce()
    return fake, torch.cat(grid) if grid else torch.zeros(0)


def reference_scores(space: FeatureSpace, real: stream_stats.FeatureSet, dataset: str, cfg: EvalConfig, tc, n: int,
                     rank: int = 0, world: int = 1) -> dict:
    """The same scores for up to ``n`` *train* images vs the split: what a perfect generator would get."""
    try:
        ds = open_split(dataset, "train", cfg.data.data_dir, tc.image_size, tc.in_channels)
    except VQGenError as e:
        return {"skipped": str(e)}
    train = new_set(cfg, split_size(ds, n), space, world)
    with torch.no_grad():
        for idx, x, _ in split_batches(ds, n, cfg.batch_size, rank, world, cfg.data.num_workers):
            f, lg = space.batch(x)
            train.update(f, lg, idx)
    train.reduce()
    out = stream_stats.quality(real, train, cfg.pr_k)
    out["num_images"] = int(train.n)
    return out
