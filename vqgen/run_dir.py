"""Run folders: the one place that knows their layout and the output-folder policy.

:class:`RunDir` is one trainer's folder (``checkpoints/checkpoint-<step>/``, ``export/``, ``samples/``,
``metrics.jsonl``, ``config.yaml``, ``run_config.json``, ``STOP``, the trackers' folders); :class:`PipelineLayout` is
the folder of ``VQVAE_T.py`` (``vqvae/``, ``shards/``, ``prior/``, ``samples/``, ``eval.json``). A checkpoint counts
only when complete: it is written as ``.checkpoint-<step>.tmp`` and renamed once its ``vqgen_state.json`` is in
(:mod:`vqgen.train.checkpointing`). The layout, entry by entry: docs/NOTES.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .config.stages import CONFIG_FILE
from .errors import CheckpointError, ConfigError, VQGenError
from .fsutil import atomic_write_json, atomic_write_text


class RunDir:
    """A training run folder (``--output_dir`` of a trainer)."""

    CHECKPOINTS, EXPORT, SAMPLES, LOGS = "checkpoints", "export", "samples", "logs"
    METRICS, CONFIG, RECORD, STATE, STOP = "metrics.jsonl", CONFIG_FILE, "run_config.json", "vqgen_state.json", "STOP"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def of_export(cls, export_path: str | os.PathLike) -> "RunDir":
        """The run an export folder belongs to (``runs/x/vqvae/export`` -> ``runs/x/vqvae``)."""
        p = Path(export_path)
        return cls(p.parent if p.name == cls.EXPORT else p)

    # ---- paths
    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def export(self) -> Path:
        return self.root / self.EXPORT

    @property
    def samples(self) -> Path:
        return self.root / self.SAMPLES

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    @property
    def metrics_file(self) -> Path:
        return self.root / self.METRICS

    @property
    def config_file(self) -> Path:
        return self.root / self.CONFIG

    @property
    def record_file(self) -> Path:
        return self.root / self.RECORD

    @property
    def stop_file(self) -> Path:
        return self.root / self.STOP

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def checkpoint_tmp(self, step: int) -> Path:
        return self.checkpoints / f".checkpoint-{step}.tmp"

    # ---- checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        """Complete ``checkpoint-{step}`` folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            if d.is_dir() and d.name.startswith("checkpoint-") and d.name[11:].isdigit() and is_checkpoint(d):
                found.append((int(d.name[11:]), d))
        return [d for _, d in sorted(found)]

    def resolve_resume(self, resume: str | None) -> Path | None:
        """``--resume latest`` -> the newest complete checkpoint (None if there is none); a path must be one."""
        if not resume:
            return None
        if resume == "latest":
            dirs = self.checkpoint_dirs()
            return dirs[-1] if dirs else None
        p = Path(resume)
        if not is_checkpoint(p):
            raise CheckpointError(f"--resume {resume}: not a complete vqgen checkpoint folder (no {self.STATE})")
        return p

    def clean_stale_checkpoints(self) -> None:
        """Remove ``.checkpoint-*.tmp`` / ``.*.del`` folders left by a run killed while saving or rotating."""
        if self.checkpoints.is_dir():
            for d in self.checkpoints.iterdir():
                if d.name.startswith(".checkpoint-") and d.name.endswith((".tmp", ".del")):
                    shutil.rmtree(d, ignore_errors=True)

    # ---- the output-folder policy
    def holds_run(self) -> bool:
        return (self.record_file.exists() or self.config_file.exists() or bool(self.checkpoint_dirs())
                or self.export.exists())

    def check_policy(self, record: dict, resume: str | None, overwrite: bool, model_config=None) -> Path | None:
        """Refuse to mix two runs in one folder and a resume with another model; returns the checkpoint to resume
        from (None: start fresh). ``record`` is what :meth:`write_record` will store for this run.
        ``model_config``: this run's model config (a :class:`vqgen.config.ModelConfig`); the model a run of an
        earlier vqgen recorded is read through its class (earlier names, fields added since), so it stays
        resumable."""
        resume_dir = self.resolve_resume(resume) if resume else None
        if self.holds_run() and not resume and not overwrite:
            raise ConfigError(f"{self.root} already holds a run; pass --resume latest to continue it, --overwrite to "
                              f"start over, or choose another --output_dir")
        # The run being continued: this folder's, or the one --resume PATH points into (another folder).
        runs = [self] + ([RunDir(resume_dir.parent.parent)] if resume_dir is not None else [])
        for run in runs if resume else []:
            old = run.read_record()
            if old is not None and isinstance(old.get("model"), dict) and model_config is not None:
                old = {**old, "model": _canonical(type(model_config), old["model"])}
            if old is not None and old.get("model") != record.get("model"):
                raise CheckpointError(f"--resume: {run.root} was trained with another model config:\n  saved:   "
                                      f"{old.get('model')}\n  flags:   {record.get('model')}")
        return resume_dir

    def clear(self) -> None:
        """--overwrite: remove what an earlier run wrote (checkpoints first: the folder stops being resumable)."""
        for sub in (self.CHECKPOINTS, self.EXPORT, f".{self.EXPORT}.old", self.SAMPLES, self.LOGS):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for f in (self.RECORD, self.CONFIG, self.METRICS):
            with contextlib.suppress(FileNotFoundError):
                (self.root / f).unlink()

    # ---- files
    def write_record(self, record: dict) -> None:
        atomic_write_json(self.record_file, record)

    def read_record(self) -> dict | None:
        return json.loads(self.record_file.read_text()) if self.record_file.exists() else None

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_file, text)

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        rows = []
        if self.metrics_file.is_file():
            for line in self.metrics_file.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill mid-write
        return rows


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A complete checkpoint folder: its state file is written last."""
    return (Path(path) / RunDir.STATE).exists()


class PipelineLayout:
    """The folder of ``VQVAE_T.py``: one :class:`RunDir` per trainer, the shards, the samples and the evaluation."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.vqvae, self.prior = RunDir(self.root / "vqvae"), RunDir(self.root / "prior")
        self.shards, self.samples = self.root / "shards", self.root / RunDir.SAMPLES
        self.eval_json, self.eval_plots = self.root / "eval.json", self.root / "eval"


def _canonical(config_cls, model: dict) -> dict:
    """A recorded model config as this vqgen writes it (earlier names upgraded); as recorded if it is not valid."""
    try:
        return config_cls.from_dict(model).to_dict()
    except VQGenError:
        return model
