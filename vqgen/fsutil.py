"""Crash-consistent file writing: temp file + fsync + rename, so a SIGKILL at any moment leaves either the
old file or the new one, never a half-written file that a later run trusts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DiskFullError

_UMASK = os.umask(0)
os.umask(_UMASK)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that wrap the OSError report it: torch.save (RuntimeError "... file write failed"), safetensors
# (Rust io error "No space left on device (os error 28)"), plain OSError text.
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
                   "file write failed")


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the disk or quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, Exception) and any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_full_guard(what: str, intact: str = "the previous version is intact") -> Iterator[None]:
    """Turn a disk-full failure inside the block into a clear :class:`DiskFullError` naming ``what``."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, DiskFullError) and is_disk_full(e):
            raise DiskFullError(f"disk full while writing {what}; {intact}. Free some space and rerun") from None
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file below ``root`` (before the rename that publishes the folder)."""
    for f in Path(root).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in (nearly) one rename.

    The old directory is moved aside first and removed only after the new one is in place, so a crash
    leaves either the old or the new directory (or both, one under a ``.old`` name that the next call cleans).
    A crash between the two renames leaves only ``.<name>.old``: the next call puts it back first, and
    :func:`recover_directory` lets readers do the same.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        os.replace(old, final)  # an earlier call was killed between its two renames: the old one is current
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # temp dirs of writers killed before committing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not final.exists():
            os.replace(old, final)
        raise


def recover_directory(final: str | os.PathLike) -> Path:
    """``final``, or its ``.<name>.old`` copy when a writer was killed between its two renames (read-only use)."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    return old if not final.exists() and old.is_dir() else final


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
