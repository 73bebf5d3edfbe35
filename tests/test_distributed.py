"""Multi-process / multi-node runs of the three stages on CPU (gloo), through the real `accelerate launch`.

What is checked: two processes really ran (one random_states_<rank>.pkl per rank, the banner's "processes = 2",
one shard series per rank), each checkpoint is written once, 1 x 128 and 2 x 64 give the same training, a
2-process checkpoint resumes on 1 process (or is refused with a clear error), a simulated 2-node launch on
localhost, a killed rank fails the launch quickly, DeepSpeed ZeRO-2 (DS_ACCELERATOR=cpu) saves/resumes/exports,
the stage-3 reader with fewer shards than ranks x workers neither hangs nor starves a rank, and a 2-process prior
checkpoint resumes on 1 process with the unseen rest of its epoch (tests/test_token_reader.py: the reader's own
2-process test).
Recipes: docs/CLUSTER.md. Kept small (digits 16x16, tiny models) for 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqgen import extract, shards
from vqgen.cli import run_cli
from vqgen.config import ExtractConfig, PriorStageConfig, VQVAEStageConfig, load_config
from vqgen.train import prior_task as train_prior
from vqgen.train import vqvae_task as train_vqvae

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TINY_VQ = ["--dataset", "digits", "--num_channels", "16", "32", "--num_res_channels", "16", "32",
           "--num_res_layers", "1", "--num_embeddings", "32", "--embedding_dim", "8", "--no_wandb",
           "--val_images", "64", "--lr", "1e-3", "--n_epochs", "1", "--restart_every", "1000",
           "--lr_schedule", "constant"]  # constant: runs cut with --max_steps, the default cosine's horizon too
TINY_PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--no_wandb",
              "--num_samples", "4", "--val_batches", "2", "--n_epochs_t", "1", "--warmup_steps", "2",
              "--tune_sampling", "none"]
# Dead-code restarts are pushed past the end of these short runs (--restart_every 1000): their candidate vectors
# come from rank 0's share of the batch, so a restart differs between world sizes by design (test_quantizer.py
# covers the distributed restart). The codebook initialisation is also drawn from rank 0's share (64 of the 128
# images), the one remaining world-size dependence; hence:
# 1 x 128 vs 2 x 64: same global batches, same data order, EMA statistics and gradients all-reduced; logged losses
# agree within EQUIV_RTOL (relative). Same world size (DDP vs DeepSpeed, 2-process checkpoint resumed on one
# process vs the uninterrupted 2-process run): float summation order only, LOSS_RTOL / WEIGHT_ATOL.
EQUIV_RTOL = 2e-2
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4

pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not installed in this environment")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def cpu2(port: int | None = None) -> list[str]:
    """accelerate_configs/cpu_2proc.yaml, on a free port (its fixed port could clash with a parallel run)."""
    return [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
            "--main_process_port", str(port or free_port())]


def run(cmd: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics written more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_close_exports(a: Path, b: Path, atol: float = WEIGHT_ATOL) -> None:
    wa, wb = load_file(str(a / "export/model.safetensors")), load_file(str(b / "export/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())
        else:
            assert torch.equal(wa[k], wb[k]), k


def assert_two_ranks_checkpoint(ckpt: Path) -> None:
    names = {p.name for p in ckpt.iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= names, names  # both ranks saved their RNG state
    assert "random_states_2.pkl" not in names


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 for 10 steps: 2 processes x 64 (accelerate_configs/cpu_2proc.yaml) and 1 process x 128."""
    d = tmp_path_factory.mktemp("stage1")
    common = [*TINY_VQ, "--data_dir", str(d / "data"), "--max_steps", "10", "--checkpointing_steps", "5",
              "--sample_and_save_freq", "100"]
    proc = run([*cpu2(), str(ROOT / "train_vqvae.py"), *common, "--batch_size", "64", "--output_dir", str(d / "two")])
    train_vqvae.run(load_config(VQVAEStageConfig, [*common, "--batch_size", "128", "--output_dir", str(d / "one")]))
    return d, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- stage 1
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_stage1_two_processes_really_ran_and_checkpoint_once(stage1):
    d, log = stage1
    assert "processes = 2" in log and "global batch = 128" in log
    ckpts = sorted(p.name for p in (d / "two/checkpoints").iterdir())
    assert ckpts == ["checkpoint-10", "checkpoint-5"], ckpts  # no leftover .tmp folders, no duplicates
    for c in ckpts:
        assert_two_ranks_checkpoint(d / "two/checkpoints" / c)
        state = json.loads((d / "two/checkpoints" / c / "vqgen_state.json").read_text())
        assert state["world_size"] == 2 and state["batch_size"] == 64
    assert log.count("export written to") == 1  # the main process alone exports
    assert (d / "two/export/model.safetensors").exists()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_stage1_one_vs_two_processes_same_training(stage1):
    d, _ = stage1
    one, two = losses(d / "one"), losses(d / "two")
    assert sorted(one) == sorted(two) == [1, 10]
    for step in one:  # logged loss = global-batch mean (all-reduced), so it compares across world sizes
        assert one[step] == pytest.approx(two[step], rel=EQUIV_RTOL), (step, one[step], two[step])


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_resume_two_process_checkpoint_on_one_process(stage1, tmp_path, capsys):
    d, _ = stage1
    # checkpoint-5 of the 2 x 64 run is mid-epoch (5 of 12 batches): 5 x 128 samples done
    for name, batch in (("same_global", "128"), ("other_global", "96")):
        shutil.copytree(d / "two", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints/checkpoint-10")
        shutil.rmtree(tmp_path / name / "export")
    argv = [*TINY_VQ, "--data_dir", str(d / "data"), "--max_steps", "10", "--sample_and_save_freq", "100",
            "--resume", "latest"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*argv, "--batch_size", "128", "--output_dir",
                                              str(tmp_path / "same_global")]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_close_exports(d / "two", tmp_path / "same_global")  # = the uninterrupted 2 x 64 run
    # 640 samples done is not a whole number of 96-sample batches: the nearest exact continuation (batch 6 =
    # 576 samples; the 64 after it are seen twice) with one warning line
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*argv, "--batch_size", "96", "--output_dir",
                                              str(tmp_path / "other_global")]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: resuming epoch 0 with 1 processes x batch 96") == 1
    assert "continuing at batch 6, so 64 samples of this epoch are seen twice" in out and "2 x 64" in out
    state = json.loads((tmp_path / "other_global/checkpoints/checkpoint-10/vqgen_state.json").read_text())
    assert (state["batches_done"], state["extra"]["data"]["world_size"], state["extra"]["data"]["batch_size"]) == \
        (11, 1, 96)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_simulated_two_nodes_on_localhost(tmp_path):
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "static", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "train_vqvae.py"), *TINY_VQ, "--data_dir", str(tmp_path / "data"), "--batch_size", "64",
               "--max_steps", "2", "--output_dir", str(tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=launch_env(ACCELERATE_USE_CPU="true"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert all("processes = 2" in o for o in outs)  # each node's local main process prints the banner
    assert_two_ranks_checkpoint(tmp_path / "run/checkpoints/checkpoint-2")
    assert (tmp_path / "run/export/model.safetensors").exists()


# ------------------------------------------------------------------------------------------- stages 2 + 3
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_extract_and_prior_two_processes_fewer_shards_than_readers(stage1, tmp_path, capsys):
    d, _ = stage1
    out = tmp_path / "shards"
    proc = run([*cpu2(), str(ROOT / "extract_codes.py"), "--checkpoint", str(d / "one/export"), "--dataset",
                "digits", "--data_dir", str(d / "data"), "--split", "train", "test", "--output", str(out),
                "--batch_size", "256", "--shard_size", "1000", "--no_progress"])
    assert "on 2 process(es)" in proc.stdout
    man = shards.Manifest.read(out)
    names = [s.name for s in man.splits["train"].shards]
    assert names == ["train-r000-000000.tar", "train-r001-000000.tar"]  # one disjoint part per rank
    assert man.splits["train"].total == 1500
    # stage 3: 2 ranks x 2 DataLoader workers = 4 readers on 2 shards (the open-muse multi-node hang)
    proc = run([*cpu2(), str(ROOT / "train_prior.py"), "--shards", str(out), "--checkpoint", str(d / "one/export"),
                *TINY_PRIOR, "--batch_size", "64", "--num_workers", "2", "--max_steps", "4",
                "--output_dir", str(tmp_path / "prior")], timeout=300)
    log = proc.stdout + proc.stderr
    assert "processes = 2" in log
    assert_two_ranks_checkpoint(tmp_path / "prior/checkpoints/checkpoint-4")
    assert (tmp_path / "prior/export/model.safetensors").exists()
    # that mid-epoch checkpoint (4 of 12 batches per rank) resumed on ONE process: the epoch goes on with the
    # 1500 - 2 x 4 x 64 = 988 samples not yet seen (16 batches), one warning line, and finishes
    capsys.readouterr()
    loop = train_prior.run(load_config(PriorStageConfig, ["--output_dir", str(tmp_path / "prior"), "--resume",
                                                          "latest"]))
    out = capsys.readouterr().out
    assert out.count("warning: resuming mid-epoch with another reader setup (world_size 2 -> 1)") == 1, out
    assert loop.state.finished and loop.state.global_step == 4 + 16
    state = json.loads((tmp_path / "prior/checkpoints/checkpoint-20/vqgen_state.json").read_text())
    assert state["world_size"] == 1 and state["epoch"] == 1


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_sampling_settings_chosen_by_the_main_process_of_two(stage1, tmp_path):
    """The choice of sampling settings at the end of a 2-process prior run: the main process alone, the other
    waiting at the final barrier; both exit cleanly and the export holds generation_config.json."""
    from vqgen.eval.classifier import load_or_train

    d, _ = stage1
    assert extract.run(load_config(ExtractConfig, ["--checkpoint", str(d / "one/export"), "--split", "train",
                                                   "--output", str(tmp_path / "shards"), "--no_progress"]))
    load_or_train("digits", str(d / "data"), 16, 1, epochs=1, log=lambda *a: None)  # the data_dir stage 1 recorded
    flags = [f for f in TINY_PRIOR if f not in ("--tune_sampling", "none")]
    proc = run([*cpu2(), str(ROOT / "train_prior.py"), "--shards", str(tmp_path / "shards"), *flags,
                "--batch_size", "64", "--max_steps", "3", "--tune_samples", "16", "--tune_minutes", "1",
                "--output_dir", str(tmp_path / "prior")], timeout=300)
    log = proc.stdout + proc.stderr
    assert "processes = 2" in log and log.count("sampling settings stored in") == 1, log[-3000:]
    gc = json.loads((tmp_path / "prior/export/generation_config.json").read_text())
    assert {"conditional", "unconditional"} <= set(gc) and gc["chosen_by"]["samples_per_setting"] == 16


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_reader_fewer_shards_than_ranks_times_workers(tmp_path):
    """1 shard, 3 ranks x 2 workers: equal batch counts on every rank, every sample once, no hang."""
    settings = {"tokenizer_sha256": "b" * 64, "dataset": "synthetic", "split": "train", "num_samples": 40}
    w = shards.RankShardWriter(tmp_path, "train", 0, settings, 100, (2, 2), shards.token_dtype(16))
    w.resume()
    for k in range(40):
        w.write(k, np.full((2, 2), k % 16, dtype=np.uint16), k % 4)
    w.close()
    header = shards.Manifest(tokenizer={"sha256": "b" * 64, "config": {}, "path": None}, codebook_size=16, latent_h=2,
                             latent_w=2, dtype="uint16", num_classes=4, dataset="synthetic")
    shards.merge_manifest(tmp_path, "train", 1, header, transforms={}, hflip=False, expected_total=40)
    counts = []
    for rank in range(3):
        loader = shards.make_token_loader(tmp_path, "train", batch_size=4, rank=rank, world_size=3, num_workers=2,
                                          shuffle_buffer=8)
        batches = list(loader)
        counts.append((len(loader), len(batches), sum(t.shape[0] for t, _ in batches)))
    assert len(set(counts)) == 1 and counts[0][2] == 40 // 3, counts


# ------------------------------------------------------------------------------------------- failures
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_killed_rank_fails_the_launch_quickly(tmp_path):
    psutil = pytest.importorskip("psutil")
    cmd = [*cpu2(), str(ROOT / "train_vqvae.py"), *TINY_VQ, "--data_dir", str(tmp_path / "data"), "--batch_size", "64",
           "--n_epochs", "1000", "--sample_and_save_freq", "1000", "--timeout_minutes", "2",
           "--output_dir", str(tmp_path / "run")]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not (tmp_path / "run/metrics.jsonl").exists():  # training has started on both ranks
            assert launcher.poll() is None, launcher.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        rank1 = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1" and "train_vqvae.py" in " ".join(p.cmdline())]
        assert len(rank1) == 1, rank1
        t0 = time.monotonic()
        os.kill(rank1[0].pid, signal.SIGKILL)
        out = launcher.communicate(timeout=90)[0]
        elapsed = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert elapsed < 90, elapsed
    assert "FAILED" in out or "SIGKILL" in out or "exitcode" in out, out[-3000:]


# ------------------------------------------------------------------------------------------- VQGAN (2 optimizers)
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_vqgan_two_processes_match_one_and_resume(tmp_path):
    """--disc_weight > 0 under DDP: the discriminator and its optimizer are prepared, saved by both ranks and resumed;
    the adaptive weight uses the process-averaged gradients, so 2 x 64 logs what 1 x 128 does (GroupNorm
    discriminator: BatchNorm statistics would be per rank)."""
    common = [*TINY_VQ, "--disc_weight", "0.5", "--disc_channels", "16", "--disc_norm", "group",
              "--data_dir", str(tmp_path / "data"), "--sample_and_save_freq", "100", "--checkpointing_steps", "2"]

    def two(*extra):
        return run([*cpu2(), str(ROOT / "train_vqvae.py"), *common, "--batch_size", "64", *extra])

    log = two("--max_steps", "4", "--output_dir", str(tmp_path / "two"))
    assert "processes = 2" in log.stdout + log.stderr
    two("--max_steps", "2", "--output_dir", str(tmp_path / "cut"))
    resumed = two("--max_steps", "4", "--resume", "latest", "--output_dir", str(tmp_path / "cut"))
    assert "resumed from" in resumed.stdout + resumed.stderr
    train_vqvae.run(load_config(VQVAEStageConfig, [*common, "--batch_size", "128", "--max_steps", "4",
                                                   "--output_dir", str(tmp_path / "one")]))
    ckpt = tmp_path / "two/checkpoints/checkpoint-4"
    assert_two_ranks_checkpoint(ckpt)
    assert {"model_1.safetensors", "optimizer_1.bin"} <= {p.name for p in ckpt.iterdir()}
    rows = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
            for name in ("one", "two")}
    for key in ("loss", "d_loss", "g_loss", "adaptive_weight"):
        assert rows["one"][key] == pytest.approx(rows["two"][key], rel=EQUIV_RTOL), key
    # resumed = uninterrupted, bitwise (same world size: the same gloo reductions in the same order)
    assert_close_exports(tmp_path / "two", tmp_path / "cut", atol=0)
    da = load_file(str(ckpt / "model_1.safetensors"))
    db = load_file(str(tmp_path / "cut/checkpoints/checkpoint-4/model_1.safetensors"))
    for k in da:
        assert torch.equal(da[k], db[k]), k


# ------------------------------------------------------------------------------------------- DeepSpeed
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_deepspeed_zero2_two_processes_save_resume_export(stage1, tmp_path):
    for mod in ("deepspeed", "transformers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed (accelerate's DeepSpeed integration needs both)")
    d, _ = stage1
    base = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs/deepspeed_zero2.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
            str(ROOT / "train_vqvae.py"), *TINY_VQ, "--data_dir", str(d / "data"), "--batch_size", "64",
            "--sample_and_save_freq", "100", "--output_dir", str(tmp_path / "ds")]
    first = run([*base, "--max_steps", "3"], DS_ACCELERATOR="cpu")
    log = first.stdout + first.stderr
    assert "processes = 2" in log  # accelerate alone would say 1 here (vqgen corrects it on CPU)
    ckpt = tmp_path / "ds/checkpoints/checkpoint-3"
    assert_two_ranks_checkpoint(ckpt)
    parts = {p.name for p in (ckpt / "pytorch_model").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= parts
    # same init, same data order as the DDP run: the same first loss
    assert losses(tmp_path / "ds")[1] == pytest.approx(losses(d / "two")[1], rel=LOSS_RTOL)
    second = run([*base, "--max_steps", "6", "--resume", "latest"], DS_ACCELERATOR="cpu")
    assert "resumed from" in second.stdout + second.stderr
    state = json.loads((tmp_path / "ds/checkpoints/checkpoint-6/vqgen_state.json").read_text())
    assert state["global_step"] == 6 and state["world_size"] == 2
    assert (tmp_path / "ds/export/model.safetensors").exists()


# ------------------------------------------------------------------------------------------- prior kinds
PRIOR_KIND_FLAGS = {"ar_random_order": ["--order", "random", "--order_anneal_start", "0.2", "--order_anneal_end",
                                        "0.8"],
                    "maskgit": ["--prior_kind", "maskgit", "--decode_steps", "3"]}


def _kind_run(stage2, out: Path, kind: str, *extra: str) -> list[str]:
    return [str(ROOT / "train_prior.py"), "--shards", str(stage2 / "shards"), "--checkpoint", str(stage2 / "tok"),
            *TINY_PRIOR, "--batch_size", "128", "--checkpointing_steps", "2", "--sample_and_save_freq", "1",
            *PRIOR_KIND_FLAGS[kind], "--output_dir", str(out), *extra]


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(PRIOR_KIND_FLAGS))
def test_prior_kinds_two_processes_train_grid_export_resume(stage2, tmp_path, kind):
    """Each prior kind on 2 processes: an epoch (6 steps of 2 x 128), its validation under the kind's own name, the
    sample grid, the export (loaded by kind), then a second epoch resumed from the checkpoint."""
    from vqgen.models.prior import load_prior
    out = tmp_path / kind
    proc = run([*cpu2(), *_kind_run(stage2, out, kind)])
    assert "processes = 2" in proc.stdout + proc.stderr
    assert_two_ranks_checkpoint(out / "checkpoints/checkpoint-6")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    name = "val/masked_bits_per_token" if kind == "maskgit" else "val/bits_per_token"
    other = "val/bits_per_token" if kind == "maskgit" else "val/masked_bits_per_token"
    assert any(name in r for r in rows) and not any(other in r for r in rows)
    assert (out / "samples/samples_epoch0001.png").exists()
    prior = load_prior(out / "export")
    assert prior.config.prior_kind == ("maskgit" if kind == "maskgit" else "ar")
    proc = run([*cpu2(), *_kind_run(stage2, out, kind, "--n_epochs_t", "2", "--resume", "latest")])
    assert "resumed from" in proc.stdout + proc.stderr
    state = json.loads((out / "checkpoints/checkpoint-12/vqgen_state.json").read_text())
    assert state["global_step"] == 12 and state["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(PRIOR_KIND_FLAGS))
def test_prior_kinds_deepspeed_zero2_save_resume_export(stage2, tmp_path, kind):
    for mod in ("deepspeed", "transformers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed (accelerate's DeepSpeed integration needs both)")
    base = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs/deepspeed_zero2.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
            *_kind_run(stage2, tmp_path / "ds", kind, "--sample_and_save_freq", "100")]
    first = run([*base, "--max_steps", "2"], DS_ACCELERATOR="cpu")
    assert "processes = 2" in first.stdout + first.stderr
    assert_two_ranks_checkpoint(tmp_path / "ds/checkpoints/checkpoint-2")
    second = run([*base, "--max_steps", "4", "--resume", "latest"], DS_ACCELERATOR="cpu")
    assert "resumed from" in second.stdout + second.stderr
    assert json.loads((tmp_path / "ds/checkpoints/checkpoint-4/vqgen_state.json").read_text())["global_step"] == 4
    assert (tmp_path / "ds/export/model.safetensors").exists()
