"""Stage 3: train the Transformer prior (any ``--prior_kind``) on token shards (``accelerate launch train_prior.py``).

Reads only the shards written by stage 2 (never images, never the encoder): vocabulary, sequence length and
class count come from the shard manifest. The tokenizer export is loaded on the main process only to decode
sample grids, and must be the one the shards were made with (manifest sha256). Each rank reads ~1/W of the split
(:mod:`vqgen.shards.reader`); a checkpoint stores the reader's spec, so a resume on another world size continues
the interrupted epoch with the samples it had not seen (:func:`vqgen.shards.plan.resume_history`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..config import PriorStageConfig, validate
from ..errors import CheckpointError, ConfigError
from ..eval.tune import tune_sampling
from ..export import ExportMeta, check_compatible
from ..generation import write_generation_config
from ..hub import is_hub_ref, resolve_model_path
from ..images import save_image_grid
from ..launch import fsdp_launch
from ..metrics import bits_per_token
from ..models.prior import Prior, build_prior, token_cross_entropy, token_nll
from ..models.sampling import class_labels, decode_to_images, generate
from ..models.tokenizer import load_tokenizer
from ..shards import (
    Manifest,
    PlanSpec,
    ResumePoint,
    TokenLoader,
    TokenSplit,
    TokenStream,
    check_split,
    make_token_loader,
    resume_history,
)
from .checkpointing import map_style_resume
from .ema import WeightsEMA
from .loop import TrainLoop
from .setup import prepare_training
from .task import StageTask
from .throughput import Work


class PriorTask(StageTask):
    """Stage-3 plug-in for :class:`TrainLoop`."""

    name = "prior"

    def __init__(self, cfg: PriorStageConfig, model: Prior, manifest: Manifest, tokenizer_sha: str,
                 tokenizer_path: str | None):
        self.cfg, self.model, self.manifest, self.tokenizer_sha = cfg, model, manifest, tokenizer_sha
        self.tokenizer_path = tokenizer_path  # decodes the sample grids (None: no grids)
        self.conditional = model.config.num_classes > 0
        self.last_metrics: dict[str, float] = {}
        self._tokenizer = None
        self.world_size, self.epoch = 1, 0
        self._history: list[ResumePoint] = []  # interrupted runs of epoch self._history_epoch under other specs
        self._history_epoch: int | None = None
        self.ema = None  # --prior_ema_decay: an AveragedModel of the weights (bind), in every checkpoint
        self._loop: TrainLoop | None = None

    def work(self) -> Work:
        return Work("tokens", self.model.config.seq_len, self.model.flops_per_token())

    def bind(self, loop: TrainLoop, prepared: list) -> None:
        self._loop = loop  # its step count drives schedules over the run (--order random's annealing)
        if self.cfg.prior_ema_decay > 0:
            self.ema = WeightsEMA(loop, self.cfg.prior_ema_decay)

    def after_step(self, loop: TrainLoop) -> None:
        if self.ema is not None:
            self.ema.update(loop.unwrapped_model)

    def sampling_model(self, loop: TrainLoop) -> Prior:
        """The weights validated, sampled and exported: the EMA when there is one."""
        return self.ema.model if self.ema is not None else loop.whole_model

    def model_from_state_dict(self, state: dict) -> Prior:
        model = build_prior(self.model.config)
        model.load_state_dict(state)
        return model

    def configure_optimizers(self, train, device_type: str) -> list[torch.optim.Optimizer]:
        return [self.model.configure_optimizer(train.lr, train.weight_decay, device_type)]

    def reader_spec(self, world_size: int) -> PlanSpec:
        """Everything besides (epoch, rank) that decides a rank's batches (saved in checkpoints)."""
        r = self.cfg.reader
        return PlanSpec(batch_size=self.cfg.train.batch_size, world_size=world_size, seed=self.cfg.train.seed,
                        shuffle_buffer=self.cfg.shuffle_buffer, streams=r.reader_streams, resampled=r.resampled,
                        epoch_samples=r.epoch_samples)

    def batches_per_epoch(self, world_size: int) -> int:
        self.world_size = world_size
        return self.reader_spec(world_size).num_batches(self.manifest.split(self.cfg.split).total)

    def history(self, epoch: int) -> list[ResumePoint]:
        return self._history if epoch == self._history_epoch else []

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int):
        self.world_size, self.epoch = world_size, epoch
        stream = TokenStream(TokenSplit.from_manifest(self.manifest, self.cfg.split), self.reader_spec(world_size),
                             epoch=epoch, rank=rank, skip_batches=skip_batches, verify=self.cfg.reader.verify_shards,
                             history=self.history(epoch))
        return TokenLoader(stream, num_workers=self.cfg.num_workers)

    def data_state(self) -> dict:
        return {"world_size": self.world_size, "batch_size": self.cfg.train.batch_size,
                "num_workers": self.cfg.num_workers,
                "reader": {"spec": dataclasses.asdict(self.reader_spec(self.world_size)), "epoch": self.epoch,
                           "history": [p.to_dict() for p in self.history(self.epoch)]}}

    def resume_batches(self, saved: dict | None, epoch: int, batches_done: int, world_size: int):
        """Same reader spec: skip the batches done (exact). Another one (world size, batch, streams...) mid-epoch:
        continue with the samples the interrupted run had not seen, each once, and say so."""
        self.world_size, reader = world_size, (saved or {}).get("reader")
        if reader is None:  # a checkpoint of the older whole-shard reader: another sample order
            skip, _ = map_style_resume(saved, epoch, batches_done, world_size, self.cfg.train.batch_size)
            return skip, (f"warning: this checkpoint was written by an older vqgen token reader: the epoch "
                          f"continues after the first {skip} batches of the new order, not exactly "
                          f"where it stopped") if skip else None
        saved_history = [ResumePoint.from_dict(p) for p in reader["history"]] if reader["epoch"] == epoch else []
        try:
            history, skip, warning = resume_history(saved_history, PlanSpec.from_dict(reader["spec"]), batches_done,
                                                    self.reader_spec(world_size))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self._history, self._history_epoch = history, epoch
        return skip, warning

    def _labels(self, labels: torch.Tensor):
        return labels if self.conditional else None

    def progress(self) -> float:
        """Optimizer steps done / the run's steps: a function of the step, so a resumed run sees the same values."""
        loop = self._loop
        return loop.state.global_step / max(1, loop.total_steps) if loop is not None else 0.0

    def compute_loss(self, model, batch):
        tokens, labels = batch
        out = model(tokens, self._labels(labels), progress=self.progress())  # forward: DDP syncs gradients through it
        loss = token_cross_entropy(out.logits, out.targets)
        # bits per scored token; a tensor until the loop logs it (MaskGIT scores the masked tokens only)
        return loss, {"bpt" if self.model.exact_likelihood else "masked_bpt": loss.detach() / math.log(2)}

    @torch.no_grad()
    def validation_bits(self, loop: TrainLoop) -> float | None:
        if self.cfg.val_split not in self.manifest.splits:
            return None
        loader = make_token_loader(self.manifest, self.cfg.val_split, batch_size=self.cfg.train.batch_size,
                                   shuffle=False, hflip=False,  # held-out bits/token on the images as they are
                                   verify=self.cfg.reader.verify_shards)
        with loop.accelerator.autocast():
            total, count = token_nll(self.sampling_model(loop), loader, loop.accelerator.device, self.cfg.val_batches)
        return bits_per_token(total / max(1, count))

    def tokenizer(self, device):
        if self._tokenizer is None:
            if self.tokenizer_path:  # checked against the manifest in run()
                self._tokenizer = load_tokenizer(self.tokenizer_path)[0].to(device).eval()
        return self._tokenizer

    @torch.no_grad()
    def evaluate(self, loop: TrainLoop, epoch: int) -> dict[str, float]:
        if not loop.is_main:
            return {}
        metrics = {}
        bpt = self.validation_bits(loop)
        if bpt is not None:
            metrics[f"val/{self.model.nll_name}"] = bpt   # MaskGIT: masked-token bits, not bits/token
        tok = self.tokenizer(loop.accelerator.device)
        if tok is not None:
            model = self.sampling_model(loop)
            n = self.cfg.sampling.num_samples
            sc = self.cfg.sampling
            # default: balanced over the classes; None when unconditional
            labels = class_labels(model, n, None, sc.label_mode, self.cfg.train.seed, self.class_counts())
            labels = labels.to(loop.accelerator.device) if labels is not None else None
            self.sample_grid(loop, model, tok, self.cfg.sampling.draw_kwargs(), labels,
                             loop.run.samples / f"samples_epoch{epoch + 1:04d}.png")
        self.last_metrics = metrics  # (generate restores the model's mode; fit sets train() every epoch)
        return metrics

    def sample_grid(self, loop: TrainLoop, model: Prior, tok, draw: dict, labels, path: Path) -> None:
        n = self.cfg.sampling.num_samples
        g = torch.Generator(device=loop.accelerator.device).manual_seed(self.cfg.train.seed)
        tokens = generate(model, n, labels=labels, **draw, generator=g)
        save_image_grid(decode_to_images(tok, tokens, n), path, nrow=int(math.ceil(math.sqrt(n))), min_cell=48)

    def class_counts(self) -> list[int] | None:
        """Samples per class of the training split (the manifest's; None: unlabelled, or not counted)."""
        return self.manifest.split(self.cfg.split).class_counts if self.conditional else None

    def export(self, loop: TrainLoop) -> None:
        shards_used = {k: getattr(self.manifest, k) for k in ("dataset", "codebook_size", "latent_h", "latent_w",
                                                              "num_classes")}
        shards_used["class_counts"] = self.class_counts()   # sample.py --label_mode frequencies draws from these
        meta = ExportMeta(stage="prior", step=loop.state.global_step, metrics=self.last_metrics,
                          tokenizer_sha256=self.tokenizer_sha, tokenizer_path=self.tokenizer_path, shards=shards_used)
        sha = self.sampling_model(loop).export_to(loop.run.export, meta=meta)
        loop.print(f"export written to {loop.run.export}")
        if loop.state.finished and self.cfg.tuning.tune_sampling != "none":
            self.store_sampling_settings(loop, sha)

    def store_sampling_settings(self, loop: TrainLoop, sha: str) -> None:
        """Choose the sampling settings on held-out train images and store them beside the export (main process;
        the others wait at the loop's final barrier, which --tune_minutes < --timeout_minutes keeps in time)."""
        tok = self.tokenizer(loop.accelerator.device)
        if tok is None:
            loop.print("note: sampling settings not tuned: no tokenizer on this machine to decode samples")
            return
        # the prior's data is the shards' dataset; where it lives: the tokenizer's record when it is the same data
        recorded = tok.export_meta.dataset or {}
        data_dir = recorded.get("data_dir") if recorded.get("name") == self.manifest.dataset else None
        model = self.sampling_model(loop)
        loop.print(f"choosing sampling settings on held-out {self.manifest.dataset} train images "
                   f"(--tune_minutes {self.cfg.tuning.tune_minutes:g}; --tune_sampling none skips this)")
        tuned = tune_sampling(model, tok, self.manifest.dataset, data_dir or "data", self.cfg.tuning,
                              self.cfg.train.seed + 1, log=loop.print)
        if tuned is None:
            return
        path = write_generation_config(loop.run.export, tuned.settings, tuned.chosen_by, sha)
        trials = tuned.chosen_by["trials"]
        best = "; ".join(f"{mode}: " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None)
                         + f" (FID {min(t['fid'] for t in trials[mode]):.4g}, built-in {trials[mode][0]['fid']:.4g})"
                         for mode, s in tuned.settings.items())
        loop.print(f"sampling settings stored in {path} ({best}; {tuned.chosen_by['seconds']:g} s)")
        mode = "conditional" if "conditional" in tuned.settings else "unconditional"
        labels = class_labels(model, self.cfg.sampling.num_samples, None, unconditional=mode != "conditional")
        labels = labels.to(loop.accelerator.device) if labels is not None else None
        self.sample_grid(loop, model, tok, tuned.settings[mode], labels, loop.run.samples / "samples_tuned.png")


def run(cfg: PriorStageConfig) -> TrainLoop:
    """Train stage 3 as ``cfg`` says; returns the finished (or stopped) loop."""
    from accelerate.utils import set_seed

    validate(cfg)
    if fsdp_launch() and cfg.prior_ema_decay > 0:
        raise ConfigError("--prior_ema_decay is not supported under FSDP (the average would need the whole weights "
                          "on every rank); use DDP or --prior_ema_decay 0")
    manifest = Manifest.read(cfg.shards)
    if cfg.split not in manifest.splits:
        raise ConfigError(f"{cfg.shards}: no '{cfg.split}' split in the manifest (has: {sorted(manifest.splits)})")
    tokenizer_sha = manifest.tokenizer_sha256
    # Every shard present with its manifest size (one stat each, on every rank: a missing or truncated shard is
    # named now, not hours into an epoch); the sha256 is checked by the rank that reads each shard, as it reads.
    for split in (cfg.split, cfg.val_split):
        if split in manifest.splits:
            check_split(TokenSplit.from_manifest(manifest, split), cfg.reader.verify_shards)
    # The tokenizer that decodes sample grids is checked here, on every rank, before training: a mismatch found
    # later inside the main-process-only evaluation would leave the other ranks waiting at a barrier.
    tok_path = cfg.checkpoint or manifest.tokenizer.get("path")
    tokenizer = _grid_tokenizer(tok_path, given=bool(cfg.checkpoint))
    if tokenizer is not None:
        check_compatible(tokenizer=tokenizer, shards=manifest)  # a vqgen export or a diffusers VQModel
    else:
        print(f"note: the tokenizer recorded in the manifest ({tok_path}) is not on disk and --checkpoint is not "
              f"given: training runs, but no sample grids are written", flush=True)
        tok_path = None
    config = cfg.model.build(vocab_size=manifest.codebook_size, latent_h=manifest.latent_h, latent_w=manifest.latent_w,
                             num_classes=0 if cfg.ignore_labels else max(0, manifest.num_classes))
    set_seed(cfg.train.seed)
    model = build_prior(config)
    record = {"stage": "prior", "model": config.to_dict(), "tokenizer_sha256": tokenizer_sha}
    loop = TrainLoop(prepare_training(cfg, PriorTask(cfg, model, manifest, tokenizer_sha, tok_path), record))
    loop.fit()
    return loop


def _grid_tokenizer(ref: str | None, given: bool):
    """The tokenizer that decodes sample grids, or None when the manifest's (not ``--checkpoint``) is not on this
    machine: a local path that does not exist, or an hf: ref missing from the local Hub cache."""
    if not given and not (ref and (is_hub_ref(ref) or Path(ref).exists())):
        return None
    if not given and is_hub_ref(ref):
        try:
            resolve_model_path(ref)
        except CheckpointError:
            return None
    return load_tokenizer(ref)[0]
