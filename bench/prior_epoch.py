"""Stage-3 data path: prior training from token shards vs the original tool's way (encode images every batch).

    python bench/prior_epoch.py [--batches 6 --batch_size 128 --image_size 32]

The original VQVAE_T.py trains its transformer on ``vqvae.index_quantize(images)`` computed batch by batch, so
every prior step also pays an image load + a VQ-VAE encoder forward. vqgen encodes once (stage 2) and the prior
streams token shards. Both sides here run the same prior training steps (forward + loss + backward + AdamW) on
the same images/tokens at the original tool's default sizes (VQ-VAE 256/256 channels, 2 levels, 256 x 32 codes,
prior 96/12/8; 32x32 digits -> 8x8 tokens, batch 128), one run, alternating sides; it prints samples/s of each
and the ratio (target >= 2x). The encoder uses random weights: its cost does not depend on training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen import extract  # noqa: E402
from vqgen.config import ExtractConfig, PriorConfig, load_config  # noqa: E402
from vqgen.data import build_dataset  # noqa: E402
from vqgen.models.prior import Prior  # noqa: E402
from vqgen.models.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from vqgen.shards import make_token_loader  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=6, help="timed training batches per side (after 1 warm-up)")
    p.add_argument("--batch_size", type=int, default=128, help="batch size (the original tool's default)")
    p.add_argument("--image_size", type=int, default=32, help="image size (32: MNIST as the original tool pads it)")
    p.add_argument("--width", type=int, default=256, help="VQ-VAE channels per level (original default 256)")
    p.add_argument("--dim", type=int, default=96, help="prior width (--attn_layers_dim)")
    p.add_argument("--depth", type=int, default=12, help="prior depth (--attn_layers_depth)")
    p.add_argument("--heads", type=int, default=8, help="prior heads (--attn_layers_heads)")
    p.add_argument("--num_workers", type=int, default=0, help="loader workers on both sides (original default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args(argv)


def train_steps(prior, opt, batches, device) -> float:
    """Run one prior training step per (tokens, labels) from ``batches``; returns seconds."""
    t0 = time.perf_counter()
    n = 0
    for tokens, labels in batches:
        tokens, labels = tokens.to(device), labels.to(device)
        logits = prior(tokens, labels).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += 1
    return time.perf_counter() - t0


def on_the_fly(loader, vqvae, device, limit):
    """The original tool's data path: images -> encoder -> indices, every batch."""
    for i, (images, labels) in enumerate(loader):
        if i >= limit:
            return
        with torch.no_grad():
            idx = vqvae.encode_to_indices(images.to(device))
        yield idx.flatten(1), labels


def from_shards(loader, limit):
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        yield batch


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cfg = VQVAEConfig(in_channels=1, image_size=args.image_size, num_channels=(args.width, args.width),
                          num_res_channels=(args.width, args.width))
        VQVAE(cfg).export_to(tmp / "vqvae")
        vqvae = VQVAE.from_export(tmp / "vqvae").to(device).eval()
        h, w = cfg.latent_size
        ext = load_config(ExtractConfig,
            ["--checkpoint", str(tmp / "vqvae"), "--dataset", "digits", "--data_dir", str(tmp / "data"),
             "--image_size", str(args.image_size), "--output_dir", str(tmp / "shards"), "--no_progress"])
        print("stage 2 (not timed): encoding digits once into shards ...", flush=True)
        extract.run(ext)
        ds, info = build_dataset("digits", "train", str(tmp / "data"), image_size=args.image_size)
        img_loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                                 num_workers=args.num_workers, drop_last=True)
        pcfg = PriorConfig(vocab_size=cfg.num_embeddings, latent_h=h, latent_w=w, attn_layers_dim=args.dim,
                           attn_layers_depth=args.depth,
                           attn_layers_heads=args.heads, num_classes=info.num_classes)
        results = {}
        for side in ("warmup", "original", "vqgen", "original2", "vqgen2"):
            torch.manual_seed(0)
            prior = Prior(pcfg).to(device).train()
            opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
            limit = 1 if side == "warmup" else args.batches
            if side.startswith("original") or side == "warmup":
                batches = on_the_fly(img_loader, vqvae, device, limit)
            else:
                tok_loader = make_token_loader(tmp / "shards", "train", batch_size=args.batch_size, seed=0,
                                               num_workers=args.num_workers, drop_last=True)
                batches = from_shards(tok_loader, limit)
            secs = train_steps(prior, opt, batches, device)
            results.setdefault(side.rstrip("2"), []).append(secs)
    samples = args.batches * args.batch_size
    orig = samples / min(results["original"])
    ours = samples / min(results["vqgen"])
    print(f"\ndevice={device.type} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"image={args.image_size} tokens={h}x{w} prior={args.dim}/{args.depth}/{args.heads} "
          f"vqvae width={args.width}, best of 2 runs of {args.batches} batches")
    print(f"{'path':<40}{'samples/s':>12}")
    print(f"{'original (encode images every batch)':<40}{orig:>12.1f}")
    print(f"{'vqgen (token shards)':<40}{ours:>12.1f}")
    ratio = ours / orig
    print(f"ratio vqgen/original: {ratio:.2f}x (target >= 2x)")
    return ratio


if __name__ == "__main__":
    main()
