"""Choose a prior's sampling settings on held-out train images, for the export's ``generation_config.json``.

Each candidate of a small grid (guidance scale and schedule, temperature; temperature and top-k without classes)
draws ``--tune_samples`` samples with one seed; they are decoded and scored by their FID against up to
:data:`REFERENCE_IMAGES` train images (a seeded random subset; never the test split) in the dataset classifier's
features, the classifier evaluate.py trains and caches (:mod:`vqgen.eval.classifier`, same settings, same cache).
The lowest FID wins, conditional and unconditional settings separately; the built-in setting is always a candidate,
so the stored one is never worse on this reference. The search stops between candidates when ``--tune_minutes``
are spent. Inputs without class labels, and streams, Hub datasets or sets over 100k images without a cached classifier
are skipped with one note. bench/quality.py made the same choice by hand (docs/RESULTS.md section 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import __version__
from ..config import DATASETS, DataConfig, EvalConfig, TuneConfig
from ..data import build_dataset
from ..errors import VQGenError
from ..export import is_export
from ..models.sampling import class_labels, decode_to_images, generate
from . import classifier as C
from . import stream_stats
from .batches import GEN_CHUNK, new_set, split_batches
from .features import build_feature_space

REFERENCE_IMAGES, REFERENCE_SEED = 5000, 1   # held-out train images (bench/quality.py's carve: the last of a perm)
MAX_CLASSIFIER_IMAGES = 100_000              # train a classifier here only for MNIST/CIFAR-sized data
# Candidates in the order they are tried (the built-in setting first, then the likelier winners of bench/quality.py).
CONDITIONAL_GRID = (
    [dict(cfg_scale=1.0, cfg_schedule="constant", temperature=1.0)]
    + [dict(cfg_scale=c, cfg_schedule="linear", temperature=1.0) for c in (4.5, 3.0)]
    + [dict(cfg_scale=c, cfg_schedule="constant", temperature=1.0) for c in (2.0, 1.5, 3.0)]
    + [dict(cfg_scale=c, cfg_schedule=s, temperature=0.8) for c, s in ((4.5, "linear"), (2.0, "constant"),
                                                                         (3.0, "linear"), (1.5, "constant"))])
UNCONDITIONAL_TEMPERATURES, TOP_K_SHARE = (1.0, 0.9), 0.25   # top-k: a quarter of the vocabulary, or none


@dataclass
class Tuned:
    settings: dict       # mode -> draw settings
    chosen_by: dict      # how: grid, scores, seconds, reference, feature space


def unconditional_grid(vocab_size: int) -> list[dict]:
    k = max(1, int(vocab_size * TOP_K_SHARE))
    return [dict(temperature=t, top_k=top_k, top_p=1.0) for t in UNCONDITIONAL_TEMPERATURES for top_k in (0, k)]


def _full(setting: dict) -> dict:
    return {"top_k": 0, "top_p": 1.0, **setting}   # no top-k / nucleus filter


def tune_sampling(prior, tokenizer, dataset: str, data_dir: str, opts: TuneConfig, seed: int = 0,
                  log=print) -> Tuned | None:
    """The best settings of ``prior`` (decoded by ``tokenizer``) on held-out ``dataset`` train images, or None
    (with one note through ``log``) when they cannot be scored here."""
    t0 = time.perf_counter()
    device = next(prior.parameters()).device
    tc = tokenizer.config
    try:
        ecfg = EvalConfig(features="classifier", data=DataConfig(dataset=dataset, data_dir=data_dir))
        why = _not_here(dataset, data_dir)
        if why:
            log(f"note: sampling settings not tuned: {why}")
            return None
        train, info = build_dataset(dataset, "train", data_dir, tc.image_size, tc.in_channels)
        why = _unscorable(train, info, dataset, data_dir)
        if why:
            log(f"note: sampling settings not tuned: {why}")
            return None
        t = time.perf_counter()
        space = build_feature_space(ecfg, dataset, tc.image_size, tc.in_channels, device, log=log)
        classifier_s = time.perf_counter() - t
    except VQGenError as e:
        log(f"note: sampling settings not tuned: {str(e).splitlines()[0]}")
        return None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(REFERENCE_SEED))
    ref_idx = perm[-min(REFERENCE_IMAGES, len(train)):].tolist()
    ref = new_set(ecfg, len(ref_idx), space, 1)
    for idx, x, _ in split_batches(torch.utils.data.Subset(train, ref_idx), None, ecfg.batch_size):
        ref.update(*space.batch(x), idx)
    budget = 60 * opts.tune_minutes
    grids = {"unconditional": unconditional_grid(prior.config.vocab_size)}
    if prior.config.num_classes > 0:
        grids = {"conditional": [_full(s) for s in CONDITIONAL_GRID], **grids}
    left = sum(len(g) for g in grids.values())
    settings, trials, complete = {}, {}, True
    for mode, grid in grids.items():
        start = time.perf_counter()
        deadline = start + max(0.0, budget - (start - t0 - classifier_s)) * len(grid) / left
        left -= len(grid)
        trials[mode] = []
        for i, setting in enumerate(grid):
            if i and time.perf_counter() >= deadline:
                complete = False
                break
            t = time.perf_counter()
            fid = _fid(prior, tokenizer, space, ref, ecfg, setting, mode == "conditional", opts.tune_samples, seed)
            trials[mode].append({**setting, "fid": round(fid, 4), "seconds": round(time.perf_counter() - t, 2)})
        best = min(trials[mode], key=lambda r: r["fid"])
        settings[mode] = {k: v for k, v in best.items() if k not in ("fid", "seconds")}
    chosen_by = {
        "method": "lowest FID of the candidate's samples against held-out train images, in the dataset "
                  "classifier's features",
        "feature_space": space.info, "samples_per_setting": opts.tune_samples, "sample_seed": seed,
        "reference": {"dataset": dataset, "split": "train", "images": len(ref_idx), "of": len(train),
                      "subset_seed": REFERENCE_SEED},
        "trials": trials, "complete": complete, "budget_minutes": opts.tune_minutes,
        "classifier_seconds": round(classifier_s, 1), "seconds": round(time.perf_counter() - t0, 1),
        "vqgen_version": __version__}
    return Tuned(settings, chosen_by)


def _not_here(dataset: str, data_dir: str) -> str | None:
    """Inputs not opened here at all: streams and Hub datasets (a full download), unless a classifier is cached."""
    spec = DATASETS.get(dataset)
    if is_export(C.cache_dir(data_dir, dataset)) and not dataset.startswith("wds:"):
        return None
    if dataset.startswith(("hf:", "wds:")) or dataset.endswith(".tar") or "{" in dataset or (
            spec is not None and spec.source == "hf"):
        return (f"{dataset} is a stream or a Hub dataset without a cached feature classifier in "
                f"{C.cache_dir(data_dir, dataset)} (evaluate.py --features classifier caches one)")
    return None


def _unscorable(train, info, dataset: str, data_dir: str) -> str | None:
    if isinstance(train, torch.utils.data.IterableDataset):
        return f"{dataset} is a stream (the reference needs a map-style train split)"
    if info.num_classes < 2:
        return f"{dataset} has no class labels, so it has no feature classifier (pass --tune_sampling none)"
    if len(train) > MAX_CLASSIFIER_IMAGES and not is_export(C.cache_dir(data_dir, dataset)):
        return (f"no cached feature classifier in {C.cache_dir(data_dir, dataset)}, and training one on {len(train)} "
                f"images is not done here (evaluate.py --features classifier caches one)")
    return None


@torch.no_grad()
def _fid(prior, tokenizer, space, ref, ecfg: EvalConfig, setting: dict, conditional: bool, n: int,
         seed: int) -> float:
    """FID of ``n`` samples drawn with ``setting`` (labels cycling through the classes when ``conditional``)."""
    device = next(prior.parameters()).device
    labels = class_labels(prior, n, None, unconditional=not conditional)
    g = torch.Generator(device=device).manual_seed(seed)
    fake = new_set(ecfg, n, space, 1)
    for s in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - s)
        lab = labels[s:s + m].to(device) if labels is not None else None
        tokens = generate(prior, m, labels=lab, **setting, generator=g, batch_size=m)
        images = decode_to_images(tokenizer, tokens, ecfg.batch_size)
        fake.update(*space.batch(images), torch.arange(s, s + m))
    return stream_stats.frechet(ref, fake)
