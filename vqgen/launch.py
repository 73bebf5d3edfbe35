"""The one process start-up of every stage: accelerate's process group, the device, precision checks.

Training builds an ``Accelerator`` (:func:`build_accelerator`), extraction a ``PartialState``
(:func:`start_processes`); both join the process group of the launch (``accelerate launch``, ``torchrun``,
``srun``) through :func:`use_cpu` and refuse a launch whose processes would each run alone (:func:`_check_group`).
Data is prepared under :func:`prepare_first` (one process per node, then all in parallel). Sampling runs in one
process on :func:`resolve_device`; evaluation in one, or in each process of ``accelerate launch evaluate.py``.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch

from . import perf
from .errors import ConfigError
from .run_dir import RunDir

_FP16_CPU = ("--mixed_precision fp16 needs a GPU (fp16 training uses a gradient scaler, which accelerate only runs "
             "on CUDA; on CPU it would silently train in fp32). On CPU use --mixed_precision bf16 (faster on CPUs "
             "with AMX/AVX512-BF16) or no")


def build_accelerator(train, log_with: str | None):
    """The Accelerator of a trainer (``train``: its :class:`~vqgen.config.TrainConfig`), after refusing what cannot
    work: fp16 without a GPU (checked before and after, since an accelerate config file may ask for it) and a
    launch that formed no process group."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

    _refuse_fp16_on_cpu(train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION"))
    project = ProjectConfiguration(project_dir=train.output_dir, logging_dir=str(RunDir(train.output_dir).logs))
    kwargs = {"mixed_precision": train.mixed_precision} if train.mixed_precision is not None else {}
    # A new run in a process that already built an Accelerator (VQVAE_T.py runs the stages in-process; tests)
    # may ask for another mixed precision: forget the old AcceleratorState (not the process group).
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(gradient_accumulation_steps=train.gradient_accumulation_steps, log_with=log_with,
                      project_config=project, cpu=use_cpu(training=True),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=train.timeout_minutes))],
                      **kwargs)
    _fix_deepspeed_cpu_ranks(acc)
    _fsdp_on_cpu(acc)
    _check_group(acc.num_processes)
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu" and acc.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(_FP16_CPU)
    perf.keep_freed_memory()  # each step reuses the last step's freed activations (no page faults: vqgen/perf.py)
    return acc


def resolve_mixed_precision(train, stage: str) -> str:
    """Fill in ``train.mixed_precision`` when neither the flag/config nor the launcher chose one: the fastest safe
    precision of ``stage`` ("vqvae" | "prior") on the device this process will train on
    (:func:`vqgen.perf.default_mixed_precision`: bf16 on CUDA GPUs with bf16 tensor cores and for the VQ-VAE on
    AMX CPUs, else fp32). The launcher's choice is ``accelerate launch --mixed_precision`` or an accelerate config
    (ACCELERATE_MIXED_PRECISION) or a DeepSpeed config; it is left to accelerate. Returns the precision autocast
    will use. The filled-in value is written to the run's config.yaml, so ``--resume`` keeps it."""
    from accelerate.utils import parse_flag_from_env

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if train.mixed_precision is None and not launcher and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        cuda = torch.cuda.is_available() and not use_cpu(training=True)
        cpu = not has_accelerator() or use_cpu(training=True)
        train.mixed_precision = perf.default_mixed_precision(stage, "cuda" if cuda else "cpu" if cpu else "other")
    return train.mixed_precision or launcher or "no"


def start_processes(training: bool = False):
    """The ``accelerate.PartialState`` of extraction (no training: no DeepSpeed, no mixed-precision state), or of a
    trainer before its Accelerator exists (``training``: the same ``cpu`` choice, so both join one process group):
    stage 1 prepares its data (:func:`prepare_first`) before the model, which the data shapes, is built."""
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(training=training))
    _fix_deepspeed_cpu_ranks(state)
    _check_group(state.num_processes)
    perf.keep_freed_memory()  # each batch reuses the last batch's freed activations (vqgen/perf.py)
    return state


@contextlib.contextmanager
def prepare_first(state, once: bool = False, data_dir: str | None = None):
    """Data preparation whose cost does not grow with the number of ranks: the body (download, archive
    extraction, folder index, tar counts) runs first on one process per node, or of the whole job with ``once``
    (``--prepare_data_once``: a shared file system); the others wait, then run it *in parallel* and find everything
    prepared. The preparing process also holds a file lock in ``data_dir``, so node leaders sharing a file system
    never prepare the same files at once.
    Adapted from: accelerate ``PartialState.main_process_first`` / ``local_main_process_first``."""
    if state is None or state.num_processes == 1:
        with _prepare_lock(data_dir):
            yield
        return
    first = state.is_main_process if once else state.is_local_main_process
    with (state.main_process_first() if once else state.local_main_process_first()):
        with _prepare_lock(data_dir) if first else contextlib.nullcontext():
            yield


@contextlib.contextmanager
def _prepare_lock(data_dir: str | None):
    """An inter-process file lock in ``data_dir`` (none where it cannot be created: read-only data is complete)."""
    from filelock import FileLock

    lock = None
    if data_dir is not None:
        try:
            os.makedirs(data_dir, exist_ok=True)
            lock = FileLock(os.path.join(data_dir, ".vqgen-prepare.lock"))
            lock.acquire()
        except OSError:
            lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def use_cpu(training: bool) -> bool:
    """Whether accelerate must be told ``cpu=True`` to form the process group on this machine.

    ``accelerate launch`` exports ACCELERATE_USE_CPU only from its single-process launcher: with a multi-process
    config (``distributed_type: MULTI_GPU`` + ``use_cpu: true``, as in accelerate_configs/cpu_2proc.yaml) each
    worker would otherwise see no GPU, skip the gloo process group and run as "rank 0 of 1". Never when training
    under DeepSpeed: ``cpu=True`` switches accelerate's DeepSpeed integration off (DeepSpeed on CPU uses
    DS_ACCELERATOR). Extraction never uses DeepSpeed and goes to the CPU whenever there is no accelerator.
    """
    from accelerate.utils import parse_flag_from_env

    if training and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return False
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return (multi or not training) and not has_accelerator()


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())


def _check_group(num_processes: int) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes != launched:
        raise ConfigError(f"launched as {launched} processes but accelerate formed a group of {num_processes}: each "
                          f"process would run alone and overwrite the others' outputs. On a CPU-only machine set "
                          f"ACCELERATE_USE_CPU=true (see docs/CLUSTER.md)")


def _refuse_fp16_on_cpu(wanted: str | None) -> None:
    """Refuse fp16 on a CPU-only machine before the Accelerator exists (its state cannot be changed afterwards)."""
    from accelerate.utils import parse_flag_from_env

    if wanted != "fp16" or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return
    if parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator():
        raise ConfigError(_FP16_CPU)


def _fix_deepspeed_cpu_ranks(state) -> None:
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu, used to test the ZeRO path without GPUs): deepspeed.comm forms the
    gloo group of all ranks, but accelerate (1.x) finds no GPU backend and records every process as "rank 0 of 1"
    (all would write the same checkpoint files and read the same data). Correct accelerate's shared state from
    the process group that really exists. No effect on GPUs, where accelerate reports the ranks itself."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if state.distributed_type != DistributedType.DEEPSPEED or not dist.is_initialized():
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    if state.num_processes == world:
        return
    fix = {"num_processes": world, "process_index": rank,
           "local_process_index": int(os.environ.get("LOCAL_RANK", rank))}
    PartialState._shared_state.update(fix)
    if AcceleratorState._shared_state:  # ``state`` is an Accelerator (not stage 1's PartialState before it)
        AcceleratorState._shared_state.update(fix)


def fsdp_launch() -> bool:
    """Launched with FSDP (``accelerate launch --config_file accelerate_configs/fsdp.yaml`` / ``--use_fsdp``)?"""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def _fsdp_on_cpu(acc) -> None:
    """FSDP on a CPU process group (gloo: the sharded path tested without GPUs): accelerate (1.x) switches FSDP on for
    GPU process groups only and would silently train with DDP. Switch its shared state to FSDP with the launch's
    plugin (the FSDP_* variables of the config); torch's FSDP2 runs on gloo. No effect on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_launch() or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the environment, as accelerate builds it on GPUs
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)


def fill_deepspeed_config(acc, train) -> torch.dtype | None:
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
    cfg["train_micro_batch_size_per_gpu"] = train.batch_size
    cfg["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    cfg["gradient_clipping"] = float(train.max_grad_norm)  # 0: no clipping
    cfg.pop("train_batch_size", None)  # recomputed by accelerate from the three values above
    acc.gradient_accumulation_steps = train.gradient_accumulation_steps
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(cfg.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return None


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default cuda when available; asking for a missing device is a clear error, not a traceback."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
    return device


def check_extra_models(acc, extra: list) -> None:
    """A second trained module (GAN discriminator) needs DDP-style prepare and one grad scaler per optimizer."""
    from accelerate.utils import DistributedType

    if not extra:
        return
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("a second trained model (--disc_weight > 0: the discriminator) is not supported under "
                          "DeepSpeed (accelerate builds one engine per prepare, and the engine owns backward and "
                          "step); launch with DDP (e.g. accelerate_configs/cpu_2proc.yaml or a multi-GPU config)")
    if acc.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16 with a second optimizer (--disc_weight > 0): accelerate updates the "
                          "one grad scaler after each optimizer step, which mis-scales the second; use bf16 or no")
