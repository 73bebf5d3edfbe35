"""Local image folders (class subfolders optional, train/val/test subfolders optional) and Tiny ImageNet.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DatasetUnavailableError
from ...offline import unavailable
from ..folder_index import LazyImageFiles, index_folder
from ..splits import ALL_SPLIT_NAMES, split_candidates
from ..transforms import IMAGE_EXTENSIONS, ImageTransform


def _split_subdir(root: Path, split: str) -> tuple[Path, str]:
    """``root/train`` etc. when the folder is split that way; else the whole folder serves every split."""
    present = [d for d in ALL_SPLIT_NAMES if (root / d).is_dir()]
    if split not in ("train", "val", "test"):  # another split name: its own subfolder
        if (root / split).is_dir():
            return root / split, split
        raise DatasetUnavailableError(f"{root} has no subfolder {split!r} for split {split!r}")
    if not present:
        return root, "all (no split subfolders)"
    for d in split_candidates(split):
        if d in present:
            return root / d, d
    raise DatasetUnavailableError(f"{root} has split subfolders {present} but none for split {split!r}")


def build_folder(root: Path, split: str, tf: ImageTransform):
    """An image folder through its cached index (:mod:`vqgen.data.folder_index`): no file is opened here; an
    unreadable image is found when it is read (a marked item, see ``LazyImageFiles``)."""
    where, used = _split_subdir(root, split)
    idx = index_folder(where, IMAGE_EXTENSIONS)
    if not idx["files"]:
        raise DatasetUnavailableError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {where}")
    desc = {"source": "image_folder", "path": str(where), "split_folder": used, "classes": idx["classes"],
            "num_files": len(idx["files"]), "unreadable": "skipped when read (marked items, counted)"}
    return LazyImageFiles(where, idx["files"], idx["labels"], tf), desc, len(idx["classes"])


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
    pos = {w: i for i, w in enumerate(wnids)}
    desc = {"source": "tiny-imagenet-200", "path": str(root / "val"), "split_folder": "val"}
    return LazyImageFiles(root / "val" / "images", [f for f, _ in rows], [pos[w] for _, w in rows], tf), desc
