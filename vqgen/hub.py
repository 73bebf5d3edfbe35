"""Hugging Face Hub conventions for vqgen models, and ``hf:`` model references resolved from the local Hub cache.

:class:`HubMixin` gives the models ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``: huggingface_hub's
``PyTorchModelHubMixin`` with vqgen's export format underneath, so a folder written either way loads either way.
``hf:<user>/<repo>[/<subfolder>][@<revision>]`` resolves to a snapshot folder of the local cache; on a miss vqgen
downloads only when the Hub answers a short probe, else a :class:`~vqgen.errors.CheckpointError` names the repo and
the command that fills the cache. :func:`push_export` uploads a finished export bitwise; :func:`check_push_target`
runs before training, so a missing token is found at once, not after the run. Details: docs/NOTES.md.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin

from .errors import CheckpointError, ConfigError
from .fsutil import atomic_write_text

HF_PREFIX = "hf:"
# What vqgen ever reads from a repo: configs, safetensors weights (never pickled .bin files), a prior's stored
# sampling settings, the card.
FILES = ("config.json", "model.safetensors", "diffusion_pytorch_model.safetensors", "generation_config.json",
         "README.md")

MODEL_CARD = """---
{{ card_data }}
---

# {{ model_class }} ({{ kind }})

A vqgen {{ kind }} export: `config.json` (vqgen's export format: model config,
training metadata and a content sha256 that token shards and priors record) and `model.safetensors`.

```python
from {{ module }} import {{ model_class }}
model = {{ model_class }}.from_pretrained("{{ repo_id | default('<user>/<repo>', true) }}")
```

The vqgen scripts take it as `{{ flag }} hf:{{ repo_id | default('<user>/<repo>', true) }}` (read from the local
Hugging Face cache; `hf download {{ repo_id | default('<user>/<repo>', true) }}` fills it).
"""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HF_PREFIX}{self.repo_id}{sub}" + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_PREFIX)


def parse_hub_ref(ref: str) -> HubRef:
    """``hf:user/repo[/sub/folder][@revision]`` (also ``hf:repo`` for an un-namespaced repo)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    body = ref[len(HF_PREFIX):] if ref.startswith(HF_PREFIX) else ref
    body, at, revision = body.partition("@")
    _refuse_odd_parts(ref, "path", body)
    if at:
        _refuse_odd_parts(ref, "revision", revision)
    parts = body.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CheckpointError(f"{ref!r} is not a Hub reference hf:<user>/<repo>[/<subfolder>][@<revision>] "
                              f"({str(e).splitlines()[0]})") from None
    return HubRef(repo_id, subfolder, revision or None)


def _refuse_odd_parts(ref: str, what: str, text: str) -> None:
    """The parts of a ref become paths inside the local Hub cache: no '..', '.', empty or absolute part."""
    if text.startswith("/") or "\\" in text or any(p in ("", ".", "..") for p in text.split("/")):
        raise CheckpointError(f"{ref!r} is not a Hub reference hf:<user>/<repo>[/<subfolder>][@<revision>]: its "
                              f"{what} {text!r} has an empty, '.', '..', absolute or backslashed part")


def _offline_flag() -> str | None:
    """The offline switch that applies to models (HF_DATASETS_OFFLINE is about datasets only)."""
    from huggingface_hub import constants

    for var in ("VQGEN_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode is set ({var}=1)"
    if constants.HF_HUB_OFFLINE:  # read by huggingface_hub when it was imported
        return "offline mode is set (HF_HUB_OFFLINE=1)"
    return None


def _hub_unreachable() -> str | None:
    """Why a download cannot start now (None: it may). Env flags first, then a bounded TCP probe."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from .offline import PROBE_TIMEOUT_S, probe_host

    reason = _offline_flag()
    if reason:
        return reason
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if not probe_host(host, port):
        return f"the Hub ({host}:{port}) cannot be reached (no connection within {PROBE_TIMEOUT_S:g} s)"
    return None


def resolve_hub_ref(ref: str | HubRef, *, cache_dir=None, local_files_only: bool = False, token=None,
                    force_download: bool = False) -> Path:
    """The local folder of a Hub model: the cached snapshot, or a download when the Hub is reachable."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = ref if isinstance(ref, HubRef) else parse_hub_ref(ref)
    prefix = f"{hub.subfolder}/" if hub.subfolder else ""
    kw = dict(repo_id=hub.repo_id, revision=hub.revision, cache_dir=cache_dir, token=token,
              allow_patterns=[prefix + f for f in FILES] + ["model_index.json"])  # + the pipeline, if any
    snapshot = None
    if not force_download:
        try:
            snapshot = snapshot_download(local_files_only=True, **kw)
        except LocalEntryNotFoundError:  # also IncompleteSnapshotError (a subclass)
            pass
    if snapshot is None:
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        reason = "local_files_only=True" if local_files_only else _hub_unreachable()
        if reason:
            rev = f" --revision {hub.revision}" if hub.revision else ""
            raise CheckpointError(
                f"{hub} is not in the local Hugging Face cache ({cache}) and {reason}. On a machine with network: "
                f"`hf download {hub.repo_id}{rev} --include '{prefix}config.json' '{prefix}*.safetensors'`, then copy "
                f"{cache / ('models--' + hub.repo_id.replace('/', '--'))} into {cache} here (or set HF_HOME), or "
                f"pass the downloaded folder's path instead")
        snapshot = _download(hub, force_download=force_download, **kw)
    folder = Path(snapshot) / hub.subfolder
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{hub}: {folder} has no config.json (wrong subfolder? a vqgen export or a diffusers "
                              f"VQModel folder holds config.json + *.safetensors)")
    return folder


def _download(hub: HubRef, **kw) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(**kw)
    except Exception as e:  # noqa: BLE001 - not found, gated, HTTP errors...: one line, the cause kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{hub}: download failed ({type(e).__name__}: {first})") from e


def resolve_model_path(ref, **kw) -> Path:
    """``hf:`` references -> their local folder; anything else -> ``Path(ref)`` unchanged."""
    return resolve_hub_ref(ref, **kw) if is_hub_ref(ref) else Path(ref)


class HubMixin(PyTorchModelHubMixin, library_name="vqgen", tags=["vqgen"], model_card_template=MODEL_CARD):
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` on vqgen's export format (see module doc).

    The model class is an :class:`~vqgen.export.Exportable` (``export_to(folder, meta)``, ``from_export(folder)``);
    ``export_meta`` (the meta of the export it was loaded from) is written back by ``save_pretrained``.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, force_download: bool = False, token=None,
                        cache_dir=None, local_files_only: bool = False, revision: str | None = None,
                        map_location: str = "cpu", **unused):
        """A local export folder (or run folder), ``hf:user/repo[/sub][@rev]`` or a bare ``user/repo`` id."""
        ref = str(pretrained_model_name_or_path)
        if not is_hub_ref(ref) and not Path(ref).expanduser().exists():
            ref = HF_PREFIX + ref  # the Hub convention: a string that is not a local path is a repo id
        if is_hub_ref(ref):
            hub = parse_hub_ref(ref)
            if revision:
                _refuse_odd_parts(ref, "revision", revision)
            hub = HubRef(hub.repo_id, hub.subfolder, revision or hub.revision)
            ref = resolve_hub_ref(hub, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                  force_download=force_download)
        return cls.from_export(Path(ref).expanduser()).to(map_location)

    def _save_pretrained(self, save_directory: Path) -> None:
        self.export_to(save_directory, meta=self.export_meta)

    def generate_model_card(self, *args, **kwargs):
        kwargs.setdefault("model_class", type(self).__name__)
        kwargs.setdefault("module", type(self).__module__)
        kwargs.setdefault("kind", self.EXPORT_KIND)
        kwargs.setdefault("flag", "--checkpoint_t" if kwargs["kind"] == "prior" else "--checkpoint")
        return super().generate_model_card(*args, **kwargs)


# ------------------------------------------------------------------------------------------- --push_to_hub
def check_push_target(repo_id: str | None) -> None:
    """Before training: a valid repo id, not offline, a token. ConfigError otherwise (nothing written yet)."""
    if not repo_id:
        return
    from huggingface_hub import get_token

    parse_hub_ref(repo_id)  # validates the id
    if "/" not in repo_id.strip("/"):
        raise ConfigError(f"--push_to_hub {repo_id}: give <user or org>/<repo>")
    reason = _offline_flag()
    if reason:
        raise ConfigError(f"--push_to_hub {repo_id}: {reason}; unset it or drop --push_to_hub")
    if not get_token():
        raise ConfigError(f"--push_to_hub {repo_id} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def push_export(export_dir: str | os.PathLike, repo_id: str, model, commit_message: str | None = None) -> str | None:
    """Upload ``export_dir`` (with a README.md model card) to ``repo_id``; returns the commit url, None on failure.

    Uploads the folder as exported (not a re-save), so the Hub copy has the same sha256 as the local export.
    """
    from huggingface_hub import HfApi

    export_dir = Path(export_dir)
    try:
        api = HfApi()
        repo_id = api.create_repo(repo_id=repo_id, exist_ok=True).repo_id
        card = model.generate_model_card(repo_id=repo_id)
        atomic_write_text(export_dir / "README.md", str(card))
        info = api.upload_folder(repo_id=repo_id, folder_path=export_dir, repo_type="model",
                                 commit_message=commit_message or f"vqgen export ({type(model).__name__})")
    except Exception as e:  # noqa: BLE001 - the export is safe on disk; a failed upload must not fail the job
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"warning: pushing {export_dir} to the Hub repo {repo_id} failed ({type(e).__name__}: {first}); the "
              f"export is intact; upload it later with `hf upload {repo_id} {export_dir} .`", file=sys.stderr,
              flush=True)
        return None
    url = getattr(info, "commit_url", None) or str(info)
    print(f"pushed {export_dir} to {repo_id} ({url})", flush=True)
    return url
