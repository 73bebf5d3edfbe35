"""One writer per folder, and checkpoints that prove their integrity.

* a second writer of a run folder (stage 1 or 3) or of a shard folder is refused: exit 2, one error line naming the
  holder, the folder unchanged; readers (extraction reading a tokenizer, the prior reading shards) never lock; a
  SIGKILLed holder frees the folder at once; the lock file is no run and survives --overwrite;
* a damaged newest checkpoint (truncated weights, code-running optimizer or RNG pickle, a damaged RNG file, a
  missing file, a damaged vqgen_state.json) is set aside with one warning and the newest intact one resumed (bitwise
  as an uninterrupted run); a damaged --resume PATH or no intact checkpoint is one error line; checkpoints of older
  vqgen versions (no file list) resume, and RNG states accelerate would skip silently are an error;
* two processes: the second job is refused on both ranks while the first trains on, undisturbed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factories import TINY_VQVAE_FLAGS
from vqgen import extract, shards
from vqgen.cli import run_cli
from vqgen.config import ExtractConfig, PriorStageConfig, VQVAEStageConfig
from vqgen.lock import LOCK_NAME, lock_folder
from vqgen.run_dir import RunDir
from vqgen.train import prior_task as train_prior
from vqgen.train import vqvae_task as train_vqvae

ROOT = Path(__file__).resolve().parents[1]
VQ = [*TINY_VQVAE_FLAGS, "--sample_and_save_freq", "100", "--checkpointing_steps", "2"]
PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--batch_size", "64",
         "--no_wandb", "--num_samples", "4", "--val_batches", "2", "--warmup_steps", "2", "--sample_and_save_freq",
         "100"]
HOLD = "import sys, time; from vqgen.lock import lock_folder\n[lock_folder(f) for f in sys.argv[1:]]\n" \
       "print('held', flush=True); time.sleep(300)"
TRY_LOCK = "import sys; from vqgen.lock import lock_folder; lock_folder(sys.argv[1])"


def tree(d: Path, lock: bool = True) -> dict[str, tuple[int, int]]:
    """Every file below d with (size, mtime_ns); ``lock=False``: but the lock file (a run refused after taking the
    lock has recorded itself there)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file() and (lock or p.name != LOCK_NAME)}


def cli(mod, config, argv, capsys) -> tuple[int, str, str]:
    code = run_cli(mod.run, config, [str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err
    return code, cap.out, cap.err


def hold(*folders: Path) -> subprocess.Popen:
    """Another job holding ``folders`` (the trainers' and extraction's lock, taken by a separate process)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, folders)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def done(tmp_path_factory, stage2):
    """``run``: a finished 4-step tokenizer run (checkpoints 2 and 4); ``shards``: a finished extraction."""
    d = tmp_path_factory.mktemp("locks")
    assert run_cli(train_vqvae.run, VQVAEStageConfig, [*VQ, "--max_steps", "4", "--output_dir", str(d / "run")]) == 0
    shutil.copytree(stage2 / "shards", d / "shards")
    return d


# ------------------------------------------------------------------------------------------------ one writer
def test_second_writer_is_refused_and_readers_go_on(done, stage2, tmp_path, capsys):
    run, shard_dir, prior_dir = done / "run", done / "shards", tmp_path / "prior"
    holder = hold(run, shard_dir, prior_dir)
    try:
        before = {d: tree(d) for d in (run, shard_dir, prior_dir)}
        writers = [(train_vqvae, VQVAEStageConfig, [*VQ, "--max_steps", "6", "--resume", "latest", "--output_dir",
                                                    run]),
                   (train_prior, PriorStageConfig, ["--shards", shard_dir, *PRIOR, "--max_steps", "2", "--output_dir",
                                                    prior_dir]),
                   (extract, ExtractConfig, ["--checkpoint", stage2 / "tok", "--dataset", "digits", "--data_dir",
                                             stage2 / "data", "--split", "train", "test", "--batch_size", "512",
                                             "--shard_size", "500", "--no_progress", "--overwrite", "--output",
                                             shard_dir])]
        for mod, config, argv in writers:
            code, _, err = cli(mod, config, argv, capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert "is being written by another vqgen job" in err and f"pid {holder.pid}," in err, err
        assert {d: tree(d) for d in before} == before  # nothing written, nothing cleared by --overwrite
        # readers never lock: the tokenizer of the held run, the held shards
        code, _, err = cli(extract, ExtractConfig, ["--checkpoint", run / "export", "--dataset", "digits",
                                                    "--data_dir", stage2 / "data", "--split", "test",
                                                    "--no_progress", "--output", tmp_path / "sh"], capsys)
        assert code == 0, err
        code, _, err = cli(train_prior, PriorStageConfig, ["--shards", shard_dir, *PRIOR, "--max_steps", "1",
                                                           "--output_dir", tmp_path / "p2"], capsys)
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_frees_the_folder_at_once(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    holder = hold(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, out, err = cli(train_vqvae, VQVAEStageConfig, [*VQ, "--max_steps", "6", "--resume", "latest",
                                                         "--output_dir", run], capsys)
    assert code == 0 and "resumed from" in out, err
    info = json.loads((run / LOCK_NAME).read_text())  # the last holder is recorded
    assert info["pid"] == os.getpid() and "host" in info and "since" in info


def test_lock_file_is_no_run_and_survives_overwrite(tmp_path):
    run = RunDir(tmp_path / "r")
    lock = lock_folder(run.root)
    assert lock_folder(run.root) is lock  # this process holds it already: the same lock
    assert not run.holds_run()
    inode = (run.root / LOCK_NAME).stat().st_ino
    run.clear()
    shards.clear_output(run.root)
    assert (run.root / LOCK_NAME).stat().st_ino == inode
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = subprocess.run([sys.executable, "-c", TRY_LOCK, str(run.root)], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert other.returncode != 0 and "FolderInUseError" in other.stderr and f"pid {os.getpid()}," in other.stderr
    lock.release()
    assert subprocess.run([sys.executable, "-c", TRY_LOCK, str(run.root)], cwd=ROOT, env=env).returncode == 0


# ------------------------------------------------------------------------------------------ damaged checkpoints
class Evil:
    """Unpickling this runs ``touch <marker>``: a checkpoint file that would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate(f: Path, marker: Path) -> None:
    f.write_bytes(f.read_bytes()[:100])


def _evil(f: Path, marker: Path) -> None:
    torch.save({"state": Evil(marker), "random_state": Evil(marker)}, str(f))


def _flip(f: Path, marker: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _remove(f: Path, marker: Path) -> None:
    f.unlink()


DAMAGE = {"truncated weights": ("model.safetensors", _truncate),
          "code-running optimizer pickle": ("optimizer.bin", _evil),
          "code-running RNG pickle": ("random_states_0.pkl", _evil),
          "damaged RNG file": ("random_states_0.pkl", _flip),
          "missing optimizer": ("optimizer.bin", _remove),
          "damaged vqgen_state.json": ("vqgen_state.json", _truncate)}


def _resume(run: Path, capsys, *extra) -> tuple[int, str, str]:
    return cli(train_vqvae, VQVAEStageConfig, [*VQ, "--max_steps", "6", "--output_dir", run, *extra], capsys)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_resumed(done, tmp_path, capsys, case):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(done / "run", run)
    name, damage = DAMAGE[case]
    damage(run / "checkpoints/checkpoint-4" / name, marker)
    damaged = tree(run / "checkpoints/checkpoint-4")
    code, out, err = _resume(run, capsys, "--resume", "latest")
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint-4 is damaged" in warnings[0] and "damaged-checkpoint-4" in warnings[0]
    assert "resumed from" in out and "checkpoint-2: step 2" in out
    assert not marker.exists()
    assert tree(run / "checkpoints/damaged-checkpoint-4") == damaged  # kept as it was, under another name
    assert {"checkpoint-4", "checkpoint-6", "damaged-checkpoint-4"} <= {p.name for p in (run / "checkpoints").iterdir()}
    if case == "truncated weights":  # the fallback run is the uninterrupted run, bitwise
        ref = tmp_path / "ref"
        assert run_cli(train_vqvae.run, VQVAEStageConfig, [*VQ, "--max_steps", "6", "--output_dir", str(ref)]) == 0
        a, b = load_file(str(ref / "export/model.safetensors")), load_file(str(run / "export/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_resume_path_or_no_intact_checkpoint_is_one_error(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    _truncate(run / "checkpoints/checkpoint-4/model.safetensors", run)
    before = tree(run, lock=False)
    code, _, err = _resume(run, capsys, "--resume", str(run / "checkpoints/checkpoint-4"))
    assert code == 2 and err.count("\n") == 1 and "the checkpoint is damaged: model.safetensors has 100 bytes" in err
    assert tree(run, lock=False) == before
    _evil(run / "checkpoints/checkpoint-2/optimizer.bin", tmp_path / "PWNED")
    before = tree(run, lock=False)
    code, _, err = _resume(run, capsys, "--resume", "latest")
    assert code == 2 and err.count("\n") == 1 and "no intact checkpoint" in err, err
    assert "checkpoint-4: model.safetensors" in err and "checkpoint-2: optimizer.bin" in err
    assert tree(run, lock=False) == before and not (tmp_path / "PWNED").exists()


def _as_older_vqgen(ckpt: Path) -> None:
    """What vqgen wrote before checkpoints listed their files."""
    state = json.loads((ckpt / "vqgen_state.json").read_text())
    del state["files"]
    (ckpt / "vqgen_state.json").write_text(json.dumps(state))


def test_older_checkpoints_resume_and_unloadable_parts_are_one_error(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    for ckpt in (run / "checkpoints").iterdir():
        _as_older_vqgen(ckpt)
    keep = tmp_path / "keep"
    shutil.copytree(run, keep)
    code, out, err = _resume(run, capsys, "--resume", "latest")
    assert code == 0 and "checkpoint-4: step 4" in out and "warning" not in out + err, out + err
    # a code-running optimizer pickle in an older checkpoint: found by the checks, set aside like any damage
    shutil.rmtree(run)
    shutil.copytree(keep, run)
    _evil(run / "checkpoints/checkpoint-4/optimizer.bin", tmp_path / "PWNED")
    code, out, err = _resume(run, capsys, "--resume", "latest")
    assert code == 0 and out.count("warning:") == 1 and "optimizer.bin cannot be loaded safely" in out, out + err
    assert "would run code" in out and not (tmp_path / "PWNED").exists()
    # an RNG state accelerate would skip silently (valid pickle, unusable state): an error, not an inexact resume
    shutil.rmtree(run)
    shutil.copytree(keep, run)
    rng = run / "checkpoints/checkpoint-4/random_states_0.pkl"
    states = torch.load(str(rng), weights_only=False)
    states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(states, str(rng))
    code, _, err = _resume(run, capsys, "--resume", "latest")
    assert code == 2 and err.count("\n") == 1 and "random_states_0.pkl was not restored" in err, err


def test_tampered_file_list_is_caught_while_loading(done, tmp_path, capsys):
    """A file list rewritten to match a code-running optimizer pickle: the load refuses it, one line, nothing runs."""
    from vqgen.train.checkpointing import checkpoint_files

    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    ckpt = run / "checkpoints/checkpoint-4"
    _evil(ckpt / "optimizer.bin", tmp_path / "PWNED")
    state = json.loads((ckpt / "vqgen_state.json").read_text())
    (ckpt / "vqgen_state.json").write_text(json.dumps({**state, "files": checkpoint_files(ckpt)}))
    code, _, err = _resume(run, capsys, "--resume", "latest")
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot resume from {ckpt}: a file of it would run code" in err and "nothing ran" in err, err
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_process_second_job_refused_on_every_rank_first_undisturbed(tmp_path):
    from test_distributed import ACCELERATE, cpu2, launch_env

    if not ACCELERATE.exists():
        pytest.skip("accelerate CLI not installed")
    psutil = pytest.importorskip("psutil")

    def kill_job(proc: subprocess.Popen) -> None:
        """SIGKILL the launcher and its ranks at once (torch's agent starts each rank in a session of its own)."""
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.send_signal(signal.SIGKILL)
        proc.wait()
    run = tmp_path / "run"
    flags = [*VQ, "--data_dir", str(tmp_path / "data"), "--batch_size", "64", "--output_dir", str(run)]
    first = subprocess.Popen([*cpu2(), str(ROOT / "train_vqvae.py"), *flags, "--max_steps", "5000"], cwd=ROOT,
                             env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 200
        while not list((run / "checkpoints").glob("checkpoint-*")):  # both ranks are training
            assert first.poll() is None and time.monotonic() < deadline, "the first job did not start training"
            time.sleep(0.5)
        holder = json.loads((run / LOCK_NAME).read_text())
        second = subprocess.run([*cpu2(), str(ROOT / "train_vqvae.py"), *flags, "--max_steps", "5000", "--resume",
                                 "latest"], cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=200)
        log = second.stdout + second.stderr
        assert second.returncode != 0
        errors = [line for line in log.splitlines() if line.startswith("train_vqvae.py: error:")]
        assert len(errors) == 2 and all(f"pid {holder['pid']}," in e for e in errors), log[-3000:]  # both ranks
        assert "exitcode  : 2" in log and "vqgen/" not in log, log[-3000:]  # no traceback from vqgen
        assert first.poll() is None  # the first job trains on, its rank 1 unaffected
        kill_job(first)
        # the killed job freed the folder at once; its newest checkpoint damaged: the rerun falls back, once
        newest = RunDir(run).checkpoint_dirs()[-1]
        _truncate(newest / "model.safetensors", run)
        step = int(newest.name.split("-")[1])
        third = subprocess.run([*cpu2(), str(ROOT / "train_vqvae.py"), *flags, "--max_steps", str(step + 2),
                                "--resume", "latest"], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                               timeout=200)
        log = third.stdout + third.stderr
        assert third.returncode == 0, log[-3000:]
        assert log.count(f"warning: checkpoint {newest} is damaged") == 1 and "resumed from" in log, log[-3000:]
    finally:
        if first.poll() is None:
            kill_job(first)
