"""Parameters, training-step time and sampling time of the AR prior with the plain head vs the factorised one
(``--token_factors K``) at large vocabularies (default 2^14 and 2^18 codes).

Per (vocabulary, head): the parameter count (all, and the token embedding + head), the median time of one training
step (forward + loss + backward + AdamW step, batch ``--batch`` of random tokens) after ``--warmup`` steps, and the
median time to sample ``--sample_batch`` grids with the KV cache. Same seed, same Transformer for every row.
Run: ``python bench/factor_head.py`` (the Fashion-MNIST benchmark's prior, 128/6/8 on 8x8 tokens, batch 32: the
plain head's fp32 logits are batch x 64 x vocab x 4 bytes, 2 GiB at 2^18, a few times that with their gradient);
``--tiny`` checks the code paths in seconds; ``--device cuda`` times a GPU (synchronised) and adds its peak memory.
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
from vqgen.models.prior import build_prior, token_cross_entropy  # noqa: E402
from vqgen.models.sampling import generate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=[1 << 14, 1 << 18], help="vocabulary sizes")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2], help="--token_factors values (1 = plain)")
    p.add_argument("--factor_layers", type=int, default=1, help="--factor_layers of the factorised heads")
    p.add_argument("--dim", type=int, default=128, help="--attn_layers_dim")
    p.add_argument("--depth", type=int, default=6, help="--attn_layers_depth")
    p.add_argument("--heads", type=int, default=8, help="--attn_layers_heads")
    p.add_argument("--grid", type=int, default=8, help="square token grid (8: 32 px images, 4x downsampling)")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--sample_batch", type=int, default=16, help="grids sampled at once")
    p.add_argument("--sample_repeats", type=int, default=1, help="timed sampling runs (median); 0: skip sampling")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--tiny", action="store_true", help="a seconds-long check of the code paths (32/2/2, 4x4 grid)")
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.depth, args.heads, args.grid, args.batch = 32, 2, 2, 4, 8
        args.steps, args.warmup, args.sample_batch = 1, 1, 2
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, n: int, device: torch.device) -> float:
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(args, vocab: int, factors: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = PriorConfig(vocab_size=vocab, latent_h=args.grid, latent_w=args.grid, attn_layers_dim=args.dim,
                      attn_layers_depth=args.depth, attn_layers_heads=args.heads, num_classes=10,
                      token_factors=factors, factor_layers=args.factor_layers)
    prior = build_prior(cfg).to(device).train()
    params = sum(p.numel() for p in prior.parameters())
    io = sum(p.numel() for n, p in prior.named_parameters() if n.startswith(("tok_emb", "head")))
    opt = prior.configure_optimizer(1e-4, 0.05, device.type)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.batch, cfg.seq_len), generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    def step():
        out = prior(tokens, labels)
        token_cross_entropy(out.logits, out.targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    step_s = _median_seconds(step, args.steps, device)
    row = {"vocab": vocab, "token_factors": factors, "bits": list(cfg.factor_bits), "params": params,
           "embed_head_params": io, "step_ms": 1000 * step_s, "train_tok_per_s": args.batch * cfg.seq_len / step_s}
    if device.type == "cuda":
        row["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if args.sample_repeats:
        classes = [c % 10 for c in range(args.sample_batch)]

        def draw():
            generate(prior, args.sample_batch, labels=classes, cfg_scale=2.0,
                     generator=torch.Generator(device=device).manual_seed(0))
        draw()                                                           # warm-up (cache allocation)
        row["sample_s"] = _median_seconds(draw, args.sample_repeats, device)
    prior.to("cpu")  # the next case starts with this one's memory released
    return row


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads"
    print(f"# prior {args.dim}/{args.depth}/{args.heads}, grid {args.grid}x{args.grid}, batch {args.batch}, "
          f"--factor_layers {args.factor_layers}; {name}")
    print("| vocab | head | params | embed+head | train step (ms) | train tok/s | sample (s) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for vocab in args.vocabs:
        for k in args.factors:
            r = measure(args, vocab, k, device)
            rows.append({**r, "device": name})
            head = "plain" if k == 1 else f"{k} factors ({'+'.join(map(str, r['bits']))} bits)"
            sample = f"{r['sample_s']:.2f}" if "sample_s" in r else "-"
            peak = f" ({r['train_peak_gib']:.1f} GiB)" if "train_peak_gib" in r else ""
            print(f"| {vocab:,} | {head} | {r['params']:,} | {r['embed_head_params']:,} | "
                  f"{r['step_ms']:.1f}{peak} | {r['train_tok_per_s']:,.0f} | {sample} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
