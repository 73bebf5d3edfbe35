"""Extraction from a WebDataset input with 1 vs 2 DataLoader workers as a ratio.

    python bench/extract_stream.py [--images 2048 --image_size 64 --width 32 --repeats 2]

JPEG shards of 256 samples (smooth noise, so decoding has real work) are encoded by a random-init VQ-VAE export
through ``vqgen.extract.extract_split`` with a streamed input (``StreamedImages``: each worker decodes its own
range). Reported: images/s with 1 and 2 workers (best of ``--repeats``, alternating) and the speed-up. The encoder
runs in the main process, so the speed-up is bounded by the decode share of the work and by the cores left over.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.data.stream_input import open_stream  # noqa: E402
from vqgen.data.streaming import StreamedImages  # noqa: E402
from vqgen.extract import extract_split  # noqa: E402
from vqgen.models.vqvae import VQVAE, VQVAEConfig  # noqa: E402


def make_data(root: Path, n: int):
    """The JPEG shards of bench/stream_throughput.py (loaded from its file: bench/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("stream_throughput", Path(__file__).with_name("stream_throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_data(root, n)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        _, spec = make_data(Path(tmp), args.images)
        src, dec, info = open_stream(spec, "train", tmp, args.image_size, 3)
        w = args.width
        model = VQVAE(VQVAEConfig(in_channels=3, image_size=args.image_size, num_channels=(w, w),
                                  num_res_channels=(w, w), num_res_layers=1, num_embeddings=256,
                                  embedding_dim=16)).eval()
        best = {1: 0.0, 2: 0.0}
        for r in range(args.repeats):
            for k in (1, 2):
                ds = StreamedImages(src, dec, num_workers=k, shuffle=False, equal=False, batch_size=args.batch_size)
                t0 = time.perf_counter()
                extract_split(model, ds, Path(tmp) / f"out{k}-{r}", split="train", tokenizer_sha256="x" * 64,
                              dataset_name="bench", num_workers=k, batch_size=args.batch_size, progress=False)
                best[k] = max(best[k], args.images / (time.perf_counter() - t0))
        print(f"extraction from WebDataset ({args.images} JPEGs -> {args.image_size}px, width {w}): 1 worker "
              f"{best[1]:.1f} img/s, 2 workers {best[2]:.1f} img/s; ratio 2/1 = {best[2] / best[1]:.2f}")


if __name__ == "__main__":
    main()
