"""Exports for consumers (safetensors + JSON, never pickle), and the one decision whether a tokenizer, a prior
and a shard set belong together (:func:`check_compatible`).

``<output_dir>/export/`` holds ``config.json`` (format, version, kind, the model config, :class:`ExportMeta` and a
content sha256) and ``model.safetensors``; a prior's may hold ``generation_config.json`` (the sampling settings chosen for
it, :mod:`vqgen.generation`; not in the sha256). :func:`save_export` is its one writer and :func:`load_export` its one
reader; models wrap them as ``export_to`` / ``from_export``. ``hf:<user>/<repo>[/<subfolder>][@<revision>]`` names an
export in the local Hub cache (:mod:`vqgen.hub`). A legacy ``.pt``/``.pth`` file is read only through
``torch.load(weights_only=True)``: anything that tries to run code while unpickling is refused. Layout: docs/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ShardError
from .fsutil import atomic_directory, disk_full_guard, recover_directory
from .hub import resolve_model_path
from .run_dir import RunDir

EXPORT_FORMAT = "vqgen-export"
EXPORT_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ExportMeta:
    """Where an export comes from (config.json's ``"meta"``). Keys this vqgen does not know are kept in ``extra``
    and written back unchanged (older/newer writers, user notes)."""

    stage: str | None = None               # "vqvae" | "prior" | "classifier"
    step: int | None = None                # optimizer steps trained
    dataset: dict | None = None            # the training data (a DatasetInfo as a dict; at least {"name": ...})
    metrics: dict = field(default_factory=dict)   # last validation metrics
    tokenizer_sha256: str | None = None    # prior: the tokenizer whose codes it was trained on
    tokenizer_path: str | None = None      # prior: where that tokenizer was
    shards: dict | None = None             # prior: the manifest fields it was trained with
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ExportMeta":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        if isinstance(known.get("dataset"), str):  # classifier exports before ExportMeta: the dataset's name
            known["dataset"] = {"name": known["dataset"]}
        return cls(**known, extra=d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in d.items() if v is not None}}


@dataclass
class Export:
    """A loaded export: what a consumer needs to rebuild a model with no flags."""

    kind: str
    config: dict
    meta: ExportMeta
    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: Path


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
                meta: ExportMeta | None = None) -> str:
    """Atomically write ``out_dir/{config.json, model.safetensors}``; returns the export fingerprint."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    sha = export_fingerprint(kind, config, tensors)
    payload = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "meta": (meta or ExportMeta()).to_dict(),
        "sha256": sha,
    }
    with disk_full_guard(f"the export {out_dir}", "the previous export (if any) is intact"), \
            atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=weights_metadata(kind, sha))
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return sha


def weights_metadata(kind: str, sha256: str) -> dict[str, str]:
    """safetensors header metadata. ``format: pt`` is what transformers/diffusers/the Hub expect of a PyTorch
    safetensors file (transformers refuses other values); vqgen's own keys are extra. Exports written before said
    ``format: vqgen-export``: they load unchanged (vqgen never reads this metadata)."""
    return {"format": "pt", "vqgen_format": EXPORT_FORMAT, "kind": kind, "sha256": sha256}


def is_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete export folder (its config.json is written with the weights, atomically)."""
    return (Path(path) / CONFIG_NAME).is_file()


def _resolve_export_dir(path: Path) -> Path:
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        return path.parent
    run_export = recover_directory(RunDir(path).export)
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (run_export / CONFIG_NAME).exists():
        return run_export  # a run's output_dir
    return path


def load_export(path: str | os.PathLike, expected_kind: str | None = None) -> Export:
    """Load an export directory (or a run dir holding ``export/``, a legacy .pt/.pth file, or ``hf:user/repo``)."""
    path = recover_directory(resolve_model_path(path))  # hf:... -> its cached folder; a writer killed between its
    # two renames left only .<name>.old
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
    return Export(kind=kind, config=config, meta=ExportMeta.from_dict(payload.get("meta")), state_dict=state_dict,
                  sha256=sha, path=d)


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
    return Export(kind=obj["kind"], config=dict(obj["config"]), meta=ExportMeta.from_dict(obj.get("meta")),
                  state_dict=sd,
                  sha256=export_fingerprint(obj["kind"], dict(obj["config"]), sd), path=path)


# ------------------------------------------------------------------------------------------ exported models
class Exportable:
    """Mixin of every exported model (VQVAE, Prior, Classifier): ``export_to`` / ``from_export``. A loaded model
    carries its export's fingerprint (``sha256``), ``export_meta`` and ``export_path``; a fresh one has None / an
    empty ExportMeta (replaced on load, never mutated)."""

    EXPORT_KIND: ClassVar[str]
    sha256: str | None = None
    export_meta: ExportMeta = ExportMeta()
    export_path: Path | None = None

    def export_to(self, out_dir: str | os.PathLike, meta: ExportMeta | None = None) -> str:
        """Write ``out_dir/{config.json, model.safetensors}``; returns the export fingerprint (sha256)."""
        return save_export(out_dir, self.EXPORT_KIND, self.config.to_dict(), self.state_dict(), meta)

    @classmethod
    def from_export(cls, path_or_export: "str | os.PathLike | Export"):
        """Rebuild in eval mode from an export folder (or a loaded :class:`Export`); CheckpointError on mismatch."""
        exp = path_or_export if isinstance(path_or_export, Export) else load_export(path_or_export, cls.EXPORT_KIND)
        if exp.kind != cls.EXPORT_KIND:
            raise CheckpointError(f"{exp.path} is a '{exp.kind}' export, but a '{cls.EXPORT_KIND}' export is needed "
                                  f"here")
        model = cls.from_loaded_export(exp)
        model.sha256, model.export_meta, model.export_path = exp.sha256, exp.meta, exp.path
        return model.eval()

    @classmethod
    def from_loaded_export(cls, exp: Export):
        """The model of ``exp``'s config with its weights, with a clear CheckpointError when they do not fit."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- compatibility
def check_compatible(tokenizer: Any = None, prior: Any = None, shards: Any = None) -> None:
    """The one place that decides whether a tokenizer, a prior and a shard set belong together.

    ``tokenizer``: a loaded :class:`~vqgen.models.vqvae.VQVAE` (its codebook size and token grid are checked too),
    an :class:`Export`, or the tokenizer's sha256; ``prior``: a loaded :class:`~vqgen.models.prior.Prior`;
    ``shards``: a :class:`~vqgen.shards.Manifest`. Any of them may be None. A mismatch between a prior and a
    tokenizer is a CheckpointError, one involving the shards a ShardError; both say which file to pass instead.
    """
    tok_sha, tok_path, tok_grid = _tokenizer_identity(tokenizer)
    if prior is not None and tokenizer is not None:
        want = prior.export_meta.tokenizer_sha256
        if want and want != tok_sha:
            raise CheckpointError(
                f"the prior {getattr(prior, 'export_path', None) or ''} was trained on codes of tokenizer "
                f"{want[:12]}..., but the tokenizer given (--checkpoint {tok_path}) is {tok_sha[:12]}...; pass the "
                f"matching --checkpoint (the prior's tokenizer was {prior.export_meta.tokenizer_path})")
        if tok_grid is not None and _prior_grid(prior) != tok_grid:
            raise CheckpointError(f"prior vocabulary {prior.config.vocab_size} / grid {prior.config.latent_h}x"
                                  f"{prior.config.latent_w} does not match the tokenizer's codebook {tok_grid[0]} / "
                                  f"grid {tok_grid[1]}x{tok_grid[2]}")
    if shards is None:
        return
    where = f" in {shards.path}" if shards.path else ""
    if tokenizer is not None and shards.tokenizer_sha256 != tok_sha:
        raise ShardError(f"the shards{where} were made with tokenizer {str(shards.tokenizer_sha256)[:12]} but the "
                         f"tokenizer in use is {tok_sha[:12]}{f' ({tok_path})' if tok_path else ''}; re-extract them "
                         f"with this tokenizer (python extract_codes.py --checkpoint <its export> ... --overwrite) "
                         f"or use the matching one")
    if prior is not None:
        want = prior.export_meta.tokenizer_sha256
        grid = (shards.codebook_size, shards.latent_h, shards.latent_w)
        if (want and want != shards.tokenizer_sha256) or _prior_grid(prior) != grid:
            raise ShardError(f"the shards{where} (tokenizer {str(shards.tokenizer_sha256)[:12]}, {grid[0]} codes, "
                             f"{grid[1]}x{grid[2]} grid) are not the ones the prior was trained on (tokenizer "
                             f"{str(want)[:12]}, vocabulary {prior.config.vocab_size}, "
                             f"{prior.config.latent_h}x{prior.config.latent_w})")


def _tokenizer_identity(tokenizer: Any) -> tuple[str | None, Any, tuple[int, int, int] | None]:
    """(sha256, path, (codebook size, h, w) or None) of a tokenizer given as a model, an Export or a sha256."""
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer, None, None
    cfg = getattr(tokenizer, "config", None)
    grid = (int(cfg.codebook_size), *map(int, cfg.latent_size)) if hasattr(cfg, "latent_size") else None
    return tokenizer.sha256, getattr(tokenizer, "export_path", None) or getattr(tokenizer, "path", None), grid


def _prior_grid(prior: Any) -> tuple[int, int, int]:
    return int(prior.config.vocab_size), int(prior.config.latent_h), int(prior.config.latent_w)
