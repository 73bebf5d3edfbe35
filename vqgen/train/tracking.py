"""Experiment trackers (wandb, TensorBoard) through accelerate's ``log_with``, chosen so logging never breaks a run.

``--report_to`` picks the trackers (``--no_wandb`` drops wandb). wandb logs online only when an API key is configured
and its host answers a short probe, else offline into ``<output_dir>/wandb`` with one ``warning:`` line (a queued
batch job should train, not die on a missing login); a failing ``wandb.init`` is retried once offline. The wandb run
id is saved with the training state, so a resumed job logs into the same run. All is decided on the main process
before the run folder is touched. Called by :func:`vqgen.train.setup.prepare_training`: :func:`plan_trackers`,
:func:`start_trackers`, :meth:`TrackerPlan.state`. The whole rule: docs/NOTES.md.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError
from ..fsutil import is_disk_full
from ..run_dir import RunDir

REPORT_TO = ("wandb", "tensorboard", "all", "none")
STATE_KEY = "trackers"  # key in LoopState.extra


def selected_trackers(report_to: str, no_wandb: bool) -> list[str]:
    names = ["wandb", "tensorboard"] if report_to == "all" else [] if report_to == "none" else [report_to]
    return [n for n in names if not (no_wandb and n == "wandb")]


@dataclass
class TrackerPlan:
    """What to start: accelerate tracker names, their init kwargs and the warnings to print (one line each)."""

    names: list[str]
    init_kwargs: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    saved: dict = field(default_factory=dict)    # the resumed checkpoint's tracker state
    run_ids: dict = field(default_factory=dict)  # filled by start_trackers: {"wandb_run_id": ...}

    @property
    def log_with(self) -> list[str] | None:
        return self.names or None

    def state(self) -> dict:
        """Stored in every checkpoint (LoopState.extra[STATE_KEY]): the resumed run's ids, updated by this run's
        (kept when this run logs without wandb, so a later resume with wandb continues the same run)."""
        return {**self.saved, **self.run_ids}


def saved_tracker_state(checkpoint_dir: Path | None) -> tuple[dict, int]:
    """(tracker state, global step) stored in a checkpoint's ``vqgen_state.json``; ({}, 0) without one."""
    if checkpoint_dir is None:
        return {}, 0
    try:
        raw = json.loads((Path(checkpoint_dir) / RunDir.STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}, 0
    return dict(raw.get("extra", {}).get(STATE_KEY, {})), int(raw.get("global_step", 0))


def _wandb_mode_env() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode or None


def _wandb_offline_reason() -> str | None:
    """Why wandb cannot log online right now (None: it can). No network unless a key is configured."""
    import wandb

    from ..offline import PROBE_TIMEOUT_S, probe_host

    if not wandb.login(prompt=False, verify=False):
        return "wandb has no API key (no WANDB_API_KEY, no `wandb login`)"
    url = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if not probe_host(host, port):
        return f"the wandb server {host}:{port} cannot be reached (no connection within {PROBE_TIMEOUT_S:g} s)"
    return None


def plan_trackers(train, output_dir: Path, resume_dir: Path | None) -> TrackerPlan:
    """Decide trackers and wandb's mode from ``train`` (a :class:`~vqgen.config.TrainConfig`); no file is written.
    Raises ConfigError for a tracker that is not installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    names = selected_trackers(train.report_to, train.no_wandb)
    if "tensorboard" in names and not is_tensorboard_available():
        raise ConfigError("--report_to tensorboard needs tensorboardX or tensorboard: pip install tensorboardX")
    if "wandb" in names and not is_wandb_available():
        raise ConfigError("--report_to wandb needs wandb: pip install wandb (or pass --report_to none)")
    saved, step = saved_tracker_state(resume_dir)
    plan = TrackerPlan(names, saved=saved)
    if "tensorboard" in names:
        # Event files are named events.out.tfevents.<second>.<host>: two starts in one second (a quick requeue)
        # would write the same file and lose the first's events, so each start adds its own suffix.
        plan.init_kwargs["tensorboard"] = {"filename_suffix": f".{uuid.uuid4().hex[:8]}"}
        if step:
            plan.init_kwargs["tensorboard"]["purge_step"] = step
    if "wandb" in names:
        kw = {"dir": str(output_dir), "name": output_dir.name}
        if saved.get("wandb_run_id"):
            kw.update(id=saved["wandb_run_id"], resume="allow")
        mode = _wandb_mode_env()
        if mode is None and _is_main_launch():  # (only the main process starts wandb)
            reason = _wandb_offline_reason()
            if reason:
                kw["mode"] = "offline"
                plan.warnings.append(_offline_warning(reason, output_dir))
        plan.init_kwargs["wandb"] = kw
    return plan


def _is_main_launch() -> bool:
    """Main process before the Accelerator exists (RANK from accelerate launch / torchrun, else one process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _offline_warning(reason: str, output_dir: Path) -> str:
    return (f"warning: {reason}: wandb logs offline to {output_dir / 'wandb'}; upload later with "
            f"`wandb sync {output_dir / 'wandb'}/offline-run-*` (set WANDB_MODE to choose explicitly)")


def start_trackers(accelerator, plan: TrackerPlan, project: str, config: dict, output_dir: Path) -> None:
    """``accelerator.init_trackers`` with the plan; on a wandb failure, once more with wandb offline (main only)."""
    if not plan.names:
        return
    for line in plan.warnings:
        accelerator.print(line, file=sys.stderr, flush=True)
    config = {k: ("None" if v is None else v) for k, v in config.items()}  # TensorBoard hparams refuse None
    try:
        accelerator.init_trackers(project, config=config, init_kwargs=plan.init_kwargs)
    except Exception as e:  # noqa: BLE001 - a tracker must never stop training; the reason is printed
        wandb_kw = plan.init_kwargs.get("wandb")
        if wandb_kw is None or wandb_kw.get("mode") == "offline" or is_disk_full(e):
            _cannot_start(accelerator, e)
        _end_all(accelerator)
        accelerator.print(_offline_warning(f"wandb.init failed ({_first_line(e)})", output_dir), file=sys.stderr,
                          flush=True)
        wandb_kw["mode"] = "offline"
        try:
            accelerator.init_trackers(project, config=config, init_kwargs=plan.init_kwargs)
        except Exception as e2:  # noqa: BLE001 - offline failed too (a broken install, an unwritable folder)
            _cannot_start(accelerator, e2)
    if accelerator.is_main_process and "wandb" in plan.names:
        run_id = getattr(accelerator.get_tracker("wandb", unwrap=True), "id", None)
        if run_id:  # (a WANDB_MODE=disabled run has none worth keeping)
            plan.run_ids["wandb_run_id"] = run_id


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _cannot_start(accelerator, e: Exception) -> None:
    """A tracker that cannot start even offline: one error line (a full disk keeps its own handling)."""
    if is_disk_full(e):
        raise e
    _end_all(accelerator)
    raise ConfigError(f"the experiment tracker could not start ({_first_line(e)}); rerun with --no_wandb or "
                      f"--report_to none/tensorboard (nothing that blocks the rerun was written)") from e


def _end_all(accelerator) -> None:
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception:  # noqa: BLE001 - it failed to start; nothing to keep
            pass
    accelerator.trackers = []
