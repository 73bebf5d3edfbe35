"""The dataset registry: name -> size, channels, classes and source (what the configs and ``--help`` list).

Pure data, no torch: :mod:`vqgen.data` builds the datasets from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GENERIC_IMAGE_SIZE, GENERIC_CHANNELS = 64, 3  # inputs without a registry entry (folders, hf:, WebDataset)
# torchvision's IDX datasets, whose .gz archives vqgen extracts offline (vqgen.data.archives), and the folders where a
# distribution package installs them
IDX_CLASSES = ("MNIST", "FashionMNIST", "KMNIST")
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "FashionMNIST": ("/usr/share/datasets/fashion-mnist",),  # Debian/Ubuntu: apt-get install dataset-fashion-mnist
}


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry. ``subdir`` is where the files live under ``data_dir`` (shown in errors)."""
    image_size: int
    channels: int
    num_classes: int           # 0 = unlabeled (items carry label -1)
    source: str                # "digits" | "torchvision" | "medmnist" | "tinyimagenet" | "hf"
    target: str = ""           # torchvision class, MedMNIST flag or HF hub id
    subdir: str = ""
    host: str = ""             # download host probed before downloading
    port: int = 443


def _tv(size, ch, ncls, cls, subdir, host, port=443):
    return DatasetSpec(size, ch, ncls, "torchvision", cls, subdir, host, port)


def _med(flag, ch, ncls):
    return DatasetSpec(32, ch, ncls, "medmnist", flag, f"medmnist/{flag}.npz", "zenodo.org")


def _hf(repo, ncls, subdir):
    return DatasetSpec(128, 3, ncls, "hf", repo, subdir, "huggingface.co")


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(16, 1, 10, "digits"),
    "mnist": _tv(32, 1, 10, "MNIST", "MNIST/raw", "ossci-datasets.s3.amazonaws.com"),
    "fashionmnist": _tv(32, 1, 10, "FashionMNIST", "FashionMNIST/raw",
                        "fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    # chestmnist is multi-label (14 binary findings): no single class, so it is treated as unlabeled (-1).
    "chestmnist": _med("chestmnist", 1, 0), "octmnist": _med("octmnist", 1, 4),
    "tissuemnist": _med("tissuemnist", 1, 8), "pneumoniamnist": _med("pneumoniamnist", 1, 2),
    "bloodmnist": _med("bloodmnist", 3, 8), "dermamnist": _med("dermamnist", 3, 7),
    "retinamnist": _med("retinamnist", 3, 5),
    "svhn": _tv(32, 3, 10, "SVHN", "svhn", "ufldl.stanford.edu", 80),
    "cifar10": _tv(32, 3, 10, "CIFAR10", "cifar-10-batches-py", "www.cs.toronto.edu"),
    "cifar100": _tv(32, 3, 100, "CIFAR100", "cifar-100-python", "www.cs.toronto.edu"),
    "tinyimagenet": DatasetSpec(64, 3, 200, "tinyimagenet", "", "tiny-imagenet-200"),
    "places365": _tv(128, 3, 365, "Places365", "places365", "data.csail.mit.edu", 80),
    "dtd": _tv(128, 3, 47, "DTD", "dtd/dtd", "www.robots.ox.ac.uk"),
    "imagenet": _hf("benjamin-paine/imagenet-1k-256x256", 1000, "imagenet"),
    "celeba": _hf("korexyz/celeba-hq-256x256", 0, "celeba"),  # unconditional: labels not used
}


def how_idx(cls_name: str, data_dir: str) -> str:
    """The offline ways to provide an IDX dataset (MNIST family): its .gz archives, or a distribution package."""
    if cls_name not in IDX_CLASSES:
        return ""
    how = f"; or copy its four .gz IDX archives into {Path(data_dir) / cls_name / 'raw'} (extracted offline)"
    if cls_name == "FashionMNIST":
        where = "".join(f" in {d}" for d in SYSTEM_DIRS.get(cls_name, ())[:1])
        how += f"; or `apt-get install dataset-fashion-mnist` (Debian; installs them{where})"
    return how
