"""Data on disk used as it is: torchvision's .gz IDX archives extracted offline; Debian's Fashion-MNIST package."""

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from vqgen import offline
from vqgen.data import archives, build_dataset
from vqgen.errors import DatasetUnavailableError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_idx_gz(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def _tiny_set(folder: Path, n_train=6, n_test=4) -> np.ndarray:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    _write_idx_gz(folder, "train", train, (np.arange(n_train) % 10).astype(np.uint8))
    _write_idx_gz(folder, "t10k", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                  (np.arange(n_test) % 10).astype(np.uint8))
    return train


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_gz_archives_in_data_dir_are_extracted_offline(tmp_path, monkeypatch, name, cls):
    monkeypatch.setattr(archives, "SYSTEM_DIRS", {})
    monkeypatch.setattr(offline, "probe_host", lambda *a, **k: pytest.fail("no network probe when the files are here"))
    train = _tiny_set(tmp_path / cls / "raw")
    ds, info = build_dataset(name, data_dir=str(tmp_path))
    test, _ = build_dataset(name, split="test", data_dir=str(tmp_path))
    assert (len(ds), len(test)) == (6, 4)
    assert (tmp_path / cls / "raw" / "train-images-idx3-ubyte").is_file()      # extracted where torchvision looks
    assert not list((tmp_path / cls / "raw").glob(".*.tmp"))                   # no temp file left
    x, y = ds[3]
    assert y == 3 and tuple(x.shape) == (1, 32, 32)
    # the pixels are the archive's: the center of the 32x32 image is the resized 28x28 one
    assert info.transforms["archives_from"] == str(tmp_path / cls / "raw")
    assert abs(float(x.mean()) - (train[3].mean() / 127.5 - 1)) < 0.1


def test_bad_gz_fails_loudly_not_silently(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "SYSTEM_DIRS", {})
    raw = tmp_path / "MNIST" / "raw"
    _tiny_set(raw)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\0\0not idx")
    with pytest.raises(Exception):
        build_dataset("mnist", data_dir=str(tmp_path))


def test_system_location_used_when_data_dir_holds_nothing(tmp_path, monkeypatch):
    system = tmp_path / "usr_share_fashion"
    _tiny_set(system, n_train=8)
    monkeypatch.setattr(archives, "SYSTEM_DIRS", {"FashionMNIST": (str(system),)})
    ds, info = build_dataset("fashionmnist", data_dir=str(tmp_path / "data"))
    assert len(ds) == 8 and info.transforms["archives_from"] == str(system)
    # the extracted copy lands in data_dir; a second build reads it without touching the archives again
    assert (tmp_path / "data/FashionMNIST/raw/t10k-labels-idx1-ubyte").is_file()
    _, info2 = build_dataset("fashionmnist", data_dir=str(tmp_path / "data"))
    assert "archives_from" not in info2.transforms


def test_unwritable_data_dir_extracts_into_user_cache(tmp_path, monkeypatch):
    system = tmp_path / "pkg"
    _tiny_set(system)
    monkeypatch.setattr(archives, "SYSTEM_DIRS", {"FashionMNIST": (str(system),)})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "a_file").write_text("x")                # a data_dir below a file cannot be created, even by root
    ds, _ = build_dataset("fashionmnist", data_dir=str(tmp_path / "a_file" / "data"))
    assert len(ds) == 6 and (tmp_path / "cache/vqgen/FashionMNIST/raw/train-images-idx3-ubyte").is_file()


def test_missing_everywhere_still_fails_fast_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "SYSTEM_DIRS", {"FashionMNIST": (str(tmp_path / "nowhere"),)})
    t0 = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as e:
        build_dataset("fashionmnist", data_dir=str(tmp_path))
    assert time.monotonic() - t0 < 5
    assert "dataset-fashion-mnist" in str(e.value) and ".gz" in str(e.value)


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    ds, info = build_dataset("fashionmnist", data_dir=str(tmp_path))
    test, _ = build_dataset("fashionmnist", split="test", data_dir=str(tmp_path))
    assert (len(ds), len(test), info.num_classes) == (60000, 10000, 10)
    assert info.transforms["archives_from"] == str(DEBIAN_FMNIST)
    labels = ds.base.targets
    assert sorted(set(labels.tolist())) == list(range(10)) and int((labels == 0).sum()) == 6000
    x, y = ds[0]
    assert tuple(x.shape) == (1, 32, 32) and y == int(labels[0]) and -1 <= float(x.min()) < float(x.max()) <= 1
