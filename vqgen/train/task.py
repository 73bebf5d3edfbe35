"""The contract between a stage and the training loop: what a stage (its model, data, loss, validation, export)
plugs into :class:`vqgen.train.loop.TrainLoop`. Optional hooks have defaults here; the loop never probes."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..config import TrainConfig
from .throughput import Work


class StageTask:
    """Base of the stage-1 (VQ-VAE) and stage-3 (prior) tasks. ``loop`` in the hooks: the running
    :class:`vqgen.train.loop.TrainLoop` (its accelerator, run folder, unwrapped model, state)."""

    name: str                       # "vqvae" | "prior": the progress bar's label, the precision default's key
    model: nn.Module                # trained and exported; the first optimizer's parameters
    extra_models: tuple[nn.Module, ...] | list[nn.Module] = ()  # other trained modules (a GAN discriminator): prepared and checkpointed
    # with the model; not under DeepSpeed (one engine per prepare) or fp16 (one grad scaler for every optimizer)

    # ---- the model side ------------------------------------------------------------------------------------
    def configure_optimizers(self, train: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
        """The task's optimizers, built by its models (``model.configure_optimizer``, as nanoGPT); each gets the
        run's learning-rate schedule, is stepped after every backward and saved in every checkpoint."""
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to backpropagate and detached scalar tensors to log (made floats only on logging steps: no host sync
        per step). ``model`` is the wrapped (DDP/DeepSpeed) model: call its forward."""
        raise NotImplementedError

    def work(self) -> Work:
        """What the loop's throughput counts (images, tokens) and the model FLOPs per unit (MFU); default: samples."""
        return Work()

    def bind(self, loop, prepared_extra_models: list[nn.Module]) -> None:
        """Called once the loop has prepared everything (the extra models as wrapped by accelerate)."""

    def after_step(self, loop) -> None:
        """Called after every optimizer step, before its checkpoint (e.g. an EMA of the weights)."""

    def evaluate(self, loop, epoch: int) -> dict[str, float]:
        """Validation metrics and image grids (every rank calls it; files are written by the main process)."""
        return {}

    def model_from_state_dict(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A new, plain module of the trained model holding ``state`` (under FSDP: the gathered weights that the main
        process evaluates and exports)."""
        raise NotImplementedError

    def export(self, loop) -> None:
        """Write ``loop.run.export`` from ``loop.unwrapped_model`` (main process only)."""
        raise NotImplementedError

    # ---- the data side -------------------------------------------------------------------------------------
    def batches_per_epoch(self, world_size: int) -> int:
        """Micro-batches each rank runs per epoch (equal on every rank)."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int) -> Iterable:
        """The epoch's batches for this rank, the first ``skip_batches`` left out; a pure function of its arguments."""
        raise NotImplementedError

    def data_state(self) -> dict:
        """JSON description of the data layout (world size, batch, workers, reader spec, resume history), saved in
        every checkpoint's vqgen_state.json."""
        raise NotImplementedError

    def resume_batches(self, saved: dict | None, epoch: int, batches_done: int,
                       world_size: int) -> tuple[int, str | None]:
        """``skip_batches`` for the current layout, and one warning line when the resume is not exact. ``saved``: the
        checkpoint's ``data_state`` (older checkpoints: the world size and batch size their loop recorded)."""
        raise NotImplementedError
