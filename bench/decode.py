"""Compiled vs eager decoding (``generate(..., compile=True)`` / ``--compile``), measured side by side in one process.

Same random-weight AR prior, same batch, same generator seed for both: the tokens must be equal (checked and printed).
Eager = the default path (KV cache sliced by Python-int positions); compiled = the static cache and the compiled
step (Inductor on CPU, CUDA graphs on GPU). Reported: tokens/s of each (median of ``--repeats`` batches after one
warm-up), the compiled path's first call (compilation included), and the batches after which compiling has paid off.
The CPU row (8x8 tokens, batch 64, the original tool's 96/12/8 prior): ``python bench/decode.py``; ``--tiny`` runs
the same code at toy size (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.config import PriorConfig  # noqa: E402
from vqgen.models.prior import build_prior  # noqa: E402
from vqgen.models.sampling import generate  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=8, help="square token grid (8: 8x8 = 64 tokens)")
    p.add_argument("--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--dim", type=int, default=96, help="prior width (the original tool's --attn_layers_dim)")
    p.add_argument("--depth", type=int, default=12, help="prior blocks")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=256, help="codebook size")
    p.add_argument("--classes", type=int, default=10, help="classes of the conditional prior (0: unconditional)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance (> 1: 2 x batch rows)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype of decoding")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per path (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="toy size (4x4 tokens, 32/2/2 prior, batch 8, 1 repeat)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if args.tiny:
        args.grid, args.batch, args.dim, args.depth, args.heads, args.vocab, args.repeats = 4, 8, 32, 2, 2, 64, 1
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decoding(prior, batch: int, labels, cfg_scale: float, dtype, repeats: int, compile: bool) -> dict:
    """First call and median batch time of one decoding path, its last tokens, tokens/s."""
    device = next(prior.parameters()).device

    def once():
        g = torch.Generator(device=device).manual_seed(0)
        out = generate(prior, batch, labels=labels, cfg_scale=cfg_scale, generator=g, batch_size=batch,
                       autocast_dtype=dtype, compile=compile)
        sync(device)
        return out

    t = time.perf_counter()
    tokens = once()                      # compile (compiled path) / warm-up (eager)
    first = time.perf_counter() - t
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        tokens = once()
        times.append(time.perf_counter() - t)
    batch_s = statistics.median(times)
    prior.release_caches()
    return {"first_s": first, "batch_s": batch_s, "tokens_per_s": tokens.numel() / batch_s, "tokens": tokens}


def compare(prior, batch: int, labels, cfg_scale: float, dtype, repeats: int) -> dict:
    """Eager and compiled decoding of the same batch: both rows, the speed-up, equal tokens, break-even."""
    eager = time_decoding(prior, batch, labels, cfg_scale, dtype, repeats, compile=False)
    comp = time_decoding(prior, batch, labels, cfg_scale, dtype, repeats, compile=True)
    gain = eager["batch_s"] - comp["batch_s"]
    overhead = comp["first_s"] - comp["batch_s"]
    return {"eager": {k: v for k, v in eager.items() if k != "tokens"},
            "compiled": {k: v for k, v in comp.items() if k != "tokens"},
            "speedup": eager["batch_s"] / comp["batch_s"], "same_tokens": bool(torch.equal(eager["tokens"],
                                                                                           comp["tokens"])),
            "break_even_batches": overhead / gain if gain > 0 else None}


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(vocab_size=args.vocab, latent_h=args.grid, latent_w=args.grid,
                                    attn_layers_dim=args.dim, attn_layers_depth=args.depth,
                                    attn_layers_heads=args.heads, num_classes=args.classes)).to(device).eval()
    labels = torch.arange(args.batch) % args.classes if args.classes else None
    r = compare(prior, args.batch, labels, args.cfg_scale, DTYPES[args.dtype], args.repeats)
    r["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    r["config"].update(torch=torch.__version__, threads=torch.get_num_threads(),
                       device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    e, c = r["eager"], r["compiled"]
    print(f"decoding {args.grid}x{args.grid} tokens, batch {args.batch}, prior {args.dim}/{args.depth}/{args.heads}, "
          f"vocab {args.vocab}, cfg {args.cfg_scale}, {args.dtype}, {device} ({r['config']['device_name']}), "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| path | tokens/s | batch s | first call s |\n|---|---|---|---|")
    print(f"| eager | {e['tokens_per_s']:.0f} | {e['batch_s']:.3f} | {e['first_s']:.2f} |")
    print(f"| compiled | {c['tokens_per_s']:.0f} | {c['batch_s']:.3f} | {c['first_s']:.2f} (compilation) |")
    even = r["break_even_batches"]
    print(f"compiled / eager = {r['speedup']:.2f}x; same tokens: {'yes' if r['same_tokens'] else 'NO'}; compilation "
          f"paid back after {f'{even:.1f} batches' if even is not None else 'never (no gain)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main(parse_args())
