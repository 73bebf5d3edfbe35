"""Sampling speed of the prior kinds at the same size and batch: MaskGIT (parallel decoding) vs AR with a KV cache.

Random weights (speed does not depend on them): the AR prior in raster order with its KV cache (what ``--order
random`` samples with too), and the MaskGIT prior at each ``--decode_steps``; same width, depth, heads, vocabulary,
token grid and batch, CPU unless ``--device``, fp32 unless ``--bf16``. What is timed: ``vqgen.models.sampling.generate``
(token generation only, no image decoding), after one warm-up call, median of ``--repeats``. Prints images/s of each
and the MaskGIT / AR ratio (the issue's target: >= 8x).
Run: ``python bench/prior_kinds.py`` (the Fashion-MNIST benchmark's prior: 128 wide, 6 deep, 8 heads, 256 codes,
8x8 tokens, batch 512); ``python bench/prior_kinds.py --tiny`` checks the plumbing in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.config import PriorConfig  # noqa: E402
from vqgen.models.prior import build_prior  # noqa: E402
from vqgen.models.sampling import generate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--batch", type=int, default=512, help="images sampled at once (both kinds; bench/quality.py samples 512)")
    a("--grid", type=int, default=8, help="square token grid side")
    a("--dim", type=int, default=128, help="transformer width")
    a("--depth", type=int, default=6, help="transformer blocks")
    a("--heads", type=int, default=8, help="attention heads")
    a("--vocab", type=int, default=256, help="codebook size")
    a("--num_classes", type=int, default=10, help="classes of the prior (0: unconditional)")
    a("--cfg_scale", type=float, default=1.0, help="classifier-free guidance (!= 1: cond ‖ null rows, both kinds)")
    a("--decode_steps", type=int, nargs="+", default=[8, 16], help="MaskGIT decoding steps to time")
    a("--repeats", type=int, default=3, help="timed calls per sampler (median reported)")
    a("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a("--device", default="cpu", help="torch device")
    a("--bf16", action="store_true", help="sample under bf16 autocast")
    a("--tiny", action="store_true", help="a tiny size and batch, one repeat: checks the plumbing")
    a("--seed", type=int, default=0, help="seed for weights and sampling")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.grid, args.dim, args.depth, args.heads, args.vocab, args.repeats = 8, 4, 32, 2, 2, 64, 1
    return args


def time_kind(prior, args, **options) -> tuple[float, torch.Tensor]:
    """Median seconds of one ``generate`` call of ``--batch`` images (after a warm-up), and its tokens."""
    labels = torch.arange(args.batch) % args.num_classes if args.num_classes else None
    dtype = torch.bfloat16 if args.bf16 else None

    def call():
        out = generate(prior, args.batch, labels=labels, cfg_scale=args.cfg_scale, batch_size=args.batch,
                       generator=torch.Generator(device=args.device).manual_seed(args.seed), autocast_dtype=dtype,
                       **options)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    call()
    times, out = [], None
    for _ in range(max(1, args.repeats)):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(vocab_size=args.vocab, latent_h=args.grid, latent_w=args.grid, attn_layers_dim=args.dim,
                attn_layers_depth=args.depth, attn_layers_heads=args.heads, num_classes=args.num_classes)
    torch.manual_seed(args.seed)
    ar = build_prior(PriorConfig(**base, prior_kind="ar")).to(args.device).eval()
    torch.manual_seed(args.seed)
    mg = build_prior(PriorConfig(**base, prior_kind="maskgit")).to(args.device).eval()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; batch {args.batch}, grid {args.grid}x{args.grid}, dim "
          f"{args.dim}, depth {args.depth}, heads {args.heads}, vocab {args.vocab}, classes {args.num_classes}, CFG "
          f"{args.cfg_scale}; timed: token generation, median of {args.repeats}", flush=True)
    t_ar, out = time_kind(ar, args, use_cache=True)
    assert out.shape == (args.batch, args.grid, args.grid)
    rows = {"ar_kv_cache": {"seconds": t_ar, "images_per_s": args.batch / t_ar, "forward_passes": args.grid ** 2}}
    for steps in args.decode_steps:
        t, out = time_kind(mg, args, decode_steps=steps)
        assert out.shape == (args.batch, args.grid, args.grid) and int(out.max()) < args.vocab
        rows[f"maskgit_{steps}"] = {"seconds": t, "images_per_s": args.batch / t, "forward_passes": steps,
                                    "vs_ar": t_ar / t}
    print(f"\n{'sampler':<14} {'passes':>7} {'seconds':>9} {'images/s':>10} {'vs AR':>7}")
    for name, r in rows.items():
        print(f"{name:<14} {r['forward_passes']:>7} {r['seconds']:>9.3f} {r['images_per_s']:>10.1f} "
              f"{r.get('vs_ar', 1.0):>6.1f}x")
    return rows


if __name__ == "__main__":
    main(parse_args())
