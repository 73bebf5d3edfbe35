"""Image grids and files: the one writer of every PNG vqgen makes (atomically)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch

from .errors import ConfigError
from .fsutil import atomic_write_bytes


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    min_cell: int | None = None) -> Path:
    """Save ``images (N, C, H, W)`` in [-1, 1] as one grid image, atomically (temp file + rename).

    ``min_cell``: for viewing grids of small images (16x16 digits), upscale each image by an integer factor
    (nearest neighbour, pixels stay sharp) until it is at least this many pixels high.
    """
    from PIL import Image
    from torchvision.utils import save_image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the image format of {path} (use .png)")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    if min_cell and images.shape[-2] < min_cell:
        factor = math.ceil(min_cell / images.shape[-2])
        images = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=factor, mode="nearest")
    buf = io.BytesIO()
    save_image(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), buf, nrow=nrow, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
    return path
