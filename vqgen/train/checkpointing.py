"""Training-state checkpoints: crash-consistent save and rotation, and the exact mid-epoch position on load.

A checkpoint is ``accelerator.save_state`` (models, optimizers, grad scaler, RNG states of every rank) plus
``vqgen_state.json``: the :class:`LoopState` and the learning-rate schedulers' states as JSON (accelerate would
pickle custom objects and load them with ``weights_only=False``, i.e. run code on ``--resume``). Folder names and
the completeness rule are :class:`vqgen.run_dir.RunDir`'s.

Adapted from: the diffusers accelerate example scripts (checkpoint-{step} folders, total limit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiskFullError
from ..fsutil import atomic_write_json, fsync_dir, fsync_tree, is_disk_full
from ..run_dir import RunDir

DATA_STATE = "data"  # LoopState.extra key of the task's data_state() (see StageTask in loop.py)


@dataclass
class LoopState:
    """Position in training, saved in every checkpoint (vqgen_state.json)."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches done in `epoch` on each rank
    world_size: int = 1
    batch_size: int = 0
    bad_steps_total: int = 0
    finished: bool = False
    extra: dict = field(default_factory=dict)  # extra[DATA_STATE]: the task's data layout at this position


def save_checkpoint(acc, run: RunDir, state: LoopState, schedulers: list, total_limit: int) -> Path:
    """Write ``checkpoints/checkpoint-{step}`` crash-consistently (call on every rank); returns its path.

    Everything goes into ``.checkpoint-{step}.tmp`` (fsynced), the state file last, then one rename publishes it.
    Folders being replaced or rotated out are first renamed to a dot-name, then deleted, so a SIGKILL mid-delete
    never leaves a half-deleted folder that looks complete. A full disk raises :class:`DiskFullError`; the temp
    folder is removed and older checkpoints stay intact.
    """
    final, tmp = run.checkpoint(state.global_step), run.checkpoint_tmp(state.global_step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))  # every rank: DeepSpeed shards optimizer state per rank
        acc.wait_for_everyone()
        if acc.is_main_process:
            fsync_tree(tmp)
            atomic_write_json(tmp / RunDir.STATE, _state_json(state, schedulers))
    except BaseException as e:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(f"disk full while writing checkpoint {final}; the previous checkpoints in "
                                f"{run.checkpoints} are intact. Free some space and rerun with --resume "
                                f"latest") from None
        raise
    if acc.is_main_process:
        if final.exists():  # same step saved twice (e.g. --checkpointing_steps hit at an epoch end)
            _remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(run.checkpoints)
        for old in run.checkpoint_dirs()[:-total_limit]:
            _remove_dir(old)
    acc.wait_for_everyone()
    return final


def _state_json(state: LoopState, schedulers: list) -> dict:
    """The loop position and the schedulers' states: ``scheduler`` (the first optimizer's, the format of every
    vqgen checkpoint) and ``other_schedulers`` (a task with more optimizers, e.g. a GAN discriminator)."""
    out = dataclasses.asdict(state)
    out["scheduler"] = schedulers[0].state_dict()
    if len(schedulers) > 1:
        out["other_schedulers"] = [s.state_dict() for s in schedulers[1:]]
    return out


def load_checkpoint(acc, path: Path, schedulers: list) -> LoopState:
    """Restore everything ``path`` holds; returns the loop position as saved (the task's ``resume_batches`` turns
    its ``batches_done`` into the current data layout's)."""
    raw = json.loads((path / RunDir.STATE).read_text())
    states = [raw.pop("scheduler", None)] + raw.pop("other_schedulers", [])
    saved = LoopState(**raw)
    acc.load_state(str(path))
    for scheduler, sched_state in zip(schedulers, states):
        if sched_state is not None:
            scheduler.load_state_dict(sched_state)
        else:  # checkpoints of older vqgen versions (scheduler pickled by accelerate, not loaded): replay it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(saved.global_step):
                    scheduler.step()
    return saved


def saved_data_state(state: LoopState) -> dict:
    """The data layout a checkpoint was saved with (``extra["data"]``, the task's ``data_state``); checkpoints
    written before that hook existed recorded only the loop's world size and batch size."""
    return state.extra.get(DATA_STATE) or {"world_size": state.world_size, "batch_size": state.batch_size}


def map_style_resume(saved: dict | None, epoch: int, batches_done: int, world_size: int,
                     batch_size: int) -> tuple[int, str | None]:
    """The resume rule of a map-style input, whose k-th global batch holds samples ``[k*G, (k+1)*G)`` of the epoch's
    order whatever the world size (:func:`vqgen.train.schedule.epoch_indices`; ``G`` = processes x batch).

    Exact when the samples done are a whole number of the new global batches. Otherwise the nearest exact
    continuation: resume at the last new-layout batch boundary before the position reached, so the few samples
    after it (fewer than one global batch) are seen twice in this epoch, never skipped; one warning says so.
    """
    if not batches_done:
        return 0, None
    saved = saved or {}
    old_w, old_b = int(saved.get("world_size", world_size)), int(saved.get("batch_size", batch_size))
    done, new_global = batches_done * old_w * old_b, world_size * batch_size
    skip, extra = divmod(done, new_global)
    if not extra:
        return skip, None
    return skip, (f"warning: resuming epoch {epoch} with {world_size} processes x batch {batch_size}: the {done} "
                  f"samples done with {old_w} x {old_b} are not a whole number of the new global batches; continuing "
                  f"at batch {skip}, so {extra} samples of this epoch are seen twice (exact: resume with "
                  f"{old_w} x {old_b}, or from an epoch-end checkpoint)")


def _remove_dir(d: Path) -> None:
    """Delete a checkpoint folder so that no kill leaves a half-deleted one that still looks complete."""
    doomed = d.with_name(f".{d.name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(d, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
