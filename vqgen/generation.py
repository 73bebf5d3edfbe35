"""A prior's sampling settings stored beside its weights (``generation_config.json`` in the export folder, as Hugging
Face models carry one), and a torch-free look into export folders, so that every sampling value is checked before a
model is loaded.

The file holds one setting per mode (``conditional``: guidance scale and schedule, temperature, top-k/top-p;
``unconditional``: temperature, top-k/top-p), how they were chosen (:mod:`vqgen.eval.tune` writes it at the end of
prior training) and the fingerprint of the weights they were chosen for. It is not part of the export's sha256 (the
weights and config), like the model card. :func:`resolve_sampling` applies the one rule: a flag, else the stored
setting, else the built-in default (:func:`vqgen.config.draw_settings`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import SamplingConfig, draw_settings
from .errors import CheckpointError, ConfigError
from .fsutil import atomic_write_json, recover_directory
from .hub import resolve_model_path
from .run_dir import RunDir

GENERATION_CONFIG = "generation_config.json"
GENERATION_FORMAT, GENERATION_FORMAT_VERSION = "vqgen-generation-config", 1
MODES = ("conditional", "unconditional")


def export_folder(ref) -> Path:
    """The folder of an export given as itself, its config.json / model.safetensors, a run folder holding
    ``export/``, or an ``hf:`` ref (the local Hub cache: CheckpointError on a miss, within seconds)."""
    path = recover_directory(resolve_model_path(ref))  # a writer killed between its two renames left .<name>.old
    if path.is_file() and path.name in ("config.json", "model.safetensors"):
        return path.parent
    run_export = recover_directory(RunDir(path).export)
    if path.is_dir() and not (path / "config.json").exists() and (run_export / "config.json").exists():
        return run_export
    return path


@dataclass
class ExportPeek:
    """What config.json says about an export, read without torch (None fields: not a vqgen export, e.g. a diffusers
    VQModel folder or a legacy .pt file: the loader checks those)."""

    path: Path
    kind: str | None = None
    config: dict | None = None
    meta: dict | None = None
    sha256: str | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.config is None else int(self.config.get("num_classes", 0))

    @property
    def dataset(self) -> dict:
        """The training data a tokenizer export records (``{"name", "image_size", ..., "data_dir"}``; {} if none)."""
        d = (self.meta or {}).get("dataset")
        return {"name": d} if isinstance(d, str) else dict(d or {})

    def check_kind(self, kind: str, ref) -> "ExportPeek":
        if self.kind is not None and self.kind != kind:
            raise CheckpointError(f"{ref} is a '{self.kind}' export, but a '{kind}' export is needed here")
        return self


def peek_export(ref, flag: str = "--checkpoint") -> ExportPeek:
    """The export ``ref`` names, checked to exist (CheckpointError naming ``flag`` otherwise)."""
    path = export_folder(ref)
    if not path.exists():
        raise CheckpointError(f"{flag}: checkpoint not found: {path} (pass an export folder written by training, "
                              f"e.g. runs/<name>/export)")
    try:
        payload = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return ExportPeek(path)   # not a readable vqgen export folder: the loader says what is wrong
    if not isinstance(payload, dict) or payload.get("format") != "vqgen-export":
        return ExportPeek(path)
    return ExportPeek(path, payload.get("kind"), payload.get("config"), payload.get("meta"), payload.get("sha256"))


# ------------------------------------------------------------------------------------------ generation_config.json
def read_generation_config(folder, sha256: str | None = None) -> dict | None:
    """The stored settings of the prior export in ``folder``; None when there are none, or (with one warning line)
    when the file is not a valid setting or was chosen for other weights: sampling then uses the built-in defaults."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != GENERATION_FORMAT:
            raise ValueError(f"not a {GENERATION_FORMAT} file")
        if data.get("format_version", 0) > GENERATION_FORMAT_VERSION:
            raise ValueError(f"format version {data['format_version']} is newer than this vqgen understands")
        for mode in MODES:
            if mode in data:
                draw_settings(**data[mode], conditional=mode == "conditional")
        if sha256 and data.get("prior_sha256") not in (None, sha256):
            raise ValueError(f"chosen for other weights ({str(data['prior_sha256'])[:12]}; this export is "
                             f"{sha256[:12]})")
    except (OSError, ValueError, TypeError, ConfigError) as e:
        print(f"warning: {path} ignored: {e}; sampling uses the built-in defaults where no flag is given",
              file=sys.stderr, flush=True)
        return None
    return data


def write_generation_config(folder, settings: dict, chosen_by: dict, prior_sha256: str | None) -> Path:
    """Atomically write ``folder/generation_config.json``: ``settings`` maps a mode to its draw settings."""
    path = Path(folder) / GENERATION_CONFIG
    atomic_write_json(path, {"format": GENERATION_FORMAT, "format_version": GENERATION_FORMAT_VERSION,
                             "prior_sha256": prior_sha256, **{m: settings[m] for m in MODES if m in settings},
                             "chosen_by": chosen_by})
    return path


# --------------------------------------------------------------------------------------------------- resolving
def check_class_label(sc: SamplingConfig, num_classes: int | None) -> None:
    """``--class_label`` against the prior's classes (None: unknown yet, the loader checks)."""
    if num_classes is None or sc.class_label is None:
        return
    if num_classes == 0:
        raise ConfigError("--class_label given, but this prior is unconditional (its shards had no labels)")
    if not 0 <= sc.class_label < num_classes:
        raise ConfigError(f"--class_label {sc.class_label} is out of range: this prior knows classes "
                          f"0..{num_classes - 1} (for unconditional samples pass --unconditional)")


def resolve_sampling(sc: SamplingConfig, num_classes: int, stored: dict | None,
                     where: str | os.PathLike | None = None) -> tuple[dict, str]:
    """(``generate`` keyword arguments, one line saying where each value came from) for a prior with
    ``num_classes`` classes and stored settings ``stored`` (ignored with ``--sampling_defaults builtin``)."""
    conditional = num_classes > 0 and not sc.unconditional
    mode = MODES[0] if conditional else MODES[1]
    setting = (stored or {}).get(mode) if sc.sampling_defaults == "stored" else None
    kw, source = draw_settings(sc.temperature, sc.top_k, sc.top_p, sc.cfg_scale, sc.cfg_schedule, sc.cfg_power,
                               setting, conditional)
    by = {}
    for name, src in source.items():
        off = (name == "top_k" and kw[name] == 0) or (name == "top_p" and kw[name] >= 1.0)
        by.setdefault(src, []).append(f"{name} {'off' if off else kw[name]}")
    label = {"given": "given", "stored": f"stored with the prior ({Path(where) / GENERATION_CONFIG})" if where
             else "stored with the prior", "built-in": "built-in"}
    what = "class-conditional" if conditional else ("unconditional" if num_classes == 0 else
                                                    "unconditional (null class)")
    line = f"sampling, {what}: " + "; ".join(f"{', '.join(v)} {label[k]}" for k, v in by.items())
    return {**kw, **sc.kind_kwargs()}, line
