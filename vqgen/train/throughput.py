"""Training speed as users compare it: images/s (tokenizer), tokens/s and model FLOPs utilisation (prior).

MFU = achieved model FLOP/s (the stage's FLOPs per unit x units/s) / (the device's dense peak x processes), with
the peak read from a small table of data-center GPUs (vendor datasheets, dense, no sparsity); unknown GPUs and CPUs
have no peak: "n/a". Rates cover the steps since the last logged step (the current speed, start-up excluded).
Adapted from: nanoGPT ``model.py`` ``estimate_mfu`` (the FLOPs per token live in :meth:`vqgen.models.prior.Prior.
flops_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch

# Dense peak TFLOP/s per GPU: bf16/fp16 tensor cores, tf32 tensor cores, plain fp32. Matched in this order as
# substrings of torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part; GH200 = H200 peaks).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},      # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6},
}


@dataclass(frozen=True)
class Work:
    """What a stage's throughput counts: ``unit`` ("images", "tokens"), ``per_sample`` units in one batch row, and
    the model FLOPs of one training step (forward + backward) per unit (None: no MFU)."""

    unit: str = "samples"
    per_sample: int = 1
    flops_per_unit: float | None = None


def peak_column(mixed_precision: str, tf32: bool) -> str:
    """The table column a run computes in: bf16/fp16 autocast -> "bf16"; fp32 -> "tf32" when matmuls may use it."""
    if mixed_precision in ("bf16", "fp16"):
        return "bf16"
    return "tf32" if tf32 else "fp32"


def peak_flops(device_name: str, column: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``device_name`` in ``column``, or None when the table does not know it."""
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return peaks[column] * 1e12
    return None


def device_peak(device: torch.device, mixed_precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one process's device or None, a label for the banner) for ``mixed_precision``."""
    if device.type != "cuda":
        return None, f"{device.type}: no peak known"
    name = torch.cuda.get_device_name(device)
    column = peak_column(mixed_precision, torch.get_float32_matmul_precision() != "highest")
    peak = peak_flops(name, column)
    return peak, f"{name}, {column}: " + (f"{peak / 1e12:g} TFLOP/s" if peak else "not in the peak table")


class Throughput:
    """Units/s and MFU over the micro-batches counted since the last :meth:`report` (or :meth:`restart`)."""

    def __init__(self, work: Work, world_size: int, peak: float | None):
        self.work, self.world_size, self.peak = work, world_size, peak
        self.restart()

    def restart(self) -> None:
        self._t0, self._rows = perf_counter(), 0

    def add(self, rows: int) -> None:
        """Count one micro-batch of ``rows`` samples on this rank (every rank counts the same)."""
        self._rows += rows

    def report(self) -> dict[str, float]:
        """``{unit}_per_s`` over all processes and, with a known peak and FLOPs count, ``mfu`` (a fraction)."""
        dt = max(perf_counter() - self._t0, 1e-9)
        units = self._rows * self.work.per_sample * self.world_size / dt
        self.restart()
        out = {f"{self.work.unit}_per_s": units}
        mfu = self.mfu(units)
        if mfu is not None:
            out["mfu"] = mfu
        return out

    def mfu(self, units_per_s: float) -> float | None:
        if self.peak is None or self.work.flops_per_unit is None:
            return None
        return units_per_s * self.work.flops_per_unit / (self.peak * self.world_size)

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        """The progress bar's view of a :meth:`report`: e.g. ``{"tok/s": "1.2e+05", "mfu": "41.3%"}``."""
        short = {"images": "img/s", "tokens": "tok/s"}.get(self.work.unit, f"{self.work.unit}/s")
        out = {short: f"{logs[f'{self.work.unit}_per_s']:.4g}"}
        if self.work.flops_per_unit is not None:
            out["mfu"] = f"{100 * logs['mfu']:.1f}%" if "mfu" in logs else "n/a"
        return out
