"""Training-step throughput and peak memory: vqgen vs MONAI 1.6.1, same config, same batch, same optimizer.

One step = forward + loss + backward + AdamW step, for the VQ-VAE at the original tool's defaults and the prior at
96/12/8 on 8x8 tokens; each variant (``fp32``; ``best`` = bf16 autocast, channels_last, fused AdamW) of each side in
its own fresh subprocess. Throughput from the median of ``--steps`` steps after ``--warmup``; memory = peak RSS and
its growth once model, optimizer and batch are built (``torch.cuda.max_memory_allocated`` on GPU). In full:
docs/NOTES.md.

Run: ``python bench/train_step.py``; shrink with ``--cases vq28 prior --steps 2``; ``--profile vqgen:vq28:fp32``
prints the top ops of one variant (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: (kind, channels, size, batch)
    "vq28": ("vqvae", 1, 28, 128),
    "vq32": ("vqvae", 1, 32, 128),
    "vq32c3": ("vqvae", 3, 32, 64),
    "prior": ("prior", 0, 8, 64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="what to time")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (codebook init, allocator warm-up)")
    p.add_argument("--prior_steps", type=int, default=5, help="timed steps for the (cheap) prior case")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no_monai_amp", action="store_true", help="skip MONAI under the 'best' settings")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--profile", default=None, metavar="IMPL:CASE:VARIANT",
                   help="instead of the table, profile one variant (e.g. vqgen:vq28:fp32) and print the top ops")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- models
def build(impl: str, case: str, variant: str, device):
    """-> (model, optimizer, step_fn, items per step)."""
    import torch
    import torch.nn.functional as F

    kind, ch, size, batch = CASES[case]
    best = variant == "best"
    torch.manual_seed(0)
    if kind == "vqvae":
        if impl == "vqgen":
            from vqgen.models.vqvae import VQVAE, VQVAEConfig
            model = VQVAE(VQVAEConfig(in_channels=ch, image_size=size))
        else:
            from monai.networks.nets import VQVAE as MVQVAE
            model = MVQVAE(spatial_dims=2, in_channels=ch, out_channels=ch, channels=(256, 256),
                           num_res_channels=(256, 256), num_res_layers=2,
                           downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                           upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=256,
                           embedding_dim=32)
        x = torch.rand(batch, ch, size, size, device=device) * 2 - 1
        model = model.to(device)
        if best:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def loss_fn():
            if impl == "vqgen":
                out = model(x)
                recon, qloss = out.recon, out.vq_loss
            else:
                recon, qloss = model(x)
            return F.mse_loss(recon.float(), x) + qloss.float()
        items = batch
    else:
        tokens = torch.randint(0, 256, (batch, size * size), device=device)
        if impl == "vqgen":
            from vqgen.config import PriorConfig
            from vqgen.models.prior import build_prior
            model = build_prior(PriorConfig(vocab_size=256, latent_h=size, latent_w=size, attn_layers_dim=96,
                                              attn_layers_depth=12, attn_layers_heads=8)).to(device)

            def loss_fn():
                logits = model(tokens).logits
                return F.cross_entropy(logits.float().reshape(-1, 256), tokens.reshape(-1))
        else:
            from monai.networks.nets import DecoderOnlyTransformer
            model = DecoderOnlyTransformer(num_tokens=257, max_seq_len=size * size + 1, attn_layers_dim=96,
                                           attn_layers_depth=12, attn_layers_heads=8,
                                           use_flash_attention=impl == "monai_flash").to(device)
            inp = torch.cat([torch.full((batch, 1), 256, device=device), tokens[:, :-1]], dim=1)  # BOS + 63

            def loss_fn():
                logits = model(inp)
                return F.cross_entropy(logits.float().reshape(-1, 257), tokens.reshape(-1))
        items = batch * size * size
    model.train()
    fused = best
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=fused)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    dev_type = torch.device(device).type

    def step():
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=best):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, opt, step, items


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(spec: dict) -> dict:
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both sides: picks the fastest conv algorithms for these shapes
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _, _, step, items = build(spec["impl"], spec["case"], spec["variant"], device)
    rss0 = maxrss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        step()
    sync()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {**spec, "step_s": med, "items_per_s": items / med, "loss": float(loss), "peak_rss_mb": maxrss_mb(),
           "train_rss_delta_mb": maxrss_mb() - rss0, "threads_used": torch.get_num_threads()}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_subprocess(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        return {**spec, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def profile(target: str, args) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    impl, case, variant = target.split(":")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _, _, step, _ = build(impl, case, variant, device)
    for _ in range(max(1, args.warmup)):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts, record_shapes=False) as prof:
        for _ in range(max(1, args.steps)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile {target} on {device} ({max(1, args.steps)} steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


# ------------------------------------------------------------------------------------------------- main
def variants_for(case: str, args) -> list[tuple[str, str]]:
    if CASES[case][0] == "prior":
        v = [("vqgen", "fp32"), ("vqgen", "best"), ("monai", "fp32"), ("monai_flash", "fp32")]
        return v + ([] if args.no_monai_amp else [("monai_flash", "best")])
    return [("vqgen", "fp32"), ("vqgen", "best"), ("monai", "fp32")] + ([] if args.no_monai_amp else
                                                                      [("monai", "best")])


def main(args) -> list[dict]:
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return []
    if args.profile:
        profile(args.profile, args)
        return []
    import torch
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads or torch.get_num_threads()}, "
          f"warmup {args.warmup}, timed steps {args.steps} (prior {args.prior_steps}); one subprocess per row",
          flush=True)
    results = []
    for case in args.cases:
        rows = []
        for impl, variant in variants_for(case, args):
            steps = args.prior_steps if CASES[case][0] == "prior" else args.steps
            spec = {"impl": impl, "case": case, "variant": variant, "device": args.device, "threads": args.threads,
                    "warmup": args.warmup, "steps": steps}
            r = run_subprocess(spec)
            rows.append(r)
            results.append(r)
            print("  " + _row(r), flush=True)
        print(_ratios(case, rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _row(r: dict) -> str:
    kind, ch, size, batch = CASES[r["case"]]
    what = f"{r['case']:<6} {r['impl']:<11} {r['variant']:<4}"
    if "error" in r:
        return f"{what}  ERROR {r['error']}"
    unit = "tok/s" if kind == "prior" else "img/s"
    mem = f"peak RSS {r['peak_rss_mb']:7.0f} MB (train +{r['train_rss_delta_mb']:6.0f} MB)"
    if "cuda_peak_mb" in r:
        mem = f"CUDA peak {r['cuda_peak_mb']:7.0f} MB"
    return f"{what}  {r['step_s'] * 1000:8.1f} ms/step  {r['items_per_s']:10.1f} {unit}  {mem}"


def _ratios(case: str, rows: list[dict]) -> str:
    ok = {(r["impl"], r["variant"]): r["items_per_s"] for r in rows if "error" not in r}
    monai_fp32 = max((v for (i, var), v in ok.items() if i.startswith("monai") and var == "fp32"), default=None)
    monai_best = max((v for (i, var), v in ok.items() if i.startswith("monai")), default=None)
    parts = []
    for var in ("fp32", "best"):
        if ("vqgen", var) in ok and monai_fp32:
            parts.append(f"vqgen {var} / MONAI fp32 = {ok[('vqgen', var)] / monai_fp32:.2f}x")
    vbest = max((v for (i, _), v in ok.items() if i == "vqgen"), default=None)
    if vbest and monai_best:
        parts.append(f"vqgen best / MONAI best = {vbest / monai_best:.2f}x")
    return f"  => {case}: " + "; ".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(parse_args())
