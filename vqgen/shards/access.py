"""Random access into token shards: samples ``[a, b)`` of a shard read by byte offset, sha256 checked on the way.

vqgen's writer emits tars with fixed headers and the same members, of the same size, in every sample, so sample i
starts at ``i * stride``: the format is its own index (nothing else to keep in sync, no header scan). The layout is
read from the first sample and checked against the manifest's byte count, and every chunk is checked again as it is
read, so a misaligned read is refused as a corrupt shard; a shard of another writer is read whole by webdataset's
tar iterator. With ``verify="full"`` the reader that starts a shard at byte 0 hashes all of it, so every shard a job
touches is hashed once per epoch. Details: docs/NOTES.md.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from webdataset.tariterators import tar_file_iterator

from ..errors import ShardError

BLOCK, RECORD = 512, 10240  # tar block; tarfile/GNU tar pad the archive to a multiple of the record
_READ = 8 << 20  # largest single read when hashing what is not decoded


@dataclass(frozen=True)
class ShardFile:
    """One shard of a split as the reader needs it: the manifest's entry with the shard's full path. ``bytes`` is
    None for manifests written before sizes were recorded: the file's own size is used, the sha256 still checks it."""

    path: Path
    count: int
    bytes: int | None
    sha256: str


@dataclass(frozen=True)
class Member:
    suffix: str  # "tokens.npy"
    offset: int  # of its header inside a sample
    name_tail: bytes  # the header's name field after the key, e.g. b".tokens.npy\0\0..."


@dataclass(frozen=True)
class Layout:
    stride: int  # bytes per sample
    key_len: int
    magic: bytes  # header bytes 257:265 ("ustar\0" + version)
    members: tuple[Member, ...]

    def member(self, suffix: str) -> Member | None:
        return next((m for m in self.members if m.suffix == suffix), None)


@dataclass
class Decoded:
    """Samples ``[start, start + n)`` of a shard: token arrays (n, views*h*w) and labels (n,) int64."""

    tokens: np.ndarray
    flip: np.ndarray | None
    labels: np.ndarray

    def rows(self, a: int, b: int) -> "Decoded":
        return Decoded(self.tokens[a:b], None if self.flip is None else self.flip[a:b], self.labels[a:b])


class ShardFiles:
    """One process's access to a split's shards: open files, layouts, decoding, bytes read (``bytes_read``)."""

    def __init__(self, shards: list[ShardFile], latent_hw: tuple[int, int], dtype: np.dtype, npy_header: bytes,
                 need_flip: bool, views: int = 1):
        self.shards, self.need_flip = shards, need_flip
        self.hw = int(latent_hw[0] * latent_hw[1]) * int(views)  # tokens per member: (views x) h x w
        self.dtype, self.npy_header = np.dtype(dtype), npy_header
        self.bytes_read = 0
        self.verified: set[int] = set()
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}  # file size of each shard opened (= the manifest's, checked)
        self._layouts: dict[int, Layout | None] = {}
        self._fallback: tuple[int, bytes, Decoded] | None = None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- files
    def _fd(self, i: int) -> int:
        if i not in self._fds:
            s = self.shards[i]
            try:
                fd = os.open(s.path, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardError(f"shard {s.path} listed in the manifest is missing") from None
            size = os.fstat(fd).st_size
            if s.bytes is not None and size != s.bytes:
                os.close(fd)
                raise ShardError(f"corrupt or truncated shard {s.path}: {size} bytes, the manifest says {s.bytes}; "
                                 f"re-extract (rerun extract_codes.py with --overwrite)")
            if len(self._fds) >= 16:  # a reader walks through shards: keep a few open
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[i], self._sizes[i] = fd, size
        return self._fds[i]

    def size(self, i: int) -> int:
        self._fd(i)
        return self._sizes[i]

    def read(self, i: int, offset: int, n: int) -> bytes:
        buf = os.pread(self._fd(i), n, offset)
        self.bytes_read += len(buf)
        if len(buf) != n:
            raise ShardError(f"corrupt or truncated shard {self.shards[i].path}: short read at byte {offset}")
        return buf

    # -- layout
    def layout(self, i: int) -> Layout | None:
        """The shard's fixed sample layout, or None when it has none (read it with :meth:`whole`)."""
        if i not in self._layouts:
            self._layouts[i] = self._probe(i)
        return self._layouts[i]

    def _probe(self, i: int) -> Layout | None:
        s, size = self.shards[i], self.size(i)
        members, off, key0, magic = [], 0, None, b""
        while off + BLOCK <= size - 2 * BLOCK:
            blk = self.read(i, off, BLOCK)
            if not blk.strip(b"\0"):
                break  # end of archive: a one-sample shard
            try:
                ti = tarfile.TarInfo.frombuf(blk, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise ShardError(f"corrupt shard {s.path}: bad tar header at byte {off} ({e})") from None
            if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                return None  # PAX / long-name headers: not vqgen's fixed layout
            key, _, suffix = ti.name.partition(".")
            if key0 is None:
                key0, magic = key, blk[257:265]
            elif key != key0:
                break
            members.append(Member(suffix, off, blk[len(key.encode()):100]))
            off += BLOCK + BLOCK * -(-ti.size // BLOCK)
        if not members:
            raise ShardError(f"corrupt shard {s.path}: no tar member where its first sample should be")
        tail = size - s.count * off
        if size % BLOCK or not 2 * BLOCK <= tail < 2 * BLOCK + RECORD:
            return None  # samples of different sizes: no fixed stride
        return Layout(off, len(key0.encode()), magic, tuple(members))

    # -- decoding
    def decode(self, i: int, buf: bytes, start: int, n: int) -> Decoded:
        """Samples ``[start, start + n)`` from their bytes ``buf`` (fixed layout); ShardError on any mismatch."""
        lay = self._layouts[i]
        arr = np.frombuffer(buf, dtype=np.uint8).reshape(n, lay.stride)  # (n, stride)
        first = lay.members[0]
        for m in lay.members:
            o, k = m.offset, lay.key_len
            ok = ((arr[:, o + k: o + 100] == np.frombuffer(m.name_tail, np.uint8)).all(1)
                  & (arr[:, o + 257: o + 265] == np.frombuffer(lay.magic, np.uint8)).all(1)
                  & (arr[:, o: o + k] == arr[:, first.offset: first.offset + k]).all(1))
            if not ok.all():
                bad = start + int(np.argmin(ok))
                raise ShardError(f"corrupt shard {self.shards[i].path}: sample {bad} does not have the tar layout of "
                                 f"its first sample (member {m.suffix})")
        tokens = self._npy(i, arr, lay.member("tokens.npy"), start)
        flip = self._npy(i, arr, lay.member("tokens_flip.npy"), start) if self.need_flip else None
        cls = lay.member("cls")
        if cls is None:
            labels = np.full(n, -1, dtype=np.int64)
        else:
            d = cls.offset + BLOCK
            try:
                labels = np.array([int(r.tobytes().split(b"\0", 1)[0]) for r in arr[:, d: d + 24]], dtype=np.int64)
            except ValueError:
                raise ShardError(f"corrupt shard {self.shards[i].path}: unreadable class label") from None
        return Decoded(tokens, flip, labels)

    def _npy(self, i: int, arr: np.ndarray, m: Member | None, start: int) -> np.ndarray:
        if m is None:
            raise ShardError(f"shard {self.shards[i].path} has no tokens member the manifest promises")
        d, h = m.offset + BLOCK, len(self.npy_header)
        size = self.hw * self.dtype.itemsize
        if (arr[:, d: d + h] == np.frombuffer(self.npy_header, np.uint8)).all():  # the writer's exact header
            return np.ascontiguousarray(arr[:, d + h: d + h + size]).view(self.dtype)  # (n, h*w)
        rows = []
        for r, row in enumerate(arr):  # another npy header (byte order, version...): let numpy parse it
            nbytes = int(row[m.offset + 124: m.offset + 136].tobytes().strip(b"\0 ") or b"0", 8)
            rows.append(self._load_npy(i, row[d: d + nbytes].tobytes(), start + r))
        return np.stack(rows)

    def _load_npy(self, i: int, raw: bytes, sample: int | str) -> np.ndarray:
        try:
            a = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ShardError(f"undecodable tokens in shard {self.shards[i].path} sample {sample}: {e}") from None
        if a.size != self.hw or not np.issubdtype(a.dtype, np.integer):
            raise ShardError(f"sample {sample} of shard {self.shards[i].path} has tokens of shape {a.shape} "
                             f"({a.dtype}), not the manifest's")
        return a.reshape(-1).astype(np.int64)

    # -- the fallback: a shard without a fixed layout, read and parsed whole (once per process)
    def whole(self, i: int) -> tuple[bytes, Decoded]:
        if self._fallback is None or self._fallback[0] != i:
            s = self.shards[i]
            data = self.read(i, 0, self.size(i))
            toks, flips, labels = [], [], []
            try:
                for key, smp in _samples(tar_file_iterator(io.BytesIO(data))):
                    toks.append(self._load_npy(i, smp["tokens.npy"], key))
                    if self.need_flip:
                        flips.append(self._load_npy(i, smp["tokens_flip.npy"], key))
                    labels.append(int(smp.get("cls", b"-1")))
            except (tarfile.TarError, KeyError, ValueError, EOFError) as e:
                raise ShardError(f"corrupt or truncated shard {s.path}: {e}") from None
            if len(toks) != s.count:
                raise ShardError(f"corrupt or truncated shard {s.path}: {len(toks)} samples, the manifest says "
                                 f"{s.count}")
            dec = Decoded(np.stack(toks), np.stack(flips) if flips else None, np.array(labels, dtype=np.int64))
            self._fallback = (i, data, dec)
        return self._fallback[1], self._fallback[2]


def _samples(members) -> Iterator[tuple[str, dict]]:
    """Group consecutive tar members ``key.ext`` into samples ``(key, {ext: bytes})`` (webdataset's grouping)."""
    key, cur = None, {}
    for m in members:
        k, _, ext = m["fname"].partition(".")
        if k != key and cur:
            yield key, cur
            cur = {}
        key, cur[ext] = k, m["data"]
    if cur:
        yield key, cur


class Hasher:
    """sha256 of one shard fed in order by the reader that started it at byte 0; gaps are read for the hash."""

    def __init__(self, files: ShardFiles, i: int):
        self.files, self.i, self.next, self.h = files, i, 0, hashlib.sha256()

    def feed(self, offset: int, buf: bytes) -> None:
        self._fill(offset)
        self.h.update(buf)
        self.next = offset + len(buf)

    def _fill(self, upto: int) -> None:
        while self.next < upto:
            n = min(_READ, upto - self.next)
            self.h.update(self.files.read(self.i, self.next, n))
            self.next += n

    def finish(self) -> None:
        s = self.files.shards[self.i]
        self._fill(self.files.size(self.i))
        if self.h.hexdigest() != s.sha256:
            raise ShardError(f"shard {s.path} does not match its sha256 in the manifest (corrupt or modified)")
        self.files.verified.add(self.i)
