"""The one accelerate training loop both trainers share (stage 1 VQ-VAE, stage 3 prior).

A stage supplies a :class:`StageTask` (its model, data stream per epoch, loss, validation, export); this module
owns everything else: the Accelerator, gradient accumulation, mixed precision, clipping, skipping non-finite
steps, the progress bar, tracker logging, ``checkpoint-{step}`` folders, exact mid-epoch ``--resume`` and
preemption signals.

Exact resume: the data stream of an epoch is a pure function of (seed, epoch, rank, world_size) (see
:func:`epoch_indices`), the checkpoint stores (epoch, micro-batches done) next to the model/optimizer/
scheduler/RNG state from ``accelerator.save_state``, and a resumed run rebuilds the same stream and skips what
was done. On CPU in fp32 a killed-and-resumed run ends with bitwise the same weights as an uninterrupted one
(tests/test_train_vqvae.py checks it).

Adapted from: the diffusers accelerate example scripts (checkpoint-{step} folders, total limit, banner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn

from ..config import to_dict, to_yaml
from ..errors import CheckpointError, ConfigError, DiskFullError, TrainingAborted
from ..fsutil import atomic_write_json, fsync_dir, fsync_tree, is_disk_full
from ..launch import build_accelerator, check_precision, check_precision_request, fill_deepspeed_config, is_main_launch
from ..run_dir import RunDir
from .schedule import make_scheduler



class StageTask(Protocol):
    """What a stage plugs into :class:`TrainLoop`."""

    name: str  # "vqvae" | "prior"
    model: nn.Module

    def batches_per_epoch(self, world_size: int) -> int:
        """Micro-batches each rank runs per epoch (equal on every rank)."""

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int) -> Iterable:
        """The epoch's batches for this rank, the first ``skip_batches`` left out; deterministic."""

    def compute_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to backpropagate and detached scalar tensors to log (converted to floats only on logging
        steps, so GPUs are not synced every step). ``model`` is the wrapped (DDP/DeepSpeed) model."""

    def evaluate(self, loop: "TrainLoop", epoch: int) -> dict[str, float]:
        """Validation metrics and image grids (every rank calls it; write files on the main process only)."""

    def export(self, loop: "TrainLoop") -> None:
        """Write ``<output_dir>/export`` from ``loop.unwrapped_model`` (main process only)."""


@dataclass
class LoopState:
    """Position in training, saved in every checkpoint as vqgen_state.json."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches done in `epoch` on each rank
    world_size: int = 1
    batch_size: int = 0
    bad_steps_total: int = 0
    finished: bool = False
    extra: dict = field(default_factory=dict)


def _cast_floats(batch, dtype: torch.dtype | None):
    if dtype is None:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast_floats(b, dtype) for b in batch)
    return batch.to(dtype) if torch.is_tensor(batch) and batch.is_floating_point() else batch


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


class TrainLoop:
    def __init__(self, stage_config, task: StageTask, record: dict):
        """``stage_config``: the stage's config (its ``train`` part drives the loop; all of it is written to the
        run folder's config.yaml); ``record``: what the config built (model config, dataset...), run_config.json."""
        args = self.args = stage_config.train
        self.task = task
        self.run = RunDir(args.output_dir)
        self.output_dir = self.run.root
        self.stop_file = args.stop_file or str(self.run.stop_file)
        record = json.loads(json.dumps(record))  # tuples -> lists: compared as saved
        self.resume_dir = self.run.check_policy(record, args.resume, args.overwrite)
        log_with = None if args.no_wandb else "wandb"
        check_precision_request(args)
        self.accelerator = build_accelerator(args, log_with)
        acc = self.accelerator
        check_precision(acc)
        if args.overwrite and not args.resume and is_main_launch():
            self.run.clear()  # only now: every check that can refuse the run has passed
        self.world_size, self.rank = acc.num_processes, acc.process_index
        self.state = LoopState(world_size=self.world_size, batch_size=args.batch_size)

        model = task.model
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = acc.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95 if task.name == "prior" else 0.999),
                                      **({"fused": True} if fused else {}))
        steps_per_epoch = math.ceil(task.batches_per_epoch(self.world_size) / args.gradient_accumulation_steps)
        self.total_steps = steps_per_epoch * args.n_epochs
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, self.total_steps)
        self.input_dtype = fill_deepspeed_config(acc, args)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Not prepared: accelerate would step a prepared scheduler num_processes times per call. Not registered
        # for checkpointing either: accelerate pickles custom objects and loads them with weights_only=False (code
        # execution on --resume). Its state goes into vqgen_state.json instead (see save_checkpoint).
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.run.write_record(record)
            self.run.write_config(to_yaml(stage_config))
        if log_with:
            acc.init_trackers(args.wandb_project, config=_flat_config({**record, "config": to_dict(stage_config)}),
                              init_kwargs={"wandb": {"dir": str(self.output_dir), "name": self.output_dir.name}})

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # exports: plain keys

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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-{step}`` crash-consistently.

        Everything goes into ``.checkpoint-{step}.tmp`` (fsynced), ``vqgen_state.json`` last, then one rename
        publishes it; a folder counts as a checkpoint only with ``vqgen_state.json`` (see
        :func:`vqgen.run_dir.checkpoint_dirs`). Folders being replaced or rotated out are first renamed to a
        dot-name, then deleted, so a SIGKILL mid-delete never leaves a half-deleted folder that looks complete.
        A full disk raises :class:`DiskFullError`; the temp folder is removed and older checkpoints stay intact.
        """
        acc = self.accelerator
        root = self.run.checkpoints
        final, tmp = self.run.checkpoint(self.state.global_step), self.run.checkpoint_tmp(self.state.global_step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))  # every rank: DeepSpeed shards optimizer state per rank
            acc.wait_for_everyone()
            if acc.is_main_process:
                fsync_tree(tmp)
                state = dataclasses.asdict(self.state)
                state["scheduler"] = self.scheduler.state_dict()  # JSON, not pickle: resuming never unpickles code
                atomic_write_json(tmp / RunDir.STATE, state)
        except BaseException as e:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise DiskFullError(f"disk full while writing checkpoint {final}; the previous checkpoints in {root} "
                                    f"are intact. Free some space and rerun with --resume latest") from None
            raise
        if acc.is_main_process:
            if final.exists():  # same step saved twice (e.g. --checkpointing_steps hit at an epoch end)
                _remove_dir(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in self.run.checkpoint_dirs()[:-self.args.checkpoints_total_limit]:
                _remove_dir(old)
        acc.wait_for_everyone()
        return final

    def _clean_stale_checkpoints(self) -> None:
        """Remove ``.checkpoint-*.tmp`` / ``.*.del`` folders left by a run killed while saving or rotating."""
        if self.is_main:
            self.run.clean_stale_checkpoints()

    def _load_checkpoint(self, path: Path) -> None:
        raw = json.loads((path / RunDir.STATE).read_text())
        sched = raw.pop("scheduler", None)
        saved = LoopState(**raw)
        self.accelerator.load_state(str(path))
        if sched is not None:
            self.scheduler.load_state_dict(sched)
        else:  # checkpoints of older vqgen versions (scheduler pickled by accelerate, not loaded): replay it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(saved.global_step):
                    self.scheduler.step()
        old_global = saved.batch_size * saved.world_size
        new_global = self.args.batch_size * self.world_size
        if saved.batches_done and (saved.batches_done * old_global) % new_global:
            raise CheckpointError(
                f"cannot resume {path} mid-epoch with {self.world_size} processes x batch {self.args.batch_size}: it "
                f"was saved with {saved.world_size} x {saved.batch_size} after {saved.batches_done} batches, which is "
                f"not a whole number of the new global batches. Resume with the old world size/batch, or from an "
                f"epoch-end checkpoint.")
        saved.batches_done = saved.batches_done * old_global // new_global
        saved.world_size, saved.batch_size = self.world_size, self.args.batch_size
        self.state = saved
        self.print(f"resumed from {path}: step {saved.global_step}, epoch {saved.epoch}, "
                   f"{saved.batches_done} batches into the epoch")

    def _stop_requested(self, sig: "_SignalFlag") -> bool:
        return sig.signum is not None or os.path.exists(self.stop_file)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> LoopState:
        args, acc, task = self.args, self.accelerator, self.task
        if self.is_main:  # a stop file left by an earlier, preempted run must not stop this one
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stop_file)
        self._clean_stale_checkpoints()
        acc.wait_for_everyone()
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir)
        elif args.resume:
            self.print(f"--resume {args.resume}: no checkpoint in {self.output_dir}, starting from scratch")
        n_batches = task.batches_per_epoch(self.world_size)
        if n_batches == 0:
            raise ConfigError(f"the dataset gives no full batch per process ({self.world_size} processes x batch "
                              f"{args.batch_size}); lower --batch_size")
        self.print(f"***** training {task.name} *****\n"
                   f"  processes = {self.world_size}, device = {acc.device}, mixed precision = {acc.mixed_precision}\n"
                   f"  batch per process = {args.batch_size}, accumulation = {args.gradient_accumulation_steps}, "
                   f"global batch = {args.batch_size * self.world_size * args.gradient_accumulation_steps}\n"
                   f"  epochs = {args.n_epochs}, batches/epoch/process = {n_batches}, optimizer steps = {self.total_steps}\n"
                   f"  parameters = {sum(p.numel() for p in self.unwrapped_model.parameters()):,}")
        from accelerate.utils import DistributedType, send_to_device
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not acc.is_local_main_process,
                   desc=task.name, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
        consecutive_bad = 0
        stop_reason = None
        with _SignalFlag() as sig:
            while self.state.epoch < args.n_epochs and stop_reason is None:
                epoch = self.state.epoch
                self.model.train()
                t0, seen = time.perf_counter(), 0
                batches = task.epoch_batches(epoch, self.state.batches_done, self.rank, self.world_size)
                for batch in batches:
                    batch = self.cast_inputs(send_to_device(batch, acc.device))
                    with acc.accumulate(self.model):
                        with acc.autocast():
                            loss, logs = task.compute_loss(self.model, batch)
                        # One tiny all-reduce decides, identically on every rank, whether this step is skipped
                        # (non-finite loss somewhere) and whether a stop was requested (signal / stop file).
                        # The same all-reduce carries the loss, so the logged loss is the global-batch mean
                        # (ranks hold equal batch sizes), not rank 0's share: comparable across world sizes.
                        local = loss.detach().float().reshape(())
                        ok = torch.isfinite(local)
                        flags = torch.stack([(~ok).float(),
                                             torch.tensor(float(self._stop_requested(sig)), device=loss.device),
                                             torch.where(ok, local, torch.zeros_like(local))])
                        bad, stop, loss_sum = acc.reduce(flags, "sum").tolist()  # the one host sync per micro-batch
                        finite, stop_now = bad == 0, stop > 0
                        global_loss = loss_sum / self.world_size
                        if finite:
                            acc.backward(loss)
                            if acc.sync_gradients and args.max_grad_norm > 0:
                                norm = acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                                if norm is not None:  # DeepSpeed clips inside its step: None before the first
                                    logs["grad_norm"] = float(norm)
                                    # fp32/bf16 (no grad scaler): a finite loss with inf/NaN gradients would
                                    # poison the weights; the norm is of the all-reduced grads, so every rank
                                    # agrees. With fp16 the scaler skips such steps itself (and lowers its scale).
                                    # (Not under DeepSpeed: its engine already stepped inside backward.)
                                    if (acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED
                                            and not math.isfinite(logs["grad_norm"])):
                                        finite = False
                            if finite:
                                self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.state.batches_done += 1
                    seen += _batch_len(batch)
                    if not finite:
                        consecutive_bad += 1
                        self.state.bad_steps_total += 1
                        self.print(f"warning: non-finite loss or gradients at step {self.state.global_step} "
                                   f"(skipped; {consecutive_bad} in a row)")
                        if consecutive_bad >= args.max_bad_steps:
                            raise TrainingAborted(
                                f"{consecutive_bad} consecutive non-finite losses: stopping. The last good checkpoint "
                                f"is kept in {self.run.checkpoints}; try a lower --lr, --mixed_precision "
                                f"bf16 instead of fp16, or a smaller --max_grad_norm")
                        continue
                    consecutive_bad = 0
                    if not acc.sync_gradients:
                        continue
                    self.scheduler.step()
                    self.state.global_step += 1
                    bar.update(1)
                    if self.state.global_step % 10 == 0 or self.state.global_step == 1:
                        # Task scalars stay device tensors until here: no host sync on the other steps.
                        logs = {k: float(v) for k, v in logs.items()}
                        logs.update(loss=global_loss, lr=self.scheduler.get_last_lr()[0], epoch=epoch,
                                    samples_per_s=seen * self.world_size / max(1e-9, time.perf_counter() - t0))
                        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "perplexity", "bpt")},
                                        refresh=False)
                        self.log(logs)
                    if args.checkpointing_steps and self.state.global_step % args.checkpointing_steps == 0:
                        self.save_checkpoint()
                    if args.max_steps and self.state.global_step >= args.max_steps:
                        stop_reason = "max_steps"
                    if stop_now:
                        stop_reason = "stop requested (signal or stop file)"
                    if stop_reason:
                        break
                if stop_reason is None:  # epoch finished
                    self.state.epoch += 1
                    self.state.batches_done = 0
                    last = self.state.epoch == args.n_epochs
                    if last or self.state.epoch % args.sample_and_save_freq == 0:
                        self.model.eval()
                        metrics = task.evaluate(self, epoch)
                        self.log(metrics)
                        self.print(f"epoch {epoch + 1}/{args.n_epochs} step {self.state.global_step}: " +
                                   ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                    self.save_checkpoint()
        bar.close()
        if stop_reason and stop_reason.startswith("stop requested"):
            with contextlib.suppress(FileNotFoundError):
                if self.is_main:
                    Path(self.stop_file).unlink()
            path = self.save_checkpoint()
            self.print(f"{stop_reason}: saved {path}; rerun with --resume latest to continue")
            acc.end_training()
            return self.state
        if stop_reason == "max_steps":
            self.save_checkpoint()
        self.state.finished = self.state.epoch >= args.n_epochs or stop_reason == "max_steps"
        if acc.is_main_process:
            task.export(self)
        acc.wait_for_everyone()
        acc.end_training()
        return self.state


def _remove_dir(d: Path) -> None:
    """Delete a checkpoint folder so that no kill leaves a half-deleted one that still looks complete."""
    doomed = d.with_name(f".{d.name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(d, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 0


def _flat_config(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out


