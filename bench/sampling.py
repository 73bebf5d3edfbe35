"""Token-sampling speed: vqgen (KV cache) vs MONAI 1.6.1 ``VQVAETransformerInferer.sample``.

Both sides: CPU, fp32, the same transformer size, vocabulary, grid and batch, temperature 1, no top-k; only token
generation is timed (MONAI gets a stand-in VQ-VAE whose ``decode_samples`` returns the tokens). MONAI re-runs the
whole prefix at every step; ``vqgen.models.sampling.generate`` prefills once and decodes with a KV cache. Each
sampler is warmed up on a 1-row grid, then timed ``--repeats`` times (median).

Run: ``python bench/sampling.py [--batch 16 --grids 8 16 --dim 96 --depth 12 --heads 8 --repeats 1]``.
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


class TokensOnlyVQVAE(torch.nn.Module):
    """What MONAI's sampler needs from a VQ-VAE: ``num_embeddings`` (its BOS id) and ``decode_samples``.
    Decoding is the identity here so only the token loop is timed."""

    def __init__(self, num_embeddings: int):
        super().__init__()
        self.num_embeddings = num_embeddings

    def decode_samples(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="grids sampled at once (both samplers)")
    p.add_argument("--grids", type=int, nargs="+", default=[8, 16], help="square latent grid sizes to time")
    p.add_argument("--dim", type=int, default=96, help="transformer width (seed: --attn_layers_dim 96)")
    p.add_argument("--depth", type=int, default=12, help="transformer blocks (seed: --attn_layers_depth 12)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (seed: --attn_layers_heads 8)")
    p.add_argument("--vocab", type=int, default=256, help="codebook size (seed: --num_embeddings 256)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per sampler and grid (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--monai_flash", action=argparse.BooleanOptionalAction, default=True,
                   help="build MONAI's transformer with use_flash_attention=True (SDPA; faster than its "
                        "default masked matmul attention on CPU, i.e. the stronger baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and sampling")
    return p.parse_args(argv)


def _time(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median wall time and median process CPU time (all threads) of ``repeats`` calls, and the last output.

    CPU time is reported too because on a shared machine wall time swings with other jobs' load, while the
    CPU seconds a sampler burns barely do."""
    walls, cpus = [], []
    for _ in range(max(repeats, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def bench_grid(g: int, args) -> dict:
    from monai.inferers import VQVAETransformerInferer
    from monai.networks.nets import DecoderOnlyTransformer
    from monai.utils.ordering import Ordering, OrderingType

    torch.manual_seed(args.seed)
    seq_len = g * g
    prior = build_prior(PriorConfig(vocab_size=args.vocab, latent_h=g, latent_w=g, attn_layers_dim=args.dim,
                                    attn_layers_depth=args.depth,
                              attn_layers_heads=args.heads)).eval()
    # MONAI: vocab + 1 tokens (its BOS is token id num_embeddings); input = BOS + first T-1 tokens = T positions
    monai_tf = DecoderOnlyTransformer(num_tokens=args.vocab + 1, max_seq_len=seq_len, attn_layers_dim=args.dim,
                                      attn_layers_depth=args.depth, attn_layers_heads=args.heads,
                                      use_flash_attention=args.monai_flash).eval()
    vq = TokensOnlyVQVAE(args.vocab)
    inferer = VQVAETransformerInferer()

    def monai_sample(h: int) -> torch.Tensor:
        ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=2, dimensions=(1, h, g))
        start = torch.full((args.batch, 1), args.vocab, dtype=torch.long)
        return inferer.sample(latent_spatial_dim=(h, g), starting_tokens=start, vqvae_model=vq,
                              transformer_model=monai_tf, ordering=ordering, temperature=1.0, verbose=False)

    def vqgen_sample() -> torch.Tensor:
        return generate(prior, args.batch, generator=torch.Generator().manual_seed(args.seed), use_cache=True)

    with torch.inference_mode():
        monai_sample(1)                  # warm-up: one grid row
        t_monai, c_monai, m_out = _time(lambda: monai_sample(g), args.repeats)
    vqgen_sample()                       # warm-up (the full grid: it is cheap)
    t_vqgen, c_vqgen, v_out = _time(vqgen_sample, args.repeats)
    assert m_out.shape == v_out.shape == (args.batch, g, g), (m_out.shape, v_out.shape)
    assert int(m_out.max()) < args.vocab and int(v_out.max()) < args.vocab
    n_tok = args.batch * seq_len
    return dict(grid=g, tokens=n_tok, monai_s=t_monai, vqgen_s=t_vqgen, monai_tps=n_tok / t_monai,
                vqgen_tps=n_tok / t_vqgen, ratio=t_monai / t_vqgen,
                monai_cpu=c_monai, vqgen_cpu=c_vqgen, cpu_ratio=c_monai / max(c_vqgen, 1e-9),
                params=(sum(p.numel() for p in prior.parameters()), sum(p.numel() for p in monai_tf.parameters())))


def main(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    import monai
    print(f"torch {torch.__version__}, monai {monai.__version__}, threads {torch.get_num_threads()}, CPU fp32")
    print(f"config: batch {args.batch}, dim {args.dim}, depth {args.depth}, heads {args.heads}, vocab {args.vocab}, "
          f"repeats {args.repeats}, MONAI use_flash_attention={args.monai_flash}; timed: token generation only")
    rows = []
    for g in args.grids:
        r = bench_grid(g, args)
        rows.append(r)
        print(f"  {g}x{g}: MONAI {r['monai_s']:.2f}s wall / {r['monai_cpu']:.2f}s CPU, "
              f"vqgen {r['vqgen_s']:.2f}s wall / {r['vqgen_cpu']:.2f}s CPU "
              f"(params vqgen {r['params'][0]:,} / MONAI {r['params'][1]:,})", flush=True)
    print(f"\n{'grid':>6} {'tokens':>7} {'MONAI tok/s':>12} {'vqgen tok/s':>12} {'speed-up':>9} "
          f"{'CPU-time speed-up':>18}")
    for r in rows:
        print(f"{r['grid']:>3}x{r['grid']:<2} {r['tokens']:>7} {r['monai_tps']:>12.0f} {r['vqgen_tps']:>12.0f} "
              f"{r['ratio']:>8.1f}x {r['cpu_ratio']:>17.1f}x")
    print("(tok/s and speed-up: wall clock; CPU-time speed-up: ratio of process CPU seconds, less sensitive to "
          "other load on a shared machine)")
    return rows


if __name__ == "__main__":
    main(parse_args())
