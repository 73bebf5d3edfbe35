"""The one training loop both trainers share: gradient accumulation, mixed precision, clipping, skipped
non-finite steps, the progress bar, logging, checkpoints, exact mid-epoch ``--resume`` and preemption.

A stage plugs in a :class:`~vqgen.train.task.StageTask`; :func:`~vqgen.train.setup.prepare_training` builds the
run (Accelerator, folder, trackers, optimizers). Exact resume: an epoch's batches are a pure function of (seed,
epoch, rank, world size); a checkpoint stores (epoch, batches done) and the task's data layout, and the task says
how many batches of the rebuilt stream to skip (docs/ARCHITECTURE.md, "Training").
Adapted from: the diffusers accelerate example scripts (one Accelerator, banner, global_step on sync steps).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, TrainingAborted
from ..hub import push_export
from ..perf import release_freed_memory
from .checkpointing import DATA_STATE, LoopState, load_checkpoint, save_checkpoint, saved_data_state
from .setup import Training
from .throughput import Throughput, device_peak
from .tracking import STATE_KEY

STOP_REQUESTED = "stop requested (signal or stop file)"


class TrainLoop:
    def __init__(self, training: Training):
        """``training``: what :func:`vqgen.train.setup.prepare_training` built for this run."""
        self.cfg, self.task, self.run = training.cfg, training.task, training.run
        self.resume_dir, self.trackers = training.resume_dir, training.trackers
        self.accelerator, self.model = training.accelerator, training.model
        self.extra_models, self.optimizers, self.schedulers = (training.extra_models, training.optimizers,
                                                               training.schedulers)
        self.total_steps, self.input_dtype, self.stop_file = (training.total_steps, training.input_dtype,
                                                              training.stop_file)
        self.world_size, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.state = LoopState(world_size=self.world_size, batch_size=self.cfg.batch_size)
        self.folder_lock = training.folder_lock
        peak, self._peak_label = device_peak(self.accelerator.device, self.accelerator.mixed_precision)
        self.speed = Throughput(self.task.work(), self.world_size, peak)
        self._whole: nn.Module | None = None  # under FSDP: the weights gathered for evaluation and the export
        self.task.bind(self, self.extra_models)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> LoopState:
        """Train to the last epoch (or ``--max_steps``, or a stop request), then export; returns the position."""
        self._start()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc=self.task.name, dynamic_ncols=True,
                   disable=not self.accelerator.is_local_main_process,
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        self._bad_in_a_row, stop = 0, None
        if self.cfg.max_steps and self.state.global_step >= self.cfg.max_steps:
            stop = "max_steps"  # resumed from the last checkpoint (killed while exporting): only the export is left
        # --max_minutes: a time budget from here (start-up excluded), ending like --max_steps (checkpoint, export)
        self._deadline = time.monotonic() + 60 * self.cfg.max_minutes if self.cfg.max_minutes else None
        self._time_up = False
        with _SignalFlag() as sig:
            while self.state.epoch < self.cfg.n_epochs and stop is None:
                stop = self._run_epoch(sig, bar)
        bar.close()
        state = self._finish(stop)
        self.folder_lock.release()
        return state

    def _start(self) -> None:
        """Clean what a killed run left, resume, check there is work, print the banner."""
        cfg, acc, task = self.cfg, self.accelerator, self.task
        if self.is_main:  # a stop file left by an earlier, preempted run must not stop this one
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stop_file)
            self.run.clean_stale_checkpoints()
        acc.wait_for_everyone()
        if self.resume_dir is not None:
            st = self.state = load_checkpoint(acc, self.resume_dir, self.schedulers)
            skip, warning = task.resume_batches(saved_data_state(st), st.epoch, st.batches_done, self.world_size)
            if warning:
                self.print(warning)
            st.batches_done, st.world_size, st.batch_size = skip, self.world_size, cfg.batch_size
            self.print(f"resumed from {self.resume_dir}: step {self.state.global_step}, epoch {self.state.epoch}, "
                       f"{self.state.batches_done} batches into the epoch")
        elif cfg.resume:
            self.print(f"--resume {cfg.resume}: no checkpoint in {self.run.root}, starting from scratch")
        self.state.extra[STATE_KEY] = self.trackers.state()  # the wandb run id: --resume continues that run
        n_batches = task.batches_per_epoch(self.world_size)
        if n_batches == 0:
            raise ConfigError(f"the dataset gives no full batch per process ({self.world_size} processes x batch "
                              f"{cfg.batch_size}); lower --batch_size")
        work = self.speed.work
        mfu = (f", MFU = {work.flops_per_unit:.4g} FLOPs per {work.unit[:-1]} / peak ({self._peak_label})"
               if work.flops_per_unit else "")
        self.print(f"***** training {task.name} *****\n"
                   f"  processes = {self.world_size}, device = {acc.device}, mixed precision = {acc.mixed_precision}\n"
                   f"  batch per process = {cfg.batch_size}, accumulation = {cfg.gradient_accumulation_steps}, "
                   f"global batch = {cfg.batch_size * self.world_size * cfg.gradient_accumulation_steps}\n"
                   f"  epochs = {cfg.n_epochs}, batches/epoch/process = {n_batches}, "
                   f"optimizer steps = {self.total_steps}\n"
                   f"  parameters = {sum(p.numel() for p in self.unwrapped_model.parameters()):,}\n"
                   f"  throughput: {work.unit}/s{mfu}")

    def _run_epoch(self, sig: "_SignalFlag", bar) -> str | None:
        """The rest of the current epoch; returns why training stops early (None: the epoch ended)."""
        from accelerate.utils import send_to_device

        epoch = self.state.epoch
        for m in (self.model, *self.extra_models):
            m.train()
        self._t0, self._seen = time.perf_counter(), 0
        self.speed.restart()
        for batch in self.task.epoch_batches(epoch, self.state.batches_done, self.rank, self.world_size):
            batch = self.cast_inputs(send_to_device(batch, self.accelerator.device))
            finite, stop_now, loss, logs = self._micro_step(batch, sig)
            self.state.batches_done += 1
            self._seen += _batch_len(batch)
            self.speed.add(_batch_len(batch))
            if self._skipped(finite) or not self.accelerator.sync_gradients:
                continue
            stop = self._after_optimizer_step(epoch, loss, logs, stop_now, bar)
            if stop:
                return stop
        self._end_epoch(epoch)
        return None

    def _micro_step(self, batch, sig: "_SignalFlag") -> tuple[bool, bool, float, dict]:
        """Forward, the one host sync, backward, clip, step: (finite, stop requested, global mean loss, logs)."""
        acc = self.accelerator
        with acc.accumulate(self.model, *self.extra_models):
            with acc.autocast():
                loss, logs = self.task.compute_loss(self.model, batch)
            # One tiny all-reduce decides, identically on every rank, whether this step is skipped (non-finite loss
            # somewhere) and whether a stop was requested (signal / stop file). The same all-reduce carries the
            # loss, so the logged loss is the global-batch mean (ranks hold equal batch sizes), not rank 0's share.
            local = loss.detach().float().reshape(())
            ok = torch.isfinite(local)
            # --max_minutes rides on the same all-reduce: every rank ends at the same step.
            late = self._deadline is not None and time.monotonic() >= self._deadline
            flags = torch.stack([(~ok).float(), torch.tensor(float(self._stop_requested(sig)), device=loss.device),
                                 torch.tensor(float(late), device=loss.device),
                                 torch.where(ok, local, torch.zeros_like(local))])
            bad, stop, late_sum, loss_sum = acc.reduce(flags, "sum").tolist()  # the one host sync per micro-batch
            self._time_up = late_sum > 0
            finite = bad == 0
            if finite:
                acc.backward(loss)
                finite = self._clip(logs)
                if finite:
                    for optimizer in self.optimizers:
                        optimizer.step()
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
        return finite, stop > 0, loss_sum / self.world_size, logs

    def _clip(self, logs: dict) -> bool:
        """Clip on sync steps; False when the gradients are not finite (the step is then skipped)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if not (acc.sync_gradients and self.cfg.max_grad_norm > 0):
            return True
        norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if norm is None:  # DeepSpeed clips inside its step: None before the first
            return True
        logs["grad_norm"] = float(norm)
        # fp32/bf16 (no grad scaler): a finite loss with inf/NaN gradients would poison the weights; the norm is of
        # the all-reduced grads, so every rank agrees. With fp16 the scaler skips such steps itself (and lowers its
        # scale). Not under DeepSpeed: its engine already stepped inside backward.
        return math.isfinite(logs["grad_norm"]) or acc.scaler is not None or \
            acc.distributed_type == DistributedType.DEEPSPEED

    def _skipped(self, finite: bool) -> bool:
        """Count a skipped (non-finite) step; too many in a row abort with the last good checkpoint kept."""
        if finite:
            self._bad_in_a_row = 0
            return False
        self._bad_in_a_row += 1
        self.state.bad_steps_total += 1
        self.print(f"warning: non-finite loss or gradients at step {self.state.global_step} "
                   f"(skipped; {self._bad_in_a_row} in a row)")
        if self._bad_in_a_row >= self.cfg.max_bad_steps:
            raise TrainingAborted(f"{self._bad_in_a_row} consecutive non-finite losses: stopping. The last good "
                                  f"checkpoint is kept in {self.run.checkpoints}; try a lower --lr, --mixed_precision "
                                  f"bf16 instead of fp16, or a smaller --max_grad_norm")
        return True

    def _after_optimizer_step(self, epoch: int, loss: float, logs: dict, stop_now: bool, bar) -> str | None:
        """Schedule, count, log, checkpoint; returns a stop reason (max_steps / stop requested) or None."""
        cfg = self.cfg
        for scheduler in self.schedulers:
            scheduler.step()
        self.state.global_step += 1
        self.task.after_step(self)  # e.g. the prior's EMA of its weights
        bar.update(1)
        step = self.state.global_step
        if step % 10 == 0 or step == 1:
            # Task scalars stay device tensors until here: no host sync on the other steps.
            logs = {k: float(v) for k, v in logs.items()}
            # samples_per_s: since the epoch's start; {images,tokens}_per_s and mfu: since the last logged step
            logs.update(loss=loss, lr=self.schedulers[0].get_last_lr()[0], epoch=epoch,
                        samples_per_s=self._seen * self.world_size / max(1e-9, time.perf_counter() - self._t0),
                        **self.speed.report())
            bar.set_postfix({**{k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "perplexity", "bpt")},
                             **self.speed.postfix(logs)}, refresh=False)
            self.log(logs)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
            self.save_checkpoint()
        if stop_now:
            return STOP_REQUESTED
        return "max_steps" if (cfg.max_steps and step >= cfg.max_steps) or self._time_up else None

    def _end_epoch(self, epoch: int) -> None:
        """Validate (every ``--sample_and_save_freq`` epochs and after the last) and checkpoint."""
        self.state.epoch += 1
        self.state.batches_done = 0
        if self.state.epoch == self.cfg.n_epochs or self.state.epoch % self.cfg.sample_and_save_freq == 0:
            self.model.eval()
            self._gather_whole_model()
            metrics = self.task.evaluate(self, epoch)
            self._whole = None
            self.log(metrics)
            self.print(f"epoch {epoch + 1}/{self.cfg.n_epochs} step {self.state.global_step}: " +
                       ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self.save_checkpoint()

    def _finish(self, stop: str | None) -> LoopState:
        """A stop request: checkpoint and leave (rerun with --resume latest). Otherwise: export."""
        acc = self.accelerator
        if stop == STOP_REQUESTED:
            if self.is_main:
                with contextlib.suppress(FileNotFoundError):
                    Path(self.stop_file).unlink()
            self.print(f"{stop}: saved {self.save_checkpoint()}; rerun with --resume latest to continue")
            acc.end_training()
            release_freed_memory()
            return self.state
        if stop == "max_steps":
            self.save_checkpoint()
        self.state.finished = self.state.epoch >= self.cfg.n_epochs or stop == "max_steps"
        self._gather_whole_model()
        if acc.is_main_process:
            self.task.export(self)
            if self.cfg.push_to_hub and self.state.finished:
                push_export(self.run.export, self.cfg.push_to_hub, self.whole_model)
        acc.wait_for_everyone()
        acc.end_training()
        release_freed_memory()  # the allocator kept the steps' memory (launch.build_accelerator): hand it back
        return self.state

    # ------------------------------------------------------------------ helpers for the loop and the tasks
    def save_checkpoint(self) -> Path:
        self.state.extra[DATA_STATE] = self.task.data_state()
        return save_checkpoint(self.accelerator, self.run, self.state, self.schedulers,
                               self.cfg.checkpoints_total_limit)

    def _gather_whole_model(self) -> None:
        """Under FSDP (every rank takes part): the main process gets the trained weights whole, in a plain copy of
        the model (:attr:`whole_model`); a sharded module cannot run a forward on one rank alone."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.FSDP:
            return
        state = self.accelerator.get_state_dict(self.model)  # full tensors on the main process, {} elsewhere
        if self.is_main:
            self._whole = self.task.model_from_state_dict(state).to(self.accelerator.device).eval()

    def _stop_requested(self, sig: "_SignalFlag") -> bool:
        return sig.signum is not None or os.path.exists(self.stop_file)

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # exports: plain keys

    @property
    def whole_model(self) -> nn.Module:
        """What evaluation and the export read (main process): the unwrapped model, under FSDP its gathered copy."""
        return self._whole if self._whole is not None else self.unwrapped_model

    def cast_inputs(self, batch):
        """Floating tensors of ``batch`` in the dtype the model computes in (bf16/fp16 under DeepSpeed)."""
        return _cast_floats(batch, self.input_dtype)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *a) -> None:
        self.accelerator.print(*a, flush=True)

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        step = self.state.global_step if step is None else step
        self.accelerator.log(values, step=step)
        if self.is_main:
            self.run.append_metrics({"step": step, "epoch": self.state.epoch, **values})


class _SignalFlag:
    """SIGUSR1/SIGTERM (Slurm preemption, `scancel --signal`) -> save a checkpoint at the next step and stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGUSR1, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _cast_floats(batch, dtype: torch.dtype | None):
    if dtype is None:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast_floats(b, dtype) for b in batch)
    return batch.to(dtype) if torch.is_tensor(batch) and batch.is_floating_point() else batch


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 0
