"""The one deterministic image transform of every stage, and the item wrapper of PIL-yielding datasets.

Items are ``(image FloatTensor [C, H, W] in [-1, 1], label int)``; the label is -1 when the source has none.
The transform: convert to the wanted channels -> resize the shorter side (bicubic, antialiased) -> center crop
-> [-1, 1], so that stage 2 can record it in the shard manifest and extraction is reproducible.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def convert_mode(img, channels: int):
    """PIL image of any mode -> "L" or "RGB" (palette via RGBA, 16-bit/float grayscale rescaled to 8 bit)."""
    from PIL import Image
    if img.mode == "P":
        img = img.convert("RGBA")
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    want = "L" if channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)  # convert() to the same mode is only a copy


class ImageTransform:
    """PIL image -> [C, H, W] float in [-1, 1]. A module-level class so DataLoader workers can pickle it.

    torchvision's Resize (shorter side, bicubic, antialiased) + CenterCrop on the PIL image, then ToTensor +
    Normalize(0.5, 0.5) as one lookup of the uint8 pixels in a 256-entry table computed by torchvision's own
    ToTensor + Normalize: bitwise the items of ``T.Compose([Resize, CenterCrop, ToTensor, Normalize])`` (tested),
    without per-item torch calls in the training process (default ``--num_workers 0``; timings: docs/RESULTS.md,
    section 2b). Images already at the target size skip Resize/CenterCrop, which return them unchanged.
    """

    def __init__(self, image_size: int, channels: int):
        from PIL import Image
        from torchvision import transforms as T
        self.image_size, self.channels = image_size, channels
        self._resize = T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        self._crop = T.CenterCrop(image_size)
        ramp = Image.fromarray(np.arange(256, dtype=np.uint8)[None], "L")  # (1, 256): one pixel per uint8 value
        self._lut = T.Normalize([0.5], [0.5])(T.ToTensor()(ramp)).reshape(256).numpy()  # (256,) float32

    def __call__(self, img) -> torch.Tensor:
        img = convert_mode(img, self.channels)
        if img.size != (self.image_size, self.image_size):
            img = self._crop(self._resize(img))
        x = torch.from_numpy(self._lut[np.asarray(img)])  # (H, W) or (H, W, 3) float32
        return x[None] if x.dim() == 2 else x.permute(2, 0, 1).contiguous()  # (C, H, W)

    def describe(self) -> dict:
        return {"convert": "L" if self.channels == 1 else "RGB", "resize_shorter_side": self.image_size,
                "interpolation": "bicubic", "antialias": True, "center_crop": self.image_size,
                "to_tensor": True, "normalize": {"mean": 0.5, "std": 0.5}, "range": [-1, 1]}


class MappedDataset(Dataset):
    """Wrap a dataset yielding ``(PIL image, target)``: apply the transform, turn the target into an int."""

    def __init__(self, base, transform: ImageTransform, label_fn: Callable[[Any], int]):
        self.base, self.transform, self.label_fn = base, transform, label_fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, target = self.base[i]
        return self.transform(img), self.label_fn(target)


def int_label(t) -> int:
    return int(np.asarray(t).reshape(-1)[0])


def no_label(_t) -> int:
    return -1
