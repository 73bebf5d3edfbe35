"""Write an ``.npz`` of uint8 images batch by batch (constant memory): the ADM / LlamaGen evaluator's input.

The standard ImageNet gFID protocol (OpenAI's guided-diffusion ``evaluations/evaluator.py``, used by LlamaGen's
``sample_c2i_ddp.py``) reads ``np.load(path)["arr_0"]``: ``(N, H, W, 3)`` uint8. ``np.savez`` needs the whole array
in memory (9.8 GB for 50k images at 256 px), so this writes the same file format incrementally: a zip archive
(zip64) with one member ``arr_0.npy`` whose header states the final shape, followed by the rows as they come.
The file appears under its name only when complete (temp file + rename).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8 (grayscale repeated to 3 channels, as the evaluator
    feeds Inception RGB). Rounded as torchvision's ``save_image`` does (x * 255 + 0.5, clamped)."""
    x = ((images.detach().float().cpu() + 1) / 2 * 255 + 0.5).clamp_(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class NpzWriter:
    """``with NpzWriter(path, n, h, w) as out: out.write(batch_uint8_nhwc)``; exactly ``n`` rows must come."""

    def __init__(self, path: str | os.PathLike, num: int, height: int, width: int, channels: int = 3):
        self.path, self.shape = Path(path), (int(num), int(height), int(width), int(channels))
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.rows = 0

    def __enter__(self) -> "NpzWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zf.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.member, header)  # np.save's header, version 1.0
        return self

    def write(self, batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.shape[1:] != self.shape[1:]:
            raise ValueError(f"expected uint8 rows of shape {self.shape[1:]}, got {batch.dtype} {batch.shape[1:]}")
        if self.rows + len(batch) > self.shape[0]:
            raise ValueError(f"more than the {self.shape[0]} rows announced")
        self.member.write(np.ascontiguousarray(batch).tobytes())
        self.rows += len(batch)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.member.close()
        self.zf.close()
        if exc_type is None and self.rows != self.shape[0]:
            self.tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.rows} rows written, {self.shape[0]} announced")
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
