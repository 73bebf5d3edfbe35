"""The shard folder format of stage 2: names, token dtypes, the per-rank work split and the manifest reader.

    <out>/<split>-r{rank:03d}-{n:06d}.tar   samples {"__key__": "%09d" source index, "tokens.npy": [h, w]
                                             ([views, h, w] with --views), "cls": int label or -1,
                                             "tokens_flip.npy": [h, w] with --hflip}
    <out>/.parts/<split>-r{rank:03d}.json    per-rank progress record: one entry per *complete* shard
    <out>/manifest.json                       written last (the commit point), merged from the parts

The manifest is :class:`Manifest` (one reader, one writer); the writer is :mod:`vqgen.shards.writer`, the stage-3
token reader :mod:`vqgen.shards.reader`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ShardError
from ..fsutil import atomic_write_json

FORMAT = "vqgen-shards"
FORMAT_VERSION = 2  # the newest this vqgen reads; a manifest says 2 only when a split has several views
MANIFEST_NAME = "manifest.json"
PARTS_DIR = ".parts"
SPLITS = ("train", "test")  # the usual ones; any name matching vqgen.config.SPLIT_RE can be extracted
KEY_FORMAT = "%09d"
# Fixed tar headers -> reproducible shard bytes (an int mtime also avoids a PAX header per member: half the size).
TAR_KW = dict(mtime=0, user="vqgen", group="vqgen", mode=0o444, encoder=False)
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-r(?P<rank>\d{3})-(?P<n>\d{6})\.tar$")
EXTRACT_HINT = ("python extract_codes.py --checkpoint <runs/<name>/export> --dataset <name> --split {split} "
                 "--output_dir {dir}")


# ----------------------------------------------------------------------------------------------------- naming
def token_dtype(codebook_size: int) -> np.dtype:
    """uint16 while every code fits (<= 65536 entries), else int32 (LFQ's 2^18 codes and beyond)."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def sample_shape(latent_hw: Sequence[int], views: int = 1) -> tuple[int, ...]:
    """Shape of a sample's ``tokens.npy``: (h, w), or (views, h, w) for a multi-view split."""
    h, w = (int(v) for v in latent_hw)
    return (h, w) if views == 1 else (int(views), h, w)


def shard_name(split: str, rank: int, n: int) -> str:
    return f"{split}-r{rank:03d}-{n:06d}.tar"


def rank_indices(n: int, rank: int, world_size: int, order_seed: int | None = None) -> Sequence[int]:
    """Source indices that ``rank`` encodes, in order: positions ``rank, rank + world_size, ...`` of the source
    order, or of its permutation :func:`source_order` when ``order_seed`` is given.

    Strided rather than contiguous: ranks differ by at most one sample and the union over ranks is ``range(n)``
    with no overlap. The permutation makes the shards of a class-sorted source (image folders, ImageNet) mix classes,
    so a reader of contiguous shard ranges still sees many classes per batch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if order_seed is None:
        return range(rank, n, world_size)
    return source_order(n, order_seed)[rank::world_size]


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def source_order(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64) that depends on ``(n, seed)`` only, in every numpy version.

    vqgen's own, not ``np.random.Generator.permutation``: numpy does not promise the same stream across versions,
    and a resumed extraction (or a byte-identical rerun) must rebuild exactly the order the first run used. The
    indices are sorted by a splitmix64 hash of ``(seed, index)`` (stable sort: ties keep source order).
    Adapted from: splitmix64 (Steele, Lea, Flood 2014), the finaliser used by java.util.SplittableRandom.
    """
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed + 1) * _MIX[0]
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        z ^= z >> np.uint64(31)
    return np.argsort(z, kind="stable").astype(np.int64)


def part_path(out_dir: str | os.PathLike, split: str, rank: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"{split}-r{rank:03d}.json"


def npy_header(shape: Sequence[int], dtype: np.dtype) -> bytes:
    """The exact bytes ``np.save`` writes before the data of an array of this shape/dtype."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype))
    raw = buf.getvalue()
    return raw[: len(raw) - int(np.prod(shape)) * dtype.itemsize]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"corrupt record {path}: {e} (delete it, or rerun with --overwrite)") from None


# ---------------------------------------------------------------------------------------------------- manifest
def _known(cls, d: dict) -> tuple[dict, dict]:
    """Split ``d`` into the fields of dataclass ``cls`` and the rest (kept as ``extra``: written back unchanged)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in d.items() if k in names}, {k: v for k, v in d.items() if k not in names}


@dataclass
class ShardInfo:
    """One complete shard: its file name, sample count, size (absent in early manifests) and sha256."""

    name: str
    count: int
    sha256: str
    bytes: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class SplitInfo:
    """One extracted split: its sample total, its shards, the image transform and whether mirrored tokens exist.

    ``order_seed``: a map-style source was encoded in the permutation of its indices seeded by this (None: in
    source order, as streams are). ``skipped_unreadable``: keys of source images that could not be decoded.
    ``views``: token maps per sample (one per augmented view of the image; how they were made is in
    ``transforms["views"]``); 1 = the plain layout. ``class_counts``: samples per class (labelled datasets; None in
    manifests written before vqgen counted them)."""

    total: int
    shards: list[ShardInfo]
    transforms: dict = field(default_factory=dict)
    hflip: bool = False
    order_seed: int | None = None
    skipped_unreadable: list[int] = field(default_factory=list)
    views: int = 1
    class_counts: list[int] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "SplitInfo":
        known, extra = _known(cls, d)
        known["shards"] = [ShardInfo(**_known(ShardInfo, s)[0]) for s in known.get("shards", [])]
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        out = {**self.extra, "total": self.total, "shards": [s.to_dict() for s in self.shards],
               "transforms": self.transforms, "hflip": self.hflip}
        if self.order_seed is not None:
            out["order_seed"] = self.order_seed
        if self.skipped_unreadable:
            out["skipped_unreadable"] = self.skipped_unreadable
        if self.views != 1:
            out["views"] = self.views
        if self.class_counts is not None:
            out["class_counts"] = self.class_counts
        return out


@dataclass
class Manifest:
    """``manifest.json``: what ties a shard folder to its tokenizer, written last by extraction (the commit point).

    :meth:`read` is its one reader, :meth:`write` its one writer; the JSON layout is that of format_version 1
    (docs/ARCHITECTURE.md) plus, in version 2, a split's ``views``; unknown keys are kept as they were. Whether a
    tokenizer or a prior fits these shards is decided by :func:`vqgen.export.check_compatible`.
    """

    tokenizer: dict                 # {"sha256", "config", "path"} of the tokenizer export
    codebook_size: int
    latent_h: int
    latent_w: int
    dtype: str                      # numpy dtype name of the stored tokens
    num_classes: int                # 0 = unlabeled
    dataset: str
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = 1         # as read; written as :meth:`required_version`
    extra: dict = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # the folder it was read from (not stored)

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.tokenizer.get("sha256")

    @classmethod
    def read(cls, shard_dir: str | os.PathLike) -> "Manifest":
        """The manifest of a finished extraction; ShardError saying which command to run when there is none."""
        d = Path(shard_dir)
        path = d / MANIFEST_NAME
        if not path.is_file():
            what = "is missing" if not d.exists() else "has no manifest.json (extraction not run or not finished)"
            raise ShardError(f"shard folder {d} {what}. Extract the tokens first (stage 2): "
                             + EXTRACT_HINT.format(split="train", dir=d))
        raw = read_json(path)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ShardError(f"{path} is not a vqgen shard manifest")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise ShardError(f"{path} has format version {raw['format_version']}, newer than this vqgen understands "
                             f"({FORMAT_VERSION}); upgrade vqgen")
        known, extra = _known(cls, raw)
        known.pop("path", None)
        known["splits"] = {k: SplitInfo.from_dict(v) for k, v in known.get("splits", {}).items()}
        try:
            return cls(**known, extra=extra, path=d)
        except TypeError as e:
            raise ShardError(f"{path} lacks manifest fields ({e})") from None

    def write(self, shard_dir: str | os.PathLike) -> None:
        """Write ``manifest.json`` atomically (temp + fsync + rename)."""
        atomic_write_json(Path(shard_dir) / MANIFEST_NAME, self.to_dict())

    def required_version(self) -> int:
        """2 when a split has several views (a version-1 reader would misread its samples), else 1."""
        return 2 if any(s.views != 1 for s in self.splits.values()) else 1

    def to_dict(self) -> dict:
        return {**self.extra, "format": self.format, "format_version": self.required_version(),
                "tokenizer": self.tokenizer, "codebook_size": self.codebook_size, "latent_h": self.latent_h,
                "latent_w": self.latent_w, "dtype": self.dtype, "num_classes": self.num_classes,
                "dataset": self.dataset, "splits": {k: v.to_dict() for k, v in self.splits.items()}}

    def split(self, name: str) -> SplitInfo:
        """The entry of split ``name``; ShardError saying how to extract it when it is absent."""
        if name not in self.splits:
            where = self.path or "<dir>"
            raise ShardError(f"no {name!r} split in {where} (has: {', '.join(sorted(self.splits)) or 'none'}); "
                             f"extract it: " + EXTRACT_HINT.format(split=name, dir=where))
        return self.splits[name]


def has_split(shard_dir: str | os.PathLike, split: str) -> bool:
    """True when the folder has a finished manifest with this split (e.g. the held-out 'test' split)."""
    try:
        return split in Manifest.read(shard_dir).splits
    except ShardError:
        return False
