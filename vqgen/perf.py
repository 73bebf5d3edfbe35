"""Speed settings that depend on the machine: the host allocator, and the bf16 / channels-last defaults.

* :func:`keep_freed_memory` stops glibc from handing freed activation buffers back to the kernel after each step
  (the next step would page-fault them in again, zero-filled); :func:`release_freed_memory` hands them back when a
  stage ends. Like ``torch.backends.xeon.run_cpu``'s allocator settings, but in-process; skipped when the user tunes
  malloc through the environment.
* bf16 autocast, with channels-last, only where the hardware multiplies bf16 natively: CUDA GPUs of compute
  capability >= 8.0, and AMX CPUs for the VQ-VAE (the prior at CPU sizes is overhead-bound); fp32 elsewhere, where
  bf16 is emulated. The measurements: docs/RESULTS.md (sections 2, 2b); the reasoning: docs/NOTES.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h> mallopt parameters
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's glibc (ctypes handle), or None on other C libraries and platforms."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _user_tunes_malloc() -> bool:
    return any(v in os.environ for v in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (see the module docstring).

    Returns True when applied; False (nothing done) on non-glibc systems or when MALLOC_* / GLIBC_TUNABLES malloc
    settings are in the environment (the user's choice wins). Process-wide and idempotent.
    """
    libc = _glibc()
    if libc is None or _user_tunes_malloc():
        return False
    # 0 = serve every size from the heap, never from a fresh mmap; -1 = never trim the heap top (mallopt(3)).
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def release_freed_memory() -> None:
    """Hand free heap memory back to the kernel (``malloc_trim``) at the end of a stage, so that the next stage
    run in the same process (VQVAE_T.py, the tests) or an idle process does not hold the previous stage's peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """True when this CPU multiplies bf16 in AMX tiles (the only CPU bf16 faster than fp32 for vqgen)."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch's own cpuinfo view, where it has one
    if caps is not None:
        with contextlib.suppress(Exception):
            return bool(caps().get("amx_bf16", False))
    with contextlib.suppress(OSError):  # else the kernel's view of the CPU flags
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    return False


def cuda_has_native_bf16() -> bool:
    """True for CUDA GPUs with bf16 tensor cores (compute capability >= 8.0); emulated bf16 does not count."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def default_mixed_precision(stage: str, device_type: str) -> str:
    """``--mixed_precision`` when nothing chose one: "bf16" where it is faster (module docstring), else "no".

    ``stage``: "vqvae" (the conv tokenizer) or "prior" (the Transformer); ``device_type``: the training device.
    """
    if device_type == "cuda":
        return "bf16" if cuda_has_native_bf16() else "no"
    if device_type == "cpu" and stage == "vqvae":
        return "bf16" if cpu_has_amx_bf16() else "no"
    return "no"


def default_channels_last(mixed_precision: str) -> bool:
    """``--channels_last`` for the VQ-VAE when not given: on with bf16 autocast only (module docstring)."""
    return mixed_precision == "bf16"
