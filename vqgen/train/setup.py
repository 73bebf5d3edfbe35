"""Everything a training run needs before its first step, built in one place and handed to the loop: the run
folder (and its policy), the trackers, the Accelerator, the optimizers and their schedules, the prepared model.

The order matters and is the point of this module: every check that can refuse the run comes before anything is
written, and trackers start before the run folder is marked as holding a run (a tracker that cannot start leaves
nothing behind that blocks the rerun).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig, to_dict, to_yaml
from ..hub import check_push_target
from ..launch import build_accelerator, check_extra_models, fill_deepspeed_config, resolve_mixed_precision
from ..lock import FolderLock, hold_folder
from ..run_dir import RunDir
from .checkpointing import verified_resume
from .schedule import make_scheduler
from .task import StageTask
from .tracking import TrackerPlan, plan_trackers, start_trackers


@dataclass
class Training:
    """What :func:`prepare_training` built; :class:`vqgen.train.loop.TrainLoop` runs it."""

    cfg: TrainConfig
    task: StageTask
    run: RunDir
    resume_dir: Path | None          # the checkpoint to resume from (None: start fresh)
    trackers: TrackerPlan
    accelerator: object              # accelerate.Accelerator
    model: nn.Module                 # prepared (DDP / DeepSpeed wrapped)
    extra_models: list[nn.Module]    # prepared
    optimizers: list[torch.optim.Optimizer]
    schedulers: list                 # one per optimizer; not prepared (see below)
    total_steps: int
    input_dtype: torch.dtype | None  # DeepSpeed bf16/fp16 casts the model: floating inputs follow
    stop_file: str
    folder_lock: FolderLock          # released by the loop when it ends


def prepare_training(stage_config, task: StageTask, record: dict) -> Training:
    """``stage_config``: the stage's config (its ``train`` part drives the run; all of it goes to config.yaml);
    ``record``: what the config built (model config, dataset...), written to run_config.json."""
    cfg = stage_config.train
    run = RunDir(cfg.output_dir)
    record = json.loads(json.dumps(record))  # tuples -> lists: compared as saved
    resume_dir = run.check_policy(record, cfg.resume, cfg.overwrite, model_config=task.model.config)
    check_push_target(cfg.push_to_hub)  # a missing Hub token is found now, not after training
    trackers = plan_trackers(cfg, run.root, resume_dir)  # no login / no network -> offline (tracking.py)
    resolve_mixed_precision(cfg, task.name)  # unless chosen: bf16 where the device does it natively (perf.py)
    acc = build_accelerator(cfg, trackers.log_with)
    check_extra_models(acc, task.extra_models)
    folder_lock = hold_folder(run.root)  # one writer per run folder, held until the loop ends
    resume_dir = verified_resume(run, cfg.resume, resume_dir)  # a damaged newest checkpoint: the newest intact one
    if cfg.overwrite and not cfg.resume and acc.is_main_process:
        run.clear()  # only now: every check that can refuse the run has passed
    steps_per_epoch = math.ceil(task.batches_per_epoch(acc.num_processes) / cfg.gradient_accumulation_steps)
    total_steps = min(steps_per_epoch * cfg.n_epochs, cfg.max_steps or math.inf)
    optimizers = task.configure_optimizers(cfg, acc.device.type)
    # Schedulers are not prepared (accelerate would step them once per process) nor registered for checkpointing
    # (accelerate would pickle them): their state goes into vqgen_state.json as JSON (checkpointing.py).
    schedulers = [make_scheduler(o, cfg.lr_schedule, cfg.warmup_steps, total_steps) for o in optimizers]
    input_dtype = fill_deepspeed_config(acc, cfg)
    extra = list(task.extra_models)
    model, *prepared = acc.prepare(task.model, *extra, *optimizers)
    if acc.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
    start_trackers(acc, trackers, cfg.wandb_project, _flat_config({**record, "config": to_dict(stage_config)}),
                   run.root)
    if acc.is_main_process:
        run.write_record(record)
        run.write_config(to_yaml(stage_config))
    return Training(cfg, task, run, resume_dir, trackers, acc, model, prepared[:len(extra)], prepared[len(extra):],
                    schedulers, total_steps, input_dtype, cfg.stop_file or str(run.stop_file), folder_lock)


def _flat_config(cfg: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar} for the trackers' config tables."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out
