"""Stage 1: train the VQ-VAE tokenizer (``accelerate launch train_vqvae.py --dataset ...``).

Writes ``<output_dir>/checkpoints/checkpoint-{step}/`` (training state), ``samples/recon_epoch*.png``
(each row of inputs followed by its row of reconstructions), ``metrics.jsonl`` and finally ``export/`` for stages 2
and 3. Input: a map-style dataset or a stream (WebDataset urls, ``hf:<name> --streaming``), prepared once per node
(:func:`build_inputs`), with optional seeded augmentation (:mod:`vqgen.train.stage1_data`). Unreadable images are
dropped from their batch and counted (``skipped_images``: on rank 0 since the process started).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import VQVAEStageConfig, validate
from ..data import GENERIC_CHANNELS, GENERIC_IMAGE_SIZE, build_dataset
from ..data.augment import Augment
from ..data.stream_input import is_streamed, open_stream
from ..data.streaming import StreamedImages
from ..errors import ConfigError
from ..export import ExportMeta
from ..images import save_image_grid
from ..launch import fsdp_launch, prepare_first, resolve_mixed_precision, start_processes
from ..metrics import ReconstructionMeter
from ..models.vqvae import VQVAE
from ..perf import default_channels_last
from .gan import VQGANTerms
from .loop import TrainLoop
from .setup import prepare_training
from .stage1_data import MapInput, StreamInput, first_images
from .task import StageTask
from .throughput import Work


def interleave_rows(inputs: torch.Tensor, recons: torch.Tensor, per_row: int) -> torch.Tensor:
    """Rows of ``per_row`` inputs, each followed by the row of their reconstructions (for the grid PNG)."""
    out = []
    for i in range(0, inputs.shape[0], per_row):
        out += [inputs[i:i + per_row], recons[i:i + per_row]]
    return torch.cat(out)


class VQVAETask(StageTask):
    """Stage-1 plug-in for :class:`TrainLoop`; the data side is a :class:`MapInput` or a :class:`StreamInput`."""

    name = "vqvae"

    def __init__(self, cfg: VQVAEStageConfig, model: VQVAE, train_input, val_ds, info):
        self.cfg, self.model, self.input, self.val_ds, self.info = cfg, model, train_input, val_ds, info
        self.last_metrics: dict[str, float] = {}
        self.skipped = 0  # unreadable images dropped on this rank since the process started (a device tensor)
        # --disc_weight / --perceptual_weight: the VQGAN terms (train/gan.py); the discriminator is a second model
        self.gan = VQGANTerms(cfg.gan, model.config.in_channels, cfg.train.seed) if cfg.gan.enabled else None
        self.extra_models = self.gan.modules if self.gan else []

    def configure_optimizers(self, train, device_type: str) -> list[torch.optim.Optimizer]:
        gan = self.gan.optimizers(train, device_type) if self.gan else []
        return [self.model.configure_optimizer(train.lr, train.weight_decay, device_type), *gan]

    def work(self) -> Work:
        return Work("images")

    def bind(self, loop: TrainLoop, prepared: list) -> None:
        if self.gan:
            self.gan.bind(loop, prepared)

    def batches_per_epoch(self, world_size: int) -> int:
        return self.input.batches_per_epoch(world_size)

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int):
        return self.input.epoch_batches(epoch, skip_batches, rank, world_size)

    def data_state(self) -> dict:
        return self.input.data_state()

    def resume_batches(self, saved: dict | None, epoch: int, batches_done: int, world_size: int):
        return self.input.resume_batches(saved, epoch, batches_done, world_size)

    def compute_loss(self, model, batch):
        x, _, skipped = batch  # unreadable images were dropped by the collate (stage1_data.collate_readable)
        self.skipped = self.skipped + skipped
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        recon = out.recon.float()
        rec = F.mse_loss(recon, x) if self.cfg.recon_loss == "mse" else F.l1_loss(recon, x)
        # detached tensors: the loop converts them only on logging steps (no per-step host sync on GPUs)
        logs = {"recon_loss": rec.detach(), "vq_loss": out.vq_loss.detach(), "perplexity": out.perplexity.detach(),
                "skipped_images": self.skipped.detach()}
        if self.gan is not None:
            rec = self.gan.loss(x.float(), recon, rec, self.gan.loop.unwrapped_model.last_layer, logs)
        return rec + out.vq_loss, logs

    @torch.no_grad()
    def evaluate(self, loop: TrainLoop, epoch: int) -> dict[str, float]:
        if not loop.is_main:
            return {}
        model = loop.unwrapped_model.eval()
        meter = ReconstructionMeter(model.config.codebook_size)
        grid_x = grid_r = None
        for x, _ in first_images(self.val_ds, self.cfg.val_images, self.cfg.train.batch_size):
            x = x.to(loop.accelerator.device)
            with loop.accelerator.autocast():
                out = model(loop.cast_inputs(x))
            recon = out.recon.float().clamp(-1, 1)
            meter.update(x, recon, out.indices)
            if grid_x is None:
                grid_x, grid_r = x[: self.cfg.grid_images], recon[: self.cfg.grid_images]
        metrics = {f"val/{k}": v for k, v in meter.compute().items()}
        path = loop.run.samples / f"recon_epoch{epoch + 1:04d}.png"
        save_image_grid(interleave_rows(grid_x, grid_r, 8).cpu(), path, nrow=min(8, grid_x.shape[0]), min_cell=48)
        self.last_metrics = metrics
        return metrics

    def export(self, loop: TrainLoop) -> None:
        model = loop.unwrapped_model
        # the data as read (stage 2 and evaluate.py take it from here when not given): DatasetInfo + --data_dir
        data = {**dataclasses.asdict(self.info), "data_dir": self.cfg.data.data_dir}
        meta = ExportMeta(stage="vqvae", step=loop.state.global_step, dataset=data, metrics=self.last_metrics)
        model.export_to(loop.run.export, meta=meta)
        loop.print(f"export written to {loop.run.export}")


def build_inputs(cfg: VQVAEStageConfig, state):
    """(training input, validation dataset, DatasetInfo): prepared by one process per node, then loaded by all."""
    data = cfg.data
    streamed = is_streamed(data.dataset, data.streaming)
    with prepare_first(state, once=data.prepare_data_once, data_dir=data.data_dir):
        if streamed:  # streams have no registry entry: the generic 64 px RGB unless --image_size says otherwise
            source, decoder, info = open_stream(data.dataset, "train", data.data_dir,
                                                data.image_size or GENERIC_IMAGE_SIZE, GENERIC_CHANNELS,
                                                streaming_hf=data.streaming)
        else:
            train_ds, info = build_dataset(data.dataset, "train", data.data_dir, data.image_size)
        val_name = cfg.val_dataset or data.dataset
        if is_streamed(val_name, data.streaming):
            vsrc, vdec, _ = open_stream(val_name, "test", data.data_dir, info.image_size, info.channels,
                                        streaming_hf=data.streaming)
            val_ds = StreamedImages(vsrc, vdec, shuffle=False, equal=False)
        else:
            val_ds, _ = build_dataset(val_name, "test", data.data_dir, info.image_size, info.channels)
    augment = Augment(info.image_size, cfg.augment.random_crop, cfg.augment.hflip)
    if augment:
        info.transforms = {**info.transforms, "train_augmentation": augment.describe()}
    if not streamed:
        return MapInput(train_ds, cfg, augment), val_ds, info
    per_epoch = cfg.samples_per_epoch
    if source.counts is None and not per_epoch and info.transforms.get("total"):
        per_epoch = int(info.transforms["total"])  # an HF stream whose split size the dataset records
        if state.is_main_process:
            print(f"streamed input of unknown shard sizes: one epoch = the split's {per_epoch} samples "
                  f"(--samples_per_epoch)", flush=True)
    return StreamInput(source, decoder, cfg, augment, per_epoch), val_ds, info


def run(cfg: VQVAEStageConfig) -> TrainLoop:
    """Train stage 1 as ``cfg`` says; returns the finished (or stopped) loop."""
    from accelerate.utils import set_seed

    validate(cfg)
    if fsdp_launch():
        raise ConfigError("FSDP (accelerate_configs/fsdp.yaml) shards the prior's Transformer blocks: train the "
                          "tokenizer with DDP (accelerate_configs/multi_gpu.yaml)")
    state = start_processes(training=True)  # the Accelerator built by the loop joins the same process group
    train_input, val_ds, info = build_inputs(cfg, state)
    config = cfg.model.build(in_channels=info.channels, image_size=info.image_size)
    if cfg.channels_last is None:  # NHWC with bf16 autocast (its fast kernels), NCHW in fp32 (vqgen/perf.py)
        cfg.channels_last = default_channels_last(resolve_mixed_precision(cfg.train, VQVAETask.name))
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VQVAE(config)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    record = {"stage": "vqvae", "model": config.to_dict(), "dataset": dataclasses.asdict(info)}
    loop = TrainLoop(prepare_training(cfg, VQVAETask(cfg, model, train_input, val_ds, info), record))
    loop.fit()
    return loop
