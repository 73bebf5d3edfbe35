"""Hugging Face ``datasets``: hub ids (cached under ``<data_dir>/huggingface``), local data files, save_to_disk copies.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from ...errors import ConfigError, DatasetUnavailableError
from ...offline import check_download, download_timeout, unavailable
from ..splits import split_candidates
from ..transforms import IMAGE_EXTENSIONS, ImageTransform


def is_saved_hf(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def is_hf_files_dir(path: Path) -> bool:
    """A folder of parquet/arrow files (e.g. from ``huggingface-cli download``) and no loose images."""
    pats = ("*.parquet", "*/*.parquet", "*.arrow", "*/*.arrow")
    return any(next(path.glob(p), None) for p in pats) and not any(
        f.suffix.lower() in IMAGE_EXTENSIONS for f in path.iterdir())


def _dict_split(d, s: str):
    if s not in d:
        raise ValueError(f"Unknown split {s!r}; available: {list(d)}")
    return d[s]


@contextlib.contextmanager
def _hf_offline():
    """Make ``datasets``/``huggingface_hub`` use only the local cache (they read these flags at call time)."""
    import datasets
    from huggingface_hub import constants
    old = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = old


def _hf_split(load: Callable[[str], Any], split: str, where: str):
    err = None
    for s in split_candidates(split):
        try:
            return load(s), s
        except ValueError as e:  # "Unknown split": try the next name
            if "split" not in str(e).lower():
                raise
            err = e
    raise ConfigError(f"{where} has no split for {split!r} (tried {split_candidates(split)}): {err}")


def load_hf(name: str, ref: str, split: str, data_dir: str, download: bool, local_copy: Path | None = None):
    """Returns (datasets.Dataset, split name used, description). ``ref`` is a hub id or a local path."""
    import datasets
    path = Path(ref).expanduser()
    for p in ([local_copy] if local_copy else []) + [path]:
        if p.is_dir() and is_saved_hf(p):
            d = datasets.load_from_disk(str(p))
            desc = {"source": "datasets.load_from_disk", "path": str(p)}
            if isinstance(d, datasets.DatasetDict):
                return *_hf_split(lambda s: _dict_split(d, s), split, str(p)), desc
            return d, "all (single Dataset)", desc
    if path.is_dir():  # local data files: the packaged builders read them without network
        with _hf_offline():
            ds, used = _hf_split(lambda s: datasets.load_dataset(str(path), split=s), split, str(path))
        return ds, used, {"source": "datasets.load_dataset", "path": str(path)}
    cache = Path(data_dir) / "huggingface"
    looked = (f"{local_copy} (datasets.save_to_disk copy) and " if local_copy else "") + f"{cache} (HF cache)"
    how = (f"on a machine with internet run `python -c \"import datasets; datasets.load_dataset('{ref}')"
           f".save_to_disk('{local_copy.name if local_copy else 'copy'}')\"` and copy that folder to "
           f"{local_copy or 'this machine'}" + ("" if local_copy else " then pass --dataset /path/to/copy") +
           f"; or `huggingface-cli download {ref} --repo-type dataset --local-dir DIR` and pass --dataset hf:DIR")

    def load(s):
        return datasets.load_dataset(ref, split=s, cache_dir=str(cache))

    try:
        with _hf_offline():
            ds, used = _hf_split(load, split, ref)
    except OSError:  # not cached (ConnectionError/FileNotFoundError are OSErrors)
        check_download(name, download, "huggingface.co", 443, looked, how)
        try:
            with download_timeout():
                ds, used = _hf_split(load, split, ref)
        except (ConfigError, DatasetUnavailableError):
            raise
        except Exception as e:
            raise unavailable(name, f"the download failed ({type(e).__name__}: {e})", looked, how) from e
    return ds, used, {"source": "datasets.load_dataset", "repo": ref, "cache_dir": str(cache)}


class HFImageDataset(Dataset):
    """Map-style view of a ``datasets.Dataset``: (transformed image, int label or -1)."""

    def __init__(self, ds, image_col: str, label_col: str | None, transform: ImageTransform):
        self.ds, self.image_col, self.label_col, self.transform = ds, image_col, label_col, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        lab = row[self.label_col] if self.label_col else -1
        return self.transform(row[self.image_col]), (int(lab) if isinstance(lab, (int, np.integer)) else -1)


def wrap_hf(ds, tf: ImageTransform, use_labels: bool):
    import datasets
    feats = ds.features
    image_col = next((c for c in ("image", "img") if c in feats), None) or next(
        (c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ConfigError(f"no image column in Hugging Face dataset (columns: {list(feats)}); expected 'image'/'img'")
    if not isinstance(feats[image_col], datasets.Image):  # file paths or {"bytes", "path"} dicts
        ds = ds.cast_column(image_col, datasets.Image())
    label_col = next((c for c in ("label", "labels") if c in feats), None) if use_labels else None
    num_classes = 0
    if label_col and isinstance(feats[label_col], datasets.ClassLabel):
        num_classes = feats[label_col].num_classes
    elif label_col and isinstance(feats[label_col], datasets.Value) and "int" in feats[label_col].dtype:
        num_classes = int(max(ds[label_col], default=-1)) + 1
    else:
        label_col = None  # absent or multi-label
    cols = [image_col] + ([label_col] if label_col else [])
    return HFImageDataset(ds.select_columns(cols), image_col, label_col, tf), num_classes
