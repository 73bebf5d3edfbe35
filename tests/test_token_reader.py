"""The per-rank token reader (issue 12): vqgen.shards.plan (who reads what), vqgen.shards.access (reads by offset,
sha256), vqgen.shards.reader (DataLoader). Synthetic shards from vqgen's own writer; token 0 of a sample is its key.
tests/test_shards.py runs the reader's older contract tests (determinism, skip, workers, corrupt shards...)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vqgen import shards
from vqgen.errors import ShardError
from vqgen.shards.access import BLOCK
from vqgen.shards.plan import PlanSpec, plan_epoch, resume_history

SHA = "c" * 64
H = W = 3


def tokens_for(key: int) -> np.ndarray:
    return ((np.arange(H * W) * 7 + key) % 65536).astype(np.uint16).reshape(H, W)


def make_split(out: Path, counts: list[int], hflip: bool = False, split: str = "train") -> list[int]:
    """One shard per writer rank with the given sample counts (unequal sizes); keys 0..N-1 in shard order."""
    key = 0
    for rank, c in enumerate(counts):
        settings = {"tokenizer_sha256": SHA, "dataset": "synthetic", "split": split, "num_samples": sum(counts)}
        w = shards.RankShardWriter(out, split, rank, settings, max(1, c), (H, W), shards.token_dtype(65536))
        w.resume()
        for k in range(key, key + c):
            w.write(k, tokens_for(k), k % 10, tokens_for(k)[:, ::-1] if hflip else None)
        key += c
        w.close()
    header = shards.Manifest(tokenizer={"sha256": SHA, "config": {}, "path": None}, codebook_size=65536, latent_h=H,
                             latent_w=W, dtype="uint16", num_classes=10, dataset="synthetic")
    shards.merge_manifest(out, split, len(counts), header, transforms={}, hflip=hflip, expected_total=key)
    return counts


def load(out, **kw):
    loader = shards.make_token_loader(out, **kw)
    return loader, list(loader)


def keys_of(batches) -> list[int]:
    return [int(k) for toks, _ in batches for k in toks[:, 0]]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


# ------------------------------------------------------------------------------------------- the plan (pure)
CASES = [([7] * 8, 1), ([7] * 8, 3), ([50], 4), ([1, 9, 3, 14, 6], 2), ([1, 9, 3, 14, 6], 8), ([40, 2], 16),
         ([5] * 64, 64), ([0, 11, 0, 4], 3)]


@pytest.mark.parametrize("counts,world", CASES)
@pytest.mark.parametrize("batch,streams,drop_last", [(4, 8, False), (3, 2, True), (1, 1, False)])
def test_plan_ranks_disjoint_cover_equal(counts, world, batch, streams, drop_last):
    n = sum(counts)
    spec = PlanSpec(batch, world, seed=5, shuffle_buffer=6, streams=streams, drop_last=drop_last)
    plans = [plan_epoch(counts, spec, 2, r) for r in range(world)]
    per_rank = n // world
    assert len({p.num_batches for p in plans}) == 1  # DDP never waits for a rank at the epoch end
    assert plans[0].num_batches == (per_rank // batch if drop_last else -(-per_rank // batch))
    seen = []
    for p in plans:
        mine = np.concatenate([p.batch_positions(b) for b in range(p.num_batches)] + [np.zeros(0, np.int64)])
        assert sorted(mine.tolist()) == sorted(p.positions.tolist())  # the batches are exactly the rank's samples
        assert len(mine) == (p.num_batches * batch if drop_last else per_rank)
        slots = np.unique(p.locate(p.positions)[0])
        if len(slots):  # the rank opens only the shards holding its range: consecutive in the epoch order
            skipped = set(range(slots.min(), slots.max() + 1)) - set(slots.tolist())
            assert all(counts[p.order[k]] == 0 for k in skipped)
        seen += mine.tolist()
    assert len(seen) == len(set(seen))
    assert set(range(world * per_rank)) >= set(seen)  # dropped: the epoch order's tail (< W) and drop_last's
    if not drop_last:
        assert sorted(seen) == list(range(world * per_rank))


def test_plan_shuffle_window_bounded():
    """A stream emits in a jittered order whose look-ahead is bounded by the buffer: a sequential reader holds at
    most shuffle_buffer + 1 samples; and the order really mixes (not the identity, different per epoch)."""
    spec = PlanSpec(batch_size=8, streams=2, shuffle_buffer=50, seed=1)
    p = plan_epoch([400] * 5, spec, 0, 0)
    for s in range(2):
        order = p.stream_order(s)
        held = np.maximum.accumulate(order) + 1 - np.arange(1, len(order) + 1)  # read minus emitted
        assert held.max() <= 51 and held.max() > 10
        assert not np.array_equal(order, np.arange(len(order)))
    assert not np.array_equal(p.stream_order(0), plan_epoch([400] * 5, spec, 1, 0).stream_order(0))


def test_plan_flips_do_not_depend_on_world_size():
    counts = [13, 9, 20]
    one = plan_epoch(counts, PlanSpec(4, 1, seed=3), 1, 0)
    flips = dict(zip(one.positions.tolist(), one.flips(one.positions).tolist()))
    assert 0.3 < np.mean(list(flips.values())) < 0.7
    for r in range(3):
        p = plan_epoch(counts, PlanSpec(5, 3, seed=3, streams=2), 1, r)
        assert all(flips[int(q)] == f for q, f in zip(p.positions, p.flips(p.positions)))


@pytest.mark.parametrize("old_world,new_world", [(2, 3), (4, 1), (3, 2)])
def test_resume_on_another_world_size_continues_with_the_rest(old_world, new_world):
    counts, batch, done = [11, 7, 23, 9, 14], 3, 2
    old = PlanSpec(batch, old_world, seed=9, shuffle_buffer=5, streams=4)
    new = PlanSpec(batch, new_world, seed=9, shuffle_buffer=5, streams=4)
    consumed = np.concatenate([plan_epoch(counts, old, 4, r).consumed(done) for r in range(old_world)])
    assert len(consumed) == old_world * done * batch
    history, skip, warning = resume_history([], old, done, new)
    assert skip == 0 and warning.startswith("warning:") and f"world_size {old_world} -> {new_world}" in warning
    rest = [plan_epoch(counts, new, 4, r, history) for r in range(new_world)]
    assert len({p.num_batches for p in rest}) == 1
    later = np.concatenate([p.batch_positions(b) for p in rest for b in range(p.num_batches)])
    both = np.concatenate([consumed, later])
    assert len(both) == len(set(both.tolist()))  # no sample twice in the epoch
    assert sum(counts) - len(both) < new_world  # and none lost but the new remainder
    # same spec: the same plan, the saved batches skipped (bitwise-exact resume)
    assert resume_history(history, new, 5, new) == (history, 5, None)


def test_spec_checks():
    with pytest.raises(ValueError, match="batch_size"):
        PlanSpec(0)
    with pytest.raises(ValueError, match="resampled"):
        PlanSpec(4, epoch_samples=10)
    with pytest.raises(ValueError, match="rank"):
        plan_epoch([5], PlanSpec(1, 2), 0, 2)


def test_resampled_plan():
    counts = [10, 3, 8]
    spec = PlanSpec(4, 2, seed=1, resampled=True, epoch_samples=30)
    a, b = (plan_epoch(counts, spec, 0, r) for r in range(2))
    assert a.num_batches == b.num_batches == 8 and a.samples == 30
    assert len(a.order) > len(counts) and len(set(a.order.tolist())) <= len(counts)  # drawn with replacement
    assert not np.array_equal(a.order, b.order)
    assert np.array_equal(a.order, plan_epoch(counts, spec, 0, 0).order)
    assert not np.array_equal(a.order, plan_epoch(counts, spec, 1, 0).order)


# ------------------------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("counts,world,workers", [([7] * 8, 3, 0), ([40], 3, 2), ([1, 9, 3, 14, 6], 4, 2),
                                                  ([13, 2, 21], 2, 3)])
def test_reader_ranks_disjoint_cover_equal(tmp_path, counts, world, workers):
    make_split(tmp_path, counts)
    streams = []
    for r in range(world):
        loader, batches = load(tmp_path, batch_size=4, seed=2, rank=r, world_size=world, num_workers=workers,
                               shuffle_buffer=5)
        assert len(loader) == len(batches)
        streams.append(batches)
        for toks, labels in batches:
            for row, lab in zip(toks, labels):
                assert np.array_equal(row.numpy(), tokens_for(int(row[0])).reshape(-1)) and int(lab) == row[0] % 10
    assert len({len(s) for s in streams}) == 1
    keys = [k for s in streams for k in keys_of(s)]
    assert len(keys) == len(set(keys)) == (sum(counts) // world) * world


def test_stream_does_not_depend_on_num_workers(tmp_path):
    make_split(tmp_path, [9, 17, 5, 12])
    kw = dict(batch_size=3, seed=4, epoch=1, rank=1, world_size=2, shuffle_buffer=7, hflip=False)
    ref = load(tmp_path, **kw)[1]
    for workers in (1, 2, 3):  # 3 does not divide the 8 streams: same batches, some bytes read twice
        assert same(ref, load(tmp_path, num_workers=workers, **kw)[1])
    unshuffled = load(tmp_path, **{**kw, "shuffle": False})[1]
    assert same(unshuffled, load(tmp_path, num_workers=2, **{**kw, "shuffle": False})[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_exact_and_reads_less(tmp_path, workers):
    make_split(tmp_path, [30] * 6)
    kw = dict(batch_size=4, seed=1, epoch=3, shuffle_buffer=10, verify="size", num_workers=workers)
    full_loader, full = load(tmp_path, **kw)
    for skip in (1, 7, len(full) - 1, len(full)):
        loader, rest = load(tmp_path, skip_batches=skip, **kw)
        assert len(loader) == len(full) - skip and same(full[skip:], rest)
    late = load(tmp_path, skip_batches=len(full) - 3, **kw)[0]
    assert late.bytes_read < full_loader.bytes_read / 3  # a late resume does not re-read the epoch


def test_resume_other_world_size_reader(tmp_path):
    """2 ranks stop after 3 batches; 3 ranks continue: each sample at most once in the epoch, nothing else lost."""
    make_split(tmp_path, [17, 25, 8, 30])
    kw = dict(batch_size=4, seed=6, epoch=0, shuffle_buffer=9, hflip=False)
    done = [k for r in range(2) for k in keys_of(load(tmp_path, rank=r, world_size=2, **kw)[1][:3])]
    old, new = (PlanSpec(4, w, seed=6, shuffle_buffer=9) for w in (2, 3))
    history, skip, warning = resume_history([], old, 3, new)
    assert warning is not None and "world_size 2 -> 3" in warning
    rest = [keys_of(load(tmp_path, rank=r, world_size=3, history=history, skip_batches=skip, **kw)[1])
            for r in range(3)]
    assert len({len(x) for x in rest}) == 1
    allk = done + [k for x in rest for k in x]
    assert len(allk) == len(set(allk)) and 80 - len(allk) < 3


def test_resampled_reader(tmp_path):
    make_split(tmp_path, [6, 11, 4])
    kw = dict(batch_size=4, seed=2, resampled=True, epoch_samples=26, world_size=2)
    a = [load(tmp_path, rank=r, **kw)[1] for r in range(2)]
    assert [len(x) for x in a] == [7, 7] and sum(t.shape[0] for t, _ in a[0]) == 26
    assert same(a[0], load(tmp_path, rank=0, num_workers=2, **kw)[1])
    assert keys_of(a[0]) != keys_of(a[1])
    assert same(a[0][3:], load(tmp_path, rank=0, skip_batches=3, **kw)[1])


def test_hflip_half_and_world_size_independent(tmp_path):
    make_split(tmp_path, [20, 20, 20], hflip=True)

    def flipped(batches):
        out = {}
        for toks, _ in batches:
            for row in toks.numpy():
                plain = np.array_equal(row, tokens_for(int(row[0])).reshape(-1))
                out[int(row[0]) if plain else int(row[2])] = not plain
        return out

    one = flipped(load(tmp_path, batch_size=5, seed=3)[1])
    assert 0.2 < np.mean(list(one.values())) < 0.8
    for r in range(2):
        two = flipped(load(tmp_path, batch_size=5, seed=3, rank=r, world_size=2)[1])
        assert all(one[k] == v for k, v in two.items())
    assert not any(flipped(load(tmp_path, batch_size=5, hflip=False)[1]).values())


def test_fewer_samples_than_ranks_is_a_clear_error(tmp_path):
    make_split(tmp_path, [2, 1])
    with pytest.raises(ShardError, match="3 samples, fewer than the 4 ranks"):
        shards.make_token_loader(tmp_path, batch_size=2, world_size=4)
    loader, batches = load(tmp_path, batch_size=2, world_size=4, resampled=True, epoch_samples=5)
    assert len(batches) == len(loader) == 3  # resampled: a fixed sample count per rank whatever the split size


# ------------------------------------------------------------------------------------------- verification
def _shard(tmp_path, i=0) -> Path:
    return shards.TokenSplit.read(tmp_path, "train").shards[i].path


def test_sha256_mismatch_names_the_shard(tmp_path):
    make_split(tmp_path, [10, 10, 10])
    p = _shard(tmp_path, 1)
    data = bytearray(p.read_bytes())
    data[data.find(_npy(tokens_for(14))) + 128 + 3] ^= 0x01  # a token bit of key 14: tar and npy headers intact
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=p.name + ".*sha256"):
        load(tmp_path, batch_size=4, verify="full")
    for verify in ("size", "none"):  # no hash: the structure is fine, the batches come out
        assert len(load(tmp_path, batch_size=4, verify=verify)[1]) == 8


def test_verify_modes_and_check_split(tmp_path):
    make_split(tmp_path, [10, 10])
    info = shards.TokenSplit.read(tmp_path, "train")
    for verify in ("full", "size", "none"):
        shards.check_split(info, verify)
    p = info.shards[1].path
    p.write_bytes(p.read_bytes()[:-BLOCK])
    for verify in ("full", "size"):
        with pytest.raises(ShardError, match="truncated shard .*" + p.name):
            shards.check_split(info, verify)
    shards.check_split(info, "none")  # no stat at start-up...
    with pytest.raises(ShardError, match=p.name):  # ...but the reader that opens the shard still refuses it
        load(tmp_path, batch_size=4, verify="none", shuffle=False)
    p.unlink()
    with pytest.raises(ShardError, match=p.name + ".*missing"):
        shards.check_split(info, "size")
    with pytest.raises(ValueError, match="verify"):
        shards.check_split(info, "sha1")


def test_layout_broken_after_first_sample_is_refused(tmp_path):
    make_split(tmp_path, [10])
    p = _shard(tmp_path)
    data = bytearray(p.read_bytes())
    data[data.find(b"000000006.cls") + 257] = ord("X")  # the tar magic of sample 6's first header
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=p.name + ".*sample 6"):
        load(tmp_path, batch_size=4, verify="size")


def test_shard_without_fixed_layout_falls_back_to_a_whole_read(tmp_path):
    """A shard another tool wrote (PAX headers: float mtimes): read whole with webdataset's tar iterator."""
    make_split(tmp_path, [12, 12])
    p = _shard(tmp_path, 0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for k in range(12):
            for ext, raw in (("cls", str(k % 10).encode()), ("tokens.npy", _npy(tokens_for(k)))):
                ti = tarfile.TarInfo(f"{k:09d}.{ext}")
                ti.size, ti.mtime = len(raw), 1.5 + k
                tar.addfile(ti, io.BytesIO(raw))
    p.write_bytes(buf.getvalue())
    man = shards.Manifest.read(tmp_path)
    entry = man.splits["train"].shards[0]
    entry.bytes, entry.sha256 = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
    man.write(tmp_path)
    for world in (1, 2):
        keys = [k for r in range(world) for k in keys_of(load(tmp_path, batch_size=5, world_size=world, rank=r)[1])]
        assert sorted(keys) == list(range(24))


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_rank_of_64_reads_about_a_64th(tmp_path):
    make_split(tmp_path, [100] * 64)
    total = sum(s.bytes for s in shards.TokenSplit.read(tmp_path, "train").shards)
    for verify, bound in (("size", 1.15), ("full", 2.5)):
        loader, batches = load(tmp_path, batch_size=8, world_size=64, rank=0, verify=verify)
        assert sum(t.shape[0] for t, _ in batches) == 100
        assert total / 64 * 0.8 < loader.bytes_read < total / 64 * bound, (verify, loader.bytes_read, total / 64)


# ------------------------------------------------------------------------------------------- the loop's data hook
def prior_task(shard_dir: Path, *flags: str):
    """A stage-3 task over these shards (no model needed by the data hook)."""
    from types import SimpleNamespace

    from vqgen.config import PriorStageConfig, load_config
    from vqgen.train.prior_task import PriorTask

    cfg = load_config(PriorStageConfig, ["--shards", str(shard_dir), "--output_dir", str(shard_dir / "run"),
                                         "--batch_size", "4", "--shuffle_buffer", "5", *flags])
    model = SimpleNamespace(config=SimpleNamespace(num_classes=10))
    return PriorTask(cfg, model, shards.Manifest.read(shard_dir), SHA, None)


def run_epoch(task, epoch: int, skip: int, rank: int, world: int, stop: int | None = None) -> list[int]:
    task.batches_per_epoch(world)
    return keys_of(list(task.epoch_batches(epoch, skip, rank, world))[:stop])


def resumed(saved: dict, epoch: int, done: int, world: int, *flags: str, shard_dir: Path):
    task = prior_task(shard_dir, *flags)
    task.batches_per_epoch(world)
    skip, warning = task.resume_batches(json.loads(json.dumps(saved)), epoch, done, world)  # as vqgen_state.json
    return task, skip, warning


def test_prior_data_hook_resume_on_another_world_size(tmp_path):
    """2 ranks stop after 3 batches; the epoch goes on with 1 rank (one warning), is interrupted again and resumed
    on 1 rank (exact, no warning) and then on 3: every sample of the epoch once, none lost but the remainder."""
    make_split(tmp_path, [17, 25, 8, 30])
    first = prior_task(tmp_path)
    done = [k for r in range(2) for k in run_epoch(first, 2, 0, r, 2, stop=3)]
    saved = first.data_state()
    assert saved["world_size"] == 2 and saved["reader"]["spec"]["world_size"] == 2

    one, skip, warning = resumed(saved, 2, 3, 1, shard_dir=tmp_path)
    assert skip == 0 and warning.startswith("warning:") and "world_size 2 -> 1" in warning
    rest = run_epoch(one, 2, skip, 0, 1)
    assert len(done + rest) == len(set(done + rest)) == 80  # W=1: no remainder

    one.epoch_batches(2, 0, 0, 1)
    saved2 = one.data_state()  # after 2 batches of the continuation: its spec + the 2-rank point
    assert len(saved2["reader"]["history"]) == 1
    again, skip, warning = resumed(saved2, 2, 2, 1, shard_dir=tmp_path)
    assert (skip, warning) == (2, None) and run_epoch(again, 2, skip, 0, 1) == rest[8:]  # exact, bitwise keys

    three = [resumed(saved2, 2, 2, 3, shard_dir=tmp_path) for _ in range(3)]
    assert all(w is not None and "world_size 1 -> 3" in w for _, _, w in three)
    later = [k for r, (t, skip, _) in enumerate(three) for k in run_epoch(t, 2, skip, r, 3)]
    seen = done + rest[:8] + later
    assert len(seen) == len(set(seen)) and 80 - len(seen) < 3

    t, skip, warning = resumed(saved2, 3, 0, 3, shard_dir=tmp_path)  # the next epoch: a fresh plan, no history
    assert (skip, warning) == (0, None) and t.history(3) == []


def test_prior_data_hook_refusals_and_old_checkpoints(tmp_path):
    from vqgen.errors import CheckpointError

    make_split(tmp_path, [20, 20])
    task = prior_task(tmp_path)
    run_epoch(task, 0, 0, 0, 2, stop=1)
    with pytest.raises(CheckpointError, match="seed"):  # positions live in the seed's shard order
        resumed(task.data_state(), 0, 1, 1, "--seed", "7", shard_dir=tmp_path)
    t, skip, warning = resumed(task.data_state(), 0, 1, 2, "--reader_streams", "4", shard_dir=tmp_path)
    assert skip == 0 and "streams 8 -> 4" in warning
    assert resumed(task.data_state(), 0, 1, 2, "--num_workers", "2", shard_dir=tmp_path)[1:] == (1, None)
    t, skip, warning = resumed(None, 0, 5, 1, shard_dir=tmp_path)  # a checkpoint of the reader before issue 12
    assert skip == 5 and "older vqgen token reader" in warning


def test_map_style_resume_rule():
    """Map-style data: exact when the samples done are whole new global batches, else the last boundary before
    them (the rest seen twice, never skipped) with one warning; checkpoints without a data state use the loop's."""
    from vqgen.train.checkpointing import map_style_resume

    assert map_style_resume({"world_size": 2, "batch_size": 64}, 0, 5, 1, 128) == (5, None)
    assert map_style_resume({"world_size": 1, "batch_size": 64}, 0, 6, 2, 64) == (3, None)
    skip, warning = map_style_resume({"world_size": 2, "batch_size": 64}, 3, 5, 1, 96)
    assert skip == 6 and "64 samples of this epoch are seen twice" in warning and warning.startswith("warning:")
    assert map_style_resume(None, 0, 5, 1, 32) == (5, None) and map_style_resume(None, 0, 0, 4, 8) == (0, None)


def test_prior_resume_with_another_batch_size_warns_and_finishes(tmp_path, stage2, capsys):
    """Through the real loop: a mid-epoch checkpoint (batch 64) resumed with batch 32 continues with the samples
    not yet seen (one warning line) and finishes the epoch."""
    from vqgen.config import PriorStageConfig, load_config
    from vqgen.train import prior_task as train_prior

    flags = ["--shards", str(stage2 / "shards"), "--attn_layers_dim", "16", "--attn_layers_depth", "1",
             "--attn_layers_heads", "2", "--no_wandb", "--num_samples", "4", "--val_batches", "1",
             "--n_epochs_t", "1", "--checkpointing_steps", "5", "--output_dir", str(tmp_path / "p"),
             "--tune_sampling", "none"]
    train_prior.run(load_config(PriorStageConfig, [*flags, "--batch_size", "64", "--max_steps", "5"]))
    state = json.loads((tmp_path / "p/checkpoints/checkpoint-5/vqgen_state.json").read_text())
    assert state["batches_done"] == 5 and state["extra"]["data"]["reader"]["spec"]["batch_size"] == 64
    capsys.readouterr()
    loop = train_prior.run(load_config(PriorStageConfig, [*flags, "--batch_size", "32", "--resume", "latest"]))
    out = capsys.readouterr().out
    assert out.count("warning: resuming mid-epoch with another reader setup (batch_size 64 -> 32)") == 1
    assert loop.state.finished and loop.state.epoch == 1
    assert loop.state.global_step == 5 + -(-(1500 - 5 * 64) // 32)  # the 1180 samples not seen, in batches of 32
    assert (tmp_path / "p/export/model.safetensors").exists()


# ------------------------------------------------------------------------------------------- two real processes
RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from vqgen import shards
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = shards.make_token_loader(sys.argv[1], batch_size=4, seed=1, rank=rank, world_size=world, num_workers=2,
                                  shuffle_buffer=5, verify="size")
keys = [int(k) for toks, _ in loader for k in toks[:, 0]]
plan = loader.stream.plan
slot, sample = plan.locate(plan.positions)
mine = {"keys": keys, "batches": len(loader), "bytes": loader.bytes_read,
        "samples": sorted(zip(plan.order[slot].tolist(), sample.tolist()))}
out = [None] * world
dist.all_gather_object(out, mine)
if rank == 0:
    json.dump(out, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_processes_read_disjoint_shares_that_cover_the_split(tmp_path):
    root = Path(__file__).resolve().parents[1]
    counts = make_split(tmp_path / "shards", [13, 2, 21, 9, 30, 1])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "shards"), str(tmp_path / "out.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:  # never leave the ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    ranks = json.loads((tmp_path / "out.json").read_text())
    assert ranks[0]["batches"] == ranks[1]["batches"] == 10  # 76 // 2 = 38 samples -> 10 batches of 4
    a, b = (set(r["keys"]) for r in ranks)
    assert len(a) == len(ranks[0]["keys"]) == 38 and not a & b and len(a | b) == sum(counts) // 2 * 2
    sa, sb = ({tuple(x) for x in r["samples"]} for r in ranks)
    assert not sa & sb and len(sa | sb) == 76  # (shard, sample) pairs: disjoint, together the split minus 0
    total = sum(s.bytes for s in shards.TokenSplit.read(tmp_path / "shards", "train").shards)
    assert all(r["bytes"] < 0.75 * total for r in ranks)  # each rank reads about half, not everything



# ------------------------------------------------------------------------------------------- multi-view splits
def view_tokens(key: int, views: int) -> np.ndarray:
    """(views, H, W): token 0 is the key, token 1 names the view (60000 + v)."""
    t = np.stack([tokens_for(key)] * views)
    t[:, 0, 1] = 60000 + np.arange(views)
    return t


def make_views_split(out: Path, counts: list[int], views: int) -> None:
    key = 0
    for rank, c in enumerate(counts):
        settings = {"tokenizer_sha256": SHA, "dataset": "synthetic", "split": "train", "num_samples": sum(counts)}
        w = shards.RankShardWriter(out, "train", rank, settings, max(1, c), (H, W), np.dtype(np.uint16), views=views)
        w.resume()
        for k in range(key, key + c):
            w.write(k, view_tokens(k, views), k % 10)
        key += c
        w.close()
    header = shards.Manifest(tokenizer={"sha256": SHA, "config": {}, "path": None}, codebook_size=65536, latent_h=H,
                             latent_w=W, dtype="uint16", num_classes=10, dataset="synthetic")
    shards.merge_manifest(out, "train", len(counts), header, transforms={"views": {"count": views}}, hflip=False,
                          expected_total=key, views=views)


def view_of(batches) -> dict[int, int]:
    """key -> view given, asserting every row is one stored view of its sample (and each key once)."""
    out = {}
    for toks, labels in batches:
        assert toks.shape[1] == H * W
        for row, label in zip(toks.numpy(), labels.tolist()):
            key, v = int(row[0]), int(row[1]) - 60000
            assert key not in out and label == key % 10
            assert np.array_equal(row, view_tokens(key, v + 1)[v].reshape(-1))
            out[key] = v
    return out


def test_multi_view_manifest_and_layout(tmp_path):
    make_views_split(tmp_path, [7, 5], views=4)
    raw = json.loads((tmp_path / shards.MANIFEST_NAME).read_text())
    assert raw["format_version"] == 2 and raw["splits"]["train"]["views"] == 4   # a v1 reader refuses it clearly
    info = shards.TokenSplit.read(tmp_path, "train")
    assert info.views == 4
    with tarfile.open(tmp_path / "train-r000-000000.tar") as tf:
        arr = np.load(io.BytesIO(tf.extractfile("000000003.tokens.npy").read()))
    assert arr.shape == (4, H, W) and np.array_equal(arr, view_tokens(3, 4))
    make_split(tmp_path / "single", [6])                                           # single-view: unchanged format
    raw = json.loads((tmp_path / "single" / shards.MANIFEST_NAME).read_text())
    assert raw["format_version"] == 1 and "views" not in raw["splits"]["train"]
    assert shards.TokenSplit.read(tmp_path / "single", "train").views == 1
    raw["format_version"] = 3
    (tmp_path / "single" / shards.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ShardError, match="newer than this vqgen"):
        shards.Manifest.read(tmp_path / "single")


def test_multi_view_reader_one_view_per_sample_per_epoch(tmp_path):
    make_views_split(tmp_path, [30, 25, 41], views=5)
    kw = dict(batch_size=6, seed=2)
    e0 = view_of(load(tmp_path, epoch=0, **kw)[1])
    assert sorted(e0) == list(range(96))                                           # an epoch is one sample per image
    assert view_of(load(tmp_path, epoch=0, **kw)[1]) == e0                          # deterministic for (seed, epoch)
    assert sorted(np.bincount(list(e0.values()), minlength=5))[0] >= 8              # every view drawn
    e1 = view_of(load(tmp_path, epoch=1, **kw)[1])
    assert sum(e0[k] != e1[k] for k in e0) > 60                                    # another epoch, other views
    assert view_of(load(tmp_path, epoch=0, seed=3, batch_size=6)[1]) != e0
    split = {}
    for r in range(3):                                                              # the same view on any world size
        split.update(view_of(load(tmp_path, epoch=0, rank=r, world_size=3, **kw)[1]))
    assert all(e0[k] == v for k, v in split.items()) and len(split) == 96


@pytest.mark.parametrize("workers", [0, 2])
def test_multi_view_resume_mid_epoch_and_workers(tmp_path, workers):
    make_views_split(tmp_path, [30, 25, 41], views=3)
    kw = dict(batch_size=5, seed=1, epoch=2, rank=1, world_size=2)
    _, full = load(tmp_path, **kw)
    assert same(full, load(tmp_path, num_workers=workers, **kw)[1])
    assert same(full[4:], load(tmp_path, skip_batches=4, num_workers=workers, **kw)[1])


def test_multi_view_rank_reads_about_a_wth(tmp_path):
    make_views_split(tmp_path, [40] * 16, views=10)
    total = sum(s.bytes for s in shards.TokenSplit.read(tmp_path, "train").shards)
    loader, batches = load(tmp_path, batch_size=8, world_size=8, rank=3, verify="size")
    assert sum(t.shape[0] for t, _ in batches) == 80
    assert total / 8 * 0.8 < loader.bytes_read < total / 8 * 1.15
