"""One writer per folder (a run folder, a shard folder), and decisions taken once on the main process.

The writer holds an OS lock on ``<folder>/.vqgen.lock`` (a POSIX record lock, ``fcntl.lockf``) for its whole run;
the file says who holds it (host, pid, start time) for the refusal message. A POSIX lock belongs to the process:
forked DataLoader workers do not inherit it, so a SIGKILLed job frees it at once (a ``flock`` would live on in its
orphaned workers). The file is never deleted: that would let two processes lock two different files.
NFS and Lustre: docs/FAILURES.md. :func:`main_decides` runs a check on the main process and gives its outcome
(value or error) to every rank, so no rank waits for a rank that has already stopped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, FolderInUseError, VQGenError

LOCK_NAME = ".vqgen.lock"
_BUSY = (errno.EACCES, errno.EAGAIN)

_held: dict[tuple[int, int], "FolderLock"] = {}  # (st_dev, st_ino) of a lock file -> this process's lock on it


class FolderLock:
    """This process's lock on one folder (``fd`` None: not held, e.g. on a non-main rank)."""

    def __init__(self, path: Path | None = None, fd: int | None = None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Free the folder for the next writer (closing the only descriptor drops the POSIX lock)."""
        if self.fd is None:
            return
        for key, lock in list(_held.items()):
            if lock is self:
                del _held[key]
        fd, self.fd = self.fd, None
        os.close(fd)


def lock_folder(folder: str | os.PathLike, flag: str = "--output_dir") -> FolderLock:
    """Lock ``folder`` (created if missing) for this process, or raise :class:`FolderInUseError` naming the holder.

    Taking a lock this process already holds returns it (a process may run several stages on one folder, one
    after the other). Where the file system has no locks (Lustre ``-o noflock``, NFS ``nolock``) one warning line
    says so and the run goes on unlocked."""
    path = Path(folder) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {flag} {folder}: {e.strerror or e}") from None
    while True:
        # Our own lock first: opening a second descriptor and closing it would drop the POSIX lock we hold.
        with_same_file = _held.get(_file_id(path))
        if with_same_file is not None:
            return with_same_file
        fd = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            if e.errno in _BUSY:
                raise FolderInUseError(f"{Path(folder)} is being written by another vqgen job ({holder(path)}); one "
                                       f"writer per folder: wait until it ends or stop it (a killed job frees the "
                                       f"folder at once), or choose another {flag}") from None
            print(f"warning: cannot lock {path} ({os.strerror(e.errno)}): a second job writing this folder at the "
                  f"same time would not be refused (see docs/FAILURES.md, 'One writer per folder')", flush=True)
            return FolderLock()
        st = os.fstat(fd)
        if _file_id(path) == (st.st_dev, st.st_ino):
            break
        os.close(fd)  # the file was replaced between open and lock (someone deleted it): lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
    lock = _held[_file_id(path)] = FolderLock(path, fd)
    return lock


def release_all() -> None:
    """Free every folder this process holds."""
    for lock in list(_held.values()):
        lock.release()


def hold_folder(folder: str | os.PathLike, flag: str = "--output_dir") -> FolderLock:
    """:func:`lock_folder` on the main process; every rank gets its outcome (a refusal raises on all of them)."""
    held: list[FolderLock] = []
    main_decides(lambda: held.append(lock_folder(folder, flag)))
    return held[0] if held else FolderLock()


def holder(path: Path) -> str:
    """Who holds the lock file ``path``, as its holder wrote it."""
    try:
        info = json.loads(path.read_text())
        return f"{info['command']} on host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _me() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": Path(sys.argv[0]).name + (f" (Slurm job {job})" if job else "")}


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


# ------------------------------------------------------------------------------------------- rank agreement
def _group() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main_decides(decide: Callable[[], Any]) -> Any:
    """``decide()`` on the main process; its (picklable) result, or its :class:`VQGenError`, on every rank."""
    import torch.distributed as dist

    rank, world = _group()
    result, error = None, None
    if rank == 0:
        try:
            result = decide()
        except VQGenError as e:
            error = e
        except BaseException:
            if world > 1:  # a bug on the main process: the others stop too instead of waiting for it
                dist.broadcast_object_list([None, RuntimeError("the main process failed (see its traceback)")], 0)
            raise
    if world > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        if rank != 0:
            result, error = box
    if error is not None:
        raise error
    return result


def first_error(message: str | None) -> str | None:
    """This rank's error message, else another rank's (None when every rank succeeded); call on every rank."""
    import torch.distributed as dist

    _, world = _group()
    if world == 1:
        return message
    everyone: list = [None] * world
    dist.all_gather_object(everyone, message)
    others = (f"rank {r}: {m}" for r, m in enumerate(everyone) if m is not None)
    return message if message is not None else next(others, None)
