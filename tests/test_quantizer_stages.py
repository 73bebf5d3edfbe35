"""FSQ and LFQ tokenizers through every stage on the digits: train_vqvae.py -> export / load -> extract_codes.py ->
train_prior.py -> sample.py -> evaluate.py (codebook usage and perplexity for each kind, a 2^18-code LFQ with a
factorised prior), exact resume of stage 1, and 2-process stage 1 (distributed marker)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqgen import extract, sample
from vqgen.cli import run_cli
from vqgen.config import EvalConfig, ExtractConfig, PriorStageConfig, SampleConfig, VQVAEStageConfig, load_config
from vqgen.eval.evaluate import run as evaluate
from vqgen.export import check_compatible
from vqgen.models.prior import Prior
from vqgen.models.tokenizer import load_tokenizer
from vqgen.models.vqvae import VQVAE
from vqgen.shards import Manifest
from vqgen.train import prior_task, vqvae_task

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--dataset", "digits", "--num_channels", "16", "32", "--num_res_channels", "16", "32", "--num_res_layers",
        "1", "--no_wandb", "--val_images", "64", "--lr", "1e-3", "--lr_schedule", "constant"]
TINY_PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--batch_size", "64",
              "--no_wandb", "--num_samples", "4", "--val_batches", "2", "--warmup_steps", "2"]
# kind: (stage-1 flags, codes, prior flags)
KINDS = {"fsq": (["--quantizer", "fsq", "--fsq_levels", "5", "5", "5"], 125, []),
         "lfq": (["--quantizer", "lfq", "--lfq_bits", "6"], 64, []),
         "lfq18": (["--quantizer", "lfq", "--lfq_bits", "18"], 1 << 18, ["--token_factors", "2"])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("digits"))   # the digits and the evaluation's classifier, prepared once


def train_stage1(out: Path, data_dir: str, flags: list[str], *extra: str):
    return vqvae_task.run(load_config(VQVAEStageConfig, [*BASE, *flags, "--data_dir", data_dir, "--batch_size",
                                                         "128", *extra, "--output_dir", str(out)]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_stage_takes_the_tokenizer(kind, tmp_path, data_dir):
    flags, codes, prior_flags = KINDS[kind]
    quantizer = flags[1]
    loop = train_stage1(tmp_path / "vq", data_dir, flags, "--n_epochs", "1")
    val = [json.loads(x) for x in (tmp_path / "vq/metrics.jsonl").read_text().splitlines() if "val/perplexity" in x]
    assert 0 < val[-1]["val/codebook_usage"] <= 1 and val[-1]["val/perplexity"] >= 1
    # export / load: the kind is recorded and rebuilt, and gives the trained model's codes
    tok = VQVAE.from_export(tmp_path / "vq/export")
    assert tok.config.quantizer == quantizer and tok.config.codebook_size == codes
    assert type(tok.quantizer).__name__ == quantizer.upper()
    x = torch.stack([loop.task.val_ds[i][0] for i in range(8)])
    assert torch.equal(tok.encode_to_indices(x), loop.unwrapped_model.eval().encode_to_indices(x))
    assert load_tokenizer(str(tmp_path / "vq/export"))[0].config == tok.config
    # extraction: the manifest's vocabulary is the quantizer's; int32 tokens above 65536 codes
    assert run_cli(extract.run, ExtractConfig, ["--checkpoint", str(tmp_path / "vq/export"), "--dataset", "digits",
                                                "--data_dir", data_dir, "--output", str(tmp_path / "shards"),
                                                "--split", "train", "test", "--no_progress"]) == 0
    man = Manifest.read(tmp_path / "shards")
    assert man.codebook_size == codes and man.dtype == ("int32" if codes > 65536 else "uint16")
    # the prior's vocabulary follows the manifest
    prior_task.run(load_config(PriorStageConfig, ["--shards", str(tmp_path / "shards"), *TINY_PRIOR, *prior_flags,
                                                  "--n_epochs_t", "1",
                                                  "--output_dir", str(tmp_path / "prior")]))
    prior = Prior.from_export(tmp_path / "prior")
    assert prior.config.vocab_size == codes and list((tmp_path / "prior/samples").glob("*.png"))
    check_compatible(tokenizer=tok, prior=prior, shards=man)
    assert run_cli(sample.run, SampleConfig, ["--checkpoint", str(tmp_path / "vq/export"), "--checkpoint_t",
                                              str(tmp_path / "prior/export"), "--num_samples", "4", "--output_dir",
                                              str(tmp_path / "samples")]) == 0
    toks = np.load(tmp_path / "samples/tokens.npy")
    assert toks.shape == (4, 4, 4) and 0 <= toks.min() and toks.max() < codes
    # evaluation: usage and perplexity over this kind's codes, bits/token of the prior
    assert run_cli(evaluate, EvalConfig, ["--checkpoint", str(tmp_path / "vq/export"), "--checkpoint_t",
                                          str(tmp_path / "prior/export"), "--shards", str(tmp_path / "shards"),
                                          "--dataset", "digits", "--data_dir", data_dir, "--max_images", "64",
                                          "--num_samples", "16", "--classifier_epochs", "1", "--classifier_dir",
                                          str(Path(data_dir) / "clf"), "--output", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    t = ev["tokenizer"]
    assert t["codebook_size"] == codes and len(t["code_counts"]) == codes and sum(t["code_counts"]) == 64 * 16
    assert t["codebook_usage"] == pytest.approx(t["codes_used"] / codes) and 1 <= t["perplexity"] <= t["codes_used"]
    assert math.isfinite(ev["prior"]["bits_per_token"]) and (tmp_path / "eval/codebook_usage.png").is_file()


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_stage1_resume_mid_epoch_is_bitwise_exact(kind, tmp_path, data_dir):
    flags = KINDS[kind][0]
    run = ["--n_epochs", "2", "--sample_and_save_freq", "2", "--checkpointing_steps", "7", "--max_steps", "16"]
    train_stage1(tmp_path / "full", data_dir, flags, *run)
    train_stage1(tmp_path / "cut", data_dir, flags, *run[:-1], "7")
    train_stage1(tmp_path / "cut", data_dir, flags, *run, "--resume", "latest")
    a, b = (load_file(str(tmp_path / r / "export/model.safetensors")) for r in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- two processes (accelerate_configs/cpu_2proc.yaml) ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_stage1_two_processes_train_like_one(kind, tmp_path, data_dir):
    """2 x 64 = 1 x 128: no codebook to initialise from one rank's share, LFQ's codebook entropy over all ranks."""
    accelerate = Path(sys.executable).parent / "accelerate"
    common = [*BASE, *KINDS[kind][0], "--data_dir", data_dir, "--n_epochs", "1", "--max_steps", "6",
              "--checkpointing_steps", "6", "--sample_and_save_freq", "100"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
                           "--main_process_port", str(_free_port()), str(ROOT / "train_vqvae.py"), *common,
                           "--batch_size", "64", "--output_dir", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes = 2" in proc.stdout + proc.stderr
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in
                                                              (tmp_path / "two/checkpoints/checkpoint-6").iterdir()}
    vqvae_task.run(load_config(VQVAEStageConfig, [*common, "--batch_size", "128", "--output_dir", str(tmp_path / "one")]))

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}
    one, two = losses("one"), losses("two")
    assert one.keys() == two.keys() and len(one) >= 1
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    a, b = (load_file(str(tmp_path / r / "export/model.safetensors")) for r in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)
