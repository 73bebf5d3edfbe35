"""A small CNN classifier of the dataset itself: the offline feature space of FID / IS / precision-recall.

ImageNet's Inception-v3 fits small grey images poorly and cannot be downloaded here; the usual practice for
MNIST-like data is a classifier trained on the dataset: its penultimate activations replace Inception's pool
features, its logits Inception's for IS. Numbers compare only under the same classifier export (its sha256 is
recorded in eval.json). The export (kind ``"classifier"``) is cached at ``<root>/classifier/<dataset>`` and
retrained, deterministically, when missing or made for another image size or channel count.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..export import Export, Exportable, ExportMeta, is_export


@dataclass
class ClassifierConfig(ModelConfig):
    in_channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32            # channels of the first stage; the second has 2x
    feature_dim: int = 128     # penultimate width = the FID feature space


class Classifier(Exportable, nn.Module):
    """(conv3x3-BN-ReLU x2, maxpool) x2 -> global average pool -> linear(feature_dim) -> ReLU -> linear(classes)."""

    EXPORT_KIND = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        w = c.width

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(c.in_channels, w), *block(w, w), nn.MaxPool2d(2),
                                  *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(2 * w, c.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` in [-1, 1] -> (features ``(B, feature_dim)``, logits ``(B, num_classes)``)."""
        f = self.embed(self.body(x))
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    @classmethod
    def from_loaded_export(cls, exp: Export) -> "Classifier":
        try:
            model = cls(ClassifierConfig(**exp.config))
            model.load_state_dict(exp.state_dict, strict=True)
        except (TypeError, RuntimeError) as e:
            raise CheckpointError(f"{exp.path}: not a loadable classifier export ({e})") from None
        return model


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style dataset -> (images (N, C, H, W), labels (N,)); fast path for in-memory datasets (digits)."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images, torch.as_tensor(dataset.labels).long()
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys).long()


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px per image (background -1 fills the border)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * p)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[s:s + batch_size]).argmax(1) == y[s:s + batch_size]).sum())
                  for s in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def train_classifier(train_ds, test_ds, config: ClassifierConfig, epochs: int = 15, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0, log=print) -> tuple[Classifier, dict]:
    """Train on ``train_ds`` (items ``(image in [-1, 1], label)``), report accuracy on ``test_ds``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = _stack(train_ds)
    xt, yt = _stack(test_ds)
    if int(y.min()) < 0:
        raise ConfigError("the classifier needs labelled images (this dataset has items labelled -1)")
    model = Classifier(config)
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    shift = max(1, config.image_size // 16)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], gen, shift)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    meta = {"train_accuracy": accuracy(model, x, y), "test_accuracy": accuracy(model, xt, yt),
            "train_images": len(x), "test_images": len(xt), "epochs": epochs, "seed": seed,
            "train_seconds": round(time.perf_counter() - t0, 1)}
    log(f"classifier: test accuracy {meta['test_accuracy']:.4f} ({len(xt)} images), train "
        f"{meta['train_accuracy']:.4f}, {meta['train_seconds']} s")
    return model, meta


def cache_dir(root: str | os.PathLike, dataset: str) -> Path:
    """``<root>/classifier/<dataset>`` (a folder or URL dataset name is reduced to a safe folder name)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(dataset).rstrip("/")).name) or "dataset"
    return Path(root) / "classifier" / name


def load_or_train(dataset: str, data_dir: str, image_size: int, channels: int, root: str | os.PathLike | None = None,
                  retrain: bool = False, epochs: int = 15, seed: int = 0, log=print) -> Classifier:
    """The cached classifier of ``dataset`` at this image size/channels, trained (and exported) when missing."""
    from ..data import build_dataset

    out = cache_dir(root if root is not None else data_dir, dataset)
    if not retrain and is_export(out):
        try:
            model = Classifier.from_export(out)
            c = model.config
            if (c.image_size, c.in_channels) == (image_size, channels):
                return model
            log(f"classifier in {out} is for {c.in_channels}x{c.image_size}px images; retraining for "
                f"{channels}x{image_size}px")
        except CheckpointError as e:
            log(f"classifier in {out} is unusable ({e}); retraining")
    train_ds, info = build_dataset(dataset, "train", data_dir, image_size=image_size, channels=channels)
    test_ds, _ = build_dataset(dataset, "test", data_dir, image_size=image_size, channels=channels)
    if info.num_classes < 2:
        raise ConfigError(f"dataset {dataset!r} has no class labels, so no classifier feature space can be trained; "
                          f"pass --inception_weights PATH (standard Inception features) instead")
    log(f"training the {dataset} feature classifier ({channels}x{image_size}px, {info.num_classes} classes) -> {out}")
    config = ClassifierConfig(in_channels=channels, image_size=image_size, num_classes=info.num_classes)
    model, meta = train_classifier(train_ds, test_ds, config, epochs=epochs, seed=seed, log=log)
    accuracy_keys = ("train_accuracy", "test_accuracy")
    model.export_to(out, meta=ExportMeta(stage="classifier", dataset={"name": dataset},
                                         metrics={k: meta[k] for k in accuracy_keys},
                                         extra={k: v for k, v in meta.items() if k not in accuracy_keys}))
    return Classifier.from_export(out)
