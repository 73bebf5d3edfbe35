"""Trackers (issue 14): wandb with no API key in a batch job, a failing wandb.init, TensorBoard event files, and the
wandb run id reused on --resume. All offline (no wandb server is reachable from the tests)."""

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vqgen.cli import run_cli
from vqgen.config import VQVAEStageConfig
from vqgen.train import vqvae_task
from vqgen.train.tracking import selected_trackers

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--batch_size", "256", "--n_epochs", "2", "--num_channels", "8", "--num_res_channels",
        "8", "--num_res_layers", "1", "--num_embeddings", "16", "--embedding_dim", "4", "--val_images", "16",
        "--lr", "1e-3"]


def train(tmp_path: Path, out: str, *extra: str) -> int:
    argv = [*TINY, "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / out), *extra]
    return run_cli(vqvae_task.run, VQVAEStageConfig, argv)


def batch_job_env(tmp_path: Path) -> dict:
    """A batch job's environment: no WANDB_MODE, no API key, a HOME without .netrc or wandb settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), NETRC=str(home / ".netrc"))
    return env


def test_report_to_selection():
    assert selected_trackers("wandb", False) == ["wandb"] and selected_trackers("wandb", True) == []
    assert selected_trackers("all", True) == ["tensorboard"] and selected_trackers("none", False) == []


def test_wandb_without_api_key_in_a_batch_job_logs_offline(tmp_path):
    """The issue's failure: wandb on, no login, no TTY. Before: a 20-line traceback from wandb.init and a run folder
    that made the rerun refuse. Now: one warning line, training runs, wandb logs offline in the run folder."""
    cmd = [sys.executable, str(ROOT / "train_vqvae.py"), *TINY, "--data_dir", str(tmp_path / "data"),
           "--output_dir", str(tmp_path / "run"), "--max_steps", "2"]
    run = subprocess.run(cmd, env=batch_job_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    warnings = [ln for ln in run.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "no API key" in warnings[0] and "wandb sync" in warnings[0]
    assert (tmp_path / "run" / "export" / "config.json").exists()
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    rerun = subprocess.run(cmd + ["--resume", "latest"], env=batch_job_env(tmp_path), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr


def test_failing_wandb_init_falls_back_offline_then_never_blocks_the_rerun(tmp_path, monkeypatch, capsys):
    """wandb.init refused online: one warning, offline run. Refused offline too: one error line, exit 2, and no run
    left behind: the rerun without wandb needs no --overwrite."""
    import wandb

    real_init, modes = wandb.init, []

    def flaky_init(*a, **kw):  # the server refuses the key: online init fails, offline works
        modes.append(kw.get("mode"))
        if kw.get("mode") != "offline":
            raise wandb.errors.CommError("invalid API key\nmore detail")
        return real_init(*a, **kw)

    monkeypatch.delenv("WANDB_MODE")  # so the wandb mode is vqgen's decision ...
    monkeypatch.setattr("vqgen.train.tracking._wandb_offline_reason", lambda: None)  # ... as if logged in and reachable
    monkeypatch.setattr(wandb, "init", flaky_init)
    assert train(tmp_path, "a", "--max_steps", "1") == 0
    err = capsys.readouterr().err
    assert modes == [None, "offline"] and "wandb.init failed (CommError: invalid API key)" in err
    assert len(list((tmp_path / "a" / "wandb").glob("offline-run-*"))) == 1

    def broken_init(*a, **kw):  # fails offline too: the error surfaces, but leaves no run behind
        raise wandb.errors.CommError("broken")

    monkeypatch.setattr(wandb, "init", broken_init)
    assert train(tmp_path, "b", "--max_steps", "1") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "tracker could not start (CommError: broken)" in err and "--no_wandb" in err
    assert not (tmp_path / "b" / "run_config.json").exists() and not (tmp_path / "b" / "config.yaml").exists()
    assert train(tmp_path, "b", "--max_steps", "1", "--no_wandb") == 0  # the rerun needs no --overwrite


def read_scalars(event_file: Path) -> dict[str, list[int]]:
    """{tag: [steps]} from a TensorBoard event file (TFRecord framing: u64 length, u32 crc, Event proto, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[int]] = {}
    data, pos = event_file.read_bytes(), 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append(event.step)
    return out


def test_tensorboard_events_under_the_run_folder_and_wandb_run_id_reused_on_resume(tmp_path):
    """--report_to all: TensorBoard event files in <output_dir>/logs/vqgen hold the loss at the logged steps; a run
    stopped by --max_steps and resumed continues the same wandb run (same id, saved in the checkpoint)."""
    import json

    assert train(tmp_path, "r", "--report_to", "all", "--max_steps", "3") == 0
    state = json.loads(next((tmp_path / "r" / "checkpoints").glob("checkpoint-3/vqgen_state.json")).read_text())
    run_id = state["extra"]["trackers"]["wandb_run_id"]
    assert train(tmp_path, "r", "--report_to", "all", "--resume", "latest") == 0
    runs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*"))
    # wandb names a run folder offline-run-<time>-<id>, adding "-1" when two starts fall in the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)
    last = sorted((tmp_path / "r" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))[-1]
    assert json.loads((last / "vqgen_state.json").read_text())["extra"]["trackers"]["wandb_run_id"] == run_id
    events = sorted((tmp_path / "r" / "logs" / "vqgen").glob("events.out.tfevents.*"),
                    key=lambda p: p.stat().st_mtime_ns)
    assert len(events) == 2  # one writer (one file, even within the same second) per process start
    first, second = read_scalars(events[0]), read_scalars(events[1])
    assert first["loss"] == [1] and min(second["loss"]) > 3 and "val/mse" in second


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_processes_without_api_key_one_wandb_run_continued_on_resume(tmp_path):
    """The requeued multi-process job: 2 ranks, wandb on, no login. Only the main process starts wandb (one warning
    line, one offline run); the checkpoint holds its id and the resumed 2-process run continues it."""
    import json
    import socket

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed in this environment")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", str(port), str(ROOT / "train_vqvae.py"), *TINY, "--batch_size", "64",
           "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--sample_and_save_freq",
           "100"]
    env = {**batch_job_env(tmp_path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.run([*cmd, "--max_steps", "2"], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "processes = 2" in first.stdout and "Traceback" not in first.stderr
    assert sum(ln.startswith("warning: wandb has no API key") for ln in first.stderr.splitlines()) == 1
    state = json.loads((tmp_path / "run/checkpoints/checkpoint-2/vqgen_state.json").read_text())
    run_id = state["extra"]["trackers"]["wandb_run_id"]
    again = subprocess.run([*cmd, "--max_steps", "4", "--resume", "latest"], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=500)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # wandb names a run folder offline-run-<time>-<id>, adding "-1" when two starts fall in the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)  # one per launch, not per rank
