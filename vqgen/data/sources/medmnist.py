"""Registry datasets of the MedMNIST collection (28x28 images, downloaded by the ``medmnist`` package).
"""

from __future__ import annotations

from pathlib import Path

from ...offline import how_registry, load_or_download
from ..transforms import MappedDataset, int_label, no_label


def build_medmnist(name, spec, split, data_dir, tf, download):
    import medmnist
    root = Path(data_dir) / "medmnist"
    cls = getattr(medmnist, medmnist.INFO[spec.target]["python_class"])

    def load(dl):
        if dl:
            root.mkdir(parents=True, exist_ok=True)  # MedMNIST refuses a root that does not exist
        return cls(split=split, download=dl, root=str(root), size=28)

    base = load_or_download(name, load, download, spec.host, spec.port, str(Path(data_dir) / spec.subdir),
                             how_registry(name, split, spec.subdir, data_dir))
    return MappedDataset(base, tf, int_label if spec.num_classes else no_label), {
        "source": f"medmnist.{cls.__name__}", "source_args": {"split": split, "size": 28}}
