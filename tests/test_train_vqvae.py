"""Stage 1 end to end on the offline digits dataset: training lowers the loss, exact resume, exports, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factories import TINY_VQVAE_FLAGS
from vqgen.cli import run_cli
from vqgen.config import VQVAEStageConfig, load_config
from vqgen.export import load_export
from vqgen.models.vqvae import VQVAE
from vqgen.train import vqvae_task as train_vqvae

TINY = TINY_VQVAE_FLAGS  # constant lr (tests cut runs with --max_steps, the cosine schedule's horizon)


def run(tmp_path, *extra, out="run"):
    return train_vqvae.run(load_config(VQVAEStageConfig, [*TINY, "--output_dir", str(tmp_path / out), *extra]))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_lowers_loss_and_exports(tmp_path):
    loop = run(tmp_path, "--n_epochs", "3", "--sample_and_save_freq", "3")
    out = tmp_path / "run"
    logs = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"]
    assert (out / "samples" / "recon_epoch0003.png").exists()
    val = [m for m in read_metrics(out / "metrics.jsonl") if "val/psnr" in m][-1]
    assert val["val/psnr"] > 10 and 0 < val["val/codebook_usage"] <= 1
    # the export rebuilds the model without flags and gives the same codes as the trained model
    model = VQVAE.from_export(out / "export")
    x = torch.stack([loop.task.val_ds[i][0] for i in range(8)])
    trained = loop.unwrapped_model.eval()
    assert torch.equal(model.encode_to_indices(x), trained.encode_to_indices(x))
    exp = load_export(out / "export")
    assert exp.kind == "vqvae" and exp.meta.dataset["name"] == "digits"


def test_resume_mid_epoch_is_bitwise_exact(tmp_path):
    # 1500 digits / batch 128 -> 12 steps per epoch; stop at step 7 (mid epoch 1), resume, finish epoch 2.
    run(tmp_path, "--n_epochs", "2", "--sample_and_save_freq", "2", out="full")
    run(tmp_path, "--n_epochs", "2", "--sample_and_save_freq", "2", "--max_steps", "7", out="cut")
    state = json.loads((tmp_path / "cut/checkpoints/checkpoint-7/vqgen_state.json").read_text())
    assert state["global_step"] == 7 and state["epoch"] == 0 and state["batches_done"] == 7
    run(tmp_path, "--n_epochs", "2", "--sample_and_save_freq", "2", "--resume", "latest", out="cut")
    a = load_file(str(tmp_path / "full/export/model.safetensors"))
    b = load_file(str(tmp_path / "cut/export/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refuses_existing_run_without_resume_or_overwrite(tmp_path, capsys):
    argv = [*TINY, "--output_dir", str(tmp_path / "r"), "--n_epochs", "1", "--max_steps", "1"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before


def test_resume_with_other_model_config_is_refused(tmp_path, capsys):
    argv = [*TINY, "--output_dir", str(tmp_path / "r"), "--n_epochs", "1", "--max_steps", "1"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 0
    other = [a if a != "32" else "64" for a in argv] + ["--resume", "latest"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, other) == 2
    assert "another model config" in capsys.readouterr().err


def test_run_of_an_older_vqgen_without_newer_model_fields_resumes(tmp_path, capsys):
    """A run folder written before a model field existed (its run_config.json lacks it) resumes when the field
    keeps its default; set to another value, the resume is refused as another model config."""
    import json

    import yaml

    argv = [*TINY, "--output_dir", str(tmp_path / "r"), "--n_epochs", "1", "--max_steps", "1"]
    # an older vqgen trained the plain codebook (the l2 codebook became the default later) and recorded none of these
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*argv, "--no_codebook_l2"]) == 0
    record_file, config_file = tmp_path / "r" / "run_config.json", tmp_path / "r" / "config.yaml"
    record, config = json.loads(record_file.read_text()), yaml.safe_load(config_file.read_text())
    old_names = {"ema_decay": "decay", "ema_epsilon": "epsilon"}  # and the fields added since it, left out
    record["model"] = {old_names.get(k, k): v for k, v in record["model"].items()
                       if k not in ("vq_arch", "vq_attention", "norm_groups", "codebook_l2", "quantizer")}
    for added in ("vq_arch", "vq_attention", "norm_groups", "codebook_l2"):
        del config["model"][added]
    record_file.write_text(json.dumps(record))
    config_file.write_text(yaml.safe_dump(config))
    resume = ["--output_dir", str(tmp_path / "r"), "--max_steps", "2", "--resume", "latest"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*resume, "--codebook_l2"]) == 2
    assert "another model config" in capsys.readouterr().err
    assert run_cli(train_vqvae.run, VQVAEStageConfig, resume) == 0   # its config.yaml: the plain codebook it meant
    assert (tmp_path / "r" / "checkpoints" / "checkpoint-2").is_dir()


@pytest.mark.parametrize("bad, message", [
    (["--num_channels", "16", "32", "--num_res_channels", "16"], "num_res_channels"),
    (["--downsample_parameters", "2", "4", "1"], "downsample_parameters"),
    (["--batch_size", "0"], "batch_size"),
])
def test_bad_flags_give_clear_error(tmp_path, bad, message):
    proc = subprocess.run([sys.executable, "train_vqvae.py", *TINY, "--output_dir", str(tmp_path / "x"), *bad],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_bf16_channels_last_trains_and_exports_fp32_codebook(tmp_path):
    """The fast CPU setting (bf16 autocast on AMX + channels_last) trains, and the quantizer stays fp32."""
    loop = run(tmp_path, "--n_epochs", "1", "--max_steps", "3", "--mixed_precision", "bf16", "--channels_last")
    assert loop.state.global_step == 3
    model = VQVAE.from_export(tmp_path / "run" / "export")
    assert model.quantizer.embedding.dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_wandb_logging_works_offline(tmp_path):
    """Without --no_wandb the run logs to wandb; WANDB_MODE=offline (tests/conftest.py) needs no network."""
    argv = [a for a in TINY if a != "--no_wandb"]
    cfg = load_config(VQVAEStageConfig, [*argv, "--output_dir", str(tmp_path / "w"), "--n_epochs", "1",
                                                  "--max_steps", "2"])
    train_vqvae.run(cfg)
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_torch_compile_through_accelerate_keeps_plain_exports(tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend inductor` compiles the model; checkpoints, exports and a resume
    without compile must still see plain parameter names (no `_orig_mod.` prefix)."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    run(tmp_path, "--n_epochs", "1", "--max_steps", "3", "--checkpointing_steps", "3")
    keys = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-3" / "model.safetensors")).keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    VQVAE.from_export(tmp_path / "run" / "export")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    loop = run(tmp_path, "--n_epochs", "1", "--max_steps", "4", "--resume", "latest")
    assert loop.state.global_step == 4


def test_resume_from_another_runs_checkpoint_with_other_config_is_refused(tmp_path, capsys):
    argv = [*TINY, "--n_epochs", "1", "--max_steps", "1"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*argv, "--output_dir", str(tmp_path / "a")]) == 0
    other = [a if a != "32" else "64" for a in argv]  # another model config, in a fresh folder
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-1"
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*other, "--output_dir", str(tmp_path / "b"), "--resume", str(ckpt)]) == 2
    assert "another model config" in capsys.readouterr().err and not (tmp_path / "b" / "checkpoints").exists()
