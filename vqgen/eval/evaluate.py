"""Evaluate a run: tokenizer reconstruction over a split, prior samples vs the split, bits/token on held-out shards.

``python evaluate.py --run_dir runs/demo`` finds the exports and shards that ``VQVAE_T.py --train`` wrote
(:class:`vqgen.run_dir.PipelineLayout`; ``--checkpoint/--checkpoint_t/--shards`` name them one by one), writes
``<run>/eval.json`` (atomically) and ``<run>/eval/*.png`` and prints a table. The metrics: docs/NOTES.md; the
feature spaces: :mod:`vqgen.eval.features`. Memory does not grow with the number of images: everything passes one
batch at a time into accumulators (:mod:`vqgen.eval.batches`, :mod:`vqgen.eval.stream_stats`), and under
``accelerate launch`` the processes share the images and reduce the statistics.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import metrics as M
from .. import shards
from ..config import EvalConfig, check_kind_sampling, validate
from ..errors import CheckpointError, ConfigError
from ..export import check_compatible
from ..fsutil import atomic_write_json
from ..generation import peek_export, resolve_sampling
from ..hub import is_hub_ref, resolve_model_path
from ..images import save_image_grid
from ..launch import prepare_first, resolve_device, start_processes
from ..models.prior import load_prior, token_nll
from ..models.tokenizer import load_tokenizer
from ..preflight import tokenizer_data
from ..run_dir import PipelineLayout, RunDir
from . import stream_stats
from .batches import eval_real, eval_samples, open_split, reference_scores, split_size
from .features import FeatureSpace, build_feature_space, find_inception_weights
from .report import format_table, json_safe, plot_code_histogram, plot_loss_curves

EVAL_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class EvalInputs:
    """What one evaluation reads and writes, resolved from ``--run_dir`` or the explicit paths."""

    tokenizer: Path
    prior: Path | None                 # None: a run without stage 3 yet (evaluate the tokenizer only)
    shards: Path | None
    output: Path                       # eval.json
    plots: Path                        # folder of the PNG plots
    runs: dict[str, RunDir]            # "vqvae"/"prior" -> run folder (their metrics.jsonl feed the loss plot)
    names: dict[str, str]              # "tokenizer"/"prior" -> as eval.json records it (hf: refs as given)


def resolve_paths(cfg: EvalConfig) -> EvalInputs:
    layout = PipelineLayout(cfg.run_dir) if cfg.run_dir else None
    if layout is not None and not layout.root.is_dir():
        raise ConfigError(f"--run_dir {layout.root} does not exist (train first: python VQVAE_T.py --train "
                          f"--output_dir {layout.root})")
    # hf:<user>/<repo> -> its folder in the local Hub cache (vqgen.hub); outputs never go there
    tok = resolve_model_path(cfg.checkpoint) if cfg.checkpoint else (layout.vqvae.export if layout else None)
    if tok is None:
        raise ConfigError("pass --run_dir, or --checkpoint (tokenizer export) [--checkpoint_t --shards]")
    if not tok.exists():
        raise CheckpointError(f"tokenizer export {tok} not found (stage 1: python train_vqvae.py --output_dir ...)")
    prior = resolve_model_path(cfg.checkpoint_t) if cfg.checkpoint_t else (layout.prior.export if layout else None)
    if cfg.checkpoint_t and not prior.exists():
        raise CheckpointError(f"prior export {prior} not found")
    if prior is not None and not prior.exists():
        prior = None
    shard_dir = Path(cfg.shards) if cfg.shards else (layout.shards if layout else None)
    if cfg.shards and not (shard_dir / shards.MANIFEST_NAME).exists():
        raise ConfigError(f"--shards {shard_dir} has no manifest.json (stage 2 not run or not finished)")
    local = {name: p for name, ref, p in (("vqvae", cfg.checkpoint, tok), ("prior", cfg.checkpoint_t, prior))
             if p is not None and not is_hub_ref(ref)}  # models in a run folder (not the Hub cache)
    if layout is None and not local and not cfg.output:
        raise ConfigError("the models come from the Hub cache: pass --output (where eval.json goes) or --run_dir")
    root = layout.root if layout else (RunDir.of_export(next(iter(local.values()))).root.parent if local else None)
    out = Path(cfg.output) if cfg.output else PipelineLayout(root).eval_json
    runs = {name: RunDir.of_export(p) for name, p in local.items()}
    names = {"tokenizer": cfg.checkpoint if is_hub_ref(cfg.checkpoint) else str(tok),
             "prior": (cfg.checkpoint_t if is_hub_ref(cfg.checkpoint_t) else str(prior)) if prior else None}
    return EvalInputs(tok, prior, shard_dir, out, out.parent / out.stem, runs, names)


# ---------------------------------------------------------------------------------------------------- run
@torch.no_grad()
def bits_per_token(prior, manifest: shards.Manifest, split: str, batch_size: int, device,
                   verify: str = "full") -> dict:
    """Mean cross-entropy of the prior on every token of ``split`` in the shards, in bits, under the prior's
    ``nll_name``: ``bits_per_token`` for exact likelihoods; a MaskGIT prior's is ``masked_bits_per_token`` (the
    masked tokens of fixed-seed masks given the rest: not comparable with bits/token). ``verify``: the shard checks
    of :mod:`vqgen.shards.reader` (``full``: sizes first, then each shard's sha256 as it is read)."""
    shards.check_split(shards.TokenSplit.from_manifest(manifest, split), verify)
    loader = shards.make_token_loader(manifest, split, batch_size=batch_size, shuffle=False, num_workers=0,
                                      hflip=False, verify=verify)
    total, count = token_nll(prior, loader, device)
    out = {prior.nll_name: M.bits_per_token(total / max(1, count)), "tokens": count, "split": split}
    if prior.exact_likelihood:   # every token scored: the count of sequences follows
        out["sequences"] = count // max(1, prior.config.seq_len)
    return out


def run(cfg: EvalConfig) -> dict:
    """Evaluate as ``cfg`` says; the main process writes eval.json (+ plots); returns its content (every process).
    Under ``accelerate launch`` every process takes a share of the images and of the samples."""
    t_start = time.perf_counter()
    validate(cfg)
    find_inception_weights(cfg.inception_weights)                    # fail fast, before loading anything
    paths = resolve_paths(cfg)
    data, inherited = tokenizer_data(cfg.data, peek_export(paths.tokenizer))  # --dataset/--data_dir not given
    if not data.dataset:
        raise ConfigError(f"{paths.tokenizer} does not record its dataset; pass --dataset")
    cfg = dataclasses.replace(cfg, data=data)
    dataset = data.dataset
    rank, world, device, state = _processes(cfg)
    if inherited and rank == 0:
        print(inherited, flush=True)
    tokenizer, tok_export = load_tokenizer(paths.tokenizer)  # a vqgen export or a diffusers VQModel
    tokenizer = tokenizer.to(device).eval()
    prior = load_prior(paths.prior).to(device).eval() if paths.prior else None
    if prior is not None:  # flags > the prior's stored setting > built-in, recorded in eval.json
        draw, note = resolve_sampling(cfg.sampling, prior.config.num_classes, prior.generation_config, paths.prior)
        cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, **draw))
        if rank == 0:
            print(note, flush=True)
    manifest = None
    if paths.shards is not None and (paths.shards / shards.MANIFEST_NAME).exists():
        manifest = shards.Manifest.read(paths.shards)
    if prior is not None:
        check_compatible(tokenizer=tokenizer, prior=prior, shards=manifest)
        check_kind_sampling(prior.config.prior_kind, cfg.sampling.kind_kwargs())

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    tc = tokenizer.config
    # the data (and the feature classifier, trained when not cached) prepared once, then loaded by all
    with prepare_first(state, once=cfg.data.prepare_data_once, data_dir=cfg.data.data_dir):
        ds = open_split(dataset, cfg.split, cfg.data.data_dir, tc.image_size, tc.in_channels)
        space = build_feature_space(cfg, dataset, tc.image_size, tc.in_channels, device,
                                    log=print if rank == 0 else (lambda *a, **k: None))
    n_split = split_size(ds, cfg.max_images)
    if n_split is not None and n_split < 2:
        raise ConfigError(f"split {cfg.split!r} of {dataset} has {n_split} image(s); need at least 2")
    seconds["data_and_features"] = time.perf_counter() - t

    results: dict = {"format": "vqgen-eval", "format_version": EVAL_FORMAT_VERSION, "dataset": dataset,
                     "split": cfg.split, "feature_space": space.info, "processes": world,
                     "inputs": {"tokenizer": paths.names["tokenizer"], "tokenizer_sha256": tok_export.sha256,
                                "prior": paths.names["prior"],
                                "shards": str(paths.shards) if manifest else None}}
    t = time.perf_counter()
    results["tokenizer"], counts, real = tokenizer_section(tokenizer, ds, space, cfg, device, rank, world)
    seconds["tokenizer"] = time.perf_counter() - t
    if prior is not None:
        results["prior"] = prior_section(prior, tokenizer, space, real, dataset, manifest, paths, cfg, device,
                                         results, seconds, rank, world)
    if rank == 0:
        _write(results, counts, dataset, paths, cfg, seconds, t_start)
    if state is not None:
        state.wait_for_everyone()
    return results


def _processes(cfg: EvalConfig):
    """(rank, world size, device, PartialState or None): one process, or each process of ``accelerate launch``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(cfg.device), None
    state = start_processes()
    return state.process_index, state.num_processes, state.device, state


def _write(results: dict, counts, dataset: str, paths: EvalInputs, cfg: EvalConfig, seconds: dict,
           t_start: float) -> None:
    """Main process: plots, eval.json (atomically), the table."""
    if not cfg.no_plots:
        tm = results["tokenizer"]
        plots = results.setdefault("plots", {})
        plots["loss_curves"] = str(plot_loss_curves(paths.runs, paths.plots / "loss_curves.png"))
        plots["codebook_usage"] = str(plot_code_histogram(
            counts, paths.plots / "codebook_usage.png",
            f"{dataset}/{cfg.split}: {tm['codes_used']}/{tm['codebook_size']} codes used, "
            f"perplexity {tm['perplexity']:.1f}"))
    seconds["total"] = time.perf_counter() - t_start
    results["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    atomic_write_json(paths.output, json_safe(results))
    print(format_table(results), flush=True)
    print(f"wrote {paths.output}", flush=True)


def tokenizer_section(tokenizer, ds, space: FeatureSpace, cfg: EvalConfig, device, rank: int = 0, world: int = 1):
    """Reconstruction and codebook metrics + rFID; returns (metrics, code counts, the split's feature set)."""
    metrics, counts, real, recon = eval_real(tokenizer, space, ds, cfg, device, rank, world)
    metrics["rfid"] = stream_stats.frechet(real, recon)
    metrics["code_counts"] = [int(c) for c in counts]
    return metrics, counts, real


def prior_section(prior, tokenizer, space: FeatureSpace, real, dataset: str, manifest, paths: EvalInputs,
                  cfg: EvalConfig, device, results: dict, seconds: dict, rank: int = 0, world: int = 1) -> dict:
    """Sample metrics (+ the train-split reference and the sample grid) and held-out bits/token."""
    pm: dict = {}
    sc = cfg.sampling
    if sc.num_samples:
        t = time.perf_counter()
        fake, grid = eval_samples(prior, tokenizer, space, cfg, device, rank, world)
        seconds["sampling_and_features"] = time.perf_counter() - t
        conditional = prior.config.num_classes > 0 and not sc.unconditional
        pm.update(num_samples=sc.num_samples, pr_k=cfg.pr_k, conditional=conditional, **sc.draw_kwargs(),
                  label_mode=sc.label_mode,
                  **stream_stats.quality(real, fake, cfg.pr_k))
        if space.classifier is not None:
            pm["classifier"] = fake.classifier_stats(with_labels=conditional)
        t = time.perf_counter()
        results["reference"] = reference_scores(space, real, dataset, cfg, tokenizer.config, sc.num_samples, rank,
                                                world)
        seconds["reference"] = time.perf_counter() - t
        if not cfg.no_plots and rank == 0:
            results.setdefault("plots", {})["samples"] = str(save_image_grid(
                grid, paths.plots / "samples.png", nrow=int(math.ceil(math.sqrt(len(grid))))))
    if manifest is not None and cfg.split in manifest.splits and rank == 0:
        t = time.perf_counter()
        pm.update(bits_per_token(prior, manifest, cfg.split, cfg.batch_size, device, cfg.reader.verify_shards))
        seconds["bits_per_token"] = time.perf_counter() - t
    elif manifest is not None and rank == 0:
        print(f"note: no {cfg.split!r} split in {paths.shards}: bits/token skipped", flush=True)
    return pm
