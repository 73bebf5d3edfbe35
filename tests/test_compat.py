"""Exports and run folders written by an earlier vqgen (tests/data/vqgen-0.1, see its README) keep loading and
resuming: the model configs took the flags' names since (``decay`` -> ``ema_decay``, ``dim`` -> ``attn_layers_dim``...)."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from vqgen.cli import run_cli
from vqgen.config import PriorConfig, VQVAEStageConfig, load_config
from vqgen.export import check_compatible
from vqgen.models.prior import load_prior
from vqgen.models.priors.ar import ARPrior
from vqgen.models.sampling import generate
from vqgen.models.tokenizer import load_tokenizer
from vqgen.run_dir import RunDir
from vqgen.train import vqvae_task

OLD = Path(__file__).parent / "data" / "vqgen-0.1"


def test_old_exports_load_under_the_new_names():
    tok, exp = load_tokenizer(OLD / "vqvae_run" / "export")
    cfg = tok.config
    assert "decay" in exp.config and "ema_decay" not in exp.config       # the file as written, fingerprint intact
    assert (cfg.ema_decay, cfg.ema_epsilon, cfg.vq_arch, cfg.quantizer) == (0.99, 1e-5, "conv", "vq")
    assert cfg.codebook_l2 and cfg.codebook_size == 16 and cfg.code_dim == 4
    prior = load_prior(OLD / "prior_export")
    assert isinstance(prior, ARPrior) and prior.config.prior_kind == "ar"
    assert (prior.config.attn_layers_dim, prior.config.attn_layers_heads, prior.config.prior_norm) == (16, 2, "layer")
    check_compatible(tokenizer=tok, prior=prior)                        # the prior recorded this tokenizer's sha256
    tokens = generate(prior, 3, labels=[0, 1, 2], generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 8, 8) and int(tokens.max()) < 16
    assert tok.decode_indices(tokens).shape == (3, 1, 16, 16)


def test_old_run_folder_resumes_where_it_stopped(tmp_path):
    run = tmp_path / "vqvae"
    shutil.copytree(OLD / "vqvae_run", run)
    argv = ["--output_dir", str(run), "--data_dir", str(tmp_path / "data"), "--resume", "latest", "--max_steps", "5"]
    assert run_cli(vqvae_task.run, VQVAEStageConfig, argv) == 0
    state = json.loads((RunDir(run).checkpoint(5) / RunDir.STATE).read_text())
    assert state["global_step"] == 5
    got = load_file(str(run / "export" / "model.safetensors"))
    want = load_file(str(OLD / "vqvae_after_5_steps" / "model.safetensors"))   # the old code, uninterrupted
    assert got.keys() == want.keys()
    # the old code ran on another CPU: its kernels may round differently (AVX-512 / AMX), so equal to float rounding;
    # a resume that lost the optimizer, RNG or data position differs by a learning-rate-sized step (~1e-3)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_old_prior_record_counts_as_the_same_model(tmp_path):
    run = RunDir(tmp_path / "prior")
    run.root.mkdir()
    shutil.copy(OLD / "prior_run_config.json", run.record_file)
    flags = load_config(PriorConfig, ["--attn_layers_dim", "16", "--attn_layers_depth", "1", "--attn_layers_heads", "2"])
    cfg = flags.build(vocab_size=16, latent_h=8, latent_w=8, num_classes=10)
    record = {**json.loads(run.record_file.read_text()), "model": cfg.to_dict()}
    assert run.check_policy(record, "latest", False, model_config=cfg) is None   # no checkpoint: starts fresh
    other = {**record, "model": flags.build(vocab_size=16, latent_h=8, latent_w=8, num_classes=0).to_dict()}
    try:
        run.check_policy(other, "latest", False, model_config=cfg)
    except Exception as e:  # noqa: BLE001 - the refusal is a CheckpointError naming both configs
        assert "another model config" in str(e)
    else:
        raise AssertionError("a resume with another model config was accepted")
