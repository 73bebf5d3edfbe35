"""Sample images: prior export -> token grids -> tokenizer export -> PNG grid + single PNGs + tokens.npy.

``python sample.py --checkpoint runs/vqvae/export --checkpoint_t runs/prior/export --num_samples 16``
Deterministic for a fixed ``--seed`` (same device and dtype).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .config import SampleConfig, validate
from .errors import CheckpointError
from .export import load_export
from .fsutil import atomic_write_bytes
from .launch import resolve_device
from .models.prior import Prior
from .models.vqvae import VQVAE
from .sampling import class_labels, decode_to_images, generate, save_image_grid

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def run(cfg: SampleConfig) -> Path:
    """Generate ``cfg.sampling.num_samples`` images into ``cfg.output_dir``; returns the grid's path."""
    validate(cfg)  # before loading anything
    sc = cfg.sampling
    device = resolve_device(cfg.device)
    tok, prior = load_pair(cfg.checkpoint, cfg.checkpoint_t)
    tok, prior = tok.to(device), prior.to(device)
    labels = class_labels(prior, sc.num_samples, sc.class_label)
    if labels is not None:
        labels = labels.to(device)
    g = torch.Generator(device=device).manual_seed(sc.seed)
    dtype = AUTOCAST[cfg.mixed_precision]
    tokens = generate(prior, sc.num_samples, labels=labels, temperature=sc.temperature, top_k=sc.top_k,
                      top_p=sc.top_p, cfg_scale=sc.cfg_scale, generator=g, batch_size=cfg.batch_size,
                      autocast_dtype=dtype)  # tokens come back on the CPU
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        images = decode_to_images(tok, tokens, cfg.batch_size)
    out = Path(cfg.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_image_grid(img[None], out / "images" / f"{i:05d}.png", nrow=1)
    _save_npy(out / "tokens.npy", tokens.cpu().numpy().astype(np.int32))
    if labels is not None:
        _save_npy(out / "labels.npy", labels.cpu().numpy())
    grid = out / "grid.png"
    save_image_grid(images, grid, nrow=int(math.ceil(math.sqrt(len(images)))), min_cell=48)
    print(f"wrote {len(images)} samples: {grid} (+ {out / 'images'}/, {out / 'tokens.npy'})", flush=True)
    return grid


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())
