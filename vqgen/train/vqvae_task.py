"""Stage 1: train the VQ-VAE tokenizer (``accelerate launch train_vqvae.py --dataset ...``).

Writes ``<output_dir>/checkpoints/checkpoint-{step}/`` (training state), ``samples/recon_epoch*.png``
(each row of inputs followed by its row of reconstructions), ``metrics.jsonl`` and finally ``export/`` for stages 2 and 3.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..config import VQVAEStageConfig

from ..flags import validate
from ..data import build_dataset, download_lock
from ..errors import ConfigError
from ..export import ExportMeta
from ..eval.metrics import ReconstructionMeter
from ..launch import resolve_mixed_precision
from ..models.vqvae import VQVAE
from ..perf import default_channels_last
from ..sampling import save_image_grid
from .loop import TrainLoop
from .schedule import epoch_generator, epoch_indices, map_style_skip


def interleave_rows(inputs: torch.Tensor, recons: torch.Tensor, per_row: int) -> torch.Tensor:
    """Rows of ``per_row`` inputs, each followed by the row of their reconstructions (for the grid PNG)."""
    out = []
    for i in range(0, inputs.shape[0], per_row):
        out += [inputs[i:i + per_row], recons[i:i + per_row]]
    return torch.cat(out)


class VQVAETask:
    """Stage-1 plug-in for :class:`TrainLoop`."""

    name = "vqvae"

    def __init__(self, cfg: VQVAEStageConfig, model: VQVAE, train_ds, val_ds, info):
        self.cfg, self.model, self.train_ds, self.val_ds, self.info = cfg, model, train_ds, val_ds, info
        self.last_metrics: dict[str, float] = {}
        self.world_size = 1

    def configure_optimizers(self, train, device_type: str) -> list[torch.optim.Optimizer]:
        return [self.model.configure_optimizer(train.lr, train.weight_decay, device_type)]

    def batches_per_epoch(self, world_size: int) -> int:
        self.world_size = world_size
        return math.ceil((len(self.train_ds) // world_size) / self.cfg.train.batch_size)

    def data_state(self) -> dict:
        return {"world_size": self.world_size, "batch_size": self.cfg.train.batch_size,
                "num_workers": self.cfg.data.num_workers}

    def resume_batches(self, saved: dict | None, epoch: int, batches_done: int, world_size: int):
        """Map-style data (:func:`epoch_indices`): exact when the samples done are whole new global batches, else
        CheckpointError (:func:`map_style_skip`); the worker count never matters."""
        if saved is None:  # an older checkpoint: load_checkpoint converted it already
            return batches_done, None
        return map_style_skip(batches_done, saved["world_size"], saved["batch_size"], world_size,
                              self.cfg.train.batch_size), None

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int):
        idx = epoch_indices(len(self.train_ds), self.cfg.train.seed, epoch, rank, world_size)
        idx = idx[skip_batches * self.cfg.train.batch_size:]
        # Own generator: a DataLoader iterator otherwise draws its worker base seed from the global RNG, so the
        # iterator a resumed run starts mid-epoch would shift every later global draw (the quantizer's dead-code
        # restart samples from it) and break bitwise-exact resume.
        return DataLoader(Subset(self.train_ds, idx), batch_size=self.cfg.train.batch_size, shuffle=False,
                          num_workers=self.cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False,
                          generator=epoch_generator(self.cfg.train.seed, epoch))

    def compute_loss(self, model, batch):
        x, _ = batch
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        recon = out.recon.float()
        rec = F.mse_loss(recon, x) if self.cfg.recon_loss == "mse" else F.l1_loss(recon, x)
        loss = rec + out.vq_loss
        # detached tensors: the loop converts them only on logging steps (no per-step host sync on GPUs)
        return loss, {"recon_loss": rec.detach(), "vq_loss": out.vq_loss.detach(), "perplexity": out.perplexity.detach()}

    @torch.no_grad()
    def evaluate(self, loop: TrainLoop, epoch: int) -> dict[str, float]:
        if not loop.is_main:
            return {}
        model = loop.unwrapped_model.eval()
        n = min(len(self.val_ds), self.cfg.val_images)
        dl = DataLoader(Subset(self.val_ds, range(n)), batch_size=self.cfg.train.batch_size, shuffle=False,
                        num_workers=self.cfg.data.num_workers, generator=torch.Generator().manual_seed(0))
        meter = ReconstructionMeter(model.config.num_embeddings)
        grid_x = grid_r = None
        for x, _ in dl:
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
        meta = ExportMeta(stage="vqvae", step=loop.state.global_step, dataset=dataclasses.asdict(self.info),
                          metrics=self.last_metrics)
        model.export_to(loop.run.export, meta=meta)
        loop.print(f"export written to {loop.run.export}")


def run(cfg: VQVAEStageConfig) -> TrainLoop:
    """Train stage 1 as ``cfg`` says; returns the finished (or stopped) loop."""
    from accelerate.utils import set_seed

    validate(cfg)
    data = cfg.data
    with download_lock(data.data_dir):  # every rank builds the datasets; only the first one downloads
        train_ds, info = build_dataset(data.dataset, "train", data.data_dir, data.image_size)
        val_ds, _ = build_dataset(data.dataset, "test", data.data_dir, data.image_size)
    if isinstance(train_ds, IterableDataset) or isinstance(val_ds, IterableDataset):
        raise ConfigError(f"{data.dataset}: train_vqvae.py needs a map-style dataset (its exact resume indexes "
                          f"samples); WebDataset tar input is streamed. Use an image folder or an HF dataset, or "
                          f"pass the tars to extract_codes.py with an existing tokenizer")
    config = cfg.model.build(in_channels=info.channels, image_size=info.image_size)
    if cfg.channels_last is None:  # NHWC with bf16 autocast (its fast kernels), NCHW in fp32 (vqgen/perf.py)
        cfg.channels_last = default_channels_last(resolve_mixed_precision(cfg.train, VQVAETask.name))
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VQVAE(config)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    record = {"stage": "vqvae", "model": dataclasses.asdict(config), "dataset": dataclasses.asdict(info)}
    loop = TrainLoop(cfg, VQVAETask(cfg, model, train_ds, val_ds, info), record)
    loop.fit()
    return loop
