"""Streamed images shared by stage 1 (training) and stage 2 (extraction): WebDataset tars or an HF stream.

A :class:`ShardSource` lists the shards (with their sample counts when known); :class:`StreamedImages` is the
``IterableDataset`` over it. Every (rank, DataLoader worker) pair is one reader whose work in an epoch is a pure
function of (seed, epoch, number of readers, reader index) (:func:`plan_readers`): equal counts for training (no rank
waits at an epoch end or starves with few shards), every sample exactly once for extraction. On resume samples are
skipped undecoded; decoding happens in the workers; an undecodable image becomes a marked sample
(:data:`UNREADABLE`) so counts and resume positions stay exact. The plans and the resume rule: docs/NOTES.md.
Adapted from: webdataset (``split_by_node``/``split_by_worker``, ``with_epoch``, ``ResampledShards``), datasets
(``split_dataset_by_node``), open-muse ``distribute_shards``; LlamaGen/taming random crop + flip.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DatasetUnavailableError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
UNREADABLE = -2          # label of a sample whose image failed to decode: consumers drop it and count it
KEY_SHARD_STRIDE = 10 ** 9  # key of sample i of shard s when shard sizes are unknown


# ------------------------------------------------------------------------------------------------- sources
class ShardSource:
    """Shards of a stream. ``names``: one per shard; ``counts``: samples per shard or None (unknown)."""

    kind = "base"
    names: list[str]
    counts: list[int] | None = None

    def samples(self, shard: int) -> Iterator[dict]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"source": self.kind, "shards": len(self.names),
                "total": sum(self.counts) if self.counts is not None else None}


class TarShards(ShardSource):
    """WebDataset tar shards (local paths, ``pipe:``, ``http(s)://`` ... anything ``webdataset.gopen`` opens)."""

    kind = "webdataset"

    def __init__(self, urls: Sequence[str], counts: list[int] | None = None):
        self.names, self.counts = list(urls), counts

    def samples(self, shard: int) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples
        yield from tarfile_samples([{"url": self.names[shard]}])


class HFStreamShards(ShardSource):
    """The data sources (files) of a ``datasets.IterableDataset``: ``ds.shard(num_shards, i, contiguous=True)``.

    Iterated with ``.iter(batch_size=1)``, which does not split again by DataLoader worker (``__iter__`` does:
    the assignment here is vqgen's own). Images arrive undecoded (``Image(decode=False)``: bytes/path dicts).
    """

    kind = "hf-streaming"

    def __init__(self, ds, image_col: str, label_col: str | None, counts: list[int] | None = None):
        self.ds, self.image_col, self.label_col = ds, image_col, label_col
        self.names = [f"data source {i}" for i in range(ds.num_shards)]
        self.counts = counts

    def samples(self, shard: int) -> Iterator[dict]:
        sub = self.ds.shard(num_shards=len(self.names), index=shard, contiguous=True)
        for row in sub.iter(batch_size=1):
            yield {k: v[0] for k, v in row.items()}


# ---------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Piece:
    """In-shard samples ``i`` of ``shard`` with ``start <= i < stop`` and ``(i - start) % stride == offset``."""

    shard: int
    start: int = 0
    stop: int | None = None
    stride: int = 1
    offset: int = 0

    def keeps(self, i: int) -> bool:
        return i >= self.start and (self.stop is None or i < self.stop) and (i - self.start) % self.stride == self.offset


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards).tolist()


def contiguous_pieces(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[Piece]:
    """The pieces covering positions ``[lo, hi)`` of the shards laid end to end in ``order``."""
    out, pos = [], 0
    for s in order:
        c = counts[s]
        a, b = max(lo, pos), min(hi, pos + c)
        if a < b:
            out.append(Piece(s, a - pos, b - pos))
        pos += c
        if pos >= hi:
            break
    return out


def round_robin_pieces(num_shards: int, order: Sequence[int], readers: int, j: int) -> list[Piece]:
    """Reader j's shards dealt round-robin; with fewer shards than readers, a shard is shared by stride."""
    if num_shards >= readers:
        return [Piece(s) for s in order[j::readers]]
    slot = j % num_shards
    sharing = len(range(slot, readers, num_shards))   # readers on this shard
    return [Piece(order[slot], stride=sharing, offset=j // num_shards)]


def plan_readers(counts: Sequence[int] | None, num_shards: int, readers: int, j: int, *, seed: int, epoch: int,
                 shuffle: bool, equal: bool, samples_per_epoch: int = 0) -> tuple[list[Piece], int | None]:
    """Reader j's pieces for one epoch and how many samples it yields (None: one pass over its pieces)."""
    order = shard_order(num_shards, seed, epoch, shuffle)
    if samples_per_epoch:
        n = samples_per_epoch // readers
        if n < 1:
            raise ConfigError(f"--samples_per_epoch {samples_per_epoch} gives no sample to each of {readers} readers "
                              f"(processes x workers)")
        return round_robin_pieces(num_shards, order, readers, j), n
    if counts is None:
        if equal:
            raise ConfigError("a stream of unknown length cannot give every rank the same number of batches: pass "
                              "--samples_per_epoch N (samples per epoch over all ranks)")
        return round_robin_pieces(num_shards, order, readers, j), None
    total = int(sum(counts))
    if equal:
        n = total // readers
        if n < 1:
            raise ConfigError(f"the stream has {total} samples: fewer than the {readers} readers (processes x workers)")
        return contiguous_pieces(counts, order, j * n, (j + 1) * n), n
    lo, hi = total * j // readers, total * (j + 1) // readers
    return contiguous_pieces(counts, order, lo, hi), hi - lo


def worker_skips(batches_done: int, num_workers: int, batch_size: int, per_worker: int) -> list[int]:
    """Samples each worker has delivered after ``batches_done`` rank batches (strict round-robin: equal counts).
    The resumed loader must start with worker ``batches_done % K`` (``StreamedImages(first_worker=...)``)."""
    k = max(1, num_workers)
    return [min(per_worker, len(range(w, batches_done, k)) * batch_size) for w in range(k)]


# ------------------------------------------------------------------------------------------------ decoding
class Decoder:
    """Raw sample -> ``(image [C,H,W] in [-1,1], label)``; a failed decode -> ``(zeros, UNREADABLE)`` + warning."""

    def __init__(self, transform: Callable, channels: int, image_size: int, image_col: str | None = None,
                 label_col: str | None = None):
        self.transform, self.channels, self.image_size = transform, channels, image_size
        self.image_col, self.label_col = image_col, label_col

    def _image(self, raw: dict):
        from PIL import Image
        if self.image_col is not None:  # HF: {"bytes": ..., "path": ...} or a PIL image
            v = raw[self.image_col]
            if isinstance(v, dict):
                return Image.open(io.BytesIO(v["bytes"])) if v.get("bytes") else Image.open(v["path"])
            return v
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise ValueError(f"no {'/'.join(IMAGE_KEYS)} member")
        return Image.open(io.BytesIO(raw[key]))

    def _label(self, raw: dict) -> int:
        if self.image_col is not None:
            v = raw.get(self.label_col) if self.label_col else None
            return int(v) if isinstance(v, (int, np.integer)) else -1
        c = raw.get("cls")
        return int(c.decode() if isinstance(c, bytes) else c) if c is not None else -1

    def __call__(self, raw: dict) -> tuple[torch.Tensor, int]:
        try:
            img = self._image(raw)
            img.load()
            return self.transform(img), self._label(raw)
        except Exception as e:  # noqa: BLE001 - any undecodable image is skipped the same way
            warnings.warn(f"skipped unreadable image {raw.get('__key__', '?')} in {raw.get('__url__', 'stream')} "
                          f"({type(e).__name__}: {e})", stacklevel=2)
            return torch.zeros(self.channels, self.image_size, self.image_size), UNREADABLE


def _seed(*parts: int) -> list[int]:
    return [int(p) & 0xFFFFFFFF for p in parts]


class StreamedImages(torch.utils.data.IterableDataset):
    """One rank's share of a :class:`ShardSource` for one epoch, split among its DataLoader workers.

    Yields ``(image, label)`` (``batch_size=None``) or, with ``batch_size``, ``(keys, images [B,C,H,W], labels)``
    batches built inside the worker (extraction). ``skip``: per-worker samples to drop first (resume; with
    ``first_worker = batches_done % K``, since the DataLoader always asks its worker 0 first), or, for extraction, ``after_key``: per-reader last key already stored (every sample up to it is skipped).
    ``augment(image, generator)``: training augmentation, seeded per sample by (seed, epoch, reader, position).
    """

    def __init__(self, source: ShardSource, decoder: Decoder, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, epoch: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 equal: bool = True, samples_per_epoch: int = 0, skip: Sequence[int] | None = None,
                 after_key: dict[int, int] | None = None, batch_size: int | None = None,
                 augment: Callable | None = None, first_worker: int = 0):
        self.source, self.decoder = source, decoder
        self.rank, self.world_size, self.k = rank, world_size, max(1, num_workers)
        self.num_workers = num_workers
        self.seed, self.epoch, self.shuffle, self.shuffle_buffer = seed, epoch, shuffle, max(1, shuffle_buffer)
        self.equal, self.samples_per_epoch = equal, samples_per_epoch
        self.skip, self.after_key = list(skip or []), dict(after_key or {})
        self.batch_size, self.augment = batch_size, augment
        self.first_worker = first_worker % self.k
        self.readers = world_size * self.k
        self._cum = None
        # every reader's plan is checked here, in the main process: errors surface before workers start
        self.plans = [self.plan(self.rank * self.k + w) for w in range(self.k)]

    def plan(self, j: int) -> tuple[list[Piece], int | None]:
        c = self.source.counts
        return plan_readers(c, len(self.source.names), self.readers, j, seed=self.seed, epoch=self.epoch,
                            shuffle=self.shuffle, equal=self.equal, samples_per_epoch=self.samples_per_epoch)

    @property
    def per_worker(self) -> int | None:
        """Samples each worker yields (equal plans: the same for every worker of every rank)."""
        return self.plans[0][1]

    def key(self, shard: int, i: int) -> int:
        c = self.source.counts
        if c is None:
            return shard * KEY_SHARD_STRIDE + i
        if getattr(self, "_cum", None) is None:
            self._cum = np.cumsum([0, *c])
        return int(self._cum[shard]) + i

    def owns(self, j: int, key: int) -> bool:
        """Does reader j (of this rank's plan) read the sample named ``key``?"""
        c = self.source.counts
        if c is not None:
            if getattr(self, "_cum", None) is None:
                self._cum = np.cumsum([0, *c])
            s = int(np.searchsorted(self._cum, key, side="right") - 1)
            i = key - int(self._cum[s])
        else:
            s, i = divmod(key, KEY_SHARD_STRIDE)
        return any(p.shard == s and p.keeps(i) for p in self.plans[j - self.rank * self.k][0])

    # -- raw sample stream of one reader
    def _pieces_stream(self, pieces: list[Piece]) -> Iterator[tuple[int, dict]]:
        for p in pieces:
            for i, raw in enumerate(self.source.samples(p.shard)):
                if p.stop is not None and i >= p.stop:
                    break
                if p.keeps(i):
                    yield self.key(p.shard, i), raw

    def _reader_raw(self, j: int) -> Iterator[tuple[int, dict]]:
        pieces, n = self.plan(j)
        if not self.samples_per_epoch:
            yield from self._pieces_stream(pieces)
            return
        made, cycle = 0, 0
        while made < n:  # fixed samples per epoch: cycle through the reader's pieces, reshuffled each cycle
            order = np.random.default_rng(_seed(self.seed, self.epoch, j, cycle, 7)).permutation(len(pieces))
            got = 0
            for key, raw in self._pieces_stream([pieces[i] for i in order]):
                yield key, raw
                got += 1
                made += 1
                if made >= n:
                    return
            if got == 0:
                raise DatasetUnavailableError(f"reader {j} of {self.readers} found no sample in its shards "
                                              f"{[self.source.names[p.shard] for p in pieces][:3]}")
            cycle += 1

    def _shuffled(self, it: Iterator, j: int) -> Iterator:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from it
            return
        rng = np.random.default_rng(_seed(self.seed, self.epoch, j, 0xB0F))
        buf: list = []
        for item in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise RuntimeError("StreamedImages planned for DataLoader workers is iterated without them")
            return 0
        if info.num_workers != self.k:
            raise RuntimeError(f"planned for {self.k} workers, the DataLoader has {info.num_workers}")
        return (info.id + self.first_worker) % self.k  # the DataLoader starts at worker 0: rotate on resume

    def __iter__(self):
        w = self._worker()
        j = self.rank * self.k + w
        stream = self._shuffled(self._reader_raw(j), j)
        skip = self.skip[w] if w < len(self.skip) else 0
        last = self.after_key.get(j)
        batch: list = []
        for pos, (key, raw) in enumerate(stream):
            if pos < skip or (last is not None and key <= last):
                continue  # already consumed before the resume: not decoded
            raw.setdefault("__key__", str(key))
            x, y = self.decoder(raw)
            if self.augment is not None and y != UNREADABLE:
                g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                    _seed(self.seed, self.epoch, j, pos)).generate_state(1)[0]))
                x = self.augment(x, g)
            if self.batch_size is None:
                yield x, y
                continue
            batch.append((key, x, y))
            if len(batch) == self.batch_size:
                yield _stack(batch)
                batch = []
        if batch:
            yield _stack(batch)


def _stack(batch: list) -> tuple[list[int], torch.Tensor, list[int]]:
    keys, xs, ys = zip(*batch)
    return list(keys), torch.stack(xs), list(ys)


def rank_batches(per_worker: int, num_workers: int, batch_size: int) -> int:
    """Batches a rank runs per epoch: every worker yields ``ceil(per_worker / batch_size)``."""
    return max(1, num_workers) * math.ceil(per_worker / batch_size)
