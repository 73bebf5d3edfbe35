"""Sample images: prior export -> token grids -> tokenizer export -> PNG grid + single PNGs + tokens.npy.

``python sample.py --checkpoint runs/vqvae/export --checkpoint_t runs/prior/export --num_samples 16``
Deterministic for a fixed ``--seed`` (same device and dtype). Constant memory in ``--num_samples``: images are
generated, decoded and written chunk by chunk (``--batch_size``), the grid shows the first ``--grid_images``, and
``--npz`` writes ``samples.npz`` in the ADM / LlamaGen evaluator's layout as rows arrive (:mod:`vqgen.npz_stream`).
Sampling values not given come from the prior's stored setting (:mod:`vqgen.generation`), else the built-in ones.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch

from .config import SampleConfig, check_kind_sampling, validate
from .export import check_compatible
from .fsutil import atomic_write_bytes
from .generation import resolve_sampling
from .images import save_image_grid
from .launch import resolve_device
from .models.prior import Prior, load_prior
from .models.sampling import class_labels, decode_to_images, generate
from .models.tokenizer import load_tokenizer
from .npz_stream import NpzWriter, to_uint8_nhwc
from .perf import keep_freed_memory
from .preflight import sample_exports

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pair(tokenizer_path: str, prior_path: str) -> tuple[torch.nn.Module, Prior]:
    """Load both (eval mode; a vqgen export or a diffusers VQModel tokenizer, hf: refs too) and refuse a prior
    trained on another tokenizer's codes."""
    tok, prior = load_tokenizer(tokenizer_path)[0], load_prior(prior_path)
    check_compatible(tokenizer=tok, prior=prior)
    return tok, prior


def run(cfg: SampleConfig) -> Path:
    """Generate ``cfg.sampling.num_samples`` images into ``cfg.output_dir``; returns the grid's path."""
    validate(cfg)  # before loading anything
    sample_exports(cfg)  # the exports exist, --class_label fits the prior's classes
    sc = cfg.sampling
    device = resolve_device(cfg.device)
    keep_freed_memory()  # decoding batches reuse the last batch's freed activations (vqgen/perf.py)
    tok, prior = load_pair(cfg.checkpoint, cfg.checkpoint_t)
    check_kind_sampling(prior.config.prior_kind, sc.kind_kwargs())  # e.g. --decode_steps for an AR prior: now
    tok, prior = tok.to(device), prior.to(device)
    labels = class_labels(prior, sc.num_samples, sc.class_label, sc.label_mode, sc.seed,
                          unconditional=sc.unconditional)
    if labels is not None:
        labels = labels.to(device)
    draw, note = resolve_sampling(sc, prior.config.num_classes, prior.generation_config, prior.export_path)
    print(note, flush=True)
    out = Path(cfg.output_dir)
    (out if cfg.no_png else out / "images").mkdir(parents=True, exist_ok=True)
    tokens, grid_images = _generate_and_write(tok, prior, labels, draw, cfg, device, out)
    _save_npy(out / "tokens.npy", tokens.numpy().astype(np.int32))
    if labels is not None:
        _save_npy(out / "labels.npy", labels.cpu().numpy())
    grid = out / "grid.png"
    save_image_grid(grid_images, grid, nrow=int(math.ceil(math.sqrt(len(grid_images)))), min_cell=48)
    print(f"wrote {sc.num_samples} samples: {grid} (first {len(grid_images)}) + {out / 'tokens.npy'}"
          + ("" if cfg.no_png else f", {out / 'images'}/") + (f", {out / 'samples.npz'}" if cfg.npz else ""),
          flush=True)
    return grid


def _generate_and_write(tok, prior, labels, draw: dict, cfg: SampleConfig, device, out: Path):
    """Generate, decode and write chunk by chunk (one chunk of images in memory; tokens are small and kept).
    One generator drawn chunk after chunk: the same tokens as one ``generate`` call with this batch size.
    Returns (all tokens [N, h*w] on the CPU, the first ``grid_images`` images)."""
    sc, n_total = cfg.sampling, cfg.sampling.num_samples
    g = torch.Generator(device=device).manual_seed(sc.seed)
    dtype = AUTOCAST[cfg.mixed_precision]
    size = tok.config.image_size
    npz = NpzWriter(out / "samples.npz", n_total, size, size) if cfg.npz else contextlib.nullcontext()
    tokens, grid = [], []
    with npz as npz_out:
        for s in range(0, n_total, cfg.batch_size):
            n = min(cfg.batch_size, n_total - s)
            chunk = generate(prior, n, labels=labels[s:s + n] if labels is not None else None,
                             **draw, generator=g, batch_size=n, autocast_dtype=dtype,
                             compile=sc.compile)  # tokens come back on the CPU
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                images = decode_to_images(tok, chunk, cfg.batch_size)
            tokens.append(chunk.cpu())
            if not cfg.no_png:
                for i, img in enumerate(images):
                    save_image_grid(img[None], out / "images" / f"{s + i:05d}.png", nrow=1)
            if npz_out is not None:
                npz_out.write(to_uint8_nhwc(images))
            room = cfg.grid_images - sum(len(x) for x in grid)
            if room > 0:
                grid.append(images[:room])
    prior.release_caches()  # --compile keeps them from chunk to chunk
    return torch.cat(tokens), torch.cat(grid)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())
