"""Evaluate a run: tokenizer reconstruction over a split, prior samples vs the split, bits/token on held-out shards.

``python evaluate.py --run_dir runs/demo`` finds ``runs/demo/{vqvae,prior}/export`` and ``runs/demo/shards`` (the
layout of ``VQVAE_T.py --train``, see :func:`vqgen.pipeline.stage_dirs`); ``--checkpoint/--checkpoint_t/--shards``
name them one by one. Writes ``<run>/eval.json`` (atomically) and ``<run>/eval/{loss_curves,codebook_usage,
samples}.png`` and prints a table.

Metrics
  tokenizer  L1 / MSE (in [0, 1] units), PSNR (dB, per image, capped at 100), SSIM, codebook usage (share of the K
             codes used on the split), perplexity (exp entropy of the code histogram), rFID (split vs its
             reconstructions).
  prior      gFID and Inception Score of ``--num_samples`` samples against the split, k-NN manifold precision/recall
             (Kynkäänniemi et al. 2019) in the same feature space, the feature classifier's confidence and class
             coverage, and bits per token of the prior on the held-out token shards (``--split``).
  reference  the same FID/IS/precision/recall of the *train* split against the split: the floor a perfect
             generator would reach with this many images in this feature space.

Feature spaces (``--features``): see :mod:`vqgen.eval.features`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .. import shards
from ..errors import CheckpointError, ConfigError, VQGenError
from ..export import load_export
from ..fsutil import atomic_write_json
from ..launch import resolve_device
from ..sampling import class_labels
from . import metrics as M
from .features import FeatureSpace, build_feature_space, find_inception_weights
from .report import format_table, json_safe, plot_code_histogram, plot_loss_curves

EVAL_FORMAT_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--run_dir", default=None, help="run folder of VQVAE_T.py --train (holds vqvae/, prior/, shards/)")
    a("--checkpoint", default=None, help="tokenizer export (default: <run_dir>/vqvae/export)")
    a("--checkpoint_t", default=None, help="prior export (default: <run_dir>/prior/export; none: skip the prior)")
    a("--shards", default=None, help="token shard folder for bits/token (default: <run_dir>/shards)")
    a("--dataset", default=None, help="dataset to compare against (default: the one in the tokenizer export)")
    a("--data_dir", default="data", help="where datasets live (see vqgen/data.py)")
    a("--split", default="test", help="split for reconstruction, FID reference and bits/token")
    a("--max_images", type=int, default=None, help="use at most this many split images (default: all)")
    a("--num_samples", type=int, default=1000, help="images to generate for gFID/IS/precision/recall (0: skip)")
    a("--batch_size", type=int, default=256, help="images per batch (tokenizer, features, decoding)")
    a("--features", choices=["auto", "inception", "classifier"], default="auto",
      help="feature space of FID/IS/precision/recall (see the module docstring)")
    a("--inception_weights", default=None,
      help="Inception-v3 weights file (implies --features inception; an error if it does not exist)")
    a("--classifier_dir", default=None,
      help="root of the feature-classifier cache (default: --data_dir): <root>/classifier/<dataset>")
    a("--retrain_classifier", action="store_true", help="retrain the feature classifier even when cached")
    a("--classifier_epochs", type=int, default=15, help="epochs when the feature classifier is trained")
    a("--confidence_threshold", type=float, default=0.9, help="max softmax counted as a confident classification")
    a("--pr_k", type=int, default=3, help="k of the k-NN manifold precision/recall")
    a("--is_splits", type=int, default=10, help="splits of the Inception Score")
    a("--temperature", type=float, default=1.0, help="sampling temperature")
    a("--top_k", type=int, default=None, help="top-k sampling")
    a("--top_p", type=float, default=None, help="top-p (nucleus) sampling")
    a("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (conditional priors)")
    a("--seed", type=int, default=0, help="seed for sampling and the classifier")
    a("--output", default=None, help="eval JSON path (default: <run>/eval.json)")
    a("--no_plots", action="store_true", help="skip the PNG plots")
    a("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


# ------------------------------------------------------------------------------------------------ inputs
def _stage_root(export_path: Path) -> Path:
    """``runs/x/vqvae/export`` -> ``runs/x/vqvae`` (the folder holding metrics.jsonl)."""
    export_path = Path(export_path)
    return export_path.parent if export_path.name == "export" else export_path


def resolve_paths(args) -> dict:
    run = Path(args.run_dir) if args.run_dir else None
    if run is not None and not run.is_dir():
        raise ConfigError(f"--run_dir {run} does not exist (train first: python VQVAE_T.py --train --output_dir {run})")
    tok = Path(args.checkpoint) if args.checkpoint else (run / "vqvae" / "export" if run else None)
    if tok is None:
        raise ConfigError("pass --run_dir, or --checkpoint (tokenizer export) [--checkpoint_t --shards]")
    if not tok.exists():
        raise CheckpointError(f"tokenizer export {tok} not found (stage 1: python train_vqvae.py --output_dir ...)")
    prior = Path(args.checkpoint_t) if args.checkpoint_t else (run / "prior" / "export" if run else None)
    if args.checkpoint_t and not prior.exists():
        raise CheckpointError(f"prior export {prior} not found")
    if prior is not None and not prior.exists():
        prior = None  # a run without stage 3 yet: evaluate the tokenizer only
    shard_dir = Path(args.shards) if args.shards else (run / "shards" if run else None)
    if args.shards and not (shard_dir / shards.MANIFEST_NAME).exists():
        raise ConfigError(f"--shards {shard_dir} has no manifest.json (stage 2 not run or not finished)")
    root = run or _stage_root(tok).parent
    out = Path(args.output) if args.output else root / "eval.json"
    return {"run": run, "tokenizer": tok, "prior": prior, "shards": shard_dir, "root": root, "output": out,
            "plots": out.parent / (out.stem if out.stem != "eval" else "eval"),
            "stages": {"vqvae": _stage_root(tok), **({"prior": _stage_root(prior)} if prior else {})}}


# ------------------------------------------------------------------------------------------------ stages
def load_split(dataset: str, split: str, data_dir: str, image_size: int, channels: int,
               max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(N, C, H, W)`` in [-1, 1] and labels ``(N,)`` of a split (small demo splits fit in memory)."""
    from ..data import build_dataset

    ds, info = build_dataset(dataset, split, data_dir, image_size=image_size, channels=channels)
    if (info.image_size, info.channels) != (image_size, channels):
        raise ConfigError(f"dataset {dataset} gives {info.channels}x{info.image_size}px images, the tokenizer "
                          f"expects {channels}x{image_size}px")
    if isinstance(ds, torch.utils.data.IterableDataset):
        xs, ys, n = [], [], 0
        for x, y in ds:
            xs.append(x)
            ys.append(int(y))
            n += 1
            if max_images and n >= max_images:
                break
        return torch.stack(xs), torch.tensor(ys)
    if max_images:
        ds = torch.utils.data.Subset(ds, range(min(max_images, len(ds))))
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False))
    return torch.cat(xs), torch.cat(ys).long()


@torch.no_grad()
def eval_tokenizer(model, images: torch.Tensor, batch_size: int, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Reconstruct every image through codes (encode_to_indices -> decode_indices, never updating the codebook).
    Returns (metrics, code counts (K,), reconstructions (N, C, H, W) on the CPU)."""
    meter = M.ReconstructionMeter(model.config.num_embeddings)
    recons = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(device)
        idx = model.encode_to_indices(x)
        r = model.decode_indices(idx).float().clamp(-1, 1)
        meter.update(x, r, idx)
        recons.append(r.cpu())
    out = meter.compute()
    out.update(num_images=int(images.shape[0]), codebook_size=int(model.config.num_embeddings),
               codes_used=int((meter.counts > 0).sum()))
    return out, meter.counts, torch.cat(recons)


def generate_images(prior, tokenizer, n: int, args, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ..sampling import decode_to_images, generate

    labels = class_labels(prior, n, None)  # balanced: 0, 1, ..., C-1, 0, ...
    g = torch.Generator(device=device).manual_seed(args.seed)
    tokens = generate(prior, n, labels=labels.to(device) if labels is not None else None,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                      generator=g, batch_size=min(n, 512))
    return decode_to_images(tokenizer, tokens, batch_size=args.batch_size), labels


def sample_quality(space: FeatureSpace, real: tuple[torch.Tensor, torch.Tensor],
                   fake: tuple[torch.Tensor, torch.Tensor], args) -> dict:
    """FID / IS / precision-recall of fake (features, logits) against real, in one feature space."""
    (rf, _), (ff, fl) = real, fake
    out = {"fid": M.frechet_distance(rf, ff)}
    out["inception_score"], out["inception_score_std"] = M.inception_score(fl, args.is_splits, args.seed)
    out.update(M.precision_recall(rf, ff, k=args.pr_k))
    return out


@torch.no_grad()
def bits_per_token(prior, shard_dir: Path, split: str, batch_size: int, device) -> dict:
    """Mean cross-entropy of the prior on every token of ``split`` in the shards, in bits."""
    loader = shards.make_token_loader(shard_dir, split, batch_size=batch_size, shuffle=False, num_workers=0,
                                      hflip=False)
    total, count = M.token_nll(prior, loader, device)
    return {"bits_per_token": M.bits_per_token(total / max(1, count)), "tokens": count,
            "sequences": count // max(1, prior.config.seq_len), "split": split}


def check_prior_matches(prior, tok_export, manifest: dict | None) -> None:
    want = prior.export_meta.get("tokenizer_sha256")
    if want and want != tok_export.sha256:
        raise CheckpointError(f"the prior was trained on tokens of tokenizer {want[:12]}, but the tokenizer given is "
                              f"{tok_export.sha256[:12]} ({tok_export.path}); pass the matching --checkpoint")
    if manifest is not None:
        shards.check_tokenizer(manifest, tok_export)


# ---------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    from ..models.prior import Prior
    from ..models.vqvae import VQVAE

    t_start = time.perf_counter()
    if args.num_samples < 0 or args.batch_size < 1 or args.pr_k < 1:
        raise ConfigError("need --num_samples >= 0, --batch_size >= 1, --pr_k >= 1")
    if args.num_samples == 1:
        raise ConfigError("--num_samples 1: FID/precision/recall need at least 2 samples (or 0 to skip the prior)")
    find_inception_weights(args.inception_weights)                   # fail fast, before loading anything
    paths = resolve_paths(args)
    device = resolve_device(args.device)
    tok_export = load_export(paths["tokenizer"], expected_kind="vqvae")
    tokenizer = VQVAE.from_export(tok_export).to(device).eval()
    cfg = tokenizer.config
    dataset = args.dataset or (tok_export.meta.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError(f"{paths['tokenizer']} does not record its dataset; pass --dataset")
    prior = Prior.from_export(paths["prior"]).to(device).eval() if paths["prior"] else None
    manifest = None
    if paths["shards"] is not None and (paths["shards"] / shards.MANIFEST_NAME).exists():
        manifest = shards.read_manifest(paths["shards"])
    if prior is not None:
        check_prior_matches(prior, tok_export, manifest)

    seconds = {}
    t = time.perf_counter()
    images, labels = load_split(dataset, args.split, args.data_dir, cfg.image_size, cfg.in_channels, args.max_images)
    if images.shape[0] < 2:
        raise ConfigError(f"split {args.split!r} of {dataset} has {images.shape[0]} image(s); need at least 2")
    space = build_feature_space(args, dataset, cfg.image_size, cfg.in_channels, device)
    seconds["data_and_features"] = time.perf_counter() - t

    results: dict = {"format": "vqgen-eval", "format_version": EVAL_FORMAT_VERSION, "dataset": dataset,
                     "split": args.split, "feature_space": space.info,
                     "inputs": {"tokenizer": str(paths["tokenizer"]), "tokenizer_sha256": tok_export.sha256,
                                "prior": str(paths["prior"]) if paths["prior"] else None,
                                "shards": str(paths["shards"]) if manifest else None}}
    t = time.perf_counter()
    tok_metrics, counts, recons = eval_tokenizer(tokenizer, images, args.batch_size, device)
    real = space(images, args.batch_size)
    tok_metrics["rfid"] = M.frechet_distance(real[0], space(recons, args.batch_size)[0])
    tok_metrics["code_counts"] = [int(c) for c in counts]
    results["tokenizer"] = tok_metrics
    seconds["tokenizer"] = time.perf_counter() - t

    if prior is not None:
        pm: dict = {}
        if args.num_samples:
            t = time.perf_counter()
            fake_images, fake_labels = generate_images(prior, tokenizer, args.num_samples, args, device)
            seconds["sampling"] = time.perf_counter() - t
            t = time.perf_counter()
            fake = space(fake_images, args.batch_size)
            pm.update(num_samples=args.num_samples, pr_k=args.pr_k, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, cfg_scale=args.cfg_scale, **sample_quality(space, real, fake, args))
            if space.classifier is not None:
                logits = fake[1] if space.name == "classifier" else space.classifier(fake_images.to(device)).cpu()
                pm["classifier"] = M.classifier_stats(logits, space.classifier.config.num_classes,
                                                      args.confidence_threshold, fake_labels)
            results["reference"] = reference_scores(space, real, dataset, args, cfg, len(fake_images))
            seconds["sample_metrics"] = time.perf_counter() - t
            if not args.no_plots:
                from ..sampling import save_image_grid
                grid = fake_images[:64]
                results.setdefault("plots", {})["samples"] = str(save_image_grid(
                    grid, paths["plots"] / "samples.png", nrow=int(math.ceil(math.sqrt(len(grid))))))
        if manifest is not None and args.split in manifest.get("splits", {}):
            t = time.perf_counter()
            pm.update(bits_per_token(prior, paths["shards"], args.split, args.batch_size, device))
            seconds["bits_per_token"] = time.perf_counter() - t
        elif manifest is not None:
            print(f"note: no {args.split!r} split in {paths['shards']}: bits/token skipped", flush=True)
        results["prior"] = pm

    if not args.no_plots:
        plots = results.setdefault("plots", {})
        plots["loss_curves"] = str(plot_loss_curves(paths["stages"], paths["plots"] / "loss_curves.png"))
        plots["codebook_usage"] = str(plot_code_histogram(
            counts, paths["plots"] / "codebook_usage.png",
            f"{dataset}/{args.split}: {tok_metrics['codes_used']}/{tok_metrics['codebook_size']} codes used, "
            f"perplexity {tok_metrics['perplexity']:.1f}"))
    seconds["total"] = time.perf_counter() - t_start
    results["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    atomic_write_json(paths["output"], json_safe(results))
    print(format_table(results), flush=True)
    print(f"wrote {paths['output']}", flush=True)
    return results


def reference_scores(space: FeatureSpace, real, dataset: str, args, cfg, n: int) -> dict:
    """The same scores for up to ``n`` *train* images vs the split: what a perfect generator would get."""
    try:
        train_images, _ = load_split(dataset, "train", args.data_dir, cfg.image_size, cfg.in_channels, n)
    except VQGenError as e:
        return {"skipped": str(e)}
    out = sample_quality(space, real, space(train_images, args.batch_size), args)
    out["num_images"] = int(train_images.shape[0])
    return out
