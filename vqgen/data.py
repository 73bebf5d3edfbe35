"""Datasets for every stage: one registry, one transform, one item format, clear errors when data is missing.

Items are ``(image FloatTensor [C, H, W] in [-1, 1], label int)``; the label is -1 when the source has none.
The transform is deterministic (convert to the wanted channels -> resize the shorter side (bicubic, antialiased)
-> center crop -> [-1, 1]) so that stage 2 can record it in the shard manifest and extraction is reproducible.

Inputs accepted by :func:`build_dataset`:
  * a registry name (:data:`DATASETS`); ``"digits"`` is the offline demo set (scikit-learn, no download);
  * a local image folder: images anywhere below it; if *all* images sit in subfolders, the label is the index of
    the top-level subfolder in sorted order, else -1. If the folder has ``train/`` / ``val/`` / ``test/``
    subfolders the requested split is taken from them, otherwise the whole folder serves every split. Images may
    differ in size and mode (L, RGB, RGBA, P, I;16...): each is converted to the wanted channels and resized +
    center-cropped by the one transform above. Files that PIL cannot open and verify() are skipped when the index
    is built (one warning with the count, also recorded as ``skipped_unreadable``). A file that passes verify()
    but fails to decode later (a truncated JPEG: verify() does not decode the data) is *not* skipped, because
    item i must stay item i for exact resume and exactly-once extraction: loading it raises
    :class:`DatasetUnavailableError` naming the file (delete or replace it and rerun);
  * ``hf:<hub id or local path>`` or a local folder written by ``datasets.save_to_disk``: Hugging Face
    ``datasets`` (image column ``image``/``img`` or any ``Image`` feature, label column ``label``/``labels``);
  * WebDataset urls (``wds:<url>``, ``*.tar`` or ``{000..009}`` brace patterns): an IterableDataset decoding
    ``jpg;png;jpeg;webp`` and ``cls`` (num_classes is reported as 0: the stream is not scanned).

Missing data: vqgen first loads without downloading; only if that fails and ``download=True`` it probes the
download host (2 s, DNS included; no probe at all when VQGEN_OFFLINE / HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is
set) and then calls the library's own download. Otherwise a :class:`DatasetUnavailableError` says what is missing,
where vqgen looked and how to provide the files (libraries left alone hang ~24 s on DNS when offline).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError, DatasetUnavailableError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
OFFLINE_ENV_VARS = ("VQGEN_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
PROBE_TIMEOUT_S = 2.0
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0  # a stalled download fails instead of hanging forever
GENERIC_IMAGE_SIZE, GENERIC_CHANNELS = 64, 3
DIGITS_NUM_TRAIN = 1500  # of 1797; the remaining 297 are the test split


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry. ``subdir`` is where the files live under ``data_dir`` (shown in errors)."""
    image_size: int
    channels: int
    num_classes: int           # 0 = unlabeled (items carry label -1)
    source: str                # "digits" | "torchvision" | "medmnist" | "tinyimagenet" | "hf"
    target: str = ""           # torchvision class, MedMNIST flag or HF hub id
    subdir: str = ""
    host: str = ""             # download host probed before downloading
    port: int = 443


def _tv(size, ch, ncls, cls, subdir, host, port=443):
    return DatasetSpec(size, ch, ncls, "torchvision", cls, subdir, host, port)


def _med(flag, ch, ncls):
    return DatasetSpec(32, ch, ncls, "medmnist", flag, f"medmnist/{flag}.npz", "zenodo.org")


def _hf(repo, ncls, subdir):
    return DatasetSpec(128, 3, ncls, "hf", repo, subdir, "huggingface.co")


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(16, 1, 10, "digits"),
    "mnist": _tv(32, 1, 10, "MNIST", "MNIST/raw", "ossci-datasets.s3.amazonaws.com"),
    "fashionmnist": _tv(32, 1, 10, "FashionMNIST", "FashionMNIST/raw",
                        "fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    # chestmnist is multi-label (14 binary findings): no single class, so it is treated as unlabeled (-1).
    "chestmnist": _med("chestmnist", 1, 0), "octmnist": _med("octmnist", 1, 4),
    "tissuemnist": _med("tissuemnist", 1, 8), "pneumoniamnist": _med("pneumoniamnist", 1, 2),
    "bloodmnist": _med("bloodmnist", 3, 8), "dermamnist": _med("dermamnist", 3, 7),
    "retinamnist": _med("retinamnist", 3, 5),
    "svhn": _tv(32, 3, 10, "SVHN", "svhn", "ufldl.stanford.edu", 80),
    "cifar10": _tv(32, 3, 10, "CIFAR10", "cifar-10-batches-py", "www.cs.toronto.edu"),
    "cifar100": _tv(32, 3, 100, "CIFAR100", "cifar-100-python", "www.cs.toronto.edu"),
    "tinyimagenet": DatasetSpec(64, 3, 200, "tinyimagenet", "", "tiny-imagenet-200"),
    "places365": _tv(128, 3, 365, "Places365", "places365", "data.csail.mit.edu", 80),
    "dtd": _tv(128, 3, 47, "DTD", "dtd/dtd", "www.robots.ox.ac.uk"),
    "imagenet": _hf("benjamin-paine/imagenet-1k-256x256", 1000, "imagenet"),
    "celeba": _hf("korexyz/celeba-hq-256x256", 0, "celeba"),  # unconditional: labels not used
}


@dataclass
class DatasetInfo:
    name: str
    split: str
    image_size: int
    channels: int
    num_classes: int                    # 0 = unlabeled
    transforms: dict = field(default_factory=dict)  # JSON-able; recorded in the shard manifest


# ----------------------------------------------------------------------------------------------- transforms
def _convert(img, channels: int):
    """PIL image of any mode -> "L" or "RGB" (palette via RGBA, 16-bit/float grayscale rescaled to 8 bit)."""
    from PIL import Image
    if img.mode == "P":
        img = img.convert("RGBA")
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    return img.convert("L" if channels == 1 else "RGB")


class ImageTransform:
    """PIL image -> [C, H, W] float in [-1, 1]. A module-level class so DataLoader workers can pickle it."""

    def __init__(self, image_size: int, channels: int):
        from torchvision import transforms as T
        self.image_size, self.channels = image_size, channels
        self._tf = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                              T.CenterCrop(image_size), T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)])

    def __call__(self, img) -> torch.Tensor:
        return self._tf(_convert(img, self.channels))

    def describe(self) -> dict:
        return {"convert": "L" if self.channels == 1 else "RGB", "resize_shorter_side": self.image_size,
                "interpolation": "bicubic", "antialias": True, "center_crop": self.image_size,
                "to_tensor": True, "normalize": {"mean": 0.5, "std": 0.5}, "range": [-1, 1]}


class MappedDataset(Dataset):
    """Wrap a dataset yielding ``(PIL image, target)``: apply the transform, turn the target into an int."""

    def __init__(self, base, transform: ImageTransform, label_fn: Callable[[Any], int]):
        self.base, self.transform, self.label_fn = base, transform, label_fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, target = self.base[i]
        return self.transform(img), self.label_fn(target)


def _int_label(t) -> int:
    return int(np.asarray(t).reshape(-1)[0])


def _no_label(_t) -> int:
    return -1


# ----------------------------------------------------------------------------------------- offline handling
def _offline_reason() -> str | None:
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode is set ({var}=1)"
    return None


def probe_host(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection to host:port opens within ``timeout`` s. DNS runs in a daemon thread so a hung
    resolver is bounded by the same timeout (socket timeouts do not cover getaddrinfo)."""
    ok: list[bool] = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _unavailable(name: str, reason: str, looked: str, how: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(f"dataset {name!r} is not on disk and {reason}.\n  vqgen looked in: {looked}\n"
                                   f"  to provide it: {how}")


def _check_download(name: str, download: bool, host: str, port: int, looked: str, how: str) -> None:
    """Raise DatasetUnavailableError unless a download may start: allowed, not forced offline, host reachable."""
    reason = "download=False" if not download else _offline_reason()
    if reason is None and not probe_host(host, port):
        reason = f"the download host {host}:{port} cannot be reached (no connection within {PROBE_TIMEOUT_S:g} s)"
    if reason:
        raise _unavailable(name, reason, looked, how)


@contextlib.contextmanager
def _download_timeout():
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _load_or_download(name: str, load: Callable[[bool], Any], download: bool, host: str, port: int,
                      looked: str, how: str):
    """``load(download)`` from disk first; download (after the checks) only when the files are missing."""
    try:
        return load(False)
    except (RuntimeError, OSError):  # torchvision / medmnist say "Dataset not found" this way
        pass
    _check_download(name, download, host, port, looked, how)
    try:
        with _download_timeout():
            return load(True)
    except Exception as e:  # network errors come in many types; the message keeps the cause
        raise _unavailable(name, f"the download failed ({type(e).__name__}: {e})", looked, how) from e


# ------------------------------------------------------------------------------------------ registry loaders
def _norm_split(split: str) -> str:
    s = str(split).lower()
    for norm, aliases in (("train", ("train", "training")), ("val", ("val", "valid", "validation")),
                          ("test", ("test", "testing"))):
        if s in aliases:
            return norm
    raise ConfigError(f"unknown split {split!r}: use train, val (validation) or test")


class DigitsDataset(Dataset):
    """scikit-learn's bundled 1797 real 8x8 handwritten digits (values 0..16, 10 classes): works offline.

    Split: ``np.random.default_rng(0).permutation(1797)``; the first 1500 are train, the last 297 test ("val" is
    the test split). Upsampled bicubically to ``image_size`` once at construction (a few MB) so items are cheap.
    """

    def __init__(self, split: str = "train", image_size: int = 16, channels: int = 1):
        from sklearn.datasets import load_digits
        d = load_digits()
        perm = np.random.default_rng(0).permutation(len(d.target))
        idx = perm[:DIGITS_NUM_TRAIN] if split == "train" else perm[DIGITS_NUM_TRAIN:]
        x = torch.from_numpy(d.images[idx]).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                                            antialias=image_size < 8).clamp_(0, 1)
        self.images = (x * 2 - 1).repeat(1, channels, 1, 1).contiguous()  # (N, C, S, S) in [-1, 1]
        self.labels = d.target[idx].astype(np.int64)
        self.description = {
            "source": "sklearn.datasets.load_digits", "split": f"seed-0 permutation: first {DIGITS_NUM_TRAIN} "
            f"train, last {len(d.target) - DIGITS_NUM_TRAIN} test", "resize": {"from": 8, "to": image_size,
            "mode": "bicubic"}, "channels": channels, "normalize": "x / 16 * 2 - 1", "range": [-1, 1]}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _how_registry(name: str, split: str, subdir: str, data_dir: str) -> str:
    return (f"on a machine with internet run `python -c \"from vqgen.data import build_dataset; "
            f"build_dataset('{name}', split='{split}', data_dir='data')\"` and copy data/{subdir.split('/')[0]} "
            f"to {Path(data_dir) / subdir.split('/')[0]}, or pass --data_dir pointing at a folder that holds it")


def _build_torchvision(name, spec, split, data_dir, tf, download):
    import torchvision.datasets as tvd
    cls, root, kw = getattr(tvd, spec.target), data_dir, {}
    if spec.target in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100"):
        kw["train"] = split == "train"
    elif spec.target == "SVHN":
        root, kw["split"] = os.path.join(data_dir, "svhn"), "train" if split == "train" else "test"
    elif spec.target == "Places365":  # the "test" split has no labels: val stands in for it
        root, kw["split"], kw["small"] = os.path.join(data_dir, "places365"), (
            "train-standard" if split == "train" else "val"), True
    else:  # DTD has train/val/test
        kw["split"] = split
    base = _load_or_download(name, lambda dl: cls(root, download=dl, **kw), download, spec.host, spec.port,
                             str(Path(data_dir) / spec.subdir), _how_registry(name, split, spec.subdir, data_dir))
    desc = {"source": f"torchvision.datasets.{spec.target}", "source_args": kw}
    return MappedDataset(base, tf, _int_label), desc


def _build_medmnist(name, spec, split, data_dir, tf, download):
    import medmnist
    root = Path(data_dir) / "medmnist"
    cls = getattr(medmnist, medmnist.INFO[spec.target]["python_class"])

    def load(dl):
        if dl:
            root.mkdir(parents=True, exist_ok=True)  # MedMNIST refuses a root that does not exist
        return cls(split=split, download=dl, root=str(root), size=28)

    base = _load_or_download(name, load, download, spec.host, spec.port, str(Path(data_dir) / spec.subdir),
                             _how_registry(name, split, spec.subdir, data_dir))
    return MappedDataset(base, tf, _int_label if spec.num_classes else _no_label), {
        "source": f"medmnist.{cls.__name__}", "source_args": {"split": split, "size": 28}}


# --------------------------------------------------------------------------------------------- image folders
class ImageFileDataset(Dataset):
    """Map-style dataset over a list of (image file, label)."""

    def __init__(self, files: list[str], labels: list[int], transform: ImageTransform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as img:
                img.load()
                return self.transform(img), self.labels[i]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # Passed the header check at indexing time (e.g. a truncated JPEG: verify() does not decode) but
            # fails to decode. Not skipped: item i must stay item i (exact resume, exactly-once extraction).
            raise DatasetUnavailableError(
                f"cannot decode image file {self.files[i]} ({type(e).__name__}: {e}); it passed the quick check "
                f"when the folder was indexed but is truncated or corrupt. Delete or replace it and rerun") from None


def _readable(files: list[Path], where) -> list[bool]:
    """Which files PIL can open and verify; one warning with the count of the others (they are skipped)."""
    from PIL import Image
    ok = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.verify()
            ok.append(True)
        except Exception:
            ok.append(False)
    if not all(ok):
        bad = [str(f) for f, k in zip(files, ok) if not k]
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) under {where} (e.g. {bad[0]})", stacklevel=3)
    return ok


def _scan_images(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _split_subdir(root: Path, split: str) -> tuple[Path, str]:
    """``root/train`` etc. when the folder is split that way; else the whole folder serves every split."""
    present = [d for d in ("train", "val", "validation", "valid", "test") if (root / d).is_dir()]
    if not present:
        return root, "all (no split subfolders)"
    order = {"train": ["train"], "val": ["val", "validation", "valid", "test"],
             "test": ["test", "val", "validation", "valid"]}[split]
    for d in order:
        if d in present:
            return root / d, d
    raise DatasetUnavailableError(f"{root} has split subfolders {present} but none for split {split!r}")


def _build_folder(root: Path, split: str, tf: ImageTransform):
    where, used = _split_subdir(root, split)
    files = _scan_images(where)
    rel = [f.relative_to(where).parts for f in files]
    classes = sorted({p[0] for p in rel}) if rel and all(len(p) > 1 for p in rel) else []
    labels = [classes.index(p[0]) if classes else -1 for p in rel]
    ok = _readable(files, where)
    files = [str(f) for f, k in zip(files, ok) if k]
    labels = [lab for lab, k in zip(labels, ok) if k]
    if not files:
        raise DatasetUnavailableError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under {where}")
    desc = {"source": "image_folder", "path": str(where), "split_folder": used, "classes": classes,
            "skipped_unreadable": int(len(ok) - sum(ok))}
    return ImageFileDataset(files, labels, tf), desc, len(classes)


def _build_tinyimagenet(name, spec, split, data_dir, tf):
    root = Path(data_dir) / spec.subdir
    if not (root / "train").is_dir():
        raise _unavailable(name, "vqgen never downloads it (local folder only)", str(root / "train"),
                           "download http://cs231n.stanford.edu/tiny-imagenet-200.zip on a machine with internet and "
                           f"unzip it into {data_dir} (so that {root}/train exists), or pass --data_dir")
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if split == "train":
        ds, desc, _ = _build_folder(root / "train", "train", tf)  # labels = sorted wnid index
        return ds, desc
    # val (also used for "test": the official test images have no labels): val/images + val_annotations.txt
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise _unavailable(name, "its validation annotations are missing", str(ann),
                           "unzip the full tiny-imagenet-200.zip (it contains val/val_annotations.txt)")
    rows = [line.split("\t")[:2] for line in ann.read_text().splitlines() if line.strip()]
    files = [root / "val" / "images" / f for f, _ in rows]
    ok = _readable(files, root / "val")
    kept = [(str(f), wnids.index(w)) for (f, (_, w)), k in zip(zip(files, rows), ok) if k]
    desc = {"source": "tiny-imagenet-200", "path": str(root / "val"), "split_folder": "val"}
    return ImageFileDataset([f for f, _ in kept], [lab for _, lab in kept], tf), desc


# ------------------------------------------------------------------------------------------ Hugging Face
def _is_saved_hf(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _is_hf_files_dir(path: Path) -> bool:
    """A folder of parquet/arrow files (e.g. from ``huggingface-cli download``) and no loose images."""
    pats = ("*.parquet", "*/*.parquet", "*.arrow", "*/*.arrow")
    return any(next(path.glob(p), None) for p in pats) and not any(
        f.suffix.lower() in IMAGE_EXTENSIONS for f in path.iterdir())


def _dict_split(d, s: str):
    if s not in d:
        raise ValueError(f"Unknown split {s!r}; available: {list(d)}")
    return d[s]


_HF_SPLITS = {"train": ["train"], "val": ["validation", "val", "valid", "test"],
              "test": ["test", "validation", "val", "valid"]}


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
    for s in _HF_SPLITS[split]:
        try:
            return load(s), s
        except ValueError as e:  # "Unknown split": try the next name
            if "split" not in str(e).lower():
                raise
            err = e
    raise ConfigError(f"{where} has no split for {split!r} (tried {_HF_SPLITS[split]}): {err}")


def _load_hf(name: str, ref: str, split: str, data_dir: str, download: bool, local_copy: Path | None = None):
    """Returns (datasets.Dataset, split name used, description). ``ref`` is a hub id or a local path."""
    import datasets
    path = Path(ref).expanduser()
    for p in ([local_copy] if local_copy else []) + [path]:
        if p.is_dir() and _is_saved_hf(p):
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
        _check_download(name, download, "huggingface.co", 443, looked, how)
        try:
            with _download_timeout():
                ds, used = _hf_split(load, split, ref)
        except (ConfigError, DatasetUnavailableError):
            raise
        except Exception as e:
            raise _unavailable(name, f"the download failed ({type(e).__name__}: {e})", looked, how) from e
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


def _wrap_hf(ds, tf: ImageTransform, use_labels: bool):
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


# ------------------------------------------------------------------------------------------------- WebDataset
class _WdsItem:
    """WebDataset sample dict -> (image tensor, label); picklable for DataLoader workers."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, sample: dict):
        key = next((k for k in ("jpg", "png", "jpeg", "webp") if k in sample), None)
        if key is None:
            raise ValueError(f"WebDataset sample {sample.get('__key__')} has no jpg/png/jpeg/webp image")
        return self.transform(sample[key]), int(sample.get("cls", -1))


def _is_wds(name: str) -> bool:
    return name.startswith("wds:") or name.endswith(".tar") or bool(re.search(r"\{\d+\.\.\d+\}", name))


def _build_wds(urls: str, tf: ImageTransform):
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


# ------------------------------------------------------------------------------------------------ entry point
def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name.lower(), list(DATASETS), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown dataset {name!r}.{hint} Valid names: {', '.join(DATASETS)}; or a local image "
                       "folder, a datasets.save_to_disk folder, hf:<hub id or path>, wds:<url> / *.tar shards.")


@contextlib.contextmanager
def download_lock(data_dir: str):
    """Serialise dataset preparation across the processes of a launch (an inter-process file lock in
    ``data_dir``): the first process downloads, the others then find the files on disk instead of downloading
    the same files into the same folder at once. No lock where ``data_dir`` cannot be written (shared, read-only
    data is already complete)."""
    from filelock import FileLock

    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(Path(data_dir) / ".vqgen-prepare.lock"))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def build_dataset(name: str, split: str = "train", data_dir: str = "data", image_size: int | None = None,
                  channels: int | None = None, download: bool = True) -> tuple[Dataset, DatasetInfo]:
    """Build the dataset ``name`` (registry name or generic input, see the module docstring) for ``split``.

    ``image_size``/``channels`` default to the registry's values (64 / 3 for generic inputs). Raises
    :class:`ConfigError` for unknown names/bad values and :class:`DatasetUnavailableError` for missing data.
    """
    split = _norm_split(split)
    spec = DATASETS.get(name)
    generic = spec is None
    image_size = int(image_size or (GENERIC_IMAGE_SIZE if generic else spec.image_size))
    channels = int(channels or (GENERIC_CHANNELS if generic else spec.channels))
    if image_size <= 0 or channels not in (1, 3):
        raise ConfigError(f"need image_size > 0 and channels 1 or 3, got {image_size} and {channels}")
    tf = ImageTransform(image_size, channels)
    num_classes = 0 if generic else spec.num_classes

    if generic:
        path = Path(name).expanduser()
        if name.startswith("hf:") or (path.is_dir() and (_is_saved_hf(path) or _is_hf_files_dir(path))):
            hf_ds, used, desc = _load_hf(name, name[3:] if name.startswith("hf:") else name, split, data_dir,
                                         download)
            ds, num_classes = _wrap_hf(hf_ds, tf, use_labels=True)
            desc["source_split"] = used
        elif _is_wds(name):
            ds, desc = _build_wds(name[4:] if name.startswith("wds:") else name, tf)
        elif path.is_dir():
            ds, desc, num_classes = _build_folder(path, split, tf)
        elif "/" in name or os.sep in name or name.startswith((".", "~")):
            raise DatasetUnavailableError(f"dataset folder {path} does not exist (for a Hugging Face hub dataset "
                                          f"use --dataset hf:{name})")
        else:
            raise _unknown(name)
    elif spec.source == "digits":
        ds = DigitsDataset(split, image_size, channels)
        desc = ds.description
    elif spec.source == "torchvision":
        ds, desc = _build_torchvision(name, spec, split, data_dir, tf, download)
    elif spec.source == "medmnist":
        ds, desc = _build_medmnist(name, spec, split, data_dir, tf, download)
    elif spec.source == "tinyimagenet":
        ds, desc = _build_tinyimagenet(name, spec, split, data_dir, tf)
    else:  # hf registry entry: a save_to_disk copy at <data_dir>/<subdir> first, then the HF cache / hub
        hf_ds, used, desc = _load_hf(name, spec.target, split, data_dir, download, Path(data_dir) / spec.subdir)
        ds, _ = _wrap_hf(hf_ds, tf, use_labels=spec.num_classes > 0)
        desc["source_split"] = used
    if spec is None or spec.source != "digits":
        desc = {**desc, **tf.describe()}
    return ds, DatasetInfo(name, split, image_size, channels, num_classes, desc)


def add_data_arguments(parser) -> None:
    """``--dataset``, ``--data_dir``, ``--image_size`` (shared by every stage)."""
    parser.add_argument("--dataset", default="digits",
                        help=f"registry name ({', '.join(DATASETS)}), a local image folder, a save_to_disk folder, "
                             "hf:<hub id or path>, or WebDataset shards (wds:<url>, *.tar, {000..009}); "
                             "'digits' works offline (default: %(default)s)")
    parser.add_argument("--data_dir", default="data",
                        help="where registry datasets are stored / downloaded to (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="resize + center-crop to this size (default: the dataset's own, 64 for generic inputs)")
