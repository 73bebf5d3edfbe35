"""Turn ``--dataset`` into a streamed source: WebDataset urls or ``hf:<name>`` with ``--streaming``.

``open_stream(name, split, ...)`` -> ``(ShardSource, Decoder, DatasetInfo)``. Local tars are counted once
(tar headers only: no image is read or decoded) and the counts cached beside them in ``.vqgen-counts.json``, keyed
by (name, size, mtime) so a changed shard is recounted; where the folder cannot be written the count is kept in
memory. Remote urls (``pipe:``, ``http``...) and HF streams are not counted: an epoch then needs
``--samples_per_epoch`` (or, for an HF split whose size the dataset card records, that size).
Call :func:`open_stream` in the preparation step (:func:`vqgen.launch.prepare_first`): one process counts, the others read the
cache.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

from ..errors import ConfigError, DatasetUnavailableError
from ..fsutil import atomic_write_json
from .sources.wds import is_wds
from .streaming import Decoder, HFStreamShards, TarShards

COUNTS_FILE = ".vqgen-counts.json"


def is_streamed(name: str, streaming: bool) -> bool:
    """Is ``--dataset`` read as a stream: WebDataset urls always, ``hf:<name>`` with ``--streaming``."""
    return is_wds(name) or (streaming and name.startswith("hf:"))


def expand_urls(spec: str) -> list[str]:
    from braceexpand import braceexpand
    urls = [u for part in spec.split("::") for u in braceexpand(part)]
    if not urls:
        raise ConfigError(f"no WebDataset url in {spec!r}")
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_tar_samples(path: str | os.PathLike) -> int:
    """Samples in a WebDataset tar: distinct keys (webdataset's ``base_plus_ext``), read from the headers only."""
    from webdataset.tariterators import base_plus_ext
    n, last = 0, None
    with tarfile.open(path, mode="r:") as tf:  # seekable: TarFile.next() seeks over member data
        for m in tf:
            if not m.isreg() or re.match(r"__[^/]*__($|/)", m.name):
                continue
            key, _ = base_plus_ext(m.name)
            if key is not None and key != last:
                n, last = n + 1, key
    return n


def tar_counts(urls: list[str]) -> list[int] | None:
    """Per-shard sample counts of local tars (cached per folder), or None when any url is remote."""
    if not all(_is_local(u) for u in urls):
        return None
    out = []
    caches: dict[Path, dict] = {}
    dirty: set[Path] = set()
    for u in urls:
        p = Path(u).expanduser()
        if not p.is_file():
            raise DatasetUnavailableError(f"WebDataset shard not found: {p}")
        folder = p.parent
        if folder not in caches:
            try:
                caches[folder] = json.loads((folder / COUNTS_FILE).read_text())
            except (OSError, ValueError):
                caches[folder] = {}
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        rec = caches[folder].get(p.name)
        if rec is None or rec[:2] != stamp:
            try:
                rec = stamp + [count_tar_samples(p)]
            except (tarfile.TarError, OSError) as e:
                raise DatasetUnavailableError(f"WebDataset shard {p} is not a readable tar: {e}") from None
            caches[folder][p.name] = rec
            dirty.add(folder)
        out.append(int(rec[2]))
    for folder in dirty:
        try:
            atomic_write_json(folder / COUNTS_FILE, caches[folder])
        except OSError:
            pass  # read-only data: counted again next time (headers only)
    return out


def open_stream(name: str, split: str, data_dir: str, image_size: int, channels: int, *,
                streaming_hf: bool = False):
    """``(source, decoder, info)`` for a WebDataset spec, or ``hf:<ref>`` read with ``streaming=True``."""
    from . import DatasetInfo
    from .transforms import ImageTransform
    tf = ImageTransform(image_size, channels)
    if is_wds(name):
        spec = name[4:] if name.startswith("wds:") else name
        urls = expand_urls(spec)
        missing = [u for u in urls if _is_local(u) and not Path(u).expanduser().is_file()]
        if missing:
            raise DatasetUnavailableError(f"WebDataset shard(s) not found: {missing[:3]}"
                                          f"{' ...' if len(missing) > 3 else ''} (from {spec!r})")
        source = TarShards(urls, tar_counts(urls))
        desc = {"source": "webdataset", "urls": spec, "shards": len(urls),
                "total": sum(source.counts) if source.counts else None, **tf.describe()}
        return source, Decoder(tf, channels, image_size), DatasetInfo(name, split, image_size, channels, 0, desc)
    if name.startswith("hf:") and streaming_hf:
        return _open_hf_stream(name, name[3:], split, data_dir, tf, image_size, channels)
    raise ConfigError(f"{name!r} is not a streamed input (WebDataset urls, or hf:<name> with --streaming)")


def _open_hf_stream(name, ref, split, data_dir, tf, image_size, channels):
    import datasets

    from . import DatasetInfo
    from .sources.hf import _hf_offline
    from .splits import split_candidates
    path = Path(ref).expanduser()
    kw = {"streaming": True, "cache_dir": str(Path(data_dir) / "huggingface")}
    tried = split_candidates(split)
    ds, err = None, None
    for s in tried:
        try:
            if path.is_dir():
                with _hf_offline():
                    ds = datasets.load_dataset(str(path), split=s, **kw)
            else:
                ds = datasets.load_dataset(ref, split=s, **kw)
            used = s
            break
        except ValueError as e:
            if "split" not in str(e).lower():
                raise
            err = e
        except (OSError, ConnectionError) as e:
            raise DatasetUnavailableError(f"{ref}: cannot open the stream ({type(e).__name__}: {e})") from None
    if ds is None:
        raise ConfigError(f"{ref} has no split for {split!r} (tried {tried}): {err}")
    feats = ds.features or {}
    image_col = next((c for c in ("image", "img") if c in feats), None) or next(
        (c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ConfigError(f"no image column in {ref} (columns: {list(feats)})")
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    label_col = next((c for c in ("label", "labels") if c in feats), None)
    num_classes = feats[label_col].num_classes if label_col and isinstance(feats[label_col], datasets.ClassLabel) else 0
    source = HFStreamShards(ds, image_col, label_col)
    total = None
    with_info = getattr(ds, "info", None)
    if with_info is not None and with_info.splits and used in with_info.splits:
        total = with_info.splits[used].num_examples or None
    desc = {"source": "datasets.load_dataset(streaming=True)", "repo": ref, "source_split": used,
            "shards": len(source.names), "total": total, **tf.describe()}
    return source, Decoder(tf, channels, image_size, image_col, label_col), DatasetInfo(
        name, split, image_size, channels, num_classes, desc)
