"""Stage-2 overhead: bare encoder forward vs full extraction (dataset -> loader -> encoder -> shard writing).

    python bench/extract.py [--num_images 512 --batch_size 128 --image_size 32 --width 256]

Both sides encode the same digits with the same random-init VQ-VAE export: the bare side runs ``encode_to_indices``
on batches in memory, the full side ``vqgen.extract.extract_split`` into a fresh folder; runs alternate and the best
of ``--repeats`` is kept. Defaults: the original tool's tokenizer on 32x32 images, batch 128. Target:
extraction/bare >= 0.9 (with a toy encoder the tar writing is no longer small beside it: docs/NOTES.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.data import build_dataset  # noqa: E402
from vqgen.extract import extract_split  # noqa: E402
from vqgen.models.vqvae import VQVAE, VQVAEConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_images", type=int, default=512, help="images to encode (digits train has 1500)")
    p.add_argument("--batch_size", type=int, default=128, help="encoder batch size")
    p.add_argument("--image_size", type=int, default=32, help="image size (multiple of 4)")
    p.add_argument("--width", type=int, default=256, help="encoder channels per level (2 levels)")
    p.add_argument("--num_embeddings", type=int, default=256, help="codebook size")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of the extraction")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="encoder autocast")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = VQVAEConfig(in_channels=1, image_size=args.image_size, num_channels=(args.width, args.width),
                      num_res_channels=(args.width, args.width), num_res_layers=2,
                      num_embeddings=args.num_embeddings, embedding_dim=32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        sha = VQVAE(cfg).export_to(tmp / "export")
        model = VQVAE.from_export(tmp / "export").to(device).eval()
        ds, info = build_dataset("digits", "train", str(tmp / "data"), image_size=args.image_size)
        n = min(args.num_images, len(ds))
        ds = torch.utils.data.Subset(ds, range(n))
        images = torch.stack([ds[i][0] for i in range(n)]).to(device)  # (N, 1, S, S), in memory
        dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]

        def bare() -> float:
            t = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                for i in range(0, n, args.batch_size):
                    model.encode_to_indices(images[i: i + args.batch_size]).cpu()
            return time.perf_counter() - t

        runs = [0]

        def full(threaded: bool = True) -> float:
            runs[0] += 1
            out = tmp / f"shards{runs[0]}"
            t = time.perf_counter()
            extract_split(model, ds, out, split="train", tokenizer_sha256=sha, dataset_name="digits",
                          transforms=info.transforms, batch_size=args.batch_size, num_workers=args.num_workers,
                          shard_size=args.shard_size, mixed_precision=args.mixed_precision, device=device,
                          progress=False, writer_thread=threaded)
            return time.perf_counter() - t

        bare(), full(), full(False)  # warm-up (allocator, oneDNN kernels)
        tb, tf, ts = [], [], []
        for _ in range(args.repeats):
            tb.append(bare())
            tf.append(full())
            ts.append(full(False))
        b, f, fs = n / min(tb), n / min(tf), n / min(ts)
        sizes = sorted(p.stat().st_size for p in (tmp / f"shards{runs[0]}").glob("*.tar"))
    print(f"device={device} threads={torch.get_num_threads()} images={n} batch={args.batch_size} "
          f"size={args.image_size} width={args.width} latent={cfg.latent_size} mp={args.mixed_precision}")
    print(f"bare encoder : {b:10.1f} img/s  (best of {args.repeats}: {min(tb):.3f} s)")
    print(f"extraction   : {f:10.1f} img/s  (best of {args.repeats}: {min(tf):.3f} s)")
    print(f"  (no writer thread: {fs:10.1f} img/s, ratio {fs / b:.3f})")
    print(f"ratio extraction/bare = {f / b:.3f}  (target >= 0.9)")
    print(f"shards: {len(sizes)} files, bytes each: {sizes}, total {sum(sizes)} "
          f"({sum(sizes) / n:.0f} B/sample)")
    return f / b


if __name__ == "__main__":
    main()
