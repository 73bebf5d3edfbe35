"""Speed at default flags: vqgen's real trainers vs the original recipe vs a plain loop, as ratios from one run.

Rows, each in its own fresh subprocess, side by side ``--rounds`` times: ``vqgen`` (the real trainer's code path),
``original`` (GenerativeZoo's VQVAE_T.py recipe on MONAI 1.6.1), ``plain`` (the same vqgen model in a bare loop) and,
with ``--ablate``, ``before`` plus one row per speed fix undone. Per step: median wall time and mean CPU time after
``--warmup`` steps; ratios > 1 mean vqgen is faster. The rows and cases in full: docs/NOTES.md.

Run: ``python bench/default_speed.py`` (all cases); quicker: ``--cases vq32s prior --steps 6``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_channels": (64, 64), "num_res_channels": (64, 64), "num_res_layers": 1}
DEFAULT = {"num_channels": (256, 256), "num_res_channels": (256, 256), "num_res_layers": 2}
CASES = {  # name: (kind, channels, size, batch, tokenizer sizes)
    "vq32": ("vqvae", 1, 32, 128, DEFAULT),
    "vq28": ("vqvae", 1, 28, 128, DEFAULT),
    "vq32s": ("vqvae", 1, 32, 128, SMALL),
    "vq32s_b32": ("vqvae", 1, 32, 32, SMALL),  # the same at stage 1's default batch
    "vq32c3": ("vqvae", 3, 32, 64, DEFAULT),
    "prior": ("prior", 1, 32, 64, SMALL),  # the prior's tokens: 8x8 from a 64/64 tokenizer on 1x32x32 images
}
IMPLS = ("vqgen", "original", "plain")
FIXES = ("malloc", "lut", "fused")
ABLATIONS = {"before": list(FIXES), **{f"-{f}": [f] for f in FIXES}}  # row name: the fixes it undoes
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="what to time")
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="repeat the three rows this often (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every row (default: torch's)")
    p.add_argument("--ablate", action="store_true",
                   help="also run vqgen with its speed fixes undone: all (before), and each alone (-malloc...)")
    p.add_argument("--data_dir", default=None, help="holds FashionMNIST/raw (default: a temporary copy)")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data
def prepare_data(work: Path, data_dir: str | None) -> dict:
    """Fashion-MNIST raw files (if available), a generated RGB image folder and a generated gray one."""
    import numpy as np
    from PIL import Image

    info = {"data_dir": data_dir or str(work / "data"), "fashionmnist": False}
    raw = Path(info["data_dir"]) / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FMNIST_FILES) and FMNIST_SYSTEM.is_dir() and data_dir is None:
        raw.mkdir(parents=True, exist_ok=True)
        for f in FMNIST_FILES:
            with gzip.open(FMNIST_SYSTEM / f"{f}.gz") as src, open(raw / f, "wb") as dst:
                shutil.copyfileobj(src, dst)
    info["fashionmnist"] = all((raw / f).exists() for f in FMNIST_FILES)
    rng = np.random.default_rng(0)
    for name, mode in (("rgb", "RGB"), ("gray", "L")):
        folder = work / name
        for i in range(2048):  # smooth random images: 8x8 noise upsampled, in 10 class folders
            d = folder / str(i % 10)
            d.mkdir(parents=True, exist_ok=True)
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(a, "RGB").resize((32, 32), Image.BICUBIC).convert(mode).save(d / f"{i:05d}.png")
        info[name] = str(folder)
    return info


def image_source(case: str, data: dict) -> dict:
    """Where a case's images come from: --dataset for vqgen, the torchvision class for the original, channels.
    Without Fashion-MNIST the 1-channel cases read the generated image folder, which vqgen (generic folder input)
    reads as RGB: they become 3-channel cases on every row."""
    kind, ch, _, _, _ = CASES[case]
    if ch == 1 and data["fashionmnist"]:
        return {"dataset": "fashionmnist", "tv_class": "FashionMNIST", "channels": 1}
    if kind == "prior":  # shards of the gray folder; the original encodes the same images (converted to 1 channel)
        return {"dataset": data["gray"], "tv_class": None, "channels": 1}
    return {"dataset": data["rgb"], "tv_class": None, "channels": 3}


def make_shards(work: Path, data: dict) -> Path:
    """Token shards of the gray image folder, written by vqgen's stage 2 (an untrained 64/64 tokenizer)."""
    sys.path.insert(0, str(ROOT))
    from vqgen import extract
    from vqgen.cli import run_cli
    from vqgen.config import ExtractConfig
    from vqgen.models.vqvae import VQVAE, VQVAEConfig

    tok = work / "tokenizer"
    VQVAE(VQVAEConfig(in_channels=1, image_size=32, **SMALL)).export_to(tok)
    out = work / "shards"
    if run_cli(extract.run, ExtractConfig, ["--dataset", data["gray"], "--checkpoint", str(tok),
                                            "--output", str(out), "--no_progress"]) != 0:
        raise SystemExit("could not write the prior's shards")
    return out


# ------------------------------------------------------------------------------------------------ rows
class Clock:
    """Timestamps (wall, CPU of the whole process) at the start of every step."""

    def __init__(self):
        self.marks = []

    def mark(self):
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.marks.append((time.perf_counter(), ru.ru_utime + ru.ru_stime, ru.ru_stime, ru.ru_minflt))

    def result(self, warmup: int) -> dict:
        d = [[b[i] - a[i] for i in range(4)] for a, b in zip(self.marks[warmup:], self.marks[warmup + 1:])]
        if not d:
            raise SystemExit("no timed steps")
        mean = lambda i: sum(x[i] for x in d) / len(d)  # noqa: E731
        return {"steps": len(d), "wall_ms": statistics.median(x[0] for x in d) * 1e3, "cpu_ms": mean(1) * 1e3,
                "sys_ms": mean(2) * 1e3, "minflt": mean(3)}


def undo_fixes(undo: list[str]) -> None:
    """The ``before`` rows: put back what vqgen did before each speed fix (this process only)."""
    if "malloc" in undo:  # glibc's default: freed buffers above the mmap threshold go back to the kernel
        from vqgen import perf
        perf.keep_freed_memory = lambda: False
    if "lut" in undo:  # torchvision's ToTensor + Normalize per item
        from torchvision import transforms as T

        from vqgen.data import transforms

        def reference(self, img):
            tf = T.Compose([T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                            T.CenterCrop(self.image_size), T.ToTensor(),
                            T.Normalize([0.5] * self.channels, [0.5] * self.channels)])
            return tf(transforms.convert_mode(img, self.channels).convert("L" if self.channels == 1 else "RGB"))
        transforms.ImageTransform.__call__ = reference
    if "fused" in undo:  # the per-tensor (foreach) AdamW on CPU
        from vqgen.models import optim, prior, vqvae
        inner = optim.adamw

        def foreach_adamw(model, lr, weight_decay, betas, device_type):
            return inner(model, lr, weight_decay, betas, "cuda" if device_type == "cuda" else "no-fused")
        vqvae.adamw = prior.adamw = foreach_adamw


def row_vqgen(spec: dict, clock: Clock) -> None:
    from vqgen.cli import run_cli

    undo_fixes(spec.get("undo", []))
    kind, _, size, batch, tok = CASES[spec["case"]]
    n = spec["warmup"] + spec["steps"] + 1
    out = tempfile.mkdtemp(prefix="vqgen-bench-")
    common = ["--output_dir", out, "--no_wandb", "--batch_size", str(batch), "--max_steps", str(n)]
    if kind == "vqvae":
        from vqgen.config import VQVAEStageConfig as config
        from vqgen.train import vqvae_task as stage
        task = stage.VQVAETask
        argv = ["--dataset", spec["dataset"], "--data_dir", spec["data_dir"], "--image_size", str(size), *common,
                "--num_channels", *map(str, tok["num_channels"]), "--num_res_channels",
                *map(str, tok["num_res_channels"]), "--num_res_layers", str(tok["num_res_layers"])]
    else:
        from vqgen.config import PriorStageConfig as config
        from vqgen.train import prior_task as stage
        task = stage.PriorTask
        argv = ["--shards", spec["shards"], *common, "--tune_sampling", "none"]  # steps only
    inner = task.compute_loss

    def timed(self, model, b):
        clock.mark()
        return inner(self, model, b)

    task.compute_loss = timed
    try:
        if run_cli(stage.run, config, argv) != 0:
            raise SystemExit("the vqgen run failed")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _tv_dataset(spec: dict, size: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])  # GenerativeZoo: normalize=False
    if spec["channels"] == 1 and not spec.get("tv_class"):
        tf = transforms.Compose([transforms.Grayscale(1), tf])
    if spec.get("tv_class"):
        return getattr(datasets, spec["tv_class"])(root=spec["data_dir"], train=True, download=False, transform=tf)
    return datasets.ImageFolder(spec["dataset"], transform=tf)


def row_original(spec: dict, clock: Clock) -> None:
    import torch
    from monai.networks.nets import VQVAE as MVQVAE
    from tqdm import tqdm

    kind, _, size, batch, tok = CASES[spec["case"]]
    ch = spec["channels"]
    dl = torch.utils.data.DataLoader(_tv_dataset(spec, size), batch_size=batch, shuffle=True, pin_memory=True,
                                     num_workers=0)
    vqvae = MVQVAE(spatial_dims=2, in_channels=ch, out_channels=ch, num_res_layers=tok["num_res_layers"],
                   downsample_parameters=((2, 4, 1, 1),) * 2, upsample_parameters=((2, 4, 1, 1, 0),) * 2,
                   channels=tok["num_channels"], num_res_channels=tok["num_res_channels"], num_embeddings=256,
                   embedding_dim=32)
    if kind == "vqvae":
        model, loss_fn = vqvae, torch.nn.L1Loss()

        def step(x):
            x_recon, quant_l = model(x)
            return loss_fn(x_recon.float(), x.float()) + quant_l
    else:
        from monai.inferers import VQVAETransformerInferer
        from monai.networks.nets import DecoderOnlyTransformer
        from monai.utils.ordering import Ordering

        vqvae.eval()
        latent = vqvae.encode_stage_2_inputs(torch.randn(1, ch, size, size)).shape[2:]
        ordering = Ordering(ordering_type="raster_scan", spatial_dims=2, dimensions=(1,) + tuple(latent))
        model = DecoderOnlyTransformer(num_tokens=257, max_seq_len=latent[0] * latent[1], attn_layers_dim=96,
                                       attn_layers_depth=12, attn_layers_heads=8)
        inferer, ce = VQVAETransformerInferer(), torch.nn.CrossEntropyLoss()

        def step(x):
            logits, targets, _ = inferer(x, vqvae, model, ordering, return_latent=True)
            return ce(logits.transpose(1, 2), targets)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    n = spec["warmup"] + spec["steps"] + 1
    while len(clock.marks) < n:
        for x, _ in tqdm(dl, desc="Batches", leave=False):
            clock.mark()
            if len(clock.marks) > n:
                return
            opt.zero_grad()
            loss = step(x)
            loss.backward()
            opt.step()
            loss.item()


def row_plain(spec: dict, clock: Clock) -> None:
    import torch
    import torch.nn.functional as F

    kind, _, size, batch, tok = CASES[spec["case"]]
    ch = spec["channels"]
    n = spec["warmup"] + spec["steps"] + 1
    torch.manual_seed(0)
    if kind == "vqvae":
        from vqgen.data import build_dataset
        from vqgen.models.vqvae import VQVAE, VQVAEConfig

        ds, _ = build_dataset(spec["dataset"], "train", spec["data_dir"], image_size=size)
        xs = torch.stack([ds[i % len(ds)][0] for i in range(n * batch)])  # (n*B, C, H, W): all batches in memory
        model = VQVAE(VQVAEConfig(in_channels=ch, image_size=size, **tok))

        def step(i):
            x = xs[i * batch:(i + 1) * batch]
            out = model(x)
            return F.mse_loss(out.recon, x) + out.vq_loss
    else:
        from vqgen.config import PriorConfig
        from vqgen.models.prior import build_prior

        model = build_prior(PriorConfig(vocab_size=256, latent_h=8, latent_w=8, num_classes=10))  # train_prior defaults
        toks, labels = torch.randint(0, 256, (n * batch, 64)), torch.randint(0, 10, (n * batch,))

        def step(i):
            t, lab = toks[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]
            return F.cross_entropy(model(t, lab).logits.reshape(-1, 256), t.reshape(-1))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    for i in range(n):
        clock.mark()
        loss = step(i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.mark()


def worker(spec: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    clock = Clock()
    impl = spec["impl"]
    if impl in ABLATIONS:
        spec = {**spec, "undo": ABLATIONS[impl]}
    {"original": row_original, "plain": row_plain}.get(impl, row_vqgen)(spec, clock)
    import torch
    return {**spec, **clock.result(spec["warmup"]), "threads": torch.get_num_threads()}


def run_row(spec: dict, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=tempfile.gettempdir())
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {**spec, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ report
def summarise(case: str, rows: list[dict]) -> dict:
    """Per row name: median over rounds of the per-row numbers."""
    out = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        ok = [r for r in rows if r["impl"] == impl and "error" not in r]
        if ok:
            out[impl] = {k: statistics.median(r[k] for r in ok) for k in ("wall_ms", "cpu_ms", "sys_ms", "minflt")}
        else:
            out[impl] = {"error": next((r["error"] for r in rows if r["impl"] == impl), "no row")}
    return out


def print_table(summary: dict[str, dict]) -> None:
    print("\n| case | row | ms/step (wall, median) | CPU ms/step (user+sys) | of it sys | minor faults/step |")
    print("|---|---|---|---|---|---|")
    for case, s in summary.items():
        for impl, v in s.items():
            if "error" in v:
                print(f"| {case} | {impl} | ERROR {v['error'][:80]} | | | |")
            else:
                print(f"| {case} | {impl} | {v['wall_ms']:.0f} | {v['cpu_ms']:.0f} | {v['sys_ms']:.0f} | "
                      f"{v['minflt']:.0f} |")
    others = [o for o in dict.fromkeys(k for s in summary.values() for k in s) if o != "vqgen"]
    print("\nratios, row / vqgen at default flags (> 1: vqgen is faster)")
    print("| case | " + " | ".join(f"{o} / vqgen (wall) | {o} / vqgen (CPU)" for o in others) + " |")
    print("|---|" + "---|---|" * len(others))
    for case, s in summary.items():
        v, cells = s["vqgen"], []
        for other in others:
            o = s.get(other, {"error": "not run"})
            for k in ("wall_ms", "cpu_ms"):
                cells.append("-" if "error" in v or "error" in o else f"{o[k] / v[k]:.2f}x")
        print(f"| {case} | " + " | ".join(cells) + " |")


def main(args) -> dict:
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return {}
    import torch
    work = Path(tempfile.mkdtemp(prefix="vqgen-default-speed-"))
    try:
        data = prepare_data(work, args.data_dir)
        shards = str(make_shards(work, data)) if "prior" in args.cases else None
        print(f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
              f"Fashion-MNIST {'real' if data['fashionmnist'] else 'not found: generated images'}, "
              f"warmup {args.warmup}, timed steps {args.steps}, rounds {args.rounds}", flush=True)
        summary, all_rows = {}, []
        for case in args.cases:
            base = {"case": case, **image_source(case, data), "data_dir": data["data_dir"], "shards": shards,
                    "steps": args.steps, "warmup": args.warmup}
            rows = []
            for rnd in range(args.rounds):
                for impl in IMPLS + (tuple(ABLATIONS) if args.ablate else ()):
                    r = run_row({**base, "impl": impl, "round": rnd}, args.threads)
                    rows.append(r)
                    print(f"  {case:7s} {impl:8s} round {rnd}: " + (f"ERROR {r['error']}" if "error" in r else
                          f"{r['wall_ms']:8.0f} ms/step wall, {r['cpu_ms']:8.0f} ms CPU ({r['sys_ms']:.0f} sys, "
                          f"{r['minflt']:.0f} faults)"), flush=True)
            all_rows += rows
            summary[case] = summarise(case, rows)
        print_table(summary)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": all_rows, "summary": summary}, indent=2) + "\n")
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args())
