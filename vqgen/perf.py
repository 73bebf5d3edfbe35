"""Speed settings that depend on the machine: the host allocator, and the bf16 / channels-last defaults.

* **Host allocator (glibc).** A training step frees and reallocates the same activation buffers every step.
  glibc returns a freed buffer above its mmap threshold (history-dependent, at most 32 MB) to the kernel at once
  and trims the top of its heap, so the next step page-faults the same memory in again, zero-filled by the kernel:
  on the 2-core development box (AMD EPYC, Zen 3) the 64-channel VQ-VAE at batch 128 took ~47k minor faults and
  ~150 ms of kernel time per step (15 % of its CPU time), the original tool's 256-channel default 750k faults and
  2.5 s. It is the "4x more system time" behind issue 15's trainer-vs-plain-loop gap; a plain loop has it too.
  :func:`keep_freed_memory` turns both off (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``): the
  next step reuses the freed memory. Peak RSS barely moves (the step reaches it anyway: 869 -> 879 MB for the
  64-channel loop); :func:`release_freed_memory` hands the cache back when a stage ends. Same idea as PyTorch's CPU launcher (``torch.backends.xeon.run_cpu``),
  which preloads jemalloc/tcmalloc configured never to return memory; vqgen does it in-process, so plain ``python``,
  ``accelerate launch`` and ``srun`` all get it. Not applied when the user tunes malloc through the environment.
* **bf16 autocast** is fast only where the hardware multiplies bf16 natively: CUDA GPUs with compute capability
  >= 8.0 (Ampere and later) and CPUs with AMX-BF16 (Intel Sapphire Rapids and later). Measured (docs/RESULTS.md,
  ``bench/train_step.py``): the VQ-VAE step with bf16 + channels-last is 4.0x fp32 on a 2-core AMX Xeon and
  1.5-1.9x on an H200; on CPUs without it oneDNN emulates bf16 and the same step is 10-15x *slower* (AMD Zen 3,
  this project's development box: 14.6 vs 1.0 CPU s for forward + backward of the 64-channel VQ-VAE at batch
  128). CPUs with AVX512-BF16 but no AMX (Cooper Lake, Zen 4) were not measured: fp32 there. The prior at CPU
  sizes (d <= 128) is overhead-bound: bf16 made it ~2x slower even with AMX, so on CPU the prior stays fp32. On
  CUDA it uses bf16: the same speed as fp32 at d=96 on an H200 (215k tok/s both), and the usual choice at GPU
  sizes (the ImageNet recipe of docs/RESULTS.md), where the matmuls dominate.
  bf16 is numerically safe for the VQ-VAE: 300 equal steps (32/32 channels, Fashion-MNIST, bf16 + channels-last vs
  fp32) ended at loss 0.0529 vs 0.0530; the quantizer's distances and argmin stay fp32 under autocast.
* **channels-last** (NHWC) goes with bf16 for the VQ-VAE (oneDNN's and cuDNN's fast bf16 convolutions are NHWC
  kernels); in fp32 it was not faster on the CPUs measured and slower on GPUs (cuDNN's fp32 kernels are NCHW).
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
    """True when this CPU multiplies bf16 in AMX tiles (the only CPU bf16 measured faster than fp32)."""
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
    """``--mixed_precision`` when nothing chose one: "bf16" where measured faster (module docstring), else "no".

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
