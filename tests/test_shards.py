"""Shard writer/reader/manifest (vqgen.shards) with synthetic tokens: no encoder involved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqgen import shards
from vqgen.errors import ShardError
from vqgen.export import check_compatible

SHA = "a" * 64
H = W = 3


def tokens_for(key: int) -> np.ndarray:
    """Tokens that identify their sample: token 0 is the key (codebook 65536 -> uint16)."""
    return ((np.arange(H * W) * 7 + key) % 65536).astype(np.uint16).reshape(H, W)


def make_shards(out: Path, n: int = 50, world_size: int = 2, shard_size: int = 7, split: str = "train",
                hflip: bool = False, sha: str = SHA) -> shards.Manifest:
    settings = {"tokenizer_sha256": sha, "dataset": "synthetic", "split": split, "num_samples": n}
    for rank in range(world_size):
        w = shards.RankShardWriter(out, split, rank, settings, shard_size, (H, W), shards.token_dtype(65536))
        assert w.resume() == 0
        for key in shards.rank_indices(n, rank, world_size):
            flip = tokens_for(key)[:, ::-1] if hflip else None
            w.write(key, tokens_for(key), key % 10, flip)
        w.close()
    header = shards.Manifest(tokenizer={"sha256": sha, "config": {}, "path": None}, codebook_size=65536, latent_h=H,
                             latent_w=W, dtype="uint16", num_classes=10, dataset="synthetic")
    return shards.merge_manifest(out, split, world_size, header, transforms={}, hflip=hflip, expected_total=n)


def keys_of(batches) -> list[int]:
    return [int(k) for toks, _ in batches for k in toks[:, 0]]


def collect(out, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(shards.make_token_loader(out, **kw))


@pytest.mark.parametrize("n,ws", [(0, 1), (10, 1), (10, 3), (7, 8), (101, 4)])
def test_rank_indices_partition(n, ws):
    parts = [list(shards.rank_indices(n, r, ws)) for r in range(ws)]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n))  # every index exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shards.rank_indices(n, ws, ws)


def test_token_dtype():
    assert shards.token_dtype(256) == np.uint16 and shards.token_dtype(65536) == np.uint16
    assert shards.token_dtype(65537) == np.int32


def test_vocabulary_of_2_18_codes_round_trips(tmp_path):
    """LFQ's 2^18 codes: int32 shards (the manifest says so), read back as long tokens, codes above 65535 intact."""
    K, n = 1 << 18, 40
    dtype = shards.token_dtype(K)
    assert dtype == np.int32
    rng = np.random.default_rng(0)
    want = {k: rng.integers(0, K, size=(4, 4)) for k in range(n)}
    want[0][:] = K - 1                                  # the largest code
    settings = {"tokenizer_sha256": SHA, "dataset": "synthetic", "split": "train", "num_samples": n}
    for rank in range(2):
        w = shards.RankShardWriter(tmp_path, "train", rank, settings, 8, (4, 4), dtype)
        w.resume()
        for key in shards.rank_indices(n, rank, 2):
            w.write(key, want[key], key % 10)
        w.close()
    header = shards.Manifest(tokenizer={"sha256": SHA, "config": {}, "path": None}, codebook_size=K, latent_h=4,
                             latent_w=4, dtype=dtype.name, num_classes=10, dataset="synthetic")
    shards.merge_manifest(tmp_path, "train", 2, header, transforms={}, hflip=False, expected_total=n)
    raw = json.loads((tmp_path / shards.MANIFEST_NAME).read_text())
    assert raw["dtype"] == "int32" and raw["codebook_size"] == K and raw["format_version"] == 1
    got = collect(tmp_path, batch_size=7, shuffle=False)
    toks = torch.cat([t for t, _ in got])
    assert toks.dtype == torch.long and toks.shape == (n, 16) and int(toks.max()) == K - 1
    stored = {tuple(v.reshape(-1).tolist()) for v in want.values()}
    assert {tuple(r.tolist()) for r in toks} == stored
    shuffled = torch.cat([t for t, _ in collect(tmp_path, batch_size=7, seed=1)])
    assert {tuple(r.tolist()) for r in shuffled} == stored


def test_roundtrip_and_manifest(tmp_path):
    man = make_shards(tmp_path, n=50, world_size=2, shard_size=7)
    assert shards.Manifest.read(tmp_path) == man
    entry = man.splits["train"]
    assert entry.total == 50 and sum(s.count for s in entry.shards) == 50
    assert [s.name for s in entry.shards][:2] == ["train-r000-000000.tar", "train-r000-000001.tar"]
    assert man.format == "vqgen-shards" and man.dtype == "uint16"
    split = shards.TokenSplit.read(tmp_path, "train")
    assert [s.path.name for s in split.shards] == [s.name for s in entry.shards]
    shards.check_split(split, "full")
    batches = collect(tmp_path, batch_size=8, shuffle=False)
    assert [t.shape[0] for t, _ in batches] == [8] * 6 + [2]
    keys = keys_of(batches)
    assert sorted(keys) == list(range(50))
    for toks, labels in batches:
        assert toks.dtype == torch.long and toks.shape[1] == H * W
        for row, lab in zip(toks, labels):
            k = int(row[0])
            assert np.array_equal(row.numpy(), tokens_for(k).reshape(-1)) and int(lab) == k % 10


def test_shard_bytes_reproducible(tmp_path):
    a = make_shards(tmp_path / "a")
    b = make_shards(tmp_path / "b")
    shas = [[s.sha256 for s in m.splits["train"].shards] for m in (a, b)]
    assert shas[0] == shas[1]


def test_second_split_merges(tmp_path):
    make_shards(tmp_path, n=20, split="train")
    man = make_shards(tmp_path, n=9, split="test")
    assert set(man.splits) == {"train", "test"} and man.splits["test"].total == 9
    assert shards.has_split(tmp_path, "test") and man.split("test").total == 9
    assert keys_of(collect(tmp_path, split="test", batch_size=4, shuffle=False)) != []


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(ShardError, match="extract_codes.py"):
        shards.Manifest.read(tmp_path / "nothing")
    make_shards(tmp_path, n=10)
    with pytest.raises(ShardError, match="no 'test' split.*extract_codes.py"):
        shards.make_token_loader(tmp_path, "test", batch_size=2)


def test_check_tokenizer(tmp_path):
    man = make_shards(tmp_path)
    check_compatible(tokenizer=SHA, shards=man)
    with pytest.raises(ShardError) as e:
        check_compatible(tokenizer="b" * 64, shards=man)
    assert "a" * 12 in str(e.value) and "b" * 12 in str(e.value)


def test_determinism_and_epochs(tmp_path):
    make_shards(tmp_path, n=60, shard_size=6)
    kw = dict(batch_size=5, seed=3, shuffle_buffer=10)
    a = keys_of(collect(tmp_path, epoch=0, **kw))
    assert a == keys_of(collect(tmp_path, epoch=0, **kw))
    assert sorted(a) == list(range(60)) and a != list(range(60))
    b = keys_of(collect(tmp_path, epoch=1, **kw))
    assert sorted(b) == list(range(60)) and b != a
    assert keys_of(collect(tmp_path, epoch=0, **{**kw, "seed": 4})) != a


def test_skip_batches_is_exact(tmp_path):
    make_shards(tmp_path, n=60, shard_size=6)
    full = collect(tmp_path, batch_size=7, seed=1, epoch=2, shuffle_buffer=8)
    for skip in (0, 1, 4, len(full)):
        rest = collect(tmp_path, batch_size=7, seed=1, epoch=2, shuffle_buffer=8, skip_batches=skip)
        assert len(rest) == len(full) - skip
        for (t1, l1), (t2, l2) in zip(full[skip:], rest):
            assert torch.equal(t1, t2) and torch.equal(l1, l2)


def test_workers_do_not_change_stream(tmp_path):
    make_shards(tmp_path, n=40, shard_size=5)
    kw = dict(batch_size=3, seed=0, epoch=1, rank=1, world_size=2, shuffle_buffer=6)
    ref = collect(tmp_path, **kw)
    two = collect(tmp_path, num_workers=2, skip_batches=1, **kw)
    assert [t.tolist() for t, _ in ref[1:]] == [t.tolist() for t, _ in two]


@pytest.mark.parametrize("world_size,shard_size", [(2, 7), (3, 50), (4, 100)])
def test_rank_streams_disjoint_equal(tmp_path, world_size, shard_size):
    # shard_size 50/100 -> 1-2 shards for 3-4 ranks: fewer shards than ranks must still work.
    make_shards(tmp_path, n=50, world_size=2, shard_size=shard_size)
    streams = [collect(tmp_path, batch_size=4, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in streams}) == 1  # equal batch counts: DDP cannot desynchronise
    assert len({sum(t.shape[0] for t, _ in s) for s in streams}) == 1
    keys = [k for s in streams for k in keys_of(s)]
    assert len(keys) == len(set(keys)) == (50 // world_size) * world_size
    loader = shards.make_token_loader(tmp_path, batch_size=4, rank=0, world_size=world_size)
    assert len(loader) == len(streams[0])


def test_resampled_equal_length_deterministic(tmp_path):
    make_shards(tmp_path, n=30, shard_size=4)
    kw = dict(batch_size=4, seed=2, resampled=True, epoch_samples=22, world_size=2)
    a = [collect(tmp_path, rank=r, **kw) for r in range(2)]
    assert [len(x) for x in a] == [6, 6] and sum(t.shape[0] for t, _ in a[0]) == 22
    assert keys_of(a[0]) == keys_of(collect(tmp_path, rank=0, **kw))
    assert keys_of(a[0]) != keys_of(a[1])


def test_hflip_tokens_used(tmp_path):
    make_shards(tmp_path, n=20, hflip=True)
    rows = [r for t, _ in collect(tmp_path, batch_size=5, seed=0) for r in t]
    flipped = [not np.array_equal(r.numpy(), tokens_for(int(r[0])).reshape(-1)) for r in rows]
    assert any(flipped) and not all(flipped)
    plain = [r for t, _ in collect(tmp_path, batch_size=5, hflip=False) for r in t]
    assert all(np.array_equal(r.numpy(), tokens_for(int(r[0])).reshape(-1)) for r in plain)


def _first_shard(tmp_path) -> Path:
    return tmp_path / json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]


def test_truncated_shard_named(tmp_path):
    make_shards(tmp_path, n=20)
    p = _first_shard(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=p.name):
        shards.check_split(shards.TokenSplit.read(tmp_path, "train"), "size")
    with pytest.raises(ShardError, match=p.name):
        collect(tmp_path, batch_size=4, shuffle=False)
    man = shards.Manifest.read(tmp_path)  # a manifest from before shard sizes were recorded
    for s in man.splits["train"].shards:
        s.bytes = None
    man.write(tmp_path)
    with pytest.raises(ShardError, match="truncated shard .*" + p.name):  # even without the size record
        collect(tmp_path, batch_size=4, shuffle=False, verify="none")


def test_corrupt_shard_named(tmp_path):
    make_shards(tmp_path, n=20)
    p = _first_shard(tmp_path)
    data = bytearray(p.read_bytes())
    data[0:600] = b"\x07" * 600  # clobber the first tar header, same size
    p.write_bytes(bytes(data))
    shards.check_split(shards.TokenSplit.read(tmp_path, "train"), "full")  # start-up: the size is right
    for verify in ("full", "none"):  # the reader that opens it names it
        with pytest.raises(ShardError, match=p.name):
            collect(tmp_path, batch_size=4, shuffle=False, verify=verify)


def test_writer_resume_keeps_complete_shards(tmp_path):
    settings = {"tokenizer_sha256": SHA, "dataset": "synthetic", "split": "train", "num_samples": 20}
    w = shards.RankShardWriter(tmp_path, "train", 0, settings, 6, (H, W), np.dtype(np.uint16))
    w.resume()
    for key in range(14):  # 2 complete shards + 2 samples of a third, then "crash" (no close)
        w.write(key, tokens_for(key), 0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".parts", ".train-r000-000002.tar.tmp", "train-r000-000000.tar", "train-r000-000001.tar"]
    w._writer.tarstream.close()  # what the OS does to a killed process's files: the temp shard stays behind
    st = [(tmp_path / f"train-r000-00000{i}.tar").stat() for i in (0, 1)]
    (tmp_path / "train-r000-000003.tar").write_bytes(b"renamed but never recorded")
    w2 = shards.RankShardWriter(tmp_path, "train", 0, settings, 6, (H, W), np.dtype(np.uint16))
    assert w2.resume() == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [".parts", "train-r000-000000.tar", "train-r000-000001.tar"]
    for i, s in zip((0, 1), st):
        s2 = (tmp_path / f"train-r000-00000{i}.tar").stat()
        assert (s2.st_ino, s2.st_mtime_ns) == (s.st_ino, s.st_mtime_ns)
    with pytest.raises(ShardError, match="other settings"):
        shards.RankShardWriter(tmp_path, "train", 0, {**settings, "num_samples": 21}, 6, (H, W),
                               np.dtype(np.uint16)).resume()
    # a kept shard that was modified afterwards is redone
    (tmp_path / "train-r000-000001.tar").write_bytes(b"x")
    w3 = shards.RankShardWriter(tmp_path, "train", 0, settings, 6, (H, W), np.dtype(np.uint16))
    assert w3.resume() == 6 and not (tmp_path / "train-r000-000001.tar").exists()


def test_check_output_and_clear(tmp_path):
    make_shards(tmp_path, n=10)
    shards.check_output(tmp_path, SHA, "synthetic")
    with pytest.raises(ShardError, match="another tokenizer"):
        shards.check_output(tmp_path, "c" * 64, "synthetic")
    (tmp_path / "notes.txt").write_text("keep me")
    shards.clear_output(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    shards.check_output(tmp_path, "c" * 64, "synthetic")
