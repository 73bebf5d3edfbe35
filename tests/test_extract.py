"""Stage 2 (vqgen.extract): round trip, exactly-once over ranks, resume after SIGKILL, refusals, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factories import shard_samples, tiny_vqvae
from vqgen import shards
from vqgen.cli import run_cli
from vqgen.config import ExtractConfig
from vqgen.data.views import MultiView
from vqgen.errors import ConfigError, ShardError
from vqgen.export import check_compatible
from vqgen.extract import extract_split, run, tokenizer_header
from vqgen.fsutil import sha256_file

ROOT = Path(__file__).resolve().parents[1]


class FakeTokenizer(torch.nn.Module):
    """Pools pixels into a 4x4 grid and quantises the mean to K levels (cheap, deterministic)."""

    def __init__(self, k: int = 16, image_size: int = 16, latent: int = 4):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(codebook_size=k, latent_size=(latent, latent), image_size=image_size,
                                      in_channels=1)

    def encode_to_indices(self, x):
        p = F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), self.config.latent_size)[:, 0]  # (B, h, w)
        return ((p.clamp(-1, 1) + 1) / 2 * (self.config.codebook_size - 1)).round().long()


class ImageSet(torch.utils.data.Dataset):
    """n deterministic images [1, 16, 16] in [-1, 1] with labels i % 10."""

    def __init__(self, n: int, size: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, size, size, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 10


def run_extract(model, ds, out, rank=0, world_size=1, **kw):
    kw = {"batch_size": 4, "shard_size": 10, "progress": False, **kw}
    return extract_split(model, ds, out, split="train", tokenizer_sha256="f" * 64, dataset_name="fake", rank=rank,
                         world_size=world_size, device="cpu", **kw)


def merge(model, out, world_size, n, hflip=False, views=1):
    header = tokenizer_header(model, "f" * 64, {}, None, 10, "fake")
    return shards.merge_manifest(out, "train", world_size, header, transforms={}, hflip=hflip, expected_total=n,
                                 views=views)


def stored(out: Path, split="train") -> dict[int, dict]:
    """key -> raw sample {ext: bytes} as the tar holds it, asserting every key appears once and the counts."""
    found: dict[int, dict] = {}
    for s in shards.Manifest.read(out).splits[split].shards:
        with tarfile.open(out / s.name) as tar:
            members = [(m.name.partition("."), tar.extractfile(m).read()) for m in tar.getmembers()]
        keys = list(dict.fromkeys(key for (key, _, _), _ in members))
        assert len(keys) == s.count, (s.name, len(keys), s.count)
        for k in keys:
            assert int(k) not in found, f"sample {k} stored twice"
            found[int(k)] = {"__key__": k, **{ext: raw for (key, _, ext), raw in members if key == k}}
    return found


def npy(b: bytes) -> np.ndarray:
    import io
    return np.load(io.BytesIO(b))


def test_roundtrip_fake_and_hflip(tmp_path):
    model, ds = FakeTokenizer(), ImageSet(23)
    run_extract(model, ds, tmp_path, hflip=True)
    man = merge(model, tmp_path, 1, 23, hflip=True)
    assert man.codebook_size == 16 and (man.latent_h, man.latent_w) == (4, 4)
    got = stored(tmp_path)
    assert sorted(got) == list(range(23))
    want = model.encode_to_indices(ds.x)
    want_flip = model.encode_to_indices(ds.x.flip(-1))
    for k, s in got.items():
        t = npy(s["tokens.npy"])
        assert t.dtype == np.uint16 and t.shape == (4, 4)
        assert np.array_equal(t, want[k].numpy()) and np.array_equal(npy(s["tokens_flip.npy"]), want_flip[k].numpy())
        assert int(s["cls"]) == k % 10 and s["__key__"] == f"{k:09d}"


def test_roundtrip_real_vqvae(tmp_path):
    model, ds = tiny_vqvae(), ImageSet(12)
    run_extract(model, ds, tmp_path, batch_size=5)
    merge(model, tmp_path, 1, 12)
    want = model.encode_to_indices(ds.x)  # the encoder's argmin codes
    got = stored(tmp_path)
    assert all(np.array_equal(npy(s["tokens.npy"]), want[k].numpy()) for k, s in got.items())


def test_two_ranks_exactly_once(tmp_path):
    model, ds = FakeTokenizer(), ImageSet(27)
    for rank in (0, 1):
        run_extract(model, ds, tmp_path, rank=rank, world_size=2)
    man = merge(model, tmp_path, 2, 27)
    names = [s.name for s in man.splits["train"].shards]
    assert names == ["train-r000-000000.tar", "train-r000-000001.tar", "train-r001-000000.tar",
                     "train-r001-000001.tar"]
    assert sorted(stored(tmp_path)) == list(range(27))
    assert man.splits["train"].class_counts == [3] * 7 + [2] * 3          # labels i % 10, summed over the ranks
    with pytest.raises(ShardError, match="rank 2 did not finish"):
        merge(model, tmp_path, 3, 27)


KILLER = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_extract import FakeTokenizer, ImageSet, run_extract

class Killed(FakeTokenizer):
    calls = 0
    def encode_to_indices(self, x):
        Killed.calls += 1
        if Killed.calls > {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_to_indices(x)

run_extract(Killed(), ImageSet({n}), {out!r}, rank={rank}, world_size=2)
"""


def test_resume_after_sigkill(tmp_path):
    n, out, ref = 101, tmp_path / "out", tmp_path / "ref"
    model, ds = FakeTokenizer(), ImageSet(n)
    # rank 0 owns 51 samples -> shards of 10 (batches 4,4,2) x5 + 1; SIGKILL in encoder call 14. The writer
    # thread lags by at most 4 queued batches, so shards 0-1 are surely committed and a later one is open.
    script = KILLER.format(root=str(ROOT), tests=str(ROOT / "tests"), kill_after=13, n=n, out=str(out), rank=0)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    complete = sorted(p.name for p in out.glob("train-*.tar"))
    assert complete[:2] == ["train-r000-000000.tar", "train-r000-000001.tar"] and len(complete) < 6
    # The shard being written when killed is usually left as a temp file; the background writer can also have
    # been between two shards at that instant. Make sure a partial temp shard is there either way.
    if not list(out.glob(".train-r000-*.tar.tmp")):
        (out / f".train-r000-{len(complete):06d}.tar.tmp").write_bytes(b"partial tar bytes")
    # Kept on resume: the shards recorded in the rank's progress file. A shard renamed but not yet recorded when
    # the kill came is (rightly) redone, so it is not part of this snapshot.
    recorded = [s["name"] for s in json.loads(shards.part_path(out, "train", 0).read_text())["shards"]]
    assert recorded[:2] == complete[:2]
    before = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in recorded}
    for rank in (0, 1):
        run_extract(model, ds, out, rank=rank, world_size=2)
    man = merge(model, out, 2, n)
    assert sorted(stored(out)) == list(range(n))  # every sample exactly once
    assert sum(man.splits["train"].class_counts) == n   # the kept shards' labels were counted again on resume
    assert not list(out.glob(".*.tmp"))
    for name, st in before.items():  # complete shards were kept, not rewritten
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == st
    for rank in (0, 1):  # an uninterrupted run writes byte-identical shards
        run_extract(model, ds, ref, rank=rank, world_size=2)
    assert man == merge(model, ref, 2, n)
    # rerunning a finished extraction is a no-op
    run_extract(model, ds, out, rank=0, world_size=2)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}.items() >= before.items()


def test_exception_mid_shard_leaves_no_partial(tmp_path):
    class Boom(FakeTokenizer):
        calls = 0

        def encode_to_indices(self, x):
            Boom.calls += 1
            if Boom.calls == 5:
                raise RuntimeError("boom")
            return super().encode_to_indices(x)

    ds = ImageSet(30)
    with pytest.raises(RuntimeError):
        run_extract(Boom(), ds, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".parts", "train-r000-000000.tar"]
    run_extract(FakeTokenizer(), ds, tmp_path)
    merge(FakeTokenizer(), tmp_path, 1, 30)
    assert sorted(stored(tmp_path)) == list(range(30))


def test_changed_settings_refused(tmp_path):
    ds = ImageSet(12)
    run_extract(FakeTokenizer(), ds, tmp_path)
    with pytest.raises(ShardError, match="shard_size"):
        run_extract(FakeTokenizer(), ds, tmp_path, shard_size=5)


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    a, b = tiny_vqvae(0), tiny_vqvae(1)
    return a.export_to(d / "a"), d / "a", b.export_to(d / "b"), d / "b"


def cli(*argv) -> int:
    return run_cli(run, ExtractConfig, [str(a) for a in argv])


def test_cli_digits_both_splits_and_refusals(tmp_path, exports, capsys):
    sha_a, exp_a, sha_b, exp_b = exports
    out = tmp_path / "shards"
    base = ["--checkpoint", exp_a, "--dataset", "digits", "--data_dir", tmp_path / "data", "--output", out,
            "--batch_size", 128, "--shard_size", 400, "--no_progress"]
    assert cli(*base, "--split", "train") == 0
    assert cli(*base, "--split", "test", "--hflip") == 0  # merges into the same manifest
    man = shards.Manifest.read(out)
    assert man.tokenizer_sha256 == sha_a and man.dataset == "digits" and man.num_classes == 10
    assert man.splits["train"].total == 1500 and man.splits["test"].total == 297
    assert man.splits["test"].hflip and not man.splits["train"].hflip
    assert man.splits["train"].transforms and man.tokenizer["config"]["num_embeddings"] == 32
    assert all(sha256_file(out / s.name) == s.sha256 for s in man.splits["train"].shards)
    check_compatible(tokenizer=sha_a, shards=man)
    capsys.readouterr()
    # another tokenizer into the same folder: refused (exit 2, clear message) unless --overwrite
    base_b = [*base[:1], exp_b, *base[2:]]
    assert cli(*base_b, "--split", "test") == 2
    err = capsys.readouterr().err
    assert "another tokenizer" in err and sha_a[:12] in err and "--overwrite" in err
    assert cli(*base_b, "--split", "test", "--overwrite") == 0
    man = shards.Manifest.read(out)
    assert man.tokenizer_sha256 == sha_b and set(man.splits) == {"test"}
    # tokens equal the encoder's codes for the same images
    from vqgen.data import build_dataset
    from vqgen.models.vqvae import VQVAE
    ds, _ = build_dataset("digits", "test", str(tmp_path / "data"), image_size=16)
    want = VQVAE.from_export(exp_b).encode_to_indices(torch.stack([ds[i][0] for i in range(len(ds))]))
    got = stored(out, "test")
    assert all(np.array_equal(npy(s["tokens.npy"]), want[k].numpy()) for k, s in got.items())


def test_class_sorted_folder_gives_shards_that_mix_classes(tmp_path, exports):
    """An image folder is sorted by class (a/, b/, c/): extraction encodes it in a seeded permutation of the source
    order, so every shard holds several classes; the key stays the source index, the seed is in the manifest, and
    a rerun writes the same bytes."""
    from PIL import Image
    _, exp_a, _, _ = exports
    for c, name in enumerate("abc"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (25 * i, 80 * c, 0)).save(tmp_path / "imgs" / name / f"{i:02d}.png")
    base = ["--checkpoint", exp_a, "--dataset", tmp_path / "imgs", "--batch_size", 4, "--shard_size", 10,
            "--no_progress"]
    assert cli(*base, "--output", tmp_path / "s0") == 0
    man = shards.Manifest.read(tmp_path / "s0")
    entry = man.splits["train"]
    assert (entry.total, len(entry.shards), entry.order_seed, man.num_classes) == (30, 3, 0, 3)
    keys = []
    for s in entry.shards:
        samples = shard_samples(tmp_path / "s0" / s.name)
        classes = {int(x["cls"]) for x in samples}
        assert len(classes) >= 2, (s.name, classes)                    # not one class per shard
        assert all(int(x["cls"]) == int(x["__key__"]) // 10 for x in samples)  # key = source index
        keys += [int(x["__key__"]) for x in samples]
    assert sorted(keys) == list(range(30)) and keys != sorted(keys)
    assert cli(*base, "--output", tmp_path / "again") == 0                  # byte-identical rerun
    assert [s.sha256 for s in shards.Manifest.read(tmp_path / "again").splits["train"].shards] == \
        [s.sha256 for s in entry.shards]
    assert cli(*base, "--output", tmp_path / "s1", "--order_seed", 1) == 0  # another seed: another order
    other = shards.Manifest.read(tmp_path / "s1").splits["train"]
    assert other.order_seed == 1 and [s.sha256 for s in other.shards] != [s.sha256 for s in entry.shards]


# ---------------------------------------------------------------------------------------------- multi-view
def test_views_tencrop_are_torchvision_ten_crops(tmp_path):
    """Each sample holds the tokens of the 10 crops (TenCrop order) of its image upsampled like stage 1's crop."""
    import torchvision.transforms.functional as TF
    model, ds = FakeTokenizer(), ImageSet(13)
    mv = MultiView(10, "tencrop", 16)
    run_extract(model, ds, tmp_path, views=mv)
    man = merge(model, tmp_path, 1, 13, views=10)
    assert man.splits["train"].views == 10 and man.required_version() == 2
    up = F.interpolate(ds.x, size=(mv.big, mv.big), mode="bicubic", align_corners=False).clamp(-1, 1)
    got = stored(tmp_path)
    assert sorted(got) == list(range(13))
    for k, s in got.items():
        t = npy(s["tokens.npy"])
        want = model.encode_to_indices(torch.stack(TF.ten_crop(up[k], 16)))
        assert t.dtype == np.uint16 and t.shape == (10, 4, 4) and np.array_equal(t, want.numpy())
        assert "tokens_flip.npy" not in s


def test_views_random_seeded_and_reproducible(tmp_path):
    model, ds = FakeTokenizer(k=256), ImageSet(12)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_extract(model, ds, tmp_path / name, views=MultiView(4, "random", 16, seed=seed))
    sha = {n: [sha256_file(p) for p in sorted((tmp_path / n).glob("*.tar"))] for n in "abc"}
    assert sha["a"] == sha["b"] and sha["a"] != sha["c"]
    mv = MultiView(4, "random", 16, seed=5)
    top, left, flip = mv.params(range(12))
    assert np.array_equal(top, mv.params(range(12))[0]) and 0 < flip.mean() < 1
    assert top.max() <= mv.big - 16 and left.min() >= 0
    views = mv(ds.x, list(range(12))).view(12, 4, 1, 16, 16)
    k = 3                                                      # view v of image k is its crop at (top, left)
    up = F.interpolate(ds.x[k:k + 1], size=(mv.big, mv.big), mode="bicubic", align_corners=False).clamp(-1, 1)[0]
    for v in range(4):
        crop = up[:, top[k, v]:top[k, v] + 16, left[k, v]:left[k, v] + 16]
        assert torch.equal(views[k, v], crop.flip(-1) if flip[k, v] else crop)
    with pytest.raises(ConfigError, match="mirrored"):
        run_extract(model, ds, tmp_path / "d", views=mv, hflip=True)


def test_codes_outside_the_codebook_are_refused(tmp_path):
    class Wrong(FakeTokenizer):
        def encode_to_indices(self, x):
            return super().encode_to_indices(x) + self.config.codebook_size

    with pytest.raises(ShardError, match="outside"):
        run_extract(Wrong(), ImageSet(8), tmp_path)


def test_cli_views_on_digits(tmp_path, exports, capsys):
    _, exp_a, _, _ = exports
    out = tmp_path / "shards"
    base = ["--checkpoint", exp_a, "--dataset", "digits", "--data_dir", tmp_path / "data", "--output", out,
            "--split", "test", "--batch_size", 64, "--shard_size", 100, "--no_progress"]
    assert cli(*base, "--views", 10, "--hflip") == 2 and "already include mirrored" in capsys.readouterr().err
    assert cli(*base, "--views", 4) == 2 and "--view_mode random" in capsys.readouterr().err
    assert not out.exists()                                    # refused before anything is written
    assert cli(*base, "--views", 10) == 0
    man = shards.Manifest.read(out)
    entry = man.splits["test"]
    assert entry.views == 10 and not entry.hflip and entry.total == 297
    assert entry.transforms["views"]["mode"] == "tencrop" and entry.transforms["views"]["count"] == 10
    assert len(entry.transforms) > 1                           # the dataset's own transform is kept beside it
    got = stored(out, "test")
    rows = {tuple(v.reshape(-1)) for s in got.values() for v in npy(s["tokens.npy"])}
    assert all(npy(s["tokens.npy"]).shape == (10, 4, 4) for s in got.values())
    batches = list(shards.make_token_loader(out, "test", batch_size=50, seed=0))
    toks = torch.cat([t for t, _ in batches])
    assert toks.shape == (297, 16) and all(tuple(r.tolist()) in rows for r in toks)
    assert cli(*base, "--overwrite", "--views", 3, "--view_mode", "random") == 0
    assert shards.Manifest.read(out).splits["test"].transforms["views"]["seed"] == 0


@pytest.mark.distributed
def test_accelerate_launch_two_processes(tmp_path, exports):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate CLI not installed")
    _, exp_a, _, _ = exports
    out = tmp_path / "shards"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29517", str(ROOT / "extract_codes.py"), "--checkpoint", str(exp_a), "--dataset", "digits", "--split",
           "test", "--data_dir", str(tmp_path / "data"), "--output", str(out), "--batch_size", "64",
           "--shard_size", "50", "--no_progress"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    man = shards.Manifest.read(out)
    names = [s.name for s in man.splits["test"].shards]
    assert {n.split("-")[1] for n in names} == {"r000", "r001"}  # both ranks wrote shards
    assert sorted(stored(out, "test")) == list(range(297))
    assert json.loads((out / ".parts" / "test-r001.json").read_text())["complete"]
