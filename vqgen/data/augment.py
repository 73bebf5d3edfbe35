"""Stage-1 training augmentation: random crop and horizontal flip (as taming-transformers and LlamaGen train
their tokenizers), seeded per sample so that exact resume and any worker count give the same images.

Works on the transformed tensor ``[C, S, S]`` in [-1, 1] (every source already resized + center-cropped to S):
``--random_crop`` upsamples it by :data:`CROP_SCALE` (LlamaGen's ``crop_range`` 1.1, rounded to whole pixels) and
takes a random S x S window; ``--hflip`` mirrors with probability 1/2. Never applied to validation images, and
unrelated to extraction's ``--hflip`` (which stores the tokens of the mirrored image next to the original's so that
the prior can train on flips without re-encoding).
Adapted from: LlamaGen ``dataset/augmentation.py`` (random_crop_arr), taming ``data/base.py`` (SmallestMaxSize +
RandomCrop + flip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_SCALE = 1.125


class Augment:
    """``(image [C,S,S], torch.Generator) -> image [C,S,S]``; picklable for DataLoader workers."""

    def __init__(self, image_size: int, random_crop: bool = False, hflip: bool = False):
        self.size, self.random_crop, self.hflip = image_size, random_crop, hflip
        self.big = max(image_size + 1, round(image_size * CROP_SCALE)) if random_crop else image_size

    def __bool__(self) -> bool:
        return self.random_crop or self.hflip

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.random_crop:
            up = F.interpolate(x[None], size=(self.big, self.big), mode="bicubic", align_corners=False,
                               antialias=False)[0].clamp_(-1, 1)            # (C, big, big)
            top, left = (int(v) for v in torch.randint(0, self.big - self.size + 1, (2,), generator=g))
            x = up[:, top:top + self.size, left:left + self.size].contiguous()
        if self.hflip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        return x

    def describe(self) -> dict:
        return {"random_crop": self.random_crop, "crop_from": self.big if self.random_crop else None,
                "hflip": self.hflip}


class AugmentedDataset(torch.utils.data.Dataset):
    """Map-style wrapper: item i of epoch e augmented with a generator seeded by (seed, e, i)."""

    def __init__(self, base, augment: Augment, seed: int, epoch: int):
        self.base, self.augment, self.seed, self.epoch = base, augment, seed, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if y == -2:  # an unreadable image (vqgen.data.streaming.UNREADABLE): left as it is, the task drops it
            return x, y
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
        return self.augment(x, g), y
