"""The layout of a training run folder: checkpoints, resume resolution."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-{step}`` folders under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and d.name[11:].isdigit() and (d / "vqgen_state.json").exists():
            found.append((int(d.name[11:]), d))
    return [d for _, d in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``--resume latest`` → newest complete checkpoint (None if there is none); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    p = Path(resume)
    if not (p / "vqgen_state.json").exists():
        raise CheckpointError(f"--resume {resume}: not a complete vqgen checkpoint folder (no vqgen_state.json)")
    return p
