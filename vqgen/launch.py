"""The one process start-up of every stage: accelerate's process group / Accelerator, device and precision checks.

Training builds an ``Accelerator`` (:func:`build_accelerator`), extraction a ``PartialState``
(:func:`start_processes`); both form the same process group from the same launch environment (``accelerate
launch``, ``torchrun``, ``srun``) and refuse a launch whose processes would each run alone.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch

from .errors import ConfigError


def build_accelerator(args: argparse.Namespace, log_with: str | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    kwargs = {}
    if args.mixed_precision is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    # A new run in a process that already built an Accelerator (VQVAE_T.py runs the stages in-process; tests)
    # may ask for another mixed precision: forget the old AcceleratorState (not the process group).
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=project,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=args.timeout_minutes))],
        cpu=cpu_only_launch(),
        **kwargs,
    )
    _fix_deepspeed_cpu_ranks(acc)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(f"launched as {launched} processes but accelerate formed a group of {acc.num_processes}: "
                          f"each process would train alone and overwrite the others' checkpoints. On a CPU-only "
                          f"machine set ACCELERATE_USE_CPU=true (see docs/CLUSTER.md)")
    return acc


def _fix_deepspeed_cpu_ranks(acc) -> None:
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu, used to test the ZeRO path without GPUs): deepspeed.comm forms the
    gloo group of all ranks, but accelerate (1.x) finds no GPU backend and records every process as "rank 0 of 1"
    (all would write the same checkpoint files and read the same data). Correct accelerate's shared state from
    the process group that really exists. No effect on GPUs, where accelerate reports the ranks itself."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED or not dist.is_initialized():
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    if acc.num_processes == world:
        return
    fix = {"num_processes": world, "process_index": rank,
           "local_process_index": int(os.environ.get("LOCAL_RANK", rank))}
    PartialState._shared_state.update(fix)
    AcceleratorState._shared_state.update(fix)


def fill_deepspeed_config(acc, args: argparse.Namespace) -> torch.dtype | None:
    """Under DeepSpeed the trainer's flags decide batch, accumulation and clipping (not the yaml's values).

    accelerate infers ``train_micro_batch_size_per_gpu`` only from dataloaders passed to ``prepare``; the loop
    builds its own deterministic per-rank batches, so it must be set here, or ``prepare`` raises. Returns the
    dtype floating inputs must be cast to: DeepSpeed bf16/fp16 casts the model itself (no autocast), so float32
    images would meet bf16 conv weights.
    """
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    cfg = plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    cfg["gradient_clipping"] = float(args.max_grad_norm)  # 0: no clipping
    cfg.pop("train_batch_size", None)  # recomputed by accelerate from the three values above
    acc.gradient_accumulation_steps = args.gradient_accumulation_steps
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(cfg.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return None


def cpu_only_launch() -> bool:
    """True for a multi-process launch on a machine without an accelerator (or when ACCELERATE_USE_CPU is set).

    ``accelerate launch`` exports ACCELERATE_USE_CPU only from its single-process launcher: with a multi-process
    config (``distributed_type: MULTI_GPU`` + ``use_cpu: true``, as in accelerate_configs/cpu_2proc.yaml) each
    worker would otherwise see no GPU, skip the gloo process group and run as "rank 0 of 1". Never under
    DeepSpeed: ``cpu=True`` switches accelerate's DeepSpeed integration off (DeepSpeed on CPU uses DS_ACCELERATOR).
    """
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return False
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    has_accel = torch.cuda.is_available()
    if not has_accel and hasattr(torch, "accelerator"):
        has_accel = torch.accelerator.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accel


_FP16_CPU = ("--mixed_precision fp16 needs a GPU (fp16 training uses a gradient scaler, which accelerate only runs "
             "on CUDA; on CPU it would silently train in fp32). On CPU use --mixed_precision bf16 (faster on CPUs "
             "with AMX/AVX512-BF16) or no")


def check_precision_request(args) -> None:
    """Refuse fp16 on a CPU-only machine before the Accelerator exists (its state cannot be changed afterwards)."""
    from accelerate.utils import parse_flag_from_env

    wanted = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if wanted != "fp16" or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return
    has_accel = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    if parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accel:
        raise ConfigError(_FP16_CPU)


def check_precision(acc) -> None:
    """Same check on the Accelerator that was built (e.g. fp16 from an accelerate config file)."""
    from accelerate.utils import DistributedType

    if acc.mixed_precision == "fp16" and acc.device.type == "cpu" and acc.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(_FP16_CPU)


def is_main_launch() -> bool:
    """Main process before the Accelerator exists (RANK from torchrun/accelerate launch, else single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def start_processes():
    """``accelerate.PartialState`` that also forms the process group of a CPU launch.

    PartialState joins a gloo group on CPU only when asked (``cpu=True``); Accelerator reads that from
    ACCELERATE_USE_CPU, so do the same. A launch whose processes still end up alone is refused: each would
    believe it is rank 0 of 1 and they would write the same shards.
    """
    import os

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise ConfigError(f"launched as {launched} processes but accelerate formed a group of {state.num_processes}; "
                          f"on CPU set ACCELERATE_USE_CPU=true (see DESIGN.md, 'Running distributed')")
    return state


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default cuda when available; asking for a missing device is a clear error, not a traceback."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
    return device
