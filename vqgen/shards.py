"""Stage-2 output: WebDataset token shards + ``manifest.json`` (writer) and the token stream of stage 3 (reader).

Layout of a shard folder (see docs/ARCHITECTURE.md)::

    <out>/<split>-r{rank:03d}-{n:06d}.tar   samples {"__key__": "%09d" source index, "tokens.npy": [h, w],
                                             "cls": int label or -1, "tokens_flip.npy": [h, w] with --hflip}
    <out>/.parts/<split>-r{rank:03d}.json    per-rank progress record: one entry per *complete* shard
    <out>/manifest.json                       written last (the commit point), merged from the parts

Writer (crash safety). A shard is written as ``.<name>.tmp``, fsynced, hashed, renamed to ``<name>`` and only
then recorded in the rank's progress file (atomic rewrite). A rerun keeps the longest prefix of recorded shards
whose size and sha256 still match, deletes every other file of that rank/split (temp files, renamed but
unrecorded shards) and redoes the rest. Shard contents are a pure function of (dataset, tokenizer, world size,
shard size, batch size), and tar headers are fixed (mtime 0, user/group "vqgen"), so a resumed run writes the same
bytes as an uninterrupted one.

Reader (exact, equal-length rank streams). Shards are split across ranks at the *sample* level: every rank reads
every shard of the split (in an order shuffled by (seed, epoch)) and keeps global stream positions
``i % world_size == rank``, truncated to ``total // world_size`` samples (the remainder, < world_size samples, is
dropped each epoch; a different one each epoch when shuffling). Why not WebDataset's shard-level
``split_by_node``/``split_by_worker``: with fewer shards than ranks x workers it starves or hangs a rank (the
open-muse multi-node failure) and with unequal shard sizes ranks get unequal batch counts, which deadlocks DDP.
Sample-level splitting is correct for any shard count; its cost is that each rank parses every shard, which for
token shards (~2 KB per sample) is cheap next to a training step. HF ``datasets`` falls back to the same scheme.
DataLoader workers split a rank's *batches* round-robin (batch b goes to worker (b - skip_batches) % num_workers)
and every batch carries its index, so the loader re-orders them: the rank's batch stream is identical for any
num_workers, and ``skip_batches=N`` is exactly "drop the first N batches" (exact mid-epoch resume).
``resampled=True`` instead draws shards with replacement per (seed, epoch, rank) (WebDataset ``ResampledShards``
+ ``with_epoch`` semantics) for ``epoch_samples`` samples per rank.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from .errors import ShardError
from .fsutil import atomic_write_json, fsync_dir, sha256_file

FORMAT = "vqgen-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARTS_DIR = ".parts"
SPLITS = ("train", "test")
KEY_FORMAT = "%09d"
# Fixed tar headers -> reproducible shard bytes (an int mtime also avoids a PAX header per member: half the size).
TAR_KW = dict(mtime=0, user="vqgen", group="vqgen", mode=0o444, encoder=False)
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-r(?P<rank>\d{3})-(?P<n>\d{6})\.tar$")
_EXTRACT_HINT = ("python extract_codes.py --checkpoint <runs/<name>/export> --dataset <name> --split {split} "
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


def _npy_header(shape: Sequence[int], dtype: np.dtype) -> bytes:
    """The exact bytes ``np.save`` writes before the data of an array of this shape/dtype."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype))
    raw = buf.getvalue()
    return raw[: len(raw) - int(np.prod(shape)) * dtype.itemsize]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"corrupt record {path}: {e} (delete it, or rerun with --overwrite)") from None


# ----------------------------------------------------------------------------------------------------- writer
def check_output(out_dir: str | os.PathLike, tokenizer_sha256: str, dataset: str) -> None:
    """Refuse an output folder that already holds shards (finished or not) from another tokenizer or dataset."""
    out = Path(out_dir)
    records = []
    man = _read_json(out / MANIFEST_NAME)
    if man is not None:
        records.append((out / MANIFEST_NAME, man.get("tokenizer", {}).get("sha256"), man.get("dataset")))
    for p in sorted((out / PARTS_DIR).glob("*.json")) if (out / PARTS_DIR).is_dir() else []:
        s = (_read_json(p) or {}).get("settings", {})
        records.append((p, s.get("tokenizer_sha256"), s.get("dataset")))
    for path, sha, ds in records:
        if sha != tokenizer_sha256:
            raise ShardError(f"{out} already holds shards made with another tokenizer ({str(sha)[:12]}, see {path}), "
                             f"not {tokenizer_sha256[:12]}: choose another --output or pass --overwrite to replace "
                             f"them")
        if ds != dataset:
            raise ShardError(f"{out} already holds shards of dataset {ds!r}, not {dataset!r}: choose another --output "
                             f"or pass --overwrite to replace them")


def clear_output(out_dir: str | os.PathLike) -> None:
    """``--overwrite``: remove what vqgen wrote there (shards, temp shards, parts, manifest); other files stay."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for p in out.iterdir():
        name = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
        if p.is_file() and (_SHARD_RE.match(name) or p.name == MANIFEST_NAME):
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
    source samples, world size, shard size, batch size, hflip, dtype...). A rerun with different settings is refused.
    Use: ``done = w.resume()`` (samples already stored, always a multiple of shard_size unless the rank finished),
    then ``w.write(key, tokens, label[, tokens_flip])`` for the remaining samples in order, then ``w.close()``.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, rank: int, settings: dict, shard_size: int,
                 latent_hw: tuple[int, int], dtype: np.dtype):
        self.out, self.split, self.rank = Path(out_dir), split, rank
        self.settings, self.shard_size = dict(settings), int(shard_size)
        self.dtype = np.dtype(dtype)
        self.latent_hw = tuple(int(v) for v in latent_hw)
        self.header = _npy_header(self.latent_hw, self.dtype)
        self.part_file = part_path(self.out, split, rank)
        self.shards: list[dict] = []
        self.complete = False
        self._writer: wds.ShardWriter | None = None
        self._written = 0  # samples handed to the current ShardWriter
        self._committed = 0  # of those, samples in committed shards

    # -- resume
    def resume(self) -> int:
        """Keep verified complete shards, delete partial/unrecorded files of this rank; return samples kept."""
        self.out.mkdir(parents=True, exist_ok=True)
        rec = _read_json(self.part_file)
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
        keep_names = {s["name"] for s in kept}
        prefix = f"{self.split}-r{self.rank:03d}-"
        for p in self.out.iterdir():
            base = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
            if p.is_file() and base.startswith(prefix) and _SHARD_RE.match(base) and p.name not in keep_names:
                p.unlink()  # a temp shard, or a shard renamed but never recorded, or one that failed verification
        self.shards = kept
        if rec is not None and len(kept) != len(rec.get("shards", [])):
            self._save_part()
        return sum(s["count"] for s in kept)

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

    def _npy(self, a: np.ndarray) -> bytes:
        # Same bytes as np.save, without its per-call header formatting (~10x faster for small arrays).
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape != self.latent_hw:
            raise ValueError(f"tokens of shape {a.shape}, expected {self.latent_hw}")
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
        atomic_write_json(self.part_file, {"settings": self.settings, "complete": self.complete,
                                           "shards": self.shards})

    def close(self) -> dict:
        """Commit the last shard and mark the rank complete; returns the part record."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.complete = True
        self._save_part()
        return {"settings": self.settings, "complete": True, "shards": self.shards}

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


def merge_manifest(out_dir: str | os.PathLike, split: str, world_size: int, header: dict, split_info: dict,
                   expected_total: int | None = None) -> dict:
    """Main process, after every rank closed its writer: merge the parts of ``split`` into manifest.json.

    ``header``: format-level fields (tokenizer, codebook_size, latent_h/w, dtype, num_classes, dataset);
    ``split_info``: transforms, hflip. An existing manifest (another split) is kept and must name the same
    tokenizer. Raises ShardError when a part is missing/incomplete or the counts do not add up.
    """
    out = Path(out_dir)
    shards: list[dict] = []
    for r in range(world_size):
        rec = _read_json(part_path(out, split, r))
        if rec is None or not rec.get("complete"):
            raise ShardError(f"rank {r} did not finish split {split!r} in {out} (no complete "
                             f"{part_path(out, split, r).name}); rerun the same command to resume")
        shards.extend(rec["shards"])
    stale = [p.name for p in (out / PARTS_DIR).glob(f"{split}-r*.json") if int(p.stem.rsplit("-r", 1)[1]) >= world_size]
    if stale:
        raise ShardError(f"{out} holds parts of an extraction with more ranks ({', '.join(sorted(stale))}); "
                         f"pass --overwrite to start fresh")
    shards.sort(key=lambda s: s["name"])
    total = sum(s["count"] for s in shards)
    if expected_total is not None and total != expected_total:
        raise ShardError(f"split {split!r} in {out}: shards hold {total} samples, the dataset has {expected_total}")
    man = _read_json(out / MANIFEST_NAME) or {}
    if man and man.get("tokenizer", {}).get("sha256") != header["tokenizer"]["sha256"]:
        raise ShardError(f"{out / MANIFEST_NAME} names another tokenizer; pass --overwrite to replace it")
    splits = dict(man.get("splits", {}))
    splits[split] = {**split_info, "total": total, "shards": shards}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "splits": splits}
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------- reader
def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest of a finished extraction; ShardError saying which command to run when there is none."""
    d = Path(shard_dir)
    path = d / MANIFEST_NAME
    if not path.is_file():
        what = "is missing" if not d.exists() else "has no manifest.json (extraction not run or not finished)"
        raise ShardError(f"shard folder {d} {what}. Extract the tokens first (stage 2): "
                         + _EXTRACT_HINT.format(split="train", dir=d))
    man = _read_json(path)
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
                         f"extract it: " + _EXTRACT_HINT.format(split=split, dir=shard_dir))
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


def verify_shards(shard_dir: str | os.PathLike, split: str) -> list[dict]:
    """Check every shard of ``split`` against the manifest (presence, size, sha256); ShardError names the shard."""
    d = Path(shard_dir)
    entry = split_entry(read_manifest(d), split, d)
    for s in entry["shards"]:
        p = d / s["name"]
        if not p.is_file():
            raise ShardError(f"shard {p} listed in the manifest is missing")
        if "bytes" in s and p.stat().st_size != s["bytes"]:
            raise ShardError(f"shard {p} has {p.stat().st_size} bytes, the manifest says {s['bytes']} (truncated?)")
        if sha256_file(p) != s["sha256"]:
            raise ShardError(f"shard {p} does not match its sha256 in the manifest (corrupt or modified)")
    return entry["shards"]


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
        self.manifest = read_manifest(self.dir)
        self.entry = split_entry(self.manifest, split, self.dir)
        self.split, self.batch_size, self.seed, self.epoch = split, int(batch_size), int(seed), int(epoch)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.shuffle_buffer, self.skip_batches = max(1, int(shuffle_buffer)), int(skip_batches)
        self.resampled, self.drop_last = bool(resampled), bool(drop_last)
        self.latent_hw = (int(self.manifest["latent_h"]), int(self.manifest["latent_w"]))
        self.dtype = np.dtype(self.manifest["dtype"])
        self._npy_hdr = _npy_header(self.latent_hw, self.dtype)
        self.use_flip = bool(self.entry.get("hflip")) if hflip is None else bool(hflip)
        if self.use_flip and not self.entry.get("hflip"):
            raise ShardError(f"split {split!r} in {self.dir} was extracted without --hflip; no mirrored tokens to use")
        total = int(self.entry["total"])
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.samples_per_rank = int(epoch_samples) if epoch_samples else total // self.world_size
        if self.samples_per_rank <= 0 or not self.entry["shards"]:
            raise ShardError(f"split {split!r} in {self.dir} has {total} samples, fewer than the {self.world_size} "
                             f"ranks reading it")
        full, rest = divmod(self.samples_per_rank, self.batch_size)
        self.num_batches = full + (0 if self.drop_last or rest == 0 else 1)
        if self.skip_batches > self.num_batches:
            raise ValueError(f"skip_batches={skip_batches} > {self.num_batches} batches per epoch")

    def __len__(self) -> int:
        return self.num_batches - self.skip_batches

    # -- the rank's sample stream (raw bytes; identical in every worker of the rank)
    def _ordered_shards(self) -> Iterator[dict]:
        shards = list(self.entry["shards"])
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
            for sample in iter_shard(self.dir / s["name"], s["count"], s.get("bytes")):
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
