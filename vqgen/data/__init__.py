"""Datasets for every stage: one registry, one transform, one item format, clear errors when data is missing.

Items are ``(image FloatTensor [C, H, W] in [-1, 1], label int)``, label -1 when the source has none; an image that
cannot be decoded gives a marked item (:data:`vqgen.data.streaming.UNREADABLE`) so that item i stays item i. The
transform is deterministic (resize the shorter side, center crop, scale to [-1, 1]) so that stage 2 can record it in
the manifest. :func:`build_dataset` takes a registry name (:data:`DATASETS`; ``digits`` needs no download), an image
folder, MNIST-family IDX archives, ``hf:<id>`` or a ``save_to_disk`` folder, or WebDataset urls (what each accepts:
docs/NOTES.md). One small module per source in :mod:`vqgen.data.sources`; the transform in
:mod:`vqgen.data.transforms`; data that is missing fails fast (:mod:`vqgen.offline`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from ..config.datasets import DATASETS, GENERIC_CHANNELS, GENERIC_IMAGE_SIZE, DatasetSpec  # noqa: F401 (re-exported)
from ..errors import ConfigError, DatasetUnavailableError
from .sources.digits import DigitsDataset
from .sources.folder import build_folder, build_tinyimagenet
from .sources.hf import is_hf_files_dir, is_saved_hf, load_hf, wrap_hf
from .sources.medmnist import build_medmnist
from .sources.torchvision import build_torchvision
from .sources.wds import build_wds, is_wds
from .splits import normalize_split
from .transforms import ImageTransform


@dataclass
class DatasetInfo:
    name: str
    split: str
    image_size: int
    channels: int
    num_classes: int                    # 0 = unlabeled
    transforms: dict = field(default_factory=dict)  # JSON-able; recorded in the shard manifest


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name.lower(), list(DATASETS), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown dataset {name!r}.{hint} Valid names: {', '.join(DATASETS)}; or a local image "
                       "folder, a datasets.save_to_disk folder, hf:<hub id or path>, wds:<url> / *.tar shards.")


def build_dataset(name: str, split: str = "train", data_dir: str = "data", image_size: int | None = None,
                  channels: int | None = None, download: bool = True) -> tuple[Dataset, DatasetInfo]:
    """Build the dataset ``name`` (registry name or generic input, see the module docstring) for ``split``.

    ``image_size``/``channels`` default to the registry's values (64 / 3 for generic inputs). Raises
    :class:`ConfigError` for unknown names/bad values and :class:`DatasetUnavailableError` for missing data.
    """
    split = normalize_split(split)
    spec = DATASETS.get(name)
    generic = spec is None
    if not generic and split not in ("train", "val", "test"):
        raise ConfigError(f"dataset {name!r} has the splits train, val and test, not {split!r}")
    image_size = int(image_size or (GENERIC_IMAGE_SIZE if generic else spec.image_size))
    channels = int(channels or (GENERIC_CHANNELS if generic else spec.channels))
    if image_size <= 0 or channels not in (1, 3):
        raise ConfigError(f"need image_size > 0 and channels 1 or 3, got {image_size} and {channels}")
    tf = ImageTransform(image_size, channels)
    num_classes = 0 if generic else spec.num_classes

    if generic:
        path = Path(name).expanduser()
        if name.startswith("hf:") or (path.is_dir() and (is_saved_hf(path) or is_hf_files_dir(path))):
            hf_ds, used, desc = load_hf(name, name[3:] if name.startswith("hf:") else name, split, data_dir,
                                         download)
            ds, num_classes = wrap_hf(hf_ds, tf, use_labels=True)
            desc["source_split"] = used
        elif is_wds(name):
            ds, desc = build_wds(name[4:] if name.startswith("wds:") else name, tf)
        elif path.is_dir():
            ds, desc, num_classes = build_folder(path, split, tf)
        elif "/" in name or os.sep in name or name.startswith((".", "~")):
            raise DatasetUnavailableError(f"dataset folder {path} does not exist (for a Hugging Face hub dataset "
                                          f"use --dataset hf:{name})")
        else:
            raise _unknown(name)
    elif spec.source == "digits":
        ds = DigitsDataset(split, image_size, channels)
        desc = ds.description
    elif spec.source == "torchvision":
        ds, desc = build_torchvision(name, spec, split, data_dir, tf, download)
    elif spec.source == "medmnist":
        ds, desc = build_medmnist(name, spec, split, data_dir, tf, download)
    elif spec.source == "tinyimagenet":
        ds, desc = build_tinyimagenet(name, spec, split, data_dir, tf)
    else:  # hf registry entry: a save_to_disk copy at <data_dir>/<subdir> first, then the HF cache / hub
        hf_ds, used, desc = load_hf(name, spec.target, split, data_dir, download, Path(data_dir) / spec.subdir)
        ds, _ = wrap_hf(hf_ds, tf, use_labels=spec.num_classes > 0)
        desc["source_split"] = used
    if spec is None or spec.source != "digits":
        desc = {**desc, **tf.describe()}
    return ds, DatasetInfo(name, split, image_size, channels, num_classes, desc)
