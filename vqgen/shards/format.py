"""The shard folder format of stage 2: names, token dtypes, the per-rank work split and the manifest reader.

Layout of a shard folder (see docs/ARCHITECTURE.md)::

    <out>/<split>-r{rank:03d}-{n:06d}.tar   samples {"__key__": "%09d" source index, "tokens.npy": [h, w],
                                             "cls": int label or -1, "tokens_flip.npy": [h, w] with --hflip}
    <out>/.parts/<split>-r{rank:03d}.json    per-rank progress record: one entry per *complete* shard
    <out>/manifest.json                       written last (the commit point), merged from the parts

The writer (crash safety) is :mod:`vqgen.shards.writer`, the stage-3 token stream :mod:`vqgen.shards.reader`.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ShardError


FORMAT = "vqgen-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARTS_DIR = ".parts"
SPLITS = ("train", "test")
KEY_FORMAT = "%09d"
# Fixed tar headers -> reproducible shard bytes (an int mtime also avoids a PAX header per member: half the size).
TAR_KW = dict(mtime=0, user="vqgen", group="vqgen", mode=0o444, encoder=False)
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-r(?P<rank>\d{3})-(?P<n>\d{6})\.tar$")
EXTRACT_HINT = ("python extract_codes.py --checkpoint <runs/<name>/export> --dataset <name> --split {split} "
                 "--output {dir}")


# ----------------------------------------------------------------------------------------------------- naming
def token_dtype(codebook_size: int) -> np.dtype:
    """uint16 while every code fits (<= 65536 entries), else int32."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def shard_name(split: str, rank: int, n: int) -> str:
    return f"{split}-r{rank:03d}-{n:06d}.tar"


def rank_indices(n: int, rank: int, world_size: int) -> range:
    """Source indices that ``rank`` encodes: the strided range ``rank, rank + world_size, ...``.

    Strided rather than contiguous: ranks differ by at most one sample, it also works for a stream of unknown
    length (keep ``i % world_size == rank``), and the union over ranks is ``range(n)`` with no overlap.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return range(rank, n, world_size)


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



# ----------------------------------------------------------------------------------------------------- reader
def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest of a finished extraction; ShardError saying which command to run when there is none."""
    d = Path(shard_dir)
    path = d / MANIFEST_NAME
    if not path.is_file():
        what = "is missing" if not d.exists() else "has no manifest.json (extraction not run or not finished)"
        raise ShardError(f"shard folder {d} {what}. Extract the tokens first (stage 2): "
                         + EXTRACT_HINT.format(split="train", dir=d))
    man = read_json(path)
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise ShardError(f"{path} is not a vqgen shard manifest")
    if man.get("format_version", 0) > FORMAT_VERSION:
        raise ShardError(f"{path} has format version {man['format_version']}, newer than this vqgen understands "
                         f"({FORMAT_VERSION}); upgrade vqgen")
    return man


def check_tokenizer(manifest: dict, tokenizer: Any, shard_dir: str | os.PathLike | None = None) -> None:
    """Refuse shards made by another tokenizer. ``tokenizer``: an ``Export``, anything with ``.sha256``, or the
    sha256 string itself."""
    want = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "sha256", None)
    have = manifest.get("tokenizer", {}).get("sha256")
    if want is None:
        raise TypeError(f"check_tokenizer needs an Export or a sha256 string, got {type(tokenizer).__name__}")
    if have != want:
        where = f" in {shard_dir}" if shard_dir else ""
        src = getattr(tokenizer, "path", None)
        raise ShardError(f"the shards{where} were made with tokenizer {str(have)[:12]} but the tokenizer in use is "
                         f"{want[:12]}{f' ({src})' if src else ''}; re-extract them with this tokenizer "
                         f"(python extract_codes.py --checkpoint <its export> ... --overwrite) or use the matching one")


def split_entry(manifest: dict, split: str, shard_dir: str | os.PathLike = "<dir>") -> dict:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(f"no {split!r} split in {shard_dir} (has: {', '.join(sorted(splits)) or 'none'}); "
                         f"extract it: " + EXTRACT_HINT.format(split=split, dir=shard_dir))
    return splits[split]


def split_total(manifest: dict, split: str) -> int:
    """Number of samples stored for ``split`` (ShardError when the split was not extracted)."""
    return int(split_entry(manifest, split)["total"])


def has_split(shard_dir: str | os.PathLike, split: str) -> bool:
    """True when the folder has a finished manifest with this split (e.g. the held-out 'test' split)."""
    try:
        return split in read_manifest(shard_dir).get("splits", {})
    except ShardError:
        return False
