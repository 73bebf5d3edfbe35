"""Stage-2 writer: one resumable shard series per rank, merged into ``manifest.json`` by the main process.

A shard is written as ``.<name>.tmp``, fsynced, hashed, renamed and only then recorded in the rank's progress file
(atomic rewrite). A rerun keeps the longest prefix of recorded shards whose size and sha256 still match, deletes
every other file of that rank/split and redoes the rest. From a map-style source a resumed run writes the same bytes
as an uninterrupted one (fixed tar headers, contents a pure function of the settings); a streamed source stores
every sample exactly once, perhaps in another order (:meth:`RankShardWriter.done_keys`). Unreadable source images
are recorded as skipped (:meth:`RankShardWriter.skip`), not written.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds

from ..errors import ShardError
from ..fsutil import atomic_write_json, fsync_dir, sha256_file
from .format import (
    KEY_FORMAT,
    MANIFEST_NAME,
    PARTS_DIR,
    SHARD_RE,
    TAR_KW,
    Manifest,
    ShardInfo,
    SplitInfo,
    npy_header,
    part_path,
    read_json,
    sample_shape,
    shard_name,
)


def check_output(out_dir: str | os.PathLike, tokenizer_sha256: str, dataset: str) -> None:
    """Refuse an output folder that already holds shards (finished or not) from another tokenizer or dataset."""
    out = Path(out_dir)
    records = []
    if (out / MANIFEST_NAME).is_file():
        man = Manifest.read(out)
        records.append((out / MANIFEST_NAME, man.tokenizer_sha256, man.dataset))
    for p in sorted((out / PARTS_DIR).glob("*.json")) if (out / PARTS_DIR).is_dir() else []:
        s = (read_json(p) or {}).get("settings", {})
        records.append((p, s.get("tokenizer_sha256"), s.get("dataset")))
    for path, sha, ds in records:
        if sha != tokenizer_sha256:
            raise ShardError(f"{out} already holds shards made with another tokenizer ({str(sha)[:12]}, see {path}), "
                             f"not {tokenizer_sha256[:12]}: choose another --output_dir or pass --overwrite to "
                             f"replace them")
        if ds != dataset:
            raise ShardError(f"{out} already holds shards of dataset {ds!r}, not {dataset!r}: choose another "
                             f"--output_dir or pass --overwrite to replace them")


def clear_output(out_dir: str | os.PathLike) -> None:
    """``--overwrite``: remove what vqgen wrote there (shards, temp shards, parts, manifest); other files stay."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for p in out.iterdir():
        name = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
        if p.is_file() and (SHARD_RE.match(name) or p.name == MANIFEST_NAME):
            p.unlink()
    parts = out / PARTS_DIR
    if parts.is_dir():
        for p in parts.iterdir():
            p.unlink()
        parts.rmdir()
    fsync_dir(out)


class RankShardWriter:
    """One rank's resumable shard writer for one split (a ``webdataset.ShardWriter`` under temp names).

    ``settings`` is everything that determines the shard contents (tokenizer sha256, dataset, split, number of
    source samples, world size, shard size, batch size, hflip, views, dtype...). A rerun with different settings is
    refused. Use: ``done = w.resume()`` (samples already stored, always a multiple of shard_size unless the rank
    finished), then ``w.write(key, tokens, label[, tokens_flip])`` for the remaining samples in order, then
    ``w.close()``. ``tokens`` is (h, w), or (views, h, w) with ``views > 1`` (one fixed size per sample either way).
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, rank: int, settings: dict, shard_size: int,
                 latent_hw: tuple[int, int], dtype: np.dtype, views: int = 1):
        self.out, self.split, self.rank = Path(out_dir), split, rank
        self.settings, self.shard_size = dict(settings), int(shard_size)
        self.dtype = np.dtype(dtype)
        self.latent_hw = tuple(int(v) for v in latent_hw)
        self.shape = sample_shape(self.latent_hw, views)
        self.header = npy_header(self.shape, self.dtype)
        self.part_file = part_path(self.out, split, rank)
        self.shards: list[dict] = []
        self.complete = False
        self._writer: wds.ShardWriter | None = None
        self._written = 0  # samples handed to the current ShardWriter
        self._committed = 0  # of those, samples in committed shards
        # [key, shard number open when it was skipped]: unreadable source images, recorded instead of written; an
        # entry is valid once that shard is committed (or the rank completes)
        self.skipped: list[list[int]] = []
        self.class_counts: dict[int, int] = {}  # label -> samples written (labels >= 0); recorded when complete

    # -- resume
    def resume(self) -> int:
        """Keep verified complete shards, delete partial/unrecorded files of this rank; return samples kept."""
        self.out.mkdir(parents=True, exist_ok=True)
        rec = read_json(self.part_file)
        kept: list[dict] = []
        if rec is not None:
            if rec.get("settings") != self.settings:
                diff = sorted(k for k in set(rec.get("settings", {})) | set(self.settings)
                              if rec.get("settings", {}).get(k) != self.settings.get(k))
                raise ShardError(f"{self.part_file}: an earlier extraction into {self.out} used other settings "
                                 f"({', '.join(diff)} differ): rerun with the same flags to resume it, or pass "
                                 f"--overwrite to start fresh")
            for i, s in enumerate(rec.get("shards", [])):
                p = self.out / s["name"]
                if (s["name"] != shard_name(self.split, self.rank, i) or not p.is_file()
                        or p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]):
                    break
                kept.append(s)
            self.complete = bool(rec.get("complete")) and len(kept) == len(rec.get("shards", []))
            self.skipped = [e for e in rec.get("skipped", []) if self.complete or e[1] < len(kept)]
        keep_names = {s["name"] for s in kept}
        prefix = f"{self.split}-r{self.rank:03d}-"
        for p in self.out.iterdir():
            base = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
            if p.is_file() and base.startswith(prefix) and SHARD_RE.match(base) and p.name not in keep_names:
                p.unlink()  # a temp shard, or a shard renamed but never recorded, or one that failed verification
        self.shards = kept
        if rec is not None and len(kept) != len(rec.get("shards", [])):
            self._save_part()
        self.class_counts = {}
        for s in kept:   # the labels of the samples kept (only a resumed rank reads them: its own shards)
            for label in _shard_labels(self.out / s["name"]):
                self._count(label)
        return sum(s["count"] for s in kept)

    def _count(self, label: int) -> None:
        if label >= 0:
            self.class_counts[label] = self.class_counts.get(label, 0) + 1

    def done_keys(self) -> list[int]:
        """Keys of the samples already stored or recorded as skipped (after :meth:`resume`; tar headers only)."""
        keys = [e[0] for e in self.skipped]
        for s in self.shards:
            with tarfile.open(self.out / s["name"], mode="r:") as tf:
                keys += sorted({int(m.name.split(".", 1)[0]) for m in tf if m.isreg()})
        return keys

    def skip(self, key: int) -> None:
        """Record source sample ``key`` as unreadable (not written; listed in the manifest)."""
        self.skipped.append([int(key), len(self.shards)])

    # -- write
    def write(self, key: int, tokens: np.ndarray, label: int, tokens_flip: np.ndarray | None = None) -> None:
        if self._writer is None:
            self._writer = wds.ShardWriter(str(self.out / f".{self.split}-r{self.rank:03d}-%06d.tar.tmp"),
                                           maxcount=self.shard_size, maxsize=float("inf"), post=self._commit,
                                           start_shard=len(self.shards), verbose=0, **TAR_KW)
        sample = {"__key__": KEY_FORMAT % key, "tokens.npy": self._npy(tokens), "cls": str(int(label)).encode()}
        if tokens_flip is not None:
            sample["tokens_flip.npy"] = self._npy(tokens_flip)
        self._writer.write(sample)
        self._written += 1
        self._count(int(label))

    def _npy(self, a: np.ndarray) -> bytes:
        # Same bytes as np.save, without its per-call header formatting (much cheaper for small arrays).
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape != self.shape:
            raise ValueError(f"tokens of shape {a.shape}, expected {self.shape}")
        return self.header + a.tobytes()

    def _commit(self, tmp_name: str) -> None:
        """ShardWriter ``post`` hook: the temp shard is closed -> fsync, hash, rename, record."""
        tmp = Path(tmp_name)
        count = self._written - self._committed
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        final = tmp.with_name(tmp.name[1:-4])
        rec = {"name": final.name, "count": count, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
        os.replace(tmp, final)
        fsync_dir(self.out)
        self.shards.append(rec)
        self._committed += count
        self._save_part()

    def _save_part(self) -> None:
        atomic_write_json(self.part_file, self._record())

    def _record(self) -> dict:
        rec = {"settings": self.settings, "complete": self.complete, "shards": self.shards}
        if self.skipped:
            rec["skipped"] = self.skipped
        if self.complete:   # the samples' labels, for the split's class frequencies (manifest: class_counts)
            rec["class_counts"] = {str(k): v for k, v in sorted(self.class_counts.items())}
        return rec

    def close(self) -> dict:
        """Commit the last shard and mark the rank complete; returns the part record."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.complete = True
        self._save_part()
        return self._record()

    def abort(self) -> None:
        """Close without committing the open shard (on an exception); its temp file is removed."""
        w, self._writer = self._writer, None
        if w is not None:
            w.post = None
            fname = w.fname
            try:
                w.close()
            finally:
                if fname:
                    Path(fname).unlink(missing_ok=True)


def merge_manifest(out_dir: str | os.PathLike, split: str, world_size: int, header: Manifest, *, transforms: dict,
                   hflip: bool, expected_total: int | None = None, order_seed: int | None = None,
                   views: int = 1) -> Manifest:
    """Main process, after every rank closed its writer: merge the parts of ``split`` into manifest.json.

    ``header``: the format-level fields (a :class:`Manifest` without splits: tokenizer, codebook size, grid, dtype,
    classes, dataset). An existing manifest (another split) is kept and must name the same tokenizer. Raises
    ShardError when a part is missing/incomplete or the counts do not add up (unreadable source images, recorded as
    skipped by the ranks, count towards ``expected_total`` and are listed as ``skipped_unreadable``).
    """
    out = Path(out_dir)
    shards: list[ShardInfo] = []
    skipped: list[int] = []
    counts: list[int] | None = [0] * header.num_classes if header.num_classes > 0 else None
    for r in range(world_size):
        rec = read_json(part_path(out, split, r))
        if rec is None or not rec.get("complete"):
            raise ShardError(f"rank {r} did not finish split {split!r} in {out} (no complete "
                             f"{part_path(out, split, r).name}); rerun the same command to resume")
        shards.extend(ShardInfo(**s) for s in rec["shards"])
        skipped += [e[0] for e in rec.get("skipped", [])]
        rank_counts = rec.get("class_counts")   # absent: a part written before vqgen counted classes
        if counts is not None and rank_counts is not None:
            for label, c in rank_counts.items():
                if int(label) < len(counts):
                    counts[int(label)] += int(c)
        elif rank_counts is None:
            counts = None
    stale = [p.name for p in (out / PARTS_DIR).glob(f"{split}-r*.json") if int(p.stem.rsplit("-r", 1)[1]) >= world_size]
    if stale:
        raise ShardError(f"{out} holds parts of an extraction with more ranks ({', '.join(sorted(stale))}); "
                         f"pass --overwrite to start fresh")
    shards.sort(key=lambda s: s.name)
    total = sum(s.count for s in shards)
    if expected_total is not None and total + len(skipped) != expected_total:
        raise ShardError(f"split {split!r} in {out}: shards hold {total} samples (+ {len(skipped)} unreadable), the "
                         f"dataset has {expected_total}")
    old = Manifest.read(out) if (out / MANIFEST_NAME).is_file() else None
    if old is not None and old.tokenizer_sha256 != header.tokenizer_sha256:
        raise ShardError(f"{out / MANIFEST_NAME} names another tokenizer; pass --overwrite to replace it")
    splits = {**(old.splits if old is not None else {}),
              split: SplitInfo(total=total, shards=shards, transforms=transforms, hflip=bool(hflip),
                               order_seed=order_seed, skipped_unreadable=sorted(skipped), views=int(views),
                               class_counts=counts)}
    manifest = dataclasses.replace(header, splits=splits, path=out)
    manifest.write(out)
    return manifest


def _shard_labels(path: Path) -> list[int]:
    """The ``cls`` labels of one shard's samples, in order."""
    with tarfile.open(path, mode="r:") as tf:
        return [int(tf.extractfile(m).read()) for m in tf if m.isreg() and m.name.endswith(".cls")]
