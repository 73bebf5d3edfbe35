"""Multi-view extraction (``extract_codes.py --views N``): N augmented views per image, encoded into one sample.

Views are taken from the image upsampled by :data:`~vqgen.data.augment.CROP_SCALE` (stage 1's ``--random_crop``
upsample): ``tencrop`` = the 4 corner + center S x S crops and the same crops of the mirrored image (torchvision's
``TenCrop`` order, LlamaGen ``extract_codes_c2i.py --ten-crop``); ``random`` = N random S x S crops, each mirrored
with probability 1/2, drawn per (seed, source key, view) by a splitmix64 hash (the same in every numpy version, so
a resumed extraction makes the same views). All crops of a batch are one gather on the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config.parts import TENCROP_VIEWS, VIEW_MODES
from ..hashing import mix64
from .augment import CROP_SCALE


class MultiView:
    """``(images [B, C, S, S], source keys) -> views [B * N, C, S, S]`` (image-major: image i's views are rows
    ``i*N .. i*N + N - 1``)."""

    def __init__(self, count: int, mode: str, image_size: int, seed: int = 0):
        if mode not in VIEW_MODES:
            raise ValueError(f"view mode must be one of {VIEW_MODES}, got {mode!r}")
        if mode == "tencrop" and count != TENCROP_VIEWS:
            raise ValueError(f"tencrop makes {TENCROP_VIEWS} views, not {count}")
        self.count, self.mode, self.size, self.seed = int(count), mode, int(image_size), int(seed)
        self.big = max(self.size + 1, round(self.size * CROP_SCALE))

    def describe(self) -> dict:
        """What the manifest records in the split's ``transforms["views"]``."""
        return {"count": self.count, "mode": self.mode, "crop": self.size, "upsample_to": self.big,
                "upsample": "bicubic", "seed": self.seed if self.mode == "random" else None}

    def params(self, keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top, left, mirrored) of every view, each (B, N): a pure function of (mode, sizes, seed, keys)."""
        B, N, room = len(keys), self.count, self.big - self.size
        if self.mode == "tencrop":
            c = int(round(room / 2.0))                     # torchvision's center_crop offset
            top = np.array([0, 0, room, room, c] * 2)
            left = np.array([0, room, 0, room, c] * 2)
            left[5:] = room - left[5:]                     # crops of the mirrored image = mirrored crops at room - left
            flip = np.arange(N) >= 5
            return np.tile(top, (B, 1)), np.tile(left, (B, 1)), np.tile(flip, (B, 1))
        k = np.asarray(keys, dtype=np.uint64)[:, None] * np.uint64(N) + np.arange(N, dtype=np.uint64)   # (B, N)
        with np.errstate(over="ignore"):
            base = mix64(k + np.uint64(self.seed + 1) * np.uint64(0x9E3779B97F4A7C15))
            draws = [mix64(base + np.uint64(i)) for i in range(3)]
        top, left = ((d >> np.uint64(11)) % np.uint64(room + 1) for d in draws[:2])
        return top.astype(np.int64), left.astype(np.int64), (draws[2] >> np.uint64(63)).astype(bool)

    def __call__(self, x: torch.Tensor, keys) -> torch.Tensor:
        B, C, S, _ = x.shape
        if S != self.size:
            raise ValueError(f"views of {self.size}px images, got {S}px")
        up = F.interpolate(x.float(), size=(self.big, self.big), mode="bicubic", align_corners=False,
                           antialias=False).clamp_(-1, 1).to(x.dtype)           # (B, C, big, big)
        top, left, flip = (torch.as_tensor(a, device=x.device) for a in self.params(keys))
        ar = torch.arange(S, device=x.device)
        rows = top[..., None] + ar                                              # (B, N, S)
        cols = left[..., None] + torch.where(flip[..., None], S - 1 - ar, ar)   # (B, N, S)
        b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        out = up.permute(1, 0, 2, 3)[:, b, rows[..., None], cols[..., None, :]]  # (C, B, N, S, S)
        return out.permute(1, 2, 0, 3, 4).reshape(B * self.count, C, S, S)
