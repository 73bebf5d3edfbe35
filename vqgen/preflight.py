"""What every script checks before torch is imported (:func:`vqgen.cli.run_cli` runs :func:`check` between parsing
the flags and importing the stage): the flag values, the model folders and ``hf:`` refs, whether the data is on disk,
sampling values against the prior's config. A wrong input then fails in about a second instead of after the imports
and the model loads; the stages repeat these checks when called in-process, so nothing depends on this module.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import (
    DATASETS,
    DataConfig,
    EvalConfig,
    ExtractConfig,
    PipelineConfig,
    PriorStageConfig,
    SampleConfig,
    VQVAEStageConfig,
    validate,
)
from .config.datasets import IDX_CLASSES, SYSTEM_DIRS, how_idx
from .generation import ExportPeek, check_class_label, peek_export
from .offline import check_download, how_registry, unavailable
from .run_dir import PipelineLayout

DEFAULT_DATA_DIR = "data"


def check(cfg) -> None:
    """The checks of ``cfg``'s stage (nothing for a config class without any)."""
    validate(cfg)
    fn = CHECKS.get(type(cfg))
    if fn is not None:
        fn(cfg)


# ------------------------------------------------------------------------------------------------------- data
def dataset_on_disk(name: str | None, data_dir: str, split: str = "train") -> None:
    """DatasetUnavailableError now when a registry dataset is not on disk and cannot be downloaded (offline, or its
    host unreachable within 2 s): the check :mod:`vqgen.data` makes after importing torch, made before. Anything
    that may be on disk is left to the loader, which has the last word."""
    spec = DATASETS.get(name or "")
    if spec is None or spec.source in ("digits", "hf"):
        return
    root = Path(data_dir)
    places = [root / spec.subdir.split("/")[0]]
    if spec.source == "medmnist":
        places = [root / spec.subdir]
    elif spec.source == "tinyimagenet":
        places = [root / spec.subdir / "train"]
    elif spec.target in IDX_CLASSES:  # extracted files, archives, a package's copy, the user-cache copy
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqgen"
        places = [root / spec.target / "raw", *map(Path, SYSTEM_DIRS.get(spec.target, ())),
                  cache / spec.target / "raw"]
    if any(p.exists() and (p.is_file() or any(p.iterdir())) for p in places):
        return
    looked = " and ".join(str(p) for p in places)
    how = how_registry(name, split, spec.subdir, data_dir) + how_idx(spec.target, data_dir)
    if spec.source == "tinyimagenet":
        raise unavailable(name, "vqgen never downloads it (local folder only)", looked, how)
    check_download(name, True, spec.host, spec.port, looked, how)


def tokenizer_data(data: DataConfig, tok: ExportPeek | None) -> tuple[DataConfig, str | None]:
    """``data`` with ``--dataset``/``--data_dir``/``--image_size`` that were not given taken from what the tokenizer
    export records (its training data; the transform follows from the tokenizer's image size and channels), and one
    line saying so (None when nothing was taken)."""
    recorded = tok.dataset if tok is not None else {}
    took = {}
    if data.dataset is None and recorded.get("name"):
        took["dataset"] = recorded["name"]
    if data.data_dir is None:
        took["data_dir"] = recorded.get("data_dir") or DEFAULT_DATA_DIR
    if data.image_size is None and recorded.get("image_size"):
        took["image_size"] = int(recorded["image_size"])
    out = dataclasses.replace(data, **took)
    if "dataset" not in took and not (recorded.get("data_dir") and "data_dir" in took):
        return out, None  # nothing the user did not say (the image size and transform are the tokenizer's anyway)
    flags = " ".join(f"--{k} {v}" for k, v in took.items() if k != "data_dir" or recorded.get("data_dir"))
    return out, (f"data: {flags} as the tokenizer export {tok.path} records (its transform; flags override)")


# ----------------------------------------------------------------------------------------------------- stages
def _train_vqvae(cfg: VQVAEStageConfig) -> None:
    dataset_on_disk(cfg.data.dataset, cfg.data.data_dir)


def _extract(cfg: ExtractConfig) -> None:
    data, _ = tokenizer_data(cfg.data, peek_export(cfg.checkpoint, "--checkpoint"))
    for split in cfg.split:
        if split in ("train", "test"):
            dataset_on_disk(data.dataset, data.data_dir, split)


def _train_prior(cfg: PriorStageConfig) -> None:
    if cfg.checkpoint:
        peek_export(cfg.checkpoint, "--checkpoint")


def sample_exports(cfg: SampleConfig) -> tuple[ExportPeek, ExportPeek]:
    """Both exports exist (hf: refs in the cache), the prior is a prior, ``--class_label`` fits its classes."""
    tok = peek_export(cfg.checkpoint, "--checkpoint")
    prior = peek_export(cfg.checkpoint_t, "--checkpoint_t").check_kind("prior", cfg.checkpoint_t)
    check_class_label(cfg.sampling, prior.num_classes)
    return tok, prior


def _evaluate(cfg: EvalConfig) -> None:
    layout = PipelineLayout(cfg.run_dir) if cfg.run_dir else None
    tok_ref = cfg.checkpoint or (layout.vqvae.export if layout and layout.vqvae.export.exists() else None)
    if tok_ref is None:
        return  # evaluate.py says what is missing
    data, _ = tokenizer_data(cfg.data, peek_export(tok_ref, "--checkpoint"))
    dataset_on_disk(data.dataset, data.data_dir, "test")
    if cfg.checkpoint_t:
        peek_export(cfg.checkpoint_t, "--checkpoint_t").check_kind("prior", cfg.checkpoint_t)


def _pipeline(cfg: PipelineConfig) -> None:
    d = PipelineLayout(cfg.output_dir or Path("runs") / Path(str(cfg.data.dataset)).name)
    if cfg.train and not (d.vqvae.export.exists() and (d.shards / "manifest.json").exists()):
        dataset_on_disk(cfg.data.dataset, cfg.data.data_dir)
    if cfg.sample and not cfg.train:
        sample_exports(SampleConfig(checkpoint=cfg.checkpoint or str(d.vqvae.export),
                                    checkpoint_t=cfg.checkpoint_t or str(d.prior.export), sampling=cfg.sampling))


CHECKS = {VQVAEStageConfig: _train_vqvae, ExtractConfig: _extract, PriorStageConfig: _train_prior,
          SampleConfig: sample_exports, EvalConfig: _evaluate, PipelineConfig: _pipeline}
