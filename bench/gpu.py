"""One prepared GPU benchmark at the ImageNet-256 recipe's shapes (configs/imagenet256.yaml): one table, one JSON.

(a) tokenizer training step: fp32, bf16, bf16 + channels_last, and that compiled; (b) prior training step at GPT-B
and GPT-L, bf16, eager vs compiled, with MFU; (c) decoding 16x16 tokens at batch 64 with CFG, eager vs compiled,
and the projected time of 50k samples; (d) MONAI 1.6.1 at the same shapes. Synthetic data, random weights, one
process; a failed row prints ERROR and the others go on; the JSON (with the card's name) is rewritten after each
row. ``python bench/gpu.py`` is sized for ~8 minutes on one H100; ``--device cpu --tiny`` runs every path at toy
size (tests/test_bench_gpu.py). What each row does: docs/NOTES.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from decode import compare, time_decoding  # noqa: E402  (bench/decode.py: eager vs compiled, side by side)
from vqgen.config import PriorStageConfig, VQVAEConfig, VQVAEStageConfig, load_config  # noqa: E402
from vqgen.config.tokenizer import level_params  # noqa: E402
from vqgen.models.prior import build_prior, token_cross_entropy  # noqa: E402
from vqgen.models.vqvae import VQVAE  # noqa: E402
from vqgen.train.throughput import device_peak  # noqa: E402

RECIPE = BENCH.parent / "configs" / "imagenet256.yaml"
SIZES = {"GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16)}   # dim, depth, heads (LlamaGen's GPT-B / GPT-L)
TINY_SIZES = {"tiny-2": (32, 2, 2), "tiny-3": (32, 3, 4)}
CLASSES, SAMPLES_50K = 1000, 50_000
SECTIONS = ("tokenizer", "prior", "decode", "monai")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (with --tiny: the code paths)")
    p.add_argument("--tiny", action="store_true", help="toy shapes: every path in seconds (tests)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run")
    p.add_argument("--no_compile", action="store_true", help="skip the compiled rows (a quick eager-only rerun)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--decode_batch", type=int, default=64, help="samples per decoding batch")
    p.add_argument("--cfg_scale", type=float, default=2.0, help="guidance of the decoding rows (2 x batch rows)")
    p.add_argument("--json", default="gpu_bench.json", help="where the results go (rewritten after each row)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- shapes
def shapes(tiny: bool) -> dict:
    """The tokenizer config and batch, the prior's base config (vocabulary, grid, classes) and batch."""
    if tiny:
        tok = VQVAEConfig(in_channels=3, image_size=16, num_channels=[8, 8], num_res_channels=[8, 8],
                          num_res_layers=1, num_embeddings=64, embedding_dim=4, init_kmeans_iters=1)
        return {"tokenizer": tok, "image_batch": 4, "prior_batch": 4, "sizes": TINY_SIZES, "classes": 10}
    stage1 = load_config(VQVAEStageConfig, ["--config", str(RECIPE)])
    stage3 = load_config(PriorStageConfig, ["--config", str(RECIPE)])
    tok = stage1.model.build(in_channels=3, image_size=stage1.data.image_size)
    assert (stage3.model.attn_layers_dim, stage3.model.attn_layers_depth, stage3.model.attn_layers_heads) == \
        SIZES["GPT-B"], "configs/imagenet256.yaml's prior is no longer GPT-B: update SIZES"
    return {"tokenizer": tok, "image_batch": stage1.train.batch_size, "prior_batch": stage3.train.batch_size,
            "sizes": SIZES, "classes": CLASSES, "prior_lr": stage3.train.lr, "prior_wd": stage3.train.weight_decay}


def prior_config(sh: dict, size: str):
    dim, depth, heads = sh["sizes"][size]
    base = load_config(PriorStageConfig, ["--shards", "-"]).model
    h, w = sh["tokenizer"].latent_size
    return dataclasses.replace(base, attn_layers_dim=dim, attn_layers_depth=depth, attn_layers_heads=heads).build(
        vocab_size=sh["tokenizer"].codebook_size, latent_h=h, latent_w=w, num_classes=sh["classes"])


# ------------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device, warmup: int, steps: int) -> dict:
    """First call (compilation, cuDNN/Inductor autotuning), then the median of ``steps`` after ``warmup``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    times = []
    for _ in range(max(1, steps)):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    out = {"first_s": first, "step_s": statistics.median(times)}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def optimizer(model, device, lr: float = 2e-4, weight_decay: float = 0.0):
    """vqgen's models configure their own (fused AdamW); MONAI's get the same AdamW."""
    if hasattr(model, "configure_optimizer"):
        return model.configure_optimizer(lr, weight_decay, device.type)
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type in ("cuda", "cpu"))


def train_step(model, forward, loss_fn, opt, clip: float | None, bf16: bool, device):
    """One trainer step: autocast forward + loss, backward, clip, step, zero_grad."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(forward())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ------------------------------------------------------------------------------------------------- sections
def tokenizer_rows(sh: dict, device, args) -> list[tuple[dict, object]]:
    """(row, thunk) for section (a) and MONAI's tokenizer rows of section (d)."""
    cfg, batch = sh["tokenizer"], sh["image_batch"]
    variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+cl", True, True, False),
                ("bf16+cl+compile", True, True, True)]
    out = []
    for impl in ("vqgen", "monai"):
        for name, bf16, cl, comp in variants:
            if (comp and args.no_compile) or (impl == "monai" and comp) or ("monai" not in args.sections and
                                                                            impl == "monai"):
                continue
            if impl == "vqgen" and "tokenizer" not in args.sections:
                continue
            row = {"section": "a" if impl == "vqgen" else "d", "what": f"{impl} tokenizer", "variant": name,
                   "unit": "img/s", "items": batch,
                   "shape": f"{batch}x3x{cfg.image_size}x{cfg.image_size}, {cfg.codebook_size} codes"}
            out.append((row, lambda impl=impl, bf16=bf16, cl=cl, comp=comp: run_tokenizer(
                impl, cfg, batch, bf16, cl, comp, device, args)))
    return out


def run_tokenizer(impl, cfg, batch, bf16, cl, comp, device, args) -> dict:
    torch.manual_seed(0)
    if impl == "vqgen":
        model = VQVAE(cfg)
    else:
        from monai.networks.nets import VQVAE as MonaiVQVAE
        levels = len(cfg.num_channels)
        model = MonaiVQVAE(spatial_dims=2, in_channels=3, out_channels=3, channels=tuple(cfg.num_channels),
                           num_res_channels=tuple(cfg.num_res_channels), num_res_layers=cfg.num_res_layers,
                           downsample_parameters=level_params(cfg.downsample_parameters, 4, levels, "down"),
                           upsample_parameters=level_params(cfg.upsample_parameters, 5, levels, "up"),
                           num_embeddings=cfg.num_embeddings, embedding_dim=cfg.embedding_dim, decay=cfg.ema_decay)
    model = model.to(device).train()
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = optimizer(model, device)
    fwd = torch.compile(model) if comp else model

    def forward():
        out = fwd(x)
        return (out.recon, out.vq_loss) if impl == "vqgen" else out

    def loss(out):  # the VQ-VAE task's loss: MSE(recon, x) + quantizer loss
        recon, qloss = out
        return F.mse_loss(recon.float(), x) + qloss.float()

    return timed(train_step(model, forward, loss, opt, None, bf16, device), device, args.warmup, args.steps)


def prior_rows(sh: dict, device, args, peak) -> list[tuple[dict, object]]:
    out = []
    for size in sh["sizes"]:
        for impl, comp in (("vqgen", False), ("vqgen", True), ("monai", False)):
            if (comp and args.no_compile) or (impl == "vqgen" and "prior" not in args.sections) or \
                    (impl == "monai" and "monai" not in args.sections):
                continue
            cfg = prior_config(sh, size)
            row = {"section": "b" if impl == "vqgen" else "d", "what": f"{impl} prior {size}",
                   "variant": "bf16+compile" if comp else "bf16", "unit": "tok/s",
                   "items": sh["prior_batch"] * cfg.seq_len,
                   "shape": f"batch {sh['prior_batch']} x {cfg.latent_h}x{cfg.latent_w} tokens, vocab "
                            f"{cfg.vocab_size}" + (f", {cfg.num_classes} classes" if impl == "vqgen" else
                                                   ", BOS only (MONAI has no class input)")}
            out.append((row, lambda impl=impl, cfg=cfg, comp=comp: run_prior(impl, cfg, sh, comp, device, args,
                                                                              peak)))
    return out


def run_prior(impl, cfg, sh, comp, device, args, peak) -> dict:
    torch.manual_seed(0)
    b, t = sh["prior_batch"], cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    labels = torch.randint(0, cfg.num_classes, (b,), device=device)
    lr, wd = sh.get("prior_lr", 4e-4), sh.get("prior_wd", 0.05)
    if impl == "vqgen":
        model = build_prior(cfg).to(device).train()
        flops = model.flops_per_token()
        fwd = torch.compile(model) if comp else model

        def forward():
            out = fwd(tokens, labels)
            return out.logits, out.targets
    else:
        from monai.networks.nets import DecoderOnlyTransformer
        model = DecoderOnlyTransformer(num_tokens=cfg.vocab_size + 1, max_seq_len=t,
                                       attn_layers_dim=cfg.attn_layers_dim, attn_layers_depth=cfg.attn_layers_depth,
                                       attn_layers_heads=cfg.attn_layers_heads,
                                       use_flash_attention=device.type == "cuda").to(device).train()
        flops = nanogpt_flops(model, cfg)
        inp = torch.cat([torch.full((b, 1), cfg.vocab_size, device=device), tokens[:, :-1]], dim=1)  # BOS + T-1

        def forward():
            return model(inp), tokens
    opt = optimizer(model, device, lr, wd)
    step = train_step(model, forward, lambda out: token_cross_entropy(*out), opt, 1.0, True, device)
    r = timed(step, device, args.warmup, args.steps)
    r["flops_per_token"] = flops
    r["mfu"] = b * t / r["step_s"] * flops / peak if peak else None
    return r


def nanogpt_flops(model, cfg) -> float:
    """6N + 12*L*H*Q*T with N the parameters outside embedding tables (MONAI's transformer, same count as vqgen's)."""
    lookup = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    n = sum(p.numel() for p in model.parameters() if id(p) not in lookup)
    return 6.0 * n + 12.0 * cfg.attn_layers_depth * cfg.attn_layers_heads * cfg.head_dim * cfg.seq_len


def decode_rows(sh: dict, device, args) -> list[tuple[dict, object]]:
    cfg = prior_config(sh, next(iter(sh["sizes"])))
    batch = min(args.decode_batch, 8) if args.tiny else args.decode_batch
    shape = f"batch {batch} x {cfg.latent_h}x{cfg.latent_w} tokens, {next(iter(sh['sizes']))}, bf16"
    out = []
    if "decode" in args.sections:
        for cfg_scale, comp in ((args.cfg_scale, not args.no_compile), (1.0, False)):  # no CFG: MONAI's setting
            row = {"section": "c", "what": "vqgen decoding", "unit": "tok/s", "items": batch * cfg.seq_len,
                   "variant": f"CFG {cfg_scale:g}" if cfg_scale != 1 else "no CFG",
                   "shape": shape + (f", CFG {cfg_scale:g} ({2 * batch} rows)" if cfg_scale != 1 else "")}
            out.append((row, lambda s=cfg_scale, c=comp: run_decode(cfg, batch, s, c, device, args)))
    if "monai" in args.sections:
        row = {"section": "d", "what": "monai decoding", "variant": "no CFG", "unit": "tok/s",
               "items": batch * cfg.seq_len, "shape": shape + ", full-prefix recompute per token (no KV cache)"}
        out.append((row, lambda: run_monai_decode(cfg, batch, device)))
    return out


def run_decode(cfg, batch, cfg_scale, comp: bool, device, args) -> dict:
    torch.manual_seed(0)
    prior = build_prior(cfg).to(device).eval()
    labels = torch.arange(batch) % cfg.num_classes
    if not comp:
        e = time_decoding(prior, batch, labels, cfg_scale, torch.bfloat16, 1 if args.tiny else 3, compile=False)
        return {"first_s": e["first_s"], "step_s": e["batch_s"],
                "projected_50k_s": math.ceil(SAMPLES_50K / batch) * e["batch_s"]}
    r = compare(prior, batch, labels, cfg_scale, torch.bfloat16, repeats=1 if args.tiny else 3)
    e, c = r["eager"], r["compiled"]
    n = math.ceil(SAMPLES_50K / batch)
    return {"first_s": e["first_s"], "step_s": e["batch_s"], "projected_50k_s": n * e["batch_s"],
            "compiled": {"first_s": c["first_s"], "step_s": c["batch_s"],
                         "projected_50k_s": n * c["batch_s"] + c["first_s"] - c["batch_s"]},
            "speedup": r["speedup"], "same_tokens": r["same_tokens"]}


def run_monai_decode(cfg, batch, device) -> dict:
    from monai.inferers import VQVAETransformerInferer
    from monai.networks.nets import DecoderOnlyTransformer
    from monai.utils.ordering import Ordering, OrderingType

    from sampling import TokensOnlyVQVAE  # bench/sampling.py: MONAI's sampler without image decoding

    torch.manual_seed(0)
    model = DecoderOnlyTransformer(num_tokens=cfg.vocab_size + 1, max_seq_len=cfg.seq_len,
                                   attn_layers_dim=cfg.attn_layers_dim, attn_layers_depth=cfg.attn_layers_depth,
                                   attn_layers_heads=cfg.attn_layers_heads,
                                   use_flash_attention=device.type == "cuda").to(device).eval()
    ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=2,
                        dimensions=(1, cfg.latent_h, cfg.latent_w))
    start = torch.full((batch, 1), cfg.vocab_size, dtype=torch.long, device=device)

    def sample():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            VQVAETransformerInferer().sample(latent_spatial_dim=(cfg.latent_h, cfg.latent_w), starting_tokens=start,
                                             vqvae_model=TokensOnlyVQVAE(cfg.vocab_size), transformer_model=model,
                                             ordering=ordering, temperature=1.0, verbose=False)
    r = timed(sample, device, warmup=1, steps=1)
    r["projected_50k_s"] = math.ceil(SAMPLES_50K / batch) * r["step_s"]
    return r


# ------------------------------------------------------------------------------------------------- main
def run_row(row: dict, thunk, device) -> dict:
    t = time.perf_counter()
    try:
        row.update(thunk())
        row["items_per_s"] = row["items"] / row["step_s"]
    except Exception as e:  # noqa: BLE001 - one failed row (OOM, a compile error) must not end the run
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    row["row_s"] = time.perf_counter() - t
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt(row: dict) -> str:
    what = f"| {row['section']} | {row['what']} | {row['variant']} | {row['shape']} |"
    if "error" in row:
        return what + f" ERROR {row['error']} | | | | |"
    mem = f"{row['peak_mem_mb']:.0f}" if "peak_mem_mb" in row else "n/a"
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else ("n/a" if "mfu" in row else "")
    main = f" {row['items_per_s']:.4g} {row['unit']} | {1000 * row['step_s']:.1f} | {row['first_s']:.1f} | {mem} |" \
           f" {mfu} |"
    if "projected_50k_s" in row:
        main += f" 50k: {row['projected_50k_s'] / 60:.1f} min"
    if "compiled" in row:
        c = row["compiled"]
        main += (f"\n{what} compiled: {row['items'] / c['step_s']:.4g} {row['unit']} | {1000 * c['step_s']:.1f} | "
                 f"{c['first_s']:.1f} | | | 50k: {c['projected_50k_s'] / 60:.1f} min; compiled/eager "
                 f"{row['speedup']:.2f}x, same tokens: {row['same_tokens']}")
    return what + main


def ratios(rows: list[dict]) -> dict:
    """The issue's targets: bf16+cl / fp32 tokenizer, compiled / eager prior and decoding, MFU."""
    ok = {(r["what"], r["variant"]): r for r in rows if "error" not in r}
    out = {}
    fp32, best = ok.get(("vqgen tokenizer", "fp32")), ok.get(("vqgen tokenizer", "bf16+cl"))
    if fp32 and best:
        out["tokenizer bf16+cl / fp32 (target >= 2x)"] = best["items_per_s"] / fp32["items_per_s"]
    for (what, variant), r in ok.items():
        if what.startswith("vqgen prior") and variant == "bf16+compile" and (what, "bf16") in ok:
            out[f"{what} compiled / eager"] = r["items_per_s"] / ok[(what, "bf16")]["items_per_s"]
        if what.startswith("vqgen prior") and r.get("mfu"):
            out[f"{what} {variant} MFU (target GPT-B >= 40%, GPT-L >= 50%)"] = r["mfu"]
        if what == "vqgen decoding" and "speedup" in r:
            out[f"decoding {variant} compiled / eager (target >= 4x with CFG)"] = r["speedup"]
    return out


def main(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --device cpu --tiny to run the code paths)")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_label = device_peak(device, "bf16")
    sh = shapes(args.tiny)
    import monai
    result = {"device": card, "peak": peak_label, "torch": torch.__version__, "monai": monai.__version__,
              "tiny": args.tiny, "args": vars(args), "rows": [],
              "fp32_math": {"cudnn_tf32": torch.backends.cudnn.allow_tf32,  # torch's defaults, as the trainers run
                            "matmul_precision": torch.get_float32_matmul_precision()}}
    print(f"bench/gpu.py on {card} ({peak_label}), torch {torch.__version__}, MONAI {monai.__version__}"
          f"{', TINY shapes' if args.tiny else ''}", flush=True)
    plan = [*prior_rows(sh, device, args, peak), *decode_rows(sh, device, args), *tokenizer_rows(sh, device, args)]
    start = time.perf_counter()
    for row, thunk in plan:
        r = run_row(row, thunk, device)
        result["rows"].append(r)
        print(f"[{time.perf_counter() - start:6.0f} s] {fmt(r)}", flush=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["ratios"] = ratios(result["rows"])
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{card}: throughput (unit), step or batch ms, first call s (compilation), peak MB, MFU")
    print("| | what | variant | shape | throughput | ms | first s | peak MB | MFU |\n" + "|---" * 9 + "|")
    for r in result["rows"]:
        print(fmt(r))
    for k, v in result["ratios"].items():
        print(f"{k}: {100 * v:.1f}%" if "MFU" in k else f"{k}: {v:.2f}x")
    print(f"total {time.perf_counter() - start:.0f} s; JSON: {args.json}")
    return result


if __name__ == "__main__":
    main(parse_args())
