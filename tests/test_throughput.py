"""Throughput and MFU logged by the trainers (vqgen/train/throughput.py): nanoGPT's FLOPs count against a hand
count, the peak table, the rates, and the keys in metrics.jsonl (tokens/s for the prior, images/s for the tokenizer;
no MFU on CPU)."""

import itertools
import json

import pytest
import torch

from vqgen.config import PriorConfig, PriorStageConfig, VQVAEStageConfig, load_config
from vqgen.models.prior import build_prior
from vqgen.train import prior_task, throughput, vqvae_task
from vqgen.train.throughput import Throughput, Work


def test_flops_per_token_matches_a_hand_count():
    """dim 32, 2 blocks, 4 heads (head dim 8), GELU MLP x4, LayerNorm, vocab 16, 4x4 tokens, 3 classes."""
    prior = build_prior(PriorConfig(vocab_size=16, latent_h=4, latent_w=4, num_classes=3, attn_layers_dim=32,
                                    attn_layers_depth=2, attn_layers_heads=4))
    # per block: ln1 2*32 + qkv 32*96 + proj 32*32 + ln2 2*32 + mlp (32*128 + 128) + (128*32 + 32)
    block = 64 + 3072 + 1024 + 64 + 4224 + 4128
    n = 2 * block + 64 + 32 * 16          # + final norm + head; tok_emb, cls_emb and pos_emb are lookups
    assert n == 25728
    attention = 12 * 2 * 4 * 8 * 16       # 12 * L * H * Q * T
    assert prior.flops_per_token() == 6 * n + attention == 166656


@pytest.mark.parametrize("name, column, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),      # the SXM part
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("NVIDIA L40S", "bf16", 362.05),
    ("Tesla V100-SXM2-16GB", "bf16", None),        # not in the table: MFU n/a
])
def test_peak_table(name, column, tflops):
    peak = throughput.peak_flops(name, column)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_peak_column_follows_the_precision():
    assert throughput.peak_column("bf16", tf32=False) == "bf16" == throughput.peak_column("fp16", tf32=True)
    assert throughput.peak_column("no", tf32=True) == "tf32"
    assert throughput.peak_column("no", tf32=False) == "fp32"
    assert throughput.device_peak(torch.device("cpu"), "no")[0] is None


def test_rates_and_mfu(monkeypatch):
    clock = itertools.chain([100.0, 102.0, 102.0, 103.0], itertools.count(200.0))  # start, report (+ restart)...
    monkeypatch.setattr(throughput, "perf_counter", lambda: next(clock))
    meter = Throughput(Work("tokens", per_sample=256, flops_per_unit=1e9), world_size=4, peak=1e15)
    for _ in range(3):
        meter.add(64)                                   # 3 micro-batches of 64 rows on each of 4 ranks in 2 s
    logs = meter.report()
    assert logs["tokens_per_s"] == pytest.approx(3 * 64 * 256 * 4 / 2)
    assert logs["mfu"] == pytest.approx(logs["tokens_per_s"] * 1e9 / (1e15 * 4))
    assert meter.postfix(logs) == {"tok/s": f"{logs['tokens_per_s']:.4g}", "mfu": f"{100 * logs['mfu']:.1f}%"}
    assert meter.report()["tokens_per_s"] == 0.0        # the window restarted at the report
    cpu = Throughput(Work("tokens", 16, 1e6), world_size=1, peak=None)
    cpu.add(2)
    logs = cpu.report()
    assert "mfu" not in logs and cpu.postfix(logs)["mfu"] == "n/a"
    assert Throughput(Work("images"), 1, None).postfix({"images_per_s": 12.0}) == {"img/s": "12"}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_prior_logs_tokens_per_s_and_no_mfu_on_cpu(stage2, tmp_path, capsys):
    argv = ["--shards", str(stage2 / "shards"), "--attn_layers_dim", "32", "--attn_layers_depth", "2",
            "--attn_layers_heads", "2", "--batch_size", "64", "--no_wandb", "--val_batches", "1",
            "--sample_and_save_freq", "100", "--max_steps", "1", "--output_dir", str(tmp_path / "prior")]
    prior_task.run(load_config(PriorStageConfig, argv))
    row = next(r for r in _metrics(tmp_path / "prior") if "loss" in r)
    assert row["tokens_per_s"] > 0 and "mfu" not in row
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 16, rel=0.5)  # 4x4 tokens per sample
    out = capsys.readouterr().out
    assert "throughput: tokens/s, MFU = " in out and "(cpu: no peak known)" in out


def test_tokenizer_logs_images_per_s(tmp_path):
    argv = ["--dataset", "digits", "--data_dir", str(tmp_path / "data"), "--num_channels", "8", "8",
            "--num_res_channels", "8", "8", "--num_res_layers", "1", "--num_embeddings", "16", "--embedding_dim", "4",
            "--no_wandb", "--val_images", "16", "--max_steps", "1", "--output_dir", str(tmp_path / "vq")]
    vqvae_task.run(load_config(VQVAEStageConfig, argv))
    row = next(r for r in _metrics(tmp_path / "vq") if "loss" in r)
    assert row["images_per_s"] > 0 and "mfu" not in row
