"""``digits``: scikit-learn's bundled handwritten digits, the offline demo dataset (no download).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

DIGITS_NUM_TRAIN = 1500  # of 1797; the remaining 297 are the test split


class DigitsDataset(Dataset):
    """scikit-learn's bundled 1797 real 8x8 handwritten digits (values 0..16, 10 classes): works offline.

    Split: ``np.random.default_rng(0).permutation(1797)``; the first 1500 are train, the last 297 test ("val" is
    the test split). Upsampled bicubically to ``image_size`` once at construction (a few MB) so items are cheap.
    """

    def __init__(self, split: str = "train", image_size: int = 16, channels: int = 1):
        from sklearn.datasets import load_digits
        d = load_digits()
        perm = np.random.default_rng(0).permutation(len(d.target))
        idx = perm[:DIGITS_NUM_TRAIN] if split == "train" else perm[DIGITS_NUM_TRAIN:]
        x = torch.from_numpy(d.images[idx]).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                                            antialias=image_size < 8).clamp_(0, 1)
        self.images = (x * 2 - 1).repeat(1, channels, 1, 1).contiguous()  # (N, C, S, S) in [-1, 1]
        self.labels = d.target[idx].astype(np.int64)
        self.description = {
            "source": "sklearn.datasets.load_digits", "split": f"seed-0 permutation: first {DIGITS_NUM_TRAIN} "
            f"train, last {len(d.target) - DIGITS_NUM_TRAIN} test", "resize": {"from": 8, "to": image_size,
            "mode": "bicubic"}, "channels": channels, "normalize": "x / 16 * 2 - 1", "range": [-1, 1]}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])
