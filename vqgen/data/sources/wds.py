"""WebDataset tar shards of images (``jpg/png/jpeg/webp`` + ``cls``) as an IterableDataset.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DatasetUnavailableError
from ..transforms import ImageTransform


class _WdsItem:
    """WebDataset sample dict -> (image tensor, label); picklable for DataLoader workers."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, sample: dict):
        key = next((k for k in ("jpg", "png", "jpeg", "webp") if k in sample), None)
        if key is None:
            raise ValueError(f"WebDataset sample {sample.get('__key__')} has no jpg/png/jpeg/webp image")
        return self.transform(sample[key]), int(sample.get("cls", -1))


def is_wds(name: str) -> bool:
    return name.startswith("wds:") or name.endswith(".tar") or bool(re.search(r"\{\d+\.\.\d+\}", name))


def build_wds(urls: str, tf: ImageTransform):
    """IterableDataset in shard order. Every rank sees the whole stream (no node splitting): the consumers split it
    (stage 2 keeps sample i on rank i % world_size; accelerate dispatches batches for iterable datasets), and
    ``split_by_node`` would starve ranks when shards < ranks. DataLoader workers still split shards."""
    import webdataset as wds
    from braceexpand import braceexpand
    if "://" not in urls and not urls.startswith("pipe:"):
        missing = [u for u in braceexpand(urls) if not Path(u).expanduser().is_file()]
        if missing:
            raise DatasetUnavailableError(f"WebDataset shard(s) not found: {missing[:3]}"
                                          f"{' ...' if len(missing) > 3 else ''} (from {urls!r})")
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return ds.decode("pil").map(_WdsItem(tf)), {"source": "webdataset", "urls": urls}
