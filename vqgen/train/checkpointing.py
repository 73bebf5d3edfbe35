"""Training-state checkpoints: crash-consistent save and rotation, integrity, and the exact position on load.

A checkpoint is ``accelerator.save_state`` (models, optimizers, grad scaler, RNG states of every rank) plus
``vqgen_state.json``, written last: the :class:`LoopState`, the learning-rate schedulers' states as JSON (accelerate
would pickle custom objects and load them with ``weights_only=False``, i.e. run code on ``--resume``) and the size
and sha256 of every other file. ``--resume`` verifies before loading (:func:`verified_resume`); a damaged newest
checkpoint is set aside and the newest intact one used. Folder names are :class:`vqgen.run_dir.RunDir`'s.

Adapted from: the diffusers accelerate example scripts (checkpoint-{step} folders, total limit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, DiskFullError, VQGenError
from ..fsutil import atomic_write_json, fsync_dir, fsync_tree, is_disk_full, sha256_file
from ..lock import first_error, main_decides
from ..run_dir import RunDir

DATA_STATE = "data"  # LoopState.extra key of the task's data_state() (see StageTask in loop.py)
FILES = "files"  # vqgen_state.json key: {relative path: {"bytes", "sha256"}} of every other file of the checkpoint
RNG_FILE = "random_states_{}.pkl"  # accelerate's RNG state of rank {} (it skips one it cannot load, silently)
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


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
            atomic_write_json(tmp / RunDir.STATE, {**_state_json(state, schedulers), FILES: checkpoint_files(tmp)})
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


def checkpoint_files(folder: Path) -> dict:
    """Size and sha256 of every file of a checkpoint folder but its state file (what --resume verifies)."""
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f != folder / RunDir.STATE}


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (None: intact). Checkpoints of older vqgen versions list no files: their
    state file, safetensors headers and top-level pickles are checked. Every rank's RNG state must load."""
    try:
        raw = json.loads((path / RunDir.STATE).read_text())
        world = int(raw["world_size"])
        if not all(isinstance(raw[k], int) for k in ("global_step", "epoch", "batches_done")):
            raise TypeError("positions are not integers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{RunDir.STATE} is unreadable ({type(e).__name__}: {_first_line(e)})"
    files = raw.get(FILES)
    for rel, rec in sorted(files.items()) if isinstance(files, dict) else ():
        f = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(rec, dict):
            return f"{RunDir.STATE} lists an invalid file {rel!r}"
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != rec.get("bytes"):
            return f"{rel} has {f.stat().st_size} bytes, {rec.get('bytes')} were written"
        if sha256_file(f) != rec.get("sha256"):
            return f"{rel} is not the file that was written (sha256 differs)"
    if not isinstance(files, dict):
        for f in sorted(path.rglob("*.safetensors")):
            if (problem := _safetensors_problem(f)) is not None:
                return f"{f.relative_to(path)} is unreadable ({problem})"
        for f in sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt")):  # optimizers, scaler
            if (problem := _load_pickle(f)[1]) is not None:
                return problem
    for rank in range(world):
        if (problem := _rng_problem(path / RNG_FILE.format(rank))) is not None:
            return problem
    return None


def _safetensors_problem(f: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as st:
            st.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        return _first_line(e)
    return None


def _load_pickle(f: Path):
    """(object, None), or (None, why accelerate could not load this pickle): it loads with weights_only, so a
    pickle that would run code is refused and nothing runs."""
    from accelerate.utils import load

    try:
        return load(str(f)), None
    except Exception as e:  # noqa: BLE001 - torch's errors for a damaged, truncated or code-running pickle
        return None, f"{f.name} cannot be loaded safely ({_load_error(e, 'it')})"


def _rng_problem(f: Path) -> str | None:
    """Why accelerate would skip this RNG state file (it does so silently), or None."""
    if not f.is_file():
        return f"{f.name} is missing"
    states, problem = _load_pickle(f)
    if problem is None and not (isinstance(states, dict) and all(k in states for k in RNG_KEYS)):
        problem = f"{f.name} holds no RNG state"
    return problem


def verified_resume(run: RunDir, resume: str | None, chosen: Path | None) -> Path | None:
    """The checkpoint to resume from, verified (call on every rank; the main process decides).

    ``chosen``: what :meth:`RunDir.check_policy` found. ``--resume latest``: the newest intact checkpoint; newer
    damaged ones are set aside (renamed, kept) with one warning line each; none intact is a CheckpointError.
    ``--resume PATH``: a damaged PATH is a CheckpointError."""
    if chosen is None:
        return None

    def decide() -> str:
        if resume != "latest":
            if (problem := checkpoint_problem(chosen)) is not None:
                raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {problem}. Resume from another "
                                      f"one (--resume latest takes the newest intact checkpoint of the run)")
            return str(chosen)
        damaged = []
        for ckpt in reversed(run.checkpoint_dirs()):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                for bad, why in damaged:
                    print(f"warning: checkpoint {bad} is damaged ({why}); kept as {run.set_aside(bad)}, resuming "
                          f"from {ckpt.name}", flush=True)
                return str(ckpt)
            damaged.append((ckpt, problem))
        raise CheckpointError(f"--resume latest: no intact checkpoint in {run.checkpoints} (" + "; ".join(
            f"{bad.name}: {why}" for bad, why in damaged) + "); nothing was changed. Start over with --overwrite, or "
            "resume a copy of a checkpoint with --resume PATH")

    return Path(main_decides(decide))


def load_checkpoint(acc, path: Path, schedulers: list) -> LoopState:
    """Restore everything ``path`` holds (on every rank); returns the loop position as saved (the task's
    ``resume_batches`` turns its ``batches_done`` into the current data layout's). Any failure, on any rank, is
    one CheckpointError on every rank."""
    error, saved = None, None
    try:
        saved = _load(acc, path, schedulers)
    except VQGenError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - torch / safetensors / accelerate errors of a file that passed checks
        error = f"cannot resume from {path}: {_load_error(e, 'a file of it')}"
    error = first_error(error)  # every rank stops if one cannot load
    if error is not None:
        raise CheckpointError(error)
    return saved


def _load(acc, path: Path, schedulers: list) -> LoopState:
    raw = json.loads((path / RunDir.STATE).read_text())
    states = [raw.pop("scheduler", None)] + raw.pop("other_schedulers", [])
    saved = LoopState(**{f.name: raw[f.name] for f in dataclasses.fields(LoopState) if f.name in raw})
    acc.load_state(str(path))
    _check_rng_restored(path / RNG_FILE.format(acc.process_index), acc.process_index < saved.world_size)
    for scheduler, sched_state in zip(schedulers, states):
        if sched_state is not None:
            scheduler.load_state_dict(sched_state)
        else:  # checkpoints of older vqgen versions (scheduler pickled by accelerate, not loaded): replay it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(saved.global_step):
                    scheduler.step()
    return saved


def _check_rng_restored(f: Path, expected: bool) -> None:
    """accelerate logs "Could not load random states" and goes on when it cannot restore them: an exact resume
    would then silently not be one. ``expected``: this rank saved a state (a resume on more ranks has none)."""
    import torch

    if not expected:
        return
    states, problem = _load_pickle(f) if f.is_file() else (None, f"{f.name} is missing")
    if problem is None:
        try:
            if random.getstate() == states["random_state"] and torch.equal(torch.get_rng_state(),
                                                                           states["torch_manual_seed"]):
                return
        except (KeyError, TypeError, RuntimeError):
            pass
        problem = f"{f.name} was not restored"
    raise CheckpointError(f"cannot resume from {f.parent}: {problem}, so the resumed run would not continue the "
                          f"interrupted one exactly")


def _load_error(e: BaseException, subject: str) -> str:
    if "Weights only load failed" in str(e):  # (torch's advice to retry with weights_only=False is not for us)
        return f"{subject} would run code or build other objects than tensors when unpickled: refused, nothing ran"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


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
