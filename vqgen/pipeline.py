"""``VQVAE_T.py``: the one-command front end with the original tool's (GenerativeZoo VQVAE_T.py) flags.

``--train`` runs stages 1-3 under ``<output_dir>/{vqvae,shards,prior}`` (:class:`vqgen.run_dir.PipelineLayout`); each
stage resumes where it stopped and a rerun skips the finished ones. ``--sample`` writes ``<output_dir>/samples`` from
``--checkpoint``/``--checkpoint_t`` (default: the exports of ``--train``). :func:`stage_configs` builds each stage's
config from the pipeline's (no argv round trip): shared parts are copied, the training values named in
:data:`vqgen.config.PIPELINE_TRAINING` go to both trainers, and each trainer keeps its own defaults for the rest.
Unlike the original: list flags take lists, the prior depth and ``--num_samples`` are honoured, and the VQ-VAE stays
frozen while the prior trains.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from . import extract, sample
from .config import (
    PIPELINE_TRAINING,
    ExtractConfig,
    PipelineConfig,
    PriorStageConfig,
    SampleConfig,
    VQVAEStageConfig,
    validate,
)
from .export import is_export
from .run_dir import PipelineLayout, RunDir
from .shards import has_split
from .train import prior_task, vqvae_task


def layout(cfg: PipelineConfig) -> PipelineLayout:
    return PipelineLayout(cfg.output_dir or Path("runs") / Path(str(cfg.data.dataset)).name)


def _training(cfg: PipelineConfig, stage_default, run: RunDir, **own):
    """A trainer's TrainConfig: its stage defaults, the values the pipeline shares (None: the stage's own, e.g. the
    batch size when --batch_size is not given), its folder, resume if begun."""
    shared = {name: getattr(cfg.training, name) for name in PIPELINE_TRAINING
              if getattr(cfg.training, name) is not None}
    return dataclasses.replace(stage_default, **{**shared, **own}, output_dir=str(run.root),
                               resume="latest" if run.holds_run() else None)


def stage_configs(cfg: PipelineConfig) -> dict:
    """The config of every stage the pipeline runs: ``vqvae``, ``extract`` (both splits), ``prior``, ``sample``."""
    d = layout(cfg)
    vqvae = VQVAEStageConfig(data=dataclasses.replace(cfg.data), model=dataclasses.replace(cfg.vqvae))
    vqvae.train = _training(cfg, vqvae.train, d.vqvae)
    ext = ExtractConfig(checkpoint=str(d.vqvae.export), split=["train", "test"], output_dir=str(d.shards),
                        batch_size=cfg.training.batch_size or ExtractConfig.batch_size, no_progress=False,
                        sharding=dataclasses.replace(cfg.sharding), data=dataclasses.replace(cfg.data))
    prior = PriorStageConfig(shards=str(d.shards), checkpoint=str(d.vqvae.export), num_workers=cfg.data.num_workers,
                             model=dataclasses.replace(cfg.prior), sampling=dataclasses.replace(cfg.sampling),
                             tuning=dataclasses.replace(cfg.tuning))
    pt = cfg.prior_training
    prior.train = _training(cfg, prior.train, d.prior, lr=pt.lr, n_epochs=pt.n_epochs, warmup_steps=pt.warmup_steps,
                            **({"batch_size": pt.batch_size} if pt.batch_size is not None else {}))
    smp = SampleConfig(checkpoint=cfg.checkpoint or str(d.vqvae.export),
                       checkpoint_t=cfg.checkpoint_t or str(d.prior.export), output_dir=str(d.samples),
                       sampling=dataclasses.replace(cfg.sampling, seed=cfg.training.seed))
    return {"vqvae": vqvae, "extract": ext, "prior": prior, "sample": smp}


def _stage(name: str, cfg) -> None:
    print(f"\n== {name}: {type(cfg).PROG} ({type(cfg).__name__})", flush=True)


def run(cfg: PipelineConfig) -> None:
    """``--train`` then ``--sample``; a trainer stopped early (preemption/stop file) ends the chain cleanly."""
    validate(cfg)
    d, stages = layout(cfg), stage_configs(cfg)
    if cfg.train:
        if is_export(d.vqvae.export):
            print(f"stage 1: {d.vqvae.export} exists, skipping", flush=True)
        elif not _train("stage 1", vqvae_task.run, stages["vqvae"]):
            return
        for split in stages["extract"].split:
            if has_split(d.shards, split):
                print(f"stage 2: {split} shards in {d.shards} complete, skipping", flush=True)
                continue
            ext = dataclasses.replace(stages["extract"], split=[split])
            _stage("stage 2", ext)
            extract.run(ext)
        if is_export(d.prior.export):
            print(f"stage 3: {d.prior.export} exists, skipping", flush=True)
        elif not _train("stage 3", prior_task.run, stages["prior"]):
            return
    if cfg.sample and int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch: main process only
        _stage("sampling", stages["sample"])
        sample.run(stages["sample"])


def _train(name: str, run_stage, cfg) -> bool:
    """Run one trainer in-process; False (with a note) when it stopped before the end."""
    _stage(name, cfg)
    if run_stage(cfg).state.finished:
        return True
    print(f"{name} stopped before the end; rerun the same command to continue", flush=True)
    return False
