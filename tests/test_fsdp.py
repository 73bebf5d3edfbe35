"""FSDP for the prior (accelerate_configs/fsdp.yaml): 2 CPU processes on gloo through the real `accelerate launch`.

Checked: the checkpoint is sharded (each rank writes its part), a run cut mid-epoch and resumed ends with bitwise
the same weights, FSDP trains as DDP does (same init, same batches), evaluation and the export run on the gathered
weights; what FSDP does not support is refused before anything is written.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import ACCELERATE, ROOT, cpu2, free_port, losses, run
from vqgen.cli import run_cli
from vqgen.config import PriorStageConfig, VQVAEStageConfig
from vqgen.train import prior_task, vqvae_task

FSDP_YAML = ROOT / "accelerate_configs/fsdp.yaml"
FLAGS = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--no_wandb",
         "--num_samples", "4", "--val_batches", "2", "--n_epochs_t", "1", "--warmup_steps", "2", "--batch_size", "64",
         "--checkpointing_steps", "4", "--lr_schedule", "constant", "--class_dropout", "0.1"]


def fsdp2() -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(FSDP_YAML), "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", str(free_port())]


def test_fsdp_config_wraps_the_prior_blocks():
    from accelerate.commands.config.config_args import load_config_from_file

    from vqgen.models.priors import blocks

    cfg = load_config_from_file(str(FSDP_YAML))
    assert cfg.distributed_type == "FSDP" and cfg.mixed_precision == "bf16"
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_activation_checkpointing"] is False
    assert isinstance(getattr(blocks, fsdp["fsdp_transformer_layer_cls_to_wrap"]), type)  # the class to wrap exists


def test_fsdp_refuses_the_tokenizer_and_the_weights_ema(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    assert run_cli(vqvae_task.run, VQVAEStageConfig, ["--dataset", "digits", "--output_dir", str(out)]) == 2
    assert run_cli(prior_task.run, PriorStageConfig, ["--shards", str(tmp_path), "--prior_ema_decay", "0.9",
                                                      "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train the tokenizer with DDP" in err and "--prior_ema_decay is not supported under FSDP" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_fsdp_two_processes_sharded_checkpoint_exact_resume_and_same_as_ddp(stage2, tmp_path):
    common = ["--shards", str(stage2 / "shards"), "--checkpoint", str(stage2 / "tok"), *FLAGS]
    proc = run([*fsdp2(), str(ROOT / "train_prior.py"), *common, "--output_dir", str(tmp_path / "fsdp")])
    log = proc.stdout + proc.stderr
    assert "processes = 2" in log and log.count("export written to") == 1
    ckpt = tmp_path / "fsdp/checkpoints/checkpoint-4"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # sharded: one file per rank, no whole-model file
        assert sorted(p.name for p in (ckpt / part).iterdir() if p.suffix == ".distcp") == \
            ["__0_0.distcp", "__1_0.distcp"], part
    assert not (ckpt / "model.safetensors").exists()
    # evaluation ran on the gathered weights (held-out bits/token, a sample grid)
    assert any("val/bits_per_token" in json.loads(line) for line in
               (tmp_path / "fsdp/metrics.jsonl").read_text().splitlines())
    assert list((tmp_path / "fsdp/samples").glob("samples_epoch*.png"))

    # cut at step 4 (mid-epoch) and resumed: bitwise the same weights as the uninterrupted run
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    for extra in [*cut.glob("checkpoints/checkpoint-[!4]*"), cut / "export"]:
        shutil.rmtree(extra)
    resumed = run([*fsdp2(), str(ROOT / "train_prior.py"), *common, "--output_dir", str(cut), "--resume", "latest"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = load_file(str(tmp_path / "fsdp/export/model.safetensors")), load_file(str(cut / "export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # DDP on the same 2 processes: the same first loss (same weights, same batches) and the same training
    run([*cpu2(), str(ROOT / "train_prior.py"), *common, "--output_dir", str(tmp_path / "ddp")])
    fsdp, ddp = losses(tmp_path / "fsdp"), losses(tmp_path / "ddp")
    assert sorted(fsdp) == sorted(ddp) and fsdp[1] == pytest.approx(ddp[1], rel=1e-6)
    for step in fsdp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-3), (step, fsdp[step], ddp[step])
