"""Fast, clear failures for data that is not on disk on a machine that cannot download it.

vqgen first loads without downloading; only if that fails and ``download=True`` it probes the download host (2 s,
DNS included; no probe at all when VQGEN_OFFLINE / HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set) and then calls
the library's own download. Otherwise a :class:`DatasetUnavailableError` says what is missing, where vqgen looked
and how to provide the files (libraries left alone hang on DNS when offline).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from .errors import DatasetUnavailableError

OFFLINE_ENV_VARS = ("VQGEN_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
PROBE_TIMEOUT_S = 2.0
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0  # a stalled download fails instead of hanging forever


def offline_reason() -> str | None:
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


def unavailable(name: str, reason: str, looked: str, how: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(f"dataset {name!r} is not on disk and {reason}.\n  vqgen looked in: {looked}\n"
                                   f"  to provide it: {how}")


def check_download(name: str, download: bool, host: str, port: int, looked: str, how: str) -> None:
    """Raise DatasetUnavailableError unless a download may start: allowed, not forced offline, host reachable."""
    reason = "download=False" if not download else offline_reason()
    if reason is None and not probe_host(host, port):
        reason = f"the download host {host}:{port} cannot be reached (no connection within {PROBE_TIMEOUT_S:g} s)"
    if reason:
        raise unavailable(name, reason, looked, how)


@contextlib.contextmanager
def download_timeout():
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def load_or_download(name: str, load: Callable[[bool], Any], download: bool, host: str, port: int,
                      looked: str, how: str):
    """``load(download)`` from disk first; download (after the checks) only when the files are missing."""
    try:
        return load(False)
    except (RuntimeError, OSError):  # torchvision / medmnist say "Dataset not found" this way
        pass
    check_download(name, download, host, port, looked, how)
    try:
        with download_timeout():
            return load(True)
    except Exception as e:  # network errors come in many types; the message keeps the cause
        raise unavailable(name, f"the download failed ({type(e).__name__}: {e})", looked, how) from e


def how_registry(name: str, split: str, subdir: str, data_dir: str) -> str:
    return (f"on a machine with internet run `python -c \"from vqgen.data import build_dataset; "
            f"build_dataset('{name}', split='{split}', data_dir='data')\"` and copy data/{subdir.split('/')[0]} "
            f"to {Path(data_dir) / subdir.split('/')[0]}, or pass --data_dir pointing at a folder that holds it")
