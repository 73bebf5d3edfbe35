"""Image folders indexed once: the file list and labels cached beside the data, rebuilt when the folder changes.

The index (``<parent>/.<folder>.vqgen-index.json``; in ``$XDG_CACHE_HOME/vqgen/index/`` when the folder is read-only) holds the
sorted relative paths, their labels, the class names and the modification time of every directory. It is valid
while no directory's mtime changed: adding, removing or renaming a file changes its directory's mtime, so checking
an index costs one ``stat`` per *directory* (1000 for ImageNet), not one per file; building it lists names only
(``os.scandir``, no ``stat``, no open). No rank opens every file to verify it any more: an unreadable image is found
when it is read and becomes a *marked* item (label ``UNREADABLE``, zero image; one warning per file) instead of an
exception. Marked items keep item i at index i, which is what exact resume and exactly-once extraction need: the
training task drops them from their batch and counts them, extraction records their keys as skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..fsutil import atomic_write_json
from .streaming import UNREADABLE

INDEX_FILE = ".vqgen-index.json"  # suffix: <parent>/.<folder name>.vqgen-index.json
INDEX_VERSION = 1


def _walk(root: Path, extensions: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """Relative image paths (sorted walk, hidden entries skipped) and every directory's mtime_ns."""
    files, dirs = [], {}
    stack = [""]
    while stack:
        rel = stack.pop()
        here = root / rel
        dirs[rel] = here.stat().st_mtime_ns
        subdirs, names = [], []
        with os.scandir(here) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=True):
                    subdirs.append(e.name)
                elif e.name.lower().endswith(extensions):
                    names.append(e.name)
        files += [f"{rel}/{n}" if rel else n for n in sorted(names)]
        stack += [f"{rel}/{d}" if rel else d for d in sorted(subdirs, reverse=True)]
    return files, dirs


def _cache_path(root: Path) -> Path:
    """Beside the folder, not inside it (writing it would change the folder's own mtime and invalidate it)."""
    root = root.resolve()
    beside = root.parent / f".{root.name}{INDEX_FILE}"
    if os.access(root.parent, os.W_OK):
        return beside
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqgen" / "index"
    return cache / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24] + ".json")


def _valid(idx: dict, root: Path) -> bool:
    if idx.get("version") != INDEX_VERSION:
        return False
    try:
        return all((root / d).stat().st_mtime_ns == m for d, m in idx["dirs"].items())
    except OSError:
        return False


def index_folder(root: str | os.PathLike, extensions: tuple[str, ...]) -> dict:
    """``{"files": [relative paths], "labels": [int], "classes": [names], "rebuilt": bool}`` for ``root``.

    Labels: the index of the top-level subfolder in sorted order when *every* image sits in a subfolder, else -1.
    """
    root = Path(root)
    path = _cache_path(root)
    try:
        idx = json.loads(path.read_text())
        if _valid(idx, root):
            return {**idx, "rebuilt": False}
    except (OSError, ValueError):
        pass
    files, dirs = _walk(root, extensions)
    tops = [f.split("/", 1)[0] for f in files]
    nested = bool(files) and all("/" in f for f in files)
    classes = sorted(set(tops)) if nested else []
    pos = {c: i for i, c in enumerate(classes)}
    idx = {"version": INDEX_VERSION, "files": files, "labels": [pos[t] if nested else -1 for t in tops],
           "classes": classes, "dirs": dirs}
    try:
        atomic_write_json(path, idx)
    except OSError:
        pass  # read-only everywhere: rebuilt next time (names only)
    return {**idx, "rebuilt": True}


class LazyImageFiles(torch.utils.data.Dataset):
    """Map-style dataset over indexed files; an unreadable file gives ``(zeros, UNREADABLE)`` and one warning."""

    def __init__(self, root: str | os.PathLike, files: list[str], labels: list[int], transform):
        self.root, self.files, self.labels, self.transform = str(root), files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        path = os.path.join(self.root, self.files[i])
        try:
            with Image.open(path) as img:
                img.load()
                return self.transform(img), self.labels[i]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipped unreadable image file {path} ({type(e).__name__}: {e})", stacklevel=2)
            size = self.transform.image_size
            return torch.zeros(self.transform.channels, size, size), UNREADABLE
