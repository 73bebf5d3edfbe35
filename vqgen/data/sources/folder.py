"""Local image folders (class subfolders optional, train/val/test subfolders optional) and Tiny ImageNet.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch.utils.data import Dataset

from ...errors import DatasetUnavailableError
from ..offline import unavailable
from ..splits import ALL_SPLIT_NAMES, split_candidates
from ..transforms import IMAGE_EXTENSIONS, ImageTransform

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
    present = [d for d in ALL_SPLIT_NAMES if (root / d).is_dir()]
    if not present:
        return root, "all (no split subfolders)"
    for d in split_candidates(split):
        if d in present:
            return root / d, d
    raise DatasetUnavailableError(f"{root} has split subfolders {present} but none for split {split!r}")


def build_folder(root: Path, split: str, tf: ImageTransform):
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


def build_tinyimagenet(name, spec, split, data_dir, tf):
    root = Path(data_dir) / spec.subdir
    if not (root / "train").is_dir():
        raise unavailable(name, "vqgen never downloads it (local folder only)", str(root / "train"),
                           "download http://cs231n.stanford.edu/tiny-imagenet-200.zip on a machine with internet and "
                           f"unzip it into {data_dir} (so that {root}/train exists), or pass --data_dir")
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if split == "train":
        ds, desc, _ = build_folder(root / "train", "train", tf)  # labels = sorted wnid index
        return ds, desc
    # val (also used for "test": the official test images have no labels): val/images + val_annotations.txt
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise unavailable(name, "its validation annotations are missing", str(ann),
                           "unzip the full tiny-imagenet-200.zip (it contains val/val_annotations.txt)")
    rows = [line.split("\t")[:2] for line in ann.read_text().splitlines() if line.strip()]
    files = [root / "val" / "images" / f for f, _ in rows]
    ok = _readable(files, root / "val")
    kept = [(str(f), wnids.index(w)) for (f, (_, w)), k in zip(zip(files, rows), ok) if k]
    desc = {"source": "tiny-imagenet-200", "path": str(root / "val"), "split_folder": "val"}
    return ImageFileDataset([f for f, _ in kept], [lab for _, lab in kept], tf), desc
