"""Registry datasets downloaded by torchvision (MNIST, FashionMNIST, SVHN, CIFAR, Places365, DTD).
"""

from __future__ import annotations

import os
from pathlib import Path

from ...config.datasets import how_idx
from ...offline import how_registry, load_or_download
from .. import archives
from ..archives import IDX_CLASSES, prepare_idx
from ..transforms import MappedDataset, int_label


def build_torchvision(name, spec, split, data_dir, tf, download):
    import torchvision.datasets as tvd
    cls, root, kw, extra = getattr(tvd, spec.target), data_dir, {}, {}
    if spec.target in IDX_CLASSES:  # .gz archives on disk (or a distribution package's copy) are used offline
        root, found = prepare_idx(spec.target, data_dir)
        root = str(root)
        if found:
            extra["archives_from"] = found
    if spec.target in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100"):
        kw["train"] = split == "train"
    elif spec.target == "SVHN":
        root, kw["split"] = os.path.join(data_dir, "svhn"), "train" if split == "train" else "test"
    elif spec.target == "Places365":  # the "test" split has no labels: val stands in for it
        root, kw["split"], kw["small"] = os.path.join(data_dir, "places365"), (
            "train-standard" if split == "train" else "val"), True
    else:  # DTD has train/val/test
        kw["split"] = split
    system = archives.SYSTEM_DIRS.get(spec.target, ())
    looked = str(Path(data_dir) / spec.subdir) + "".join(f" and {d}" for d in system)
    base = load_or_download(name, lambda dl: cls(root, download=dl, **kw), download, spec.host, spec.port, looked,
                            how_registry(name, split, spec.subdir, data_dir)
                            + how_idx(spec.target, data_dir))
    desc = {"source": f"torchvision.datasets.{spec.target}", "source_args": kw, **extra}
    return MappedDataset(base, tf, int_label), desc
