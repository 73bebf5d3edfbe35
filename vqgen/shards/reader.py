"""Stage-3 token stream: exact, equal-length per-rank batches from the shards of one split.

Shards are split across ranks at the *sample* level: every rank reads every shard of the split (in an order
shuffled by (seed, epoch)) and keeps global stream positions ``i % world_size == rank``, truncated to
``total // world_size`` samples (the remainder, < world_size samples, is dropped each epoch; a different one each
epoch when shuffling). Why not WebDataset's shard-level ``split_by_node``/``split_by_worker``: with fewer shards
than ranks x workers it starves or hangs a rank (the open-muse multi-node failure) and with unequal shard sizes
ranks get unequal batch counts, which deadlocks DDP. Sample-level splitting is correct for any shard count; its
cost is that each rank parses every shard, which for token shards (~2 KB per sample) is cheap next to a training
step. HF ``datasets`` falls back to the same scheme. DataLoader workers split a rank's *batches* round-robin (batch
b goes to worker (b - skip_batches) % num_workers) and every batch carries its index, so the loader re-orders
them: the rank's batch stream is identical for any num_workers, and ``skip_batches=N`` is exactly "drop the first
N batches" (exact mid-epoch resume). ``resampled=True`` instead draws shards with replacement per (seed, epoch,
rank) (WebDataset ``ResampledShards`` + ``with_epoch`` semantics) for ``epoch_samples`` samples per rank.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from webdataset.tariterators import tar_file_iterator

from ..errors import ShardError
from ..fsutil import sha256_file
from .format import Manifest, ShardInfo, npy_header


def verify_shards(shard_dir: str | os.PathLike, split: str) -> list[ShardInfo]:
    """Check every shard of ``split`` against the manifest (presence, size, sha256); ShardError names the shard."""
    d = Path(shard_dir)
    entry = Manifest.read(d).split(split)
    for s in entry.shards:
        p = d / s.name
        if not p.is_file():
            raise ShardError(f"shard {p} listed in the manifest is missing")
        if s.bytes is not None and p.stat().st_size != s.bytes:
            raise ShardError(f"shard {p} has {p.stat().st_size} bytes, the manifest says {s.bytes} (truncated?)")
        if sha256_file(p) != s.sha256:
            raise ShardError(f"shard {p} does not match its sha256 in the manifest (corrupt or modified)")
    return entry.shards


def _seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of the integers given (platform independent)."""
    s = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return int(s[0]) << 32 | int(s[1])


def iter_shard(path: Path, expected: int | None = None, expected_bytes: int | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "tokens.npy": bytes, "cls": bytes, ...}`` of one shard, in order.

    A corrupt or truncated tar (or one with fewer samples than the manifest records) raises ShardError naming it.
    """
    if expected_bytes is not None and path.is_file() and path.stat().st_size != expected_bytes:
        raise ShardError(f"corrupt or truncated shard {path}: {path.stat().st_size} bytes, the manifest says "
                         f"{expected_bytes}; re-extract (rerun extract_codes.py with --overwrite)")
    n, cur = 0, None
    try:
        with open(path, "rb") as f:
            # A tar cut at a member boundary reads as a shorter valid tar: require the end-of-archive zero blocks.
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1024))
            if size % 512 or size < 1024 or f.read(1024).strip(b"\0"):
                raise ShardError(f"corrupt or truncated shard {path}: no end-of-archive marker ({size} bytes)")
            f.seek(0)
            for item in tar_file_iterator(f):
                key, _, ext = item["fname"].partition(".")
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                        n += 1
                    cur = {"__key__": key}
                cur[ext] = item["data"]
        if cur is not None:
            yield cur
            n += 1
    except FileNotFoundError:
        raise ShardError(f"shard {path} listed in the manifest is missing") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardError(f"corrupt or truncated shard {path}: {e}") from None
    if expected is not None and n != expected:
        raise ShardError(f"corrupt or truncated shard {path}: {n} samples, the manifest says {expected}")


class TokenShardStream(torch.utils.data.IterableDataset):
    """Batches ``(index, tokens LongTensor [B, h*w], labels LongTensor [B])`` of one rank and DataLoader worker.

    The stream is a pure function of (manifest, seed, epoch, rank, world_size, worker, num_workers, batch_size,
    skip_batches): see the module docstring. Use :func:`make_token_loader`, which drops the index and re-orders.
    ``hflip``: when the split stores mirrored tokens, pick them with probability 1/2 per sample (seeded).
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 2000,
                 skip_batches: int = 0, resampled: bool = False, epoch_samples: int | None = None,
                 hflip: bool | None = None, drop_last: bool = False):
        self.dir = Path(shard_dir)
        self.manifest = Manifest.read(self.dir)
        self.entry = self.manifest.split(split)
        self.split, self.batch_size, self.seed, self.epoch = split, int(batch_size), int(seed), int(epoch)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.shuffle_buffer, self.skip_batches = max(1, int(shuffle_buffer)), int(skip_batches)
        self.resampled, self.drop_last = bool(resampled), bool(drop_last)
        self.latent_hw = (int(self.manifest.latent_h), int(self.manifest.latent_w))
        self.dtype = np.dtype(self.manifest.dtype)
        self._npy_hdr = npy_header(self.latent_hw, self.dtype)
        self.use_flip = self.entry.hflip if hflip is None else bool(hflip)
        if self.use_flip and not self.entry.hflip:
            raise ShardError(f"split {split!r} in {self.dir} was extracted without --hflip; no mirrored tokens to use")
        total = int(self.entry.total)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.samples_per_rank = int(epoch_samples) if epoch_samples else total // self.world_size
        if self.samples_per_rank <= 0 or not self.entry.shards:
            raise ShardError(f"split {split!r} in {self.dir} has {total} samples, fewer than the {self.world_size} "
                             f"ranks reading it")
        full, rest = divmod(self.samples_per_rank, self.batch_size)
        self.num_batches = full + (0 if self.drop_last or rest == 0 else 1)
        if self.skip_batches > self.num_batches:
            raise ValueError(f"skip_batches={skip_batches} > {self.num_batches} batches per epoch")

    def __len__(self) -> int:
        return self.num_batches - self.skip_batches

    # -- the rank's sample stream (raw bytes; identical in every worker of the rank)
    def _ordered_shards(self) -> Iterator[ShardInfo]:
        shards = list(self.entry.shards)
        if self.resampled:  # draw with replacement, seeded per (seed, epoch, rank): ResampledShards semantics
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, 1))
            while True:
                yield shards[rng.randrange(len(shards))]
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch, 0)).shuffle(shards)  # same order on every rank
        yield from shards

    def _rank_samples(self) -> Iterator[dict]:
        i = kept = 0
        for s in self._ordered_shards():
            for sample in iter_shard(self.dir / s.name, s.count, s.bytes):
                if self.resampled or i % self.world_size == self.rank:
                    yield sample
                    kept += 1
                    if kept == self.samples_per_rank:
                        return
                i += 1

    def _shuffled(self, it: Iterator[dict]) -> Iterator[dict]:
        if not self.shuffle:
            yield from it
            return
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, 2))
        buf: list[dict] = []
        for x in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(x)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = x
        rng.shuffle(buf)
        yield from buf

    # -- decoding (only the worker's own batches)
    def _decode(self, raw: bytes, name: str) -> np.ndarray:
        hdr = self._npy_hdr  # fast path: the exact header the writer emits -> no np.load parsing
        if len(raw) == len(hdr) + self.dtype.itemsize * self.latent_hw[0] * self.latent_hw[1] and raw.startswith(hdr):
            return np.frombuffer(raw, dtype=self.dtype, offset=len(hdr))
        try:
            a = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise ShardError(f"undecodable tokens in {self.dir} sample {name}: {e}") from None
        if tuple(a.shape) != self.latent_hw:
            raise ShardError(f"sample {name} in {self.dir} has tokens of shape {a.shape}, manifest says "
                             f"{self.latent_hw}")
        return a.reshape(-1)

    def _collate(self, b: int, samples: list[dict], flips: list[bool]) -> tuple[int, torch.Tensor, torch.Tensor]:
        toks = np.stack([self._decode(s["tokens_flip.npy" if f else "tokens.npy"], s["__key__"])
                         for s, f in zip(samples, flips)]).astype(np.int64)  # (B, h*w)
        labels = torch.tensor([int(s.get("cls", b"-1")) for s in samples], dtype=torch.long)
        return b, torch.from_numpy(toks), labels

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        flip_rng = random.Random(_seed(self.seed, self.epoch, self.rank, 3))
        b, batch, flips = 0, [], []
        for sample in self._shuffled(self._rank_samples()):
            batch.append(sample)
            flips.append(self.use_flip and flip_rng.random() < 0.5)  # drawn for every sample: worker-independent
            if len(batch) == self.batch_size:
                if b >= self.skip_batches and (b - self.skip_batches) % num_workers == worker:
                    yield self._collate(b, batch, flips)
                b, batch, flips = b + 1, [], []
                if b == self.num_batches:
                    return
        mine = b >= self.skip_batches and (b - self.skip_batches) % num_workers == worker
        if batch and b < self.num_batches and mine:
            yield self._collate(b, batch, flips)


class TokenLoader:
    """Iterable of ``(tokens [B, h*w] long, labels [B] long)`` over a DataLoader of :class:`TokenShardStream`;
    re-orders worker outputs by batch index so the stream never depends on num_workers or scheduling.
    Do not pass it through ``accelerator.prepare`` (it would split an already rank-split stream again)."""

    def __init__(self, stream: TokenShardStream, num_workers: int = 0):
        self.stream = stream
        # Own generator: starting a DataLoader iterator draws its worker base seed from the *global* RNG unless
        # given one, which would shift every later random draw (dropout...) of a resumed run.
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                  persistent_workers=False,
                                                  generator=torch.Generator().manual_seed(stream.seed))

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        want, pending = self.stream.skip_batches, {}
        for b, toks, labels in self.loader:
            pending[b] = (toks, labels)
            while want in pending:
                yield pending.pop(want)
                want += 1
        if pending or want != self.stream.num_batches:
            raise ShardError(f"token stream of {self.stream.dir} ended after batch {want} of "
                             f"{self.stream.num_batches} (shards changed while reading?)")


def make_token_loader(shard_dir: str | os.PathLike, split: str = "train", batch_size: int = 64, seed: int = 0,
                      epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                      shuffle_buffer: int = 2000, skip_batches: int = 0, resampled: bool = False,
                      epoch_samples: int | None = None, hflip: bool | None = None,
                      drop_last: bool = False) -> TokenLoader:
    """The stage-3 token stream for one (epoch, rank). Every rank gets ``len(loader)`` batches (equal across ranks);
    ``skip_batches=N`` yields exactly the full stream minus its first N batches (exact mid-epoch resume)."""
    stream = TokenShardStream(shard_dir, split, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank,
                              world_size=world_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                              skip_batches=skip_batches, resampled=resampled, epoch_samples=epoch_samples,
                              hflip=hflip, drop_last=drop_last)
    return TokenLoader(stream, num_workers=num_workers)
