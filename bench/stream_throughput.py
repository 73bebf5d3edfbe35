"""Stage-1 throughput from WebDataset shards vs the same images from a folder (target ratio >= 0.9).

    python bench/stream_throughput.py [--images 2048 --image_size 64 --batch_size 32 --num_workers 2]

The same JPEG images (random 80x80 crops of smooth noise, so JPEG decoding has real work) are written once as an
image folder and as WebDataset shards of 256 samples. Each side runs one epoch of stage-1 training steps (a small
VQ-VAE, AdamW, the real ``VQVAETask.compute_loss``) from ``stage1_data.MapInput`` (folder) and
``stage1_data.StreamInput`` (shards), with the same DataLoader workers, and reports images/s; the two sides
alternate and the best of ``--repeats`` is kept (a shared CPU is noisy). The ratio stream / folder is printed.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.config import VQVAEStageConfig  # noqa: E402
from vqgen.data import build_dataset  # noqa: E402
from vqgen.data.stream_input import open_stream  # noqa: E402
from vqgen.models.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from vqgen.train.stage1_data import MapInput, StreamInput  # noqa: E402
from vqgen.train.vqvae_task import VQVAETask  # noqa: E402


def make_data(root: Path, n: int, shard: int = 256) -> tuple[Path, str]:
    import webdataset as wds
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = root / "folder"
    writer = None
    for i in range(n):
        if i % shard == 0:
            if writer:
                writer.close()
            writer = wds.TarWriter(str(root / f"shard-{i // shard:04d}.tar"))
        base = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((80, 80), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        cls = i % 10
        (folder / f"c{cls}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{cls}" / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        writer.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": str(cls)})
    writer.close()
    return folder, f"wds:{root}/shard-{{0000..{(n - 1) // shard:04d}}}.tar"


def epoch(task: VQVAETask, model, opt, data, rank_batches: int) -> float:
    t0, seen = time.perf_counter(), 0
    for batch in data.epoch_batches(0, 0, 0, 1):
        loss, _ = task.compute_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(batch[0])
    return seen / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--width", type=int, default=32, help="VQ-VAE channels per level (2 levels)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder, spec = make_data(Path(tmp), args.images)
        cfg = VQVAEStageConfig(shuffle_buffer=256)
        cfg.train.batch_size, cfg.data.num_workers = args.batch_size, args.num_workers
        ds, info = build_dataset(str(folder), image_size=args.image_size)
        src, dec, _ = open_stream(spec, "train", tmp, args.image_size, 3)
        inputs = {"folder": MapInput(ds, cfg, None), "webdataset": StreamInput(src, dec, cfg, None, 0)}
        w = args.width
        model = VQVAE(VQVAEConfig(in_channels=3, image_size=args.image_size, num_channels=(w, w),
                                  num_res_channels=(w, w), num_res_layers=1, num_embeddings=256, embedding_dim=16))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        task = VQVAETask(cfg, model, None, None, info)
        best = {k: 0.0 for k in inputs}
        for _ in range(args.repeats):
            for name, data in inputs.items():
                best[name] = max(best[name], epoch(task, model, opt, data, data.batches_per_epoch(1)))
        print(f"stage-1 images/s (best of {args.repeats}, {args.images} JPEGs -> {args.image_size}px, batch "
              f"{args.batch_size}, {args.num_workers} workers): folder {best['folder']:.1f}, webdataset "
              f"{best['webdataset']:.1f}; ratio webdataset/folder = {best['webdataset'] / best['folder']:.3f}")


if __name__ == "__main__":
    main()
