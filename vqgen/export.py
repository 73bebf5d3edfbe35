"""Exports for consumers (safetensors + JSON, never pickle) and helpers for training-state checkpoints.

Export layout (``<output_dir>/export/``)::

    config.json        {"format": "vqgen-export", "format_version": 1, "kind": "vqvae"|"prior",
                        "config": asdict(model config), "meta": {...}}
    model.safetensors  the weights

Stages 2/3 and sampling load exports only. A legacy ``.pt``/``.pth`` file is accepted only through
``torch.load(weights_only=True)`` and must hold ``{"kind", "config", "state_dict"}``; anything that tries to
run code while unpickling is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .fsutil import atomic_directory, disk_full_guard, recover_directory

EXPORT_FORMAT = "vqgen-export"
EXPORT_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class Export:
    """A loaded export: what a consumer needs to rebuild a model with no flags."""

    kind: str
    config: dict
    meta: dict
    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: Path
    extra: dict = field(default_factory=dict)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def export_fingerprint(kind: str, config: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the kind, the config and every tensor's name/dtype/shape/bytes.

    Computed from content, not file bytes, so the same weights give the same fingerprint whether they were
    read from safetensors or a legacy file. Shards and priors record it to refuse a different tokenizer.
    """
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(canonical_json(config).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_export(out_dir: str | os.PathLike, kind: str, config: dict, state_dict: dict[str, torch.Tensor],
                meta: dict | None = None) -> str:
    """Atomically write ``out_dir/{config.json, model.safetensors}``; returns the export fingerprint."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    sha = export_fingerprint(kind, config, tensors)
    payload = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "meta": meta or {},
        "sha256": sha,
    }
    with disk_full_guard(f"the export {out_dir}", "the previous export (if any) is intact"), \
            atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": EXPORT_FORMAT, "kind": kind})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return sha


def is_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete export folder (its config.json is written with the weights, atomically)."""
    return (Path(path) / CONFIG_NAME).is_file()


def _resolve_export_dir(path: Path) -> Path:
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        return path.parent
    run_export = recover_directory(path / "export")
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (run_export / CONFIG_NAME).exists():
        return run_export  # a run's output_dir
    return path


def load_export(path: str | os.PathLike, expected_kind: str | None = None) -> Export:
    """Load an export directory (or a run dir holding ``export/``, or a legacy .pt/.pth file)."""
    path = recover_directory(path)  # a writer killed between its two renames left only .<name>.old
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (pass an export folder written by training, "
                              f"e.g. runs/<name>/export)")
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        exp = _load_legacy(path)
    else:
        exp = _load_export_dir(_resolve_export_dir(path))
    if expected_kind is not None and exp.kind != expected_kind:
        raise CheckpointError(f"{path} is a '{exp.kind}' export, but a '{expected_kind}' export is needed here")
    return exp


def _load_export_dir(d: Path) -> Export:
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"incomplete export {d}: {p.name} is missing (was training interrupted before "
                                  f"the export was written?)")
    try:
        payload = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt export config {cfg_path}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{cfg_path} is not a vqgen export (format={payload.get('format')!r} if a dict)")
    if payload.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} has export format version {payload['format_version']}, newer than this "
                              f"vqgen understands ({EXPORT_FORMAT_VERSION}); upgrade vqgen")
    try:
        state_dict = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated weights {w_path}: {e}") from None
    kind, config = payload["kind"], payload["config"]
    sha = export_fingerprint(kind, config, state_dict)
    if payload.get("sha256") not in (None, sha):
        raise CheckpointError(f"{d}: weights do not match config.json's sha256 (files from two different exports?)")
    return Export(kind=kind, config=config, meta=payload.get("meta", {}), state_dict=state_dict, sha256=sha, path=d)


def _load_legacy(path: Path) -> Export:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file (loading it would need to run code from the "
            f"file, which vqgen never does). Re-export it as safetensors. Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {e}") from None
    if not (isinstance(obj, dict) and {"kind", "config", "state_dict"} <= set(obj)):
        raise CheckpointError(f"{path} holds plain weights without a vqgen config; legacy files must be a dict with "
                              f"'kind', 'config' and 'state_dict' (use an export folder instead)")
    sd = {k: v for k, v in obj["state_dict"].items() if isinstance(v, torch.Tensor)}
    return Export(kind=obj["kind"], config=dict(obj["config"]), meta=dict(obj.get("meta", {})), state_dict=sd,
                  sha256=export_fingerprint(obj["kind"], dict(obj["config"]), sd), path=path)
