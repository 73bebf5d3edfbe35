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

from .config import SampleConfig

from .flags import validate
from .export import check_compatible
from .fsutil import atomic_write_bytes
from .launch import resolve_device
from .perf import keep_freed_memory
from .models.prior import Prior
from .models.tokenizer import load_tokenizer
from .sampling import class_labels, decode_to_images, generate, save_image_grid

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pair(tokenizer_path: str, prior_path: str) -> tuple[torch.nn.Module, Prior]:
    """Load both (eval mode; a vqgen export or a diffusers VQModel tokenizer, hf: refs too) and refuse a prior
    trained on another tokenizer's codes."""
    tok, prior = load_tokenizer(tokenizer_path)[0], Prior.from_export(prior_path)
    check_compatible(tokenizer=tok, prior=prior)
    return tok, prior


def run(cfg: SampleConfig) -> Path:
    """Generate ``cfg.sampling.num_samples`` images into ``cfg.output_dir``; returns the grid's path."""
    validate(cfg)  # before loading anything
    sc = cfg.sampling
    device = resolve_device(cfg.device)
    keep_freed_memory()  # decoding batches reuse the last batch's freed activations (vqgen/perf.py)
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
