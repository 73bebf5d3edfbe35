"""Stage-3 token stream whose per-rank cost is ~1/W of the split: the plan tied to a DataLoader.

Who reads what: :mod:`vqgen.shards.plan`; how a range inside a shard is read and checked: :mod:`vqgen.shards.access`.
Every rank gets ``len(loader)`` batches; a rank's batch stream is a pure function of (manifest, seed, epoch, rank,
spec), never of ``num_workers``; ``skip_batches=k`` yields exactly the stream minus its first k batches. Whole shards
per reader (webdataset's ``split_by_node``) would starve or hang ranks when shards are few and deadlock DDP when
counts differ. ``verify`` (``--verify_shards``): ``full`` hashes each shard while reading it and stats every shard at
start-up (:func:`check_split`), ``size`` only stats, ``none`` neither (sizes at open and the tar layout are always
checked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ShardError
from .access import Decoded, Hasher, ShardFile, ShardFiles
from .format import Manifest, npy_header, sample_shape
from .plan import PlanSpec, RankPlan, ResumePoint, plan_epoch

VERIFY_MODES = ("full", "size", "none")
CHUNK_BYTES = 1 << 20  # read size inside a stream when shuffling


@dataclass(frozen=True)
class TokenSplit:
    """What the reader needs of one split of a :class:`~vqgen.shards.format.Manifest`."""

    dir: Path
    split: str
    shards: tuple[ShardFile, ...]
    total: int
    hflip: bool
    latent_hw: tuple[int, int]
    dtype: np.dtype
    views: int = 1  # token maps per sample (multi-view extraction); the reader gives one of them per epoch

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str) -> "TokenSplit":
        """ShardError (saying how to extract it) when the split is absent."""
        d, entry = Path(manifest.path), manifest.split(split)
        files = tuple(ShardFile(d / s.name, int(s.count), s.bytes, s.sha256) for s in entry.shards)
        if int(entry.views) < 1 or (entry.views > 1 and entry.hflip):
            raise ShardError(f"split {split!r} in {d}: views={entry.views} with hflip={entry.hflip} is not a layout "
                             f"vqgen writes (corrupt manifest?)")
        return cls(d, split, files, int(entry.total), bool(entry.hflip),
                   (int(manifest.latent_h), int(manifest.latent_w)), np.dtype(manifest.dtype), int(entry.views))

    @classmethod
    def read(cls, shard_dir: str | os.PathLike, split: str) -> "TokenSplit":
        return cls.from_manifest(Manifest.read(shard_dir), split)


def check_split(split: TokenSplit, verify: str = "full") -> None:
    """Start-up check, on every rank (W-independent: one stat per shard, no reads): every shard of the split is
    there with its manifest size. The sha256 is checked later, by the rank that reads each shard."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if verify == "none":
        return
    for s in split.shards:
        try:
            size = s.path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"shard {s.path} listed in the manifest is missing") from None
        if s.bytes is not None and size != s.bytes:
            raise ShardError(f"corrupt or truncated shard {s.path}: {size} bytes, the manifest says {s.bytes}; "
                             f"re-extract (rerun extract_codes.py with --overwrite)")


class _Cursor:
    """Reads one stream's samples in position order, a chunk at a time, and keeps each decoded chunk until the
    samples this worker needs from it are taken (at most ~shuffle_buffer samples, see .plan)."""

    def __init__(self, plan: RankPlan, s: int, needed: np.ndarray, files: ShardFiles, chunk: int, hashing: bool):
        self.files, self.hashing = files, hashing
        pos = plan.stream_positions(s)
        slot, sample = plan.locate(pos)
        run_starts = np.flatnonzero((np.diff(slot) != 0) | (np.diff(pos) != 1)) + 1
        self.start = np.union1d(np.concatenate([[0], run_starts]), np.arange(0, len(pos), chunk)).astype(np.int64)
        self.length = np.diff(np.append(self.start, len(pos)))
        self.shard = plan.order[slot[self.start]]
        self.slot, self.sample = slot[self.start], sample[self.start]
        self.left = np.add.reduceat(needed.astype(np.int64), self.start) if len(pos) else np.zeros(0, np.int64)
        todo = np.flatnonzero(self.left)  # chunks with samples for this worker, in read order
        # After reading chunk c, the hash of its shard can be finished when no later chunk of that slot is needed.
        self.last_of_slot = {int(c): (k + 1 == len(todo) or self.slot[todo[k + 1]] != self.slot[c])
                             for k, c in enumerate(todo)}
        self.next, self.live = 0, {}
        self.hasher: Hasher | None = None

    def _read(self, c: int) -> Decoded:
        i, a, n, f = int(self.shard[c]), int(self.sample[c]), int(self.length[c]), self.files
        if a == 0 and self.hashing and i not in f.verified:
            self.hasher = Hasher(f, i)
        h = self.hasher if self.hasher is not None and self.hasher.i == i else None
        lay = f.layout(i)
        if lay is None:
            data, whole = f.whole(i)
            if h is not None and h.next == 0:
                h.feed(0, data)
            dec = whole.rows(a, a + n)
        else:
            buf = f.read(i, a * lay.stride, n * lay.stride)
            if h is not None:
                h.feed(a * lay.stride, buf)
            dec = f.decode(i, buf, a, n)
        if h is not None and self.last_of_slot[c]:
            self.hasher = None
            h.finish()  # reads the rest of the shard for the hash; ShardError names it on a mismatch
        return dec

    def take(self, local: np.ndarray) -> Decoded:
        """Samples at these stream indices (all needed by this worker), reading chunks as far as required."""
        cid = np.searchsorted(self.start, local, side="right") - 1
        while self.next <= cid.max():
            c, self.next = self.next, self.next + 1
            if self.left[c]:
                self.live[c] = self._read(c)
        parts = []
        for c in np.unique(cid):
            m = cid == c
            parts.append((m, self.live[c], local[m] - self.start[c]))
            self.left[c] -= int(m.sum())
            if self.left[c] == 0:
                del self.live[c]
        n, flip = len(local), parts[0][1].flip is not None
        tokens = np.empty((n, parts[0][1].tokens.shape[1]), dtype=np.int64)
        flips = np.empty_like(tokens) if flip else None
        labels = np.empty(n, dtype=np.int64)
        for m, d, rows in parts:
            tokens[m], labels[m] = d.tokens[rows], d.labels[rows]
            if flip:
                flips[m] = d.flip[rows]
        return Decoded(tokens, flips, labels)


class TokenStream(torch.utils.data.IterableDataset):
    """Batches ``(index, tokens LongTensor [B, h*w], labels LongTensor [B], bytes read since the last batch)`` of
    one rank and DataLoader worker. Use :func:`make_token_loader`, which re-orders and sums the bytes.
    A multi-view split gives one view per sample, drawn per (seed, epoch, sample) (:meth:`RankPlan.views`); the
    rank reads all views of its samples (still ~1/W of the bytes) and an epoch is one sample per image."""

    def __init__(self, info: TokenSplit, spec: PlanSpec, *, epoch: int = 0, rank: int = 0, skip_batches: int = 0,
                 hflip: bool | None = None, verify: str = "full", history: Sequence[ResumePoint] = ()):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.info, self.spec, self.verify = info, spec, verify
        self.use_flip = info.hflip if hflip is None else bool(hflip)
        if self.use_flip and not info.hflip:
            raise ShardError(f"split {info.split!r} in {info.dir} was extracted without --hflip; no mirrored tokens "
                             f"to use")
        if info.total == 0 or (info.total < spec.world_size and not (spec.resampled and spec.epoch_samples)):
            raise ShardError(f"split {info.split!r} in {info.dir} has {info.total} samples, fewer than the "
                             f"{spec.world_size} ranks reading it")
        self.plan = plan_epoch([s.count for s in info.shards], spec, epoch, rank, history)
        self.num_batches, self.skip_batches = self.plan.num_batches, int(skip_batches)
        if not 0 <= self.skip_batches <= self.num_batches:
            raise ValueError(f"skip_batches={skip_batches} not in [0, {self.num_batches}] batches per epoch")
        sized = [s for s in info.shards if s.bytes is not None]  # (manifests before sizes: assume ~4 KB/sample)
        sample_bytes = sum(s.bytes for s in sized) / max(1, sum(s.count for s in sized)) if sized else 4096.0
        self.chunk = spec.batch_size if not spec.shuffle else max(16, int(CHUNK_BYTES // max(1.0, sample_bytes)))

    def __len__(self) -> int:
        return self.num_batches - self.skip_batches

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(self.skip_batches + worker, self.num_batches, workers)
        plan, needed = self.plan, {}
        for b in mine:
            s, local = plan.batch(b)
            needed.setdefault(s, np.zeros(len(plan.stream_positions(s)), dtype=bool))[local] = True
        split = self.info
        files = ShardFiles(list(split.shards), split.latent_hw, split.dtype,
                           npy_header(sample_shape(split.latent_hw, split.views), split.dtype), self.use_flip,
                           split.views)
        cursors = {s: _Cursor(plan, s, m, files, self.chunk, self.verify == "full") for s, m in needed.items()}
        reported = 0
        try:
            for b in mine:
                s, local = plan.batch(b)
                d = cursors[s].take(local)
                tokens = d.tokens
                if self.use_flip:
                    tokens = np.where(plan.flips(plan.stream_positions(s)[local])[:, None], d.flip, d.tokens)
                elif split.views > 1:  # (n, views * h*w) -> the drawn view of each sample, (n, h*w)
                    n = len(local)
                    pick = plan.views(plan.stream_positions(s)[local], split.views)
                    tokens = np.ascontiguousarray(tokens.reshape(n, split.views, -1)[np.arange(n), pick])
                yield b, torch.from_numpy(tokens), torch.from_numpy(d.labels), files.bytes_read - reported
                reported = files.bytes_read
        finally:
            files.close()


class TokenLoader:
    """Iterable of ``(tokens [B, h*w] long, labels [B] long)`` over a DataLoader of :class:`TokenStream`;
    re-orders worker outputs by batch index, so the stream never depends on num_workers or scheduling.
    ``bytes_read``: shard bytes this rank read so far (all workers). Do not pass it through
    ``accelerator.prepare`` (it would split an already rank-split stream again)."""

    def __init__(self, stream: TokenStream, num_workers: int = 0):
        self.stream, self.bytes_read = stream, 0
        # Own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, which would shift
        # every later random draw (dropout...) of a resumed run.
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                  persistent_workers=False,
                                                  generator=torch.Generator().manual_seed(stream.spec.seed))

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        want, pending = self.stream.skip_batches, {}
        for b, toks, labels, nbytes in self.loader:
            self.bytes_read += nbytes
            pending[b] = (toks, labels)
            while want in pending:
                yield pending.pop(want)
                want += 1
        if pending or want != self.stream.num_batches:
            raise ShardError(f"token stream of {self.stream.info.dir} ended after batch {want} of "
                             f"{self.stream.num_batches} (shards changed while reading?)")


def make_token_loader(shard_dir: str | os.PathLike | Manifest, split: str = "train", batch_size: int = 64, seed: int = 0,
                      epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                      shuffle_buffer: int = 2000, skip_batches: int = 0, resampled: bool = False,
                      epoch_samples: int | None = None, hflip: bool | None = None, drop_last: bool = False,
                      streams: int = 8, verify: str = "full", history: Sequence[ResumePoint] = ()) -> TokenLoader:
    """The stage-3 token stream of one (epoch, rank), batches ``(tokens long [B, h*w], labels long [B])``.

    ``streams``: shuffled streams per rank (a multiple of ``num_workers`` reads every byte once); ``verify``: see
    the module docstring; ``history``: earlier interrupted runs of this epoch under another spec
    (:func:`~vqgen.shards.plan.resume_history`); ``epoch_samples`` only with ``resampled``. Every rank gets
    ``len(loader)`` batches; ``skip_batches=N`` yields exactly the full stream minus its first N batches.
    ``shard_dir`` may be the folder's :class:`~vqgen.shards.format.Manifest`, already read."""
    spec = PlanSpec(batch_size=batch_size, world_size=world_size, seed=seed, shuffle=shuffle,
                    shuffle_buffer=shuffle_buffer, streams=streams, drop_last=drop_last, resampled=resampled,
                    epoch_samples=epoch_samples)
    info = TokenSplit.from_manifest(shard_dir, split) if isinstance(shard_dir, Manifest) else \
        TokenSplit.read(shard_dir, split)
    stream = TokenStream(info, spec, epoch=epoch, rank=rank, skip_batches=skip_batches,
                         hflip=hflip, verify=verify, history=history)
    return TokenLoader(stream, num_workers=num_workers)
