"""MNIST-family IDX archives already on disk are used offline, whatever their md5.

torchvision looks only for extracted IDX files and extracts its ``.gz`` archives in ``download()``, which needs the
network and torchvision's md5 (Debian's ``dataset-fashion-mnist`` recompressed them: same content, other md5).
:func:`prepare_idx` gunzips them itself, found in ``<data_dir>/<Name>/raw`` or a distribution package's folder
(:data:`SYSTEM_DIRS`); the IDX readers check every file's magic number and size, so no md5 is needed. Call it from
one process per node (:func:`vqgen.launch.prepare_first`); concurrent callers are safe. Where it looks and writes:
docs/NOTES.md.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from ..config.datasets import IDX_CLASSES, SYSTEM_DIRS  # noqa: F401 (torchvision class -> package folders)


def _idx_files(cls) -> list[str]:
    """The extracted file names torchvision's ``_check_exists`` wants, e.g. ``train-images-idx3-ubyte``."""
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]


def _find_archive(name: str, raw: Path, system: tuple[str, ...]) -> Path | None:
    for folder in (raw, *map(Path, system)):
        gz = folder / f"{name}.gz"
        if gz.is_file():
            return gz
    return None


def _writable_raw(root: Path, cls_name: str) -> Path:
    raw = root / cls_name / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=raw, prefix=".probe"):
            return raw
    except OSError:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqgen"
        (cache / cls_name / "raw").mkdir(parents=True, exist_ok=True)
        return cache / cls_name / "raw"


def _gunzip(src: Path, dst: Path) -> None:
    """``src`` (.gz) -> ``dst`` atomically (temp file, fsync, rename): a killed extraction leaves no half file."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare_idx(cls_name: str, data_dir: str | os.PathLike) -> tuple[Path, str | None]:
    """Make ``cls_name`` (MNIST / FashionMNIST / KMNIST) loadable from ``data_dir`` without the network.

    Returns ``(root to pass to torchvision, folder the archives came from or None)``. Nothing happens when the
    extracted files are already there or no archive is found (then the usual download / error path runs).
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    root = Path(data_dir)
    names = _idx_files(cls)
    raw = root / cls_name / "raw"
    if all((raw / n).is_file() for n in names):
        return root, None
    system = SYSTEM_DIRS.get(cls_name, ())
    cache_raw = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqgen" / cls_name / "raw"
    if all((cache_raw / n).is_file() for n in names):
        return cache_raw.parent.parent, str(cache_raw)
    found = {n: _find_archive(n, raw, system) for n in names}
    if not all(found.values()):
        return root, None
    dest = _writable_raw(root, cls_name)
    for n, gz in found.items():
        if not (dest / n).is_file():
            _gunzip(gz, dest / n)
    return dest.parent.parent, str(next(iter(found.values())).parent)
