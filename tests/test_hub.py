"""Hub conventions (issue 14): from_pretrained / save_pretrained / push_to_hub on vqgen's export format, hf: refs from a
pre-filled local Hub cache, fast clear errors on a miss, --push_to_hub checks. All offline."""

import json
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import save_file

from factories import fill_hub_cache, tiny_vqvae
from vqgen import sample
from vqgen.cli import run_cli
from vqgen.config import PriorConfig, SampleConfig, VQVAEStageConfig
from vqgen.errors import CheckpointError, ConfigError
from vqgen.export import ExportMeta, canonical_json, export_fingerprint, load_export
from vqgen.hub import check_push_target, parse_hub_ref
from vqgen.models.prior import Prior, build_prior
from vqgen.models.vqvae import VQVAE
from vqgen.train import vqvae_task

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_prior(tok: VQVAE) -> Prior:
    torch.manual_seed(1)
    h, w = tok.config.latent_size
    return build_prior(PriorConfig(vocab_size=tok.config.num_embeddings, latent_h=h, latent_w=w, attn_layers_dim=16,
                                   attn_layers_depth=1,
                             attn_layers_heads=2)).eval()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub (read at call time) and child processes (HF_HOME) both use."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def test_save_pretrained_is_a_vqgen_export_and_loads_both_ways(tmp_path):
    tok = tiny_vqvae()
    tok.save_pretrained(tmp_path / "a")                      # the Hub way ...
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    exp = load_export(tmp_path / "a", expected_kind="vqvae")  # ... read the vqgen way
    payload = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {"format", "kind", "config", "meta", "sha256"} <= set(payload) and payload["sha256"] == exp.sha256
    sha_b = tok.export_to(tmp_path / "b", meta=ExportMeta(stage="vqvae", step=7))  # the vqgen way ...
    back = VQVAE.from_pretrained(tmp_path / "b")                                   # ... read the Hub way
    assert sha_b == exp.sha256 and back.export_meta.step == 7 and not back.training
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(back.encode_to_indices(x), tok.encode_to_indices(x))
    back.save_pretrained(tmp_path / "c")                      # the meta survives a round trip
    assert load_export(tmp_path / "c").meta.step == 7
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: vqgen" in card and "VQVAE.from_pretrained" in card and "--checkpoint hf:" in card
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["kind"] == "vqvae" and meta["sha256"] == exp.sha256  # transformers' check


def test_exports_written_before_the_hub_format_still_load(tmp_path):
    """An export of the previous format (safetensors metadata format=vqgen-export) loads unchanged both ways."""
    tok = tiny_vqvae(seed=3)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in tok.config.to_dict().items()}
    cfg = json.loads(canonical_json(cfg))
    sd = {k: v.contiguous() for k, v in tok.state_dict().items()}
    old = tmp_path / "old"
    old.mkdir()
    save_file(sd, str(old / "model.safetensors"), metadata={"format": "vqgen-export", "kind": "vqvae"})
    sha = export_fingerprint("vqvae", cfg, sd)
    (old / "config.json").write_text(json.dumps({"format": "vqgen-export", "format_version": 1, "kind": "vqvae",
                                                  "config": cfg, "meta": {}, "sha256": sha}))
    assert load_export(old).sha256 == sha
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(VQVAE.from_pretrained(old).encode_to_indices(x), tok.encode_to_indices(x))


def test_hf_refs_resolve_from_a_prefilled_cache(tmp_path, hub_cache):
    tok = tiny_vqvae()
    sha = tok.export_to(tmp_path / "tok")
    fill_hub_cache(hub_cache, "alice/tok", tmp_path / "tok")
    fill_hub_cache(hub_cache, "alice/bundle", tmp_path / "tok", subfolder="vqvae",
                   commit="fedcba9876543210fedcba9876543210fedcba98", ref="v1")
    assert load_export("hf:alice/tok").sha256 == sha
    assert VQVAE.from_pretrained("alice/tok").config == tok.config                  # bare repo id, as on the Hub
    assert load_export("hf:alice/bundle/vqvae@v1").sha256 == sha                    # subfolder + revision (a tag)
    assert VQVAE.from_pretrained("hf:alice/bundle/vqvae", revision="v1").config == tok.config
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_export("hf:alice/bundle/vqvae")                                         # no 'main' ref cached
    with pytest.raises(CheckpointError, match="no config.json"):
        load_export("hf:alice/tok/nope")
    assert parse_hub_ref("hf:a/b/c/d@r") == parse_hub_ref("a/b/c/d@r")
    with pytest.raises(CheckpointError, match="not a Hub reference"):
        parse_hub_ref("hf:bad name!/x")
    # train_prior: a manifest's hf: tokenizer missing from this cache only drops the sample grids (like a local path
    # that is not on disk); given as --checkpoint it is an error
    from vqgen.train.prior_task import _grid_tokenizer
    assert _grid_tokenizer("hf:alice/tok", given=False).sha256 == sha
    assert _grid_tokenizer("hf:nobody/absent", given=False) is None
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        _grid_tokenizer("hf:nobody/absent", given=True)


@pytest.mark.parametrize("ref", ["hf:a/b/../../../../etc", "hf:a/b/sub/..", "hf:a/b@../../x", "hf:a/b@refs/../x",
                                 "hf:/abs/repo", "hf:a/b@/abs", "hf:a//b", "hf:a/b/", "hf:a/b@", "hf:a/./b"])
def test_hf_refs_with_dot_dot_absolute_or_empty_parts_are_refused(ref, tmp_path, hub_cache, capsys):
    with pytest.raises(CheckpointError, match="empty, '.', '..', absolute"):
        parse_hub_ref(ref)
    with pytest.raises(CheckpointError, match="empty, '.', '..', absolute"):
        VQVAE.from_pretrained("hf:a/b", revision="../../x" if ref.endswith("/x") else "/abs")
    assert run_cli(sample.run, SampleConfig, ["--checkpoint", ref, "--checkpoint_t", ref, "--output_dir",
                                              str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Hub reference" in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()
    assert parse_hub_ref("hf:a/b/sub.dir/x@refs/pr/1") == parse_hub_ref("a/b/sub.dir/x@refs/pr/1")  # still fine


@pytest.mark.parametrize("offline_env", [True, False], ids=["HF_HUB_OFFLINE", "endpoint-unreachable"])
def test_hf_miss_is_one_clear_error_within_5s(tmp_path, hub_cache, monkeypatch, offline_env):
    if not offline_env:  # no offline flag, and nothing listens at the endpoint: the (<= 2 s) probe decides
        for var in ("HF_HUB_OFFLINE", "VQGEN_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        VQVAE.from_pretrained("hf:nobody/absent")
    elapsed = time.perf_counter() - t
    assert elapsed < 5, elapsed
    msg = str(e.value)
    assert "hf:nobody/absent is not in the local Hugging Face cache" in msg and "hf download nobody/absent" in msg
    assert ("HF_HUB_OFFLINE" in msg) if offline_env else ("cannot be reached" in msg)


def test_cli_takes_hf_refs_and_a_miss_exits_2_without_traceback(tmp_path, hub_cache, stage2):
    """sample.py with both models from the Hub cache; a miss from the real script (a child process finds the
    cache through HF_HOME) is one line, exit 2, nothing written."""
    import os

    tok = VQVAE.from_export(stage2 / "tok")
    prior = tiny_prior(tok)
    prior.export_to(tmp_path / "prior", meta=ExportMeta(tokenizer_sha256=load_export(stage2 / "tok").sha256))
    fill_hub_cache(hub_cache, "alice/tok", stage2 / "tok")
    fill_hub_cache(hub_cache, "alice/prior", tmp_path / "prior")
    assert run_cli(sample.run, SampleConfig, ["--checkpoint", "hf:alice/tok", "--checkpoint_t", "hf:alice/prior",
                                              "--num_samples", "3", "--output_dir", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    miss = subprocess.run([sys.executable, str(ROOT / "extract_codes.py"), "--checkpoint", "hf:alice/missing",
                           "--dataset", "digits", "--output", str(tmp_path / "sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert miss.returncode == 2 and "Traceback" not in miss.stderr
    assert miss.stderr.strip().count("\n") == 0 and "hf:alice/missing is not in the local" in miss.stderr
    assert not (tmp_path / "sh").exists()


def test_push_to_hub_uploads_a_loadable_folder(tmp_path, monkeypatch):
    """No network: HfApi's two calls are replaced; what would be uploaded is copied and loaded back."""
    import shutil

    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = repo_id
        return type("Url", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["upload"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://hub.invalid/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    tok = tiny_vqvae()
    tok.push_to_hub("alice/tok")
    assert calls == {"create": "alice/tok", "upload": "alice/tok"}
    assert VQVAE.from_pretrained(tmp_path / "uploaded").config == tok.config
    assert "library_name: vqgen" in (tmp_path / "uploaded" / "README.md").read_text()


def test_trainer_push_to_hub(tmp_path, monkeypatch, capsys):
    """--push_to_hub: refused before anything is written without a token or when offline; after training the
    export folder itself is uploaded (same sha256) with a model card naming the repo."""
    import shutil

    from huggingface_hub import HfApi

    argv = ["--dataset", "digits", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
            "--batch_size", "256", "--n_epochs", "1", "--num_channels", "8", "--num_res_channels", "8",
            "--num_res_layers", "1", "--num_embeddings", "16", "--embedding_dim", "4", "--report_to", "none",
            "--val_images", "16", "--max_steps", "2", "--push_to_hub", "alice/tok"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert run_cli(vqvae_task.run, VQVAEStageConfig, argv) == 2
    assert "offline mode is set (HF_HUB_OFFLINE=1)" in capsys.readouterr().err  # conftest's offline flag
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert run_cli(vqvae_task.run, VQVAEStageConfig, argv) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("U", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, folder_path, **kw: shutil.copytree(
        folder_path, tmp_path / "uploaded"))
    assert run_cli(vqvae_task.run, VQVAEStageConfig, argv) == 0
    assert load_export(tmp_path / "uploaded").sha256 == load_export(tmp_path / "run" / "export").sha256
    assert 'from_pretrained("alice/tok")' in (tmp_path / "uploaded" / "README.md").read_text()
    with pytest.raises(ConfigError, match="<user or org>/<repo>"):
        check_push_target("justaname")
