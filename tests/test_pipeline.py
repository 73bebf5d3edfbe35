"""The whole pipeline through the one-command front end (VQVAE_T.py), then sample.py on its exports."""

import json

import numpy as np
import pytest
from PIL import Image

from vqgen import pipeline, sample
from vqgen.cli import run_cli
from vqgen.config import PipelineConfig, SampleConfig
from vqgen.export import load_export

TINY = ["--dataset", "digits", "--no_wandb", "--batch_size", "128", "--n_epochs", "2", "--lr", "1e-3",
        "--num_channels", "16", "--num_res_channels", "16", "--num_res_layers", "1", "--num_embeddings", "32",
        "--embedding_dim", "8", "--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2",
        "--n_epochs_t", "3", "--lr_t", "3e-3", "--sample_and_save_freq", "100", "--shard_size", "700",
        "--num_samples", "6", "--tune_sampling", "none"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    assert run_cli(pipeline.run, PipelineConfig, ["--train", "--sample", *TINY, "--output_dir", str(out)]) == 0
    return out


def test_train_runs_all_stages_and_ties_them_together(run_dir):
    tok = load_export(run_dir / "vqvae" / "export", expected_kind="vqvae")
    prior = load_export(run_dir / "prior" / "export", expected_kind="prior")
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "test"}
    assert manifest["splits"]["train"]["total"] == 1500 and manifest["splits"]["test"]["total"] == 297
    assert manifest["tokenizer"]["sha256"] == tok.sha256 == prior.meta.tokenizer_sha256
    assert prior.config["vocab_size"] == 32 and prior.config["num_classes"] == 10
    # the prior learned something from the shards: its logged loss fell
    losses = [json.loads(line)["loss"] for line in (run_dir / "prior" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < 0.9 * losses[0]  # 36 tiny steps: ~3.45 -> ~2.86 nats/token


def test_sample_writes_the_requested_count(run_dir):
    out = run_dir / "samples"  # written by --sample in the fixture, honouring --num_samples 6
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (6, 8, 8) and tokens.min() >= 0 and tokens.max() < 32
    assert np.array_equal(np.load(out / "labels.npy"), np.arange(6) % 10)
    assert Image.open(out / "images" / "00000.png").size == (16, 16)
    assert (out / "grid.png").exists()


def test_sampling_is_deterministic_per_seed(run_dir, tmp_path):
    def tokens(seed, name):
        argv = ["--checkpoint", str(run_dir / "vqvae" / "export"), "--checkpoint_t", str(run_dir / "prior" / "export"),
                "--num_samples", "5", "--seed", str(seed), "--output_dir", str(tmp_path / name), "--class_label", "3"]
        assert run_cli(sample.run, SampleConfig, argv) == 0
        return np.load(tmp_path / name / "tokens.npy")

    a, b, c = tokens(7, "a"), tokens(7, "b"), tokens(8, "c")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rerun_skips_finished_stages(run_dir, capsys):
    before = (run_dir / "prior" / "export" / "model.safetensors").stat().st_mtime_ns
    assert run_cli(pipeline.run, PipelineConfig, ["--train", *TINY, "--output_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stage 1:" in out and "stage 3:" in out and out.count("skipping") == 4
    assert (run_dir / "prior" / "export" / "model.safetensors").stat().st_mtime_ns == before
