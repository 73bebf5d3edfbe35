"""Sample images: prior export -> token grids -> tokenizer export -> PNG grid + single PNGs + tokens.npy.

``python sample.py --checkpoint runs/vqvae/export --checkpoint_t runs/prior/export --num_samples 16``
Deterministic for a fixed ``--seed`` (same device and dtype).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from .config import add_sampling_arguments
from .errors import CheckpointError, ConfigError
from .export import load_export
from .fsutil import atomic_write_bytes
from .launch import resolve_device
from .models.prior import Prior
from .models.vqvae import VQVAE
from .sampling import check_sampling_args, class_labels, decode_to_images, generate, save_image_grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="tokenizer export folder (stage 1)")
    p.add_argument("--checkpoint_t", required=True, help="prior export folder (stage 3)")
    p.add_argument("--output_dir", default="samples", help="where grid.png, images/ and tokens.npy go")
    add_sampling_arguments(p)
    return p


def load_pair(tokenizer_path: str, prior_path: str) -> tuple[VQVAE, Prior]:
    """Load both exports and refuse a prior trained on another tokenizer's codes."""
    tok_exp = load_export(tokenizer_path, expected_kind="vqvae")
    prior_exp = load_export(prior_path, expected_kind="prior")
    want = prior_exp.meta.get("tokenizer_sha256")
    if want and want != tok_exp.sha256:
        raise CheckpointError(
            f"the prior {prior_path} was trained on codes of tokenizer {want[:12]}..., but --checkpoint "
            f"{tokenizer_path} is tokenizer {tok_exp.sha256[:12]}...; pass the tokenizer the prior was trained with "
            f"(recorded path: {prior_exp.meta.get('tokenizer_path')})")
    tok, prior = VQVAE.from_export(tok_exp), Prior.from_export(prior_exp)
    if prior.config.vocab_size != tok.config.num_embeddings or \
            (prior.config.latent_h, prior.config.latent_w) != tuple(tok.config.latent_size):
        raise CheckpointError(
            f"prior vocabulary {prior.config.vocab_size} / grid {prior.config.latent_h}x{prior.config.latent_w} does "
            f"not match the tokenizer's codebook {tok.config.num_embeddings} / grid {tok.config.latent_size}")
    return tok.eval(), prior.eval()


def main(args: argparse.Namespace) -> Path:
    if args.num_samples <= 0 or args.sample_batch_size <= 0:
        raise ConfigError("--num_samples and --batch_size must be > 0")
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.cfg_scale)  # before loading anything
    device = resolve_device(args.device)
    tok, prior = load_pair(args.checkpoint, args.checkpoint_t)
    tok, prior = tok.to(device), prior.to(device)
    labels = class_labels(prior, args.num_samples, args.class_label)
    if labels is not None:
        labels = labels.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    tokens = generate(prior, args.num_samples, labels=labels, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, cfg_scale=args.cfg_scale, generator=g, batch_size=args.sample_batch_size,
                      autocast_dtype=dtype)  # tokens come back on the CPU
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        images = decode_to_images(tok, tokens, args.sample_batch_size)
    out = Path(args.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_image_grid(img[None], out / "images" / f"{i:05d}.png", nrow=1)
    np_tokens = tokens.cpu().numpy().astype(np.int32)
    import io

    buf = io.BytesIO()
    np.save(buf, np_tokens)
    atomic_write_bytes(out / "tokens.npy", buf.getvalue())
    if labels is not None:
        buf = io.BytesIO()
        np.save(buf, labels.cpu().numpy())
        atomic_write_bytes(out / "labels.npy", buf.getvalue())
    grid = out / "grid.png"
    save_image_grid(images, grid, nrow=int(math.ceil(math.sqrt(len(images)))), min_cell=48)
    print(f"wrote {len(images)} samples: {grid} (+ {out / 'images'}/, {out / 'tokens.npy'})", flush=True)
    return grid
