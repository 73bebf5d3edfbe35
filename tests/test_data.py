"""vqgen.data: the digits demo set, the registry, every generic input (built on disk here) and offline errors."""

import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vqgen import offline
from vqgen.config import DataConfig, build_parser, load_config
from vqgen.data import DATASETS, build_dataset
from vqgen.data.transforms import IMAGE_EXTENSIONS
from vqgen.errors import ConfigError, DatasetUnavailableError


def _check_item(x, label, shape, num_classes):
    assert x.dtype == torch.float32 and tuple(x.shape) == shape
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(label, int) and (label == -1 if num_classes == 0 else 0 <= label < num_classes)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_split_shapes_range_and_determinism():
    train, info = build_dataset("digits")
    test, tinfo = build_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    assert (info.image_size, info.channels, info.num_classes, info.split) == (16, 1, 10, "train")
    _check_item(*train[0], (1, 16, 16), 10)
    assert train.images.min() == -1 and train.images.max() == 1  # the full range is used
    assert sorted(set(train.labels.tolist())) == list(range(10))
    again, _ = build_dataset("digits")
    assert torch.equal(again.images, train.images) and (again.labels == train.labels).all()
    val, vinfo = build_dataset("digits", split="validation")  # val = the test split
    assert vinfo.split == "val" and torch.equal(val.images, test.images)
    big, binfo = build_dataset("digits", image_size=32, channels=3)
    _check_item(*big[5], (3, 32, 32), 10)
    assert torch.equal(big[5][0][0], big[5][0][2])
    import json
    json.dumps(info.transforms)  # recorded in shard manifests


# ------------------------------------------------------------------------------------------------ registry
def test_registry_sizes_and_channels():
    expected = {"mnist": (32, 1), "fashionmnist": (32, 1), "chestmnist": (32, 1), "octmnist": (32, 1),
                "tissuemnist": (32, 1), "pneumoniamnist": (32, 1), "bloodmnist": (32, 3), "dermamnist": (32, 3),
                "retinamnist": (32, 3), "svhn": (32, 3), "cifar10": (32, 3), "cifar100": (32, 3),
                "tinyimagenet": (64, 3), "places365": (128, 3), "dtd": (128, 3), "imagenet": (128, 3),
                "celeba": (128, 3), "digits": (16, 1)}
    assert {k: (v.image_size, v.channels) for k, v in DATASETS.items()} == expected
    from medmnist import INFO
    for name, spec in DATASETS.items():
        if spec.source == "medmnist":
            assert INFO[name]["n_channels"] == spec.channels
            multi = INFO[name]["task"].startswith("multi-label")
            assert spec.num_classes == (0 if multi else len(INFO[name]["label"]))


def test_unknown_name_suggests_close_names():
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        build_dataset("minst")
    assert "'mnist'" in str(e.value) and "cifar10" in str(e.value) and time.monotonic() - t0 < 5
    with pytest.raises(ConfigError):
        build_dataset("digits", split="holdout")
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        build_dataset("./no/such/folder")


def _write_idx(raw, prefix, images, labels):
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(images), 28, 28)
                                                      + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def test_torchvision_mnist_from_disk(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw, prefix, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8))
    ds, info = build_dataset("mnist", data_dir=str(tmp_path))
    test, _ = build_dataset("mnist", split="test", data_dir=str(tmp_path))
    assert (len(ds), len(test), info.num_classes) == (6, 4, 10)
    _check_item(*ds[3], (1, 32, 32), 10)
    assert ds[3][1] == 3 and info.transforms["source"] == "torchvision.datasets.MNIST"


def test_medmnist_from_disk(tmp_path):
    """The real MedMNIST class reads <data_dir>/medmnist/<flag>.npz (it checks the official split sizes)."""
    from medmnist import INFO
    (tmp_path / "medmnist").mkdir()
    for flag, shape in (("pneumoniamnist", (28, 28)), ("retinamnist", (28, 28, 3))):
        arrays = {}
        for split, n in INFO[flag]["n_samples"].items():
            arrays[f"{split}_images"] = np.full((n, *shape), 200, np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % len(INFO[flag]["label"])).reshape(n, 1)
        np.savez_compressed(tmp_path / "medmnist" / f"{flag}.npz", **arrays)
    ds, info = build_dataset("pneumoniamnist", split="val", data_dir=str(tmp_path))
    assert len(ds) == 524 and info.num_classes == 2
    _check_item(*ds[1], (1, 32, 32), 2)
    assert ds[1][1] == 1
    ds, info = build_dataset("retinamnist", data_dir=str(tmp_path), image_size=16)
    _check_item(*ds[4], (3, 16, 16), 5)
    assert ds[4][1] == 4


# ------------------------------------------------------------------------------------------- generic inputs
def _make_folder(root, with_classes=True):
    sub = (lambda c: root / c) if with_classes else (lambda c: root)
    for c in ("cat", "dog"):
        sub(c).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(sub("cat") / "a.png")
    Image.new("L", (20, 20), 128).save(sub("cat") / "b.jpg")
    Image.new("RGBA", (50, 50), (0, 255, 0, 128)).save(sub("dog") / "c.png")
    Image.new("P", (33, 17), 3).save(sub("dog") / "d.png")
    (sub("dog") / "e_bad.png").write_bytes(b"definitely not a png")


def test_image_folder_labels_mixed_modes_and_corrupt_files(tmp_path):
    from vqgen.data.folder_index import INDEX_FILE
    from vqgen.data.streaming import UNREADABLE
    _make_folder(tmp_path / "imgs")
    ds, info = build_dataset(str(tmp_path / "imgs"), image_size=24)  # no file is opened to build it
    assert (len(ds), info.num_classes, info.channels) == (5, 2, 3)
    assert (tmp_path / f".imgs{INDEX_FILE}").is_file()
    assert [ds.labels[i] for i in range(5)] == [0, 0, 1, 1, 1]
    for i in range(4):
        _check_item(*ds[i], (3, 24, 24), 2)
    with pytest.warns(UserWarning, match="unreadable image file .*e_bad.png"):
        x, y = ds[4]  # found when read: a marked item, item i stays item i
    assert y == UNREADABLE and tuple(x.shape) == (3, 24, 24)
    assert info.transforms["classes"] == ["cat", "dog"]
    red = ds[0][0]
    assert torch.allclose(red[:, 12, 12], torch.tensor([1.0, -1.0, -1.0]))

    _make_folder(tmp_path / "flat", with_classes=False)
    flat, finfo = build_dataset(str(tmp_path / "flat"), channels=1)
    assert finfo.num_classes == 0 and finfo.image_size == 64 and set(flat.labels) == {-1}
    _check_item(*flat[0], (1, 64, 64), 0)


def test_folder_index_is_cached_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    from vqgen.data import folder_index
    _make_folder(tmp_path / "imgs")
    first = folder_index.index_folder(tmp_path / "imgs", IMAGE_EXTENSIONS)
    assert first["rebuilt"] and len(first["files"]) == 5
    again = folder_index.index_folder(tmp_path / "imgs", IMAGE_EXTENSIONS)
    assert not again["rebuilt"] and again["files"] == first["files"]
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "dog" / "f.png")          # a new file in a subfolder
    changed = folder_index.index_folder(tmp_path / "imgs", IMAGE_EXTENSIONS)
    assert changed["rebuilt"] and "dog/f.png" in changed["files"] and changed["labels"][-1] == 1
    (tmp_path / "imgs" / "bird").mkdir()                                         # a new class folder
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "bird" / "g.png")
    assert folder_index.index_folder(tmp_path / "imgs", IMAGE_EXTENSIONS)["classes"] == ["bird", "cat", "dog"]


def test_image_folder_with_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / split / "a" / f"{i}.png")
    tr, info = build_dataset(str(tmp_path), image_size=8)
    te, tinfo = build_dataset(str(tmp_path), split="val", image_size=8)
    assert (len(tr), len(te), info.num_classes) == (3, 2, 1) and tinfo.transforms["split_folder"] == "test"


def _hf_dataset(n=5):
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    imgs = [Image.new("RGB", (10 + i, 12), (40 * i, 0, 0)) for i in range(n)]
    return datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(n)]}, features=feats)


def test_hf_saved_to_disk_and_hf_prefix(tmp_path):
    import datasets
    _hf_dataset().save_to_disk(str(tmp_path / "single"))
    for name in (str(tmp_path / "single"), f"hf:{tmp_path / 'single'}"):
        ds, info = build_dataset(name, image_size=8)
        assert len(ds) == 5 and info.num_classes == 3
        _check_item(*ds[4], (3, 8, 8), 3)
        assert ds[4][1] == 1
    datasets.DatasetDict({"train": _hf_dataset(4), "validation": _hf_dataset(2)}).save_to_disk(str(tmp_path / "dd"))
    ds, info = build_dataset(f"hf:{tmp_path / 'dd'}", split="val", image_size=8, channels=1)
    assert len(ds) == 2 and info.transforms["source_split"] == "validation"
    _check_item(*ds[1], (1, 8, 8), 3)
    unl = datasets.Dataset.from_dict({"img": [Image.new("L", (9, 9))] * 2}, features=datasets.Features(
        {"img": datasets.Image()}))
    unl.save_to_disk(str(tmp_path / "unl"))
    ds, info = build_dataset(str(tmp_path / "unl"), image_size=8)
    assert info.num_classes == 0 and ds[0][1] == -1


def test_registry_hf_entry_from_local_save_to_disk_copy(tmp_path):
    import datasets
    datasets.DatasetDict({"train": _hf_dataset(3)}).save_to_disk(str(tmp_path / "imagenet"))
    ds, info = build_dataset("imagenet", data_dir=str(tmp_path), image_size=16)
    assert len(ds) == 3 and info.num_classes == 1000
    _check_item(*ds[2], (3, 16, 16), 1000)


def test_webdataset_tar_and_brace_pattern(tmp_path):
    import webdataset as wds
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"s-{shard:03d}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"{shard}{i:04d}", "png": Image.new("RGB", (20, 16), (0, 0, 255)),
                         "cls": shard * 3 + i})
    ds, info = build_dataset(str(tmp_path / "s-000.tar"), image_size=16)
    items = list(ds)
    assert isinstance(ds, torch.utils.data.IterableDataset) and [y for _, y in items] == [0, 1, 2]
    _check_item(items[0][0], 0, (3, 16, 16), 10)
    ds, info = build_dataset(f"wds:{tmp_path}/s-{{000..001}}.tar", image_size=16)
    assert [y for _, y in ds] == list(range(6)) and info.num_classes == 0
    with pytest.raises(DatasetUnavailableError, match="not found"):
        build_dataset(f"wds:{tmp_path}/s-{{000..004}}.tar")


# ------------------------------------------------------------------------------------------------ offline
@pytest.mark.parametrize("name", ["mnist", "cifar10", "bloodmnist", "imagenet", "celeba", "tinyimagenet",
                                  "hf:someone/some-dataset"])
def test_offline_missing_dataset_fails_fast_with_guidance(tmp_path, name):
    t0 = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as e:
        build_dataset(name, data_dir=str(tmp_path))
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert str(tmp_path) in msg and "looked in" in msg and "to provide it" in msg


def test_unreachable_host_without_offline_env(tmp_path, monkeypatch):
    for var in offline.OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    probed = []
    monkeypatch.setattr(offline, "probe_host", lambda host, port=443, timeout=2.0: probed.append(host) or False)
    for name, host in (("mnist", "ossci-datasets.s3.amazonaws.com"), ("imagenet", "huggingface.co")):
        t0 = time.monotonic()
        with pytest.raises(DatasetUnavailableError, match="cannot be reached") as e:
            build_dataset(name, data_dir=str(tmp_path))
        assert time.monotonic() - t0 < 5 and probed[-1] == host and str(tmp_path) in str(e.value)


def test_download_false_never_probes(tmp_path, monkeypatch):
    monkeypatch.delenv("VQGEN_OFFLINE", raising=False)
    monkeypatch.setattr(offline, "probe_host", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(DatasetUnavailableError, match="download=False"):
        build_dataset("mnist", data_dir=str(tmp_path), download=False)


def test_probe_is_bounded_even_for_bad_hosts():
    t0 = time.monotonic()
    assert offline.probe_host("no-such-host.invalid", 443, timeout=1.0) is False
    assert offline.probe_host("127.0.0.1", 1, timeout=1.0) is False
    assert time.monotonic() - t0 < 3


def test_data_flags():
    cfg = load_config(DataConfig, [])
    assert (cfg.dataset, cfg.data_dir, cfg.image_size) == ("digits", "data", None)
    assert all(a.help for a in build_parser(DataConfig)._actions if a.dest in ("dataset", "data_dir", "image_size"))
    assert load_config(DataConfig, ["--image_size", "32", "--dataset", "mnist"]).image_size == 32


def test_hf_parquet_folder_and_pickling_for_workers(tmp_path):
    """A folder of parquet files (what `huggingface-cli download` leaves) loads without network; datasets pickle."""
    import pickle
    (tmp_path / "pq" / "data").mkdir(parents=True)
    _hf_dataset(4).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    for name in (str(tmp_path / "pq"), f"hf:{tmp_path / 'pq'}"):
        ds, info = build_dataset(name, image_size=8)
        assert len(ds) == 4 and info.num_classes == 3
        _check_item(*ds[3], (3, 8, 8), 3)
    _make_folder(tmp_path / "imgs")
    folder, _ = build_dataset(str(tmp_path / "imgs"), image_size=8)
    for d in (ds, folder, build_dataset("digits")[0]):
        clone = pickle.loads(pickle.dumps(d))
        assert torch.equal(clone[1][0], d[1][0]) and clone[1][1] == d[1][1]
