"""Stage-1 input: a map-style dataset (exact global order, :func:`vqgen.train.schedule.epoch_indices`) or a stream.

Both give the loop the batches per epoch (equal on every rank), the epoch's batches after ``skip_batches`` and the
task's data hooks (``data_state`` / ``resume_batches`` of :class:`vqgen.train.task.StageTask`); augmentation runs in
the DataLoader workers, seeded per sample. A stream (:class:`vqgen.data.streaming.StreamedImages`) resumes exactly on
the layout it was saved with (world size, workers, batch); on another layout the same fraction of the interrupted
epoch is skipped, with one warning line (docs/NOTES.md).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Subset

from ..data.augment import Augment, AugmentedDataset
from ..data.streaming import UNREADABLE, StreamedImages, rank_batches, worker_skips
from .checkpointing import map_style_resume
from .schedule import epoch_generator, epoch_indices

STREAM_LAYOUT = ("world_size", "num_workers", "batch_size", "batches_per_epoch")


def collate_readable(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Default collate without the marked (unreadable) samples, plus their count: ``(x, y, skipped)``.

    In the DataLoader workers, so the training step needs no host sync to drop them. A batch of nothing but
    unreadable images keeps them (zero images; a step must still run on every rank)."""
    from torch.utils.data import default_collate

    good = [s for s in samples if s[1] != UNREADABLE]
    x, y = default_collate(good or samples)
    return x, y, torch.tensor(len(samples) - len(good))


class MapInput:
    """A map-style training set: one global permutation per epoch, rank r takes every W-th sample."""

    def __init__(self, train_ds, cfg, augment: Augment | None):
        self.ds, self.augment = train_ds, augment
        self.batch_size, self.seed, self.num_workers = cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers
        self.world_size = 1

    def batches_per_epoch(self, world_size: int) -> int:
        self.world_size = world_size
        return math.ceil((len(self.ds) // world_size) / self.batch_size)

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int):
        idx = epoch_indices(len(self.ds), self.seed, epoch, rank, world_size)[skip_batches * self.batch_size:]
        ds = AugmentedDataset(self.ds, self.augment, self.seed, epoch) if self.augment else self.ds
        # Own generator: a DataLoader iterator otherwise draws its worker base seed from the global RNG, so the
        # iterator a resumed run starts mid-epoch would shift every later global draw (the quantizer's dead-code
        # restart samples from it) and break bitwise-exact resume.
        return DataLoader(Subset(ds, idx), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False,
                          generator=epoch_generator(self.seed, epoch), collate_fn=collate_readable)

    def data_state(self) -> dict:
        return {"input": "map", "world_size": self.world_size, "batch_size": self.batch_size,
                "num_workers": self.num_workers}

    def resume_batches(self, saved: dict | None, epoch: int, batches_done: int, world_size: int):
        return map_style_resume(saved, epoch, batches_done, world_size, self.batch_size)


class StreamInput:
    """A streamed training set (see the module docstring)."""

    def __init__(self, source, decoder, cfg, augment: Augment | None, samples_per_epoch: int):
        self.source, self.decoder, self.augment = source, decoder, augment
        self.batch_size, self.seed, self.num_workers = cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers
        self.shuffle_buffer, self.samples_per_epoch = cfg.shuffle_buffer, samples_per_epoch
        self.world_size = 1

    def _stream(self, epoch: int, rank: int, world_size: int, **kw) -> StreamedImages:
        return StreamedImages(self.source, self.decoder, rank=rank, world_size=world_size,
                              num_workers=self.num_workers, seed=self.seed, epoch=epoch, shuffle=True,
                              shuffle_buffer=self.shuffle_buffer, samples_per_epoch=self.samples_per_epoch,
                              augment=self.augment or None, **kw)

    def batches_per_epoch(self, world_size: int) -> int:
        self.world_size = world_size
        return rank_batches(self._stream(0, 0, world_size).per_worker, self.num_workers, self.batch_size)

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int):
        plan = self._stream(epoch, rank, world_size)
        ds = self._stream(epoch, rank, world_size, first_worker=skip_batches,
                          skip=worker_skips(skip_batches, self.num_workers, self.batch_size, plan.per_worker))
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), generator=epoch_generator(self.seed, epoch),
                          collate_fn=collate_readable)

    def data_state(self) -> dict:
        return {"input": "stream", "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "batches_per_epoch": self.batches_per_epoch(self.world_size)}

    def resume_batches(self, saved: dict | None, epoch: int, batches_done: int, world_size: int):
        """Same layout: exact. Another one: the same fraction of the epoch, with one warning line."""
        old = saved or {}
        self.world_size = world_size
        new = self.data_state()
        if not batches_done or all(old.get(k) == new[k] for k in STREAM_LAYOUT):
            return batches_done, None
        frac = batches_done / old["batches_per_epoch"] if old.get("batches_per_epoch") else 0.0
        done = min(new["batches_per_epoch"], int(frac * new["batches_per_epoch"]))
        was = {k: old.get(k) for k in STREAM_LAYOUT}
        now = {k: new[k] for k in STREAM_LAYOUT}
        return done, (f"warning: resuming streamed epoch {epoch} with another layout ({was} -> {now}): continuing "
                      f"after the same fraction ({frac:.3f}) of the epoch, batch {done}; exact resume needs the saved "
                      f"world size, workers and batch size")


def first_images(ds, n: int, batch_size: int):
    """Up to ``n`` validation images ``(x, y)`` in batches, in order (map-style or stream), marked ones dropped."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        loader = DataLoader(ds, batch_size=batch_size)
    else:
        loader = DataLoader(Subset(ds, range(min(n, len(ds)))), batch_size=batch_size, shuffle=False,
                            generator=torch.Generator().manual_seed(0))
    seen = 0
    for x, y in loader:
        keep = y != UNREADABLE
        x, y = x[keep][: n - seen], y[keep][: n - seen]
        if len(x):
            yield x, y
        seen += len(x)
        if seen >= n:
            return
