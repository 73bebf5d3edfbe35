"""Per-rank cost of the stage-3 token reader as the world size grows, today's reader vs the one it replaced.

    python bench/reader_scale.py [--samples 100000 --shards 64 --repeats 3]

Builds a synthetic token split with vqgen's own shard writer and times one epoch of rank 0 of a simulated W-rank job
at W = 1, 8, 64 in one run; prints t(64)/t(1) (target <= 3/64). "before" (:func:`before_epoch`) parses every shard and
keeps every W-th sample. Bytes are counted by the reader and by the kernel (/proc/self/io), and the same byte model
is applied to ImageNet at W = 8, 64, 512 (the table of docs/CLUSTER.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from webdataset.tariterators import tar_file_iterator  # noqa: E402

from vqgen import shards  # noqa: E402
from vqgen.shards.access import BLOCK, RECORD  # noqa: E402
from vqgen.shards.plan import PlanSpec, plan_epoch  # noqa: E402
from vqgen.shards.reader import TokenSplit, make_token_loader  # noqa: E402

WORLD = (1, 8, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100_000, help="samples in the synthetic split")
    p.add_argument("--shards", type=int, default=64, help="shards in the synthetic split")
    p.add_argument("--batch_size", type=int, default=64, help="batch size per rank")
    p.add_argument("--hflip", action="store_true", help="store mirrored tokens too (~4 KB per sample, as ImageNet)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per (reader, W) for the new reader")
    p.add_argument("--old_repeats", type=int, default=1, help="timed epochs per W for the reader before (slow)")
    return p.parse_args(argv)


def build(out: Path, n: int, n_shards: int, hflip: bool) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1024, size=(n, 16, 16), dtype=np.uint16)
    settings = {"tokenizer_sha256": "0" * 64, "dataset": "synthetic", "split": "train", "num_samples": n}
    w = shards.RankShardWriter(out, "train", 0, settings, -(-n // n_shards), (16, 16), np.dtype(np.uint16))
    w.resume()
    for k in range(n):
        w.write(k, tokens[k], k % 10, tokens[k][:, ::-1] if hflip else None)
    w.close()
    header = shards.Manifest(tokenizer={"sha256": "0" * 64, "config": {}, "path": None}, codebook_size=1024,
                             latent_h=16, latent_w=16, dtype="uint16", num_classes=10, dataset="synthetic")
    shards.merge_manifest(out, "train", 1, header, transforms={}, hflip=hflip, expected_total=n)


class BeforeLoader:
    """Rank ``rank``'s epoch under vqgen's earlier reader (up to commit 1add7cb), reduced to its cost: the shards
    in a (seed, epoch) order, every member of every shard parsed by webdataset's tar iterator, the samples at
    positions ``i % world_size == rank`` kept and decoded (its shuffle buffer and worker re-ordering are left out:
    they cost little next to the parsing)."""

    def __init__(self, shard_dir, split="train", batch_size=64, seed=0, epoch=0, rank=0, world_size=1, **_):
        self.dir, self.batch_size, self.rank, self.world_size = Path(shard_dir), batch_size, rank, world_size
        self.shards = list(shards.Manifest.read(shard_dir).split(split).shards)
        np.random.default_rng([seed, epoch]).shuffle(self.shards)

    def __iter__(self):
        batch, labels = [], []
        for s in self.shards:
            with open(self.dir / s.name, "rb") as f:
                for item in tar_file_iterator(f):
                    key, _, ext = item["fname"].partition(".")
                    if int(key) % self.world_size == self.rank:  # this writer's keys are positions
                        if ext == "cls":
                            labels.append(int(item["data"]))
                        elif ext == "tokens.npy":
                            batch.append(np.frombuffer(item["data"][-16 * 16 * 2:], np.uint16))  # its fast path
                            if len(batch) == self.batch_size:
                                yield np.stack(batch), np.array(labels)
                                batch, labels = [], []
        if batch:
            yield np.stack(batch), np.array(labels)


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def epoch(make, shard_dir: Path, world: int, batch_size: int, **kw) -> dict:
    """Rank 0's epoch: loader construction + every batch; wall/CPU seconds, batches, samples, bytes."""
    r0, c0, t0 = rchar(), time.process_time(), time.perf_counter()
    loader = make(shard_dir, "train", batch_size=batch_size, seed=0, epoch=0, rank=0, world_size=world,
                  num_workers=0, **kw)
    batches = samples = 0
    for toks, _ in loader:
        batches, samples = batches + 1, samples + toks.shape[0]
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "batches": batches,
            "samples": samples, "rchar": rchar() - r0, "counted": getattr(loader, "bytes_read", None)}


def best(runs: list[dict]) -> dict:
    return {**runs[0], "wall": min(r["wall"] for r in runs), "cpu": min(r["cpu"] for r in runs)}


def model_bytes(counts, stride: int, shard_bytes, spec: PlanSpec, verify: str, probe: int) -> int:
    """Bytes rank 0 reads in epoch 0 under the reader's rules (num_workers <= 1): its samples, one layout probe
    per shard it touches, and with verify=full the rest of every shard whose first sample it holds."""
    plan = plan_epoch(counts, spec, 0, 0)
    total, touched = 0, set()
    for s in range(plan.num_streams):
        slot, sample = plan.locate(plan.stream_positions(s))
        total += len(slot) * stride
        touched.update(int(plan.order[k]) for k in np.unique(slot))
        if verify == "full":
            for k in np.unique(slot[sample == 0]):
                mine = int(np.count_nonzero(slot == k))
                total += int(shard_bytes[plan.order[k]]) - mine * stride
    return total + probe * len(touched)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000


def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "shards"
        t0 = time.perf_counter()
        build(d, args.samples, args.shards, args.hflip)
        info = TokenSplit.read(d, "train")
        total = sum(s.bytes for s in info.shards)
        print(f"built {info.total} samples in {len(info.shards)} shards ({fmt_bytes(total)}) in "
              f"{time.perf_counter() - t0:.1f} s; batch {args.batch_size}, rank 0 of W simulated, num_workers 0")
        readers = {"before": (BeforeLoader, {}, args.old_repeats),
                   "new full": (make_token_loader, {"verify": "full"}, args.repeats),
                   "new size": (make_token_loader, {"verify": "size"}, args.repeats)}
        runs = {(name, w): [] for name in readers for w in WORLD}
        for rep in range(max(args.repeats, args.old_repeats)):  # interleaved: load changes hit every case alike
            for name, (make, kw, reps) in readers.items():
                for w in WORLD:
                    if rep < reps:
                        runs[name, w].append(epoch(make, d, w, args.batch_size, **kw))
        print(f"{'reader':9} {'W':>3} {'batches':>7} {'samples':>7} {'wall s':>7} {'cpu s':>7} {'bytes (reader)':>14} "
              f"{'rchar':>10}")
        res = {k: best(v) for k, v in runs.items()}
        for (name, w), r in res.items():
            counted = fmt_bytes(r["counted"]) if r["counted"] is not None else "-"
            print(f"{name:9} {w:>3} {r['batches']:>7} {r['samples']:>7} {r['wall']:>7.3f} {r['cpu']:>7.3f} "
                  f"{counted:>14} {fmt_bytes(r['rchar']):>10}")
        for name in readers:
            a, b = res[name, 1], res[name, 64]
            print(f"{name:9} t(64)/t(1): wall {b['wall'] / a['wall']:.3f}  cpu {b['cpu'] / a['cpu']:.3f}  "
                  f"(target <= {3 / 64:.3f}); bytes(64)/bytes(1) {b['rchar'] / max(1, a['rchar']):.3f}")
        stride = BLOCK * 2 + (BLOCK + BLOCK * -(-(128 + 512) // BLOCK)) * (2 if args.hflip else 1)
        probe = BLOCK * (4 if args.hflip else 3)
        counts = [s.count for s in info.shards]
        sizes = [s.bytes for s in info.shards]
        for name, verify in (("new full", "full"), ("new size", "size")):
            for w in WORLD:
                m = model_bytes(counts, stride, sizes, PlanSpec(args.batch_size, w), verify, probe)
                print(f"model check {name} W={w}: model {m} bytes, reader counted {res[name, w]['counted']}")
        imagenet_table(args.batch_size)


def imagenet_table(batch_size: int) -> None:
    """Bytes per rank per epoch for ImageNet-1k train with --hflip (the docs/CLUSTER.md table)."""
    n, extract_ranks, shard_size = 1_281_167, 8, 1000
    counts = []
    for r in range(extract_ranks):
        mine = len(range(r, n, extract_ranks))
        counts += [shard_size] * (mine // shard_size) + ([mine % shard_size] if mine % shard_size else [])
    stride = 2 * BLOCK + 2 * (BLOCK + 2 * BLOCK)  # cls (2 blocks) + 2 x (header + 640-byte npy: 2 blocks) = 4096
    sizes = [-(-(c * stride + 2 * BLOCK) // RECORD) * RECORD for c in counts]
    total = sum(sizes)
    print(f"\nImageNet train, {n} samples, {len(counts)} shards, {fmt_bytes(total)}: bytes read per rank per epoch "
          f"(batch {batch_size}, num_workers <= 1)")
    print("| W | before (every rank reads every shard) | after, --verify_shards size | after, full (default) |")
    print("| --- | --- | --- | --- |")
    for w in (8, 64, 512):
        spec = PlanSpec(batch_size, w)
        size = model_bytes(counts, stride, sizes, spec, "size", 4 * BLOCK)
        full = model_bytes(counts, stride, sizes, spec, "full", 4 * BLOCK)
        print(f"| {w} | {fmt_bytes(total)} (+ {fmt_bytes(total)} hashed at start-up) | {fmt_bytes(size)} "
              f"({size / total:.2%}) | {fmt_bytes(full)} ({full / total:.2%}) |")


if __name__ == "__main__":
    main(parse_args())
