"""Reliability and security (issue 8): nothing lost, nothing executed.

* safe loading: a pickle that runs code on load is refused by load_export and by the CLIs, and runs nothing;
* crash consistency: stage-1 and stage-3 trainers SIGKILLed at a random-ish moment resume with --resume latest to
  bitwise the weights of an uninterrupted run; half-written / half-deleted checkpoints are ignored and cleaned;
  an export write killed between its two renames leaves a loadable export;
* numerical faults: non-finite losses are skipped and counted, --max_bad_steps aborts (exit 2) with the last good
  checkpoint intact; --mixed_precision fp16 on CPU is refused (the quantizer's fp32 is tested in test_quantizer.py);
* disk full: a clear error, the previous state intact (monkeypatched ENOSPC, and a real 200 KB tmpfs when root).

Stage-2 SIGKILL/resume is in tests/test_extract.py; mid-epoch --max_steps resume in tests/test_train_vqvae.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factories import tiny_vqvae
from vqgen import extract, sample
from vqgen.cli import run_cli
from vqgen.config import ExtractConfig, PriorStageConfig, SampleConfig, VQVAEStageConfig, load_config
from vqgen.errors import CheckpointError, DiskFullError
from vqgen.export import load_export
from vqgen.fsutil import atomic_directory
from vqgen.train import prior_task as train_prior
from vqgen.train import vqvae_task as train_vqvae

ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = ["--dataset", "digits", "--num_channels", "8", "16", "--num_res_channels", "8", "16",
           "--num_res_layers", "1", "--num_embeddings", "32", "--embedding_dim", "8", "--batch_size", "64",
           "--no_wandb", "--val_images", "64", "--lr", "1e-3", "--sample_and_save_freq", "100",
           "--lr_schedule", "constant"]  # constant: runs cut with --max_steps, the default cosine's horizon too
TINY_PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--batch_size", "64",
              "--no_wandb", "--num_samples", "4", "--val_batches", "2", "--warmup_steps", "2",
              "--sample_and_save_freq", "100", "--tune_sampling", "none"]
# The killed trainer must compute like the in-process runs it is compared with: same intra-op thread count (a
# different count changes float reduction orders in conv/matmul backward, hence the last bits of the weights).
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONWARNINGS": "ignore"}


class Evil:
    """Unpickling this runs ``os.system("touch <marker>")``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path) -> Path:
    torch.save({"kind": "vqvae", "config": {}, "state_dict": {}, "payload": Evil(marker)}, str(path))
    return path


# ------------------------------------------------------------------------------------------------ safe loading
def test_code_executing_checkpoint_is_refused(tmp_path, stage2, capsys):
    marker = tmp_path / "PWNED"
    evil = write_evil(tmp_path / "evil.pt", marker)
    # sanity: the file really runs code when unpickled without weights_only
    torch.load(str(evil), weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*never does"):
        load_export(evil)
    capsys.readouterr()
    runs = [
        (sample, ["--checkpoint", evil, "--checkpoint_t", evil, "--output_dir", tmp_path / "s"]),
        (sample, ["--checkpoint", stage2 / "tok", "--checkpoint_t", evil, "--output_dir", tmp_path / "s"]),
        (extract, ["--checkpoint", evil, "--dataset", "digits", "--output", tmp_path / "sh", "--no_progress"]),
        (train_prior, ["--shards", stage2 / "shards", "--checkpoint", evil, "--output_dir", tmp_path / "p",
                       *TINY_PRIOR]),
    ]
    config = {sample: SampleConfig, extract: ExtractConfig, train_prior: PriorStageConfig}
    for mod, argv in runs:
        assert run_cli(mod.run, config[mod], [str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert "refusing to load" in err and "evil.pt" in err and "Traceback" not in err, err
    assert not marker.exists()
    assert not (tmp_path / "s").exists() and not (tmp_path / "sh").exists() and not (tmp_path / "p").exists()


def test_code_executing_checkpoint_refused_by_script(tmp_path):
    """The real entry point too (one subprocess: the thin script, its exit code and stderr)."""
    marker = tmp_path / "PWNED"
    evil = write_evil(tmp_path / "evil.pt", marker)
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(evil), "--checkpoint_t", str(evil),
                           "--output_dir", str(tmp_path / "s")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "s").exists()


def test_training_checkpoints_hold_no_pickled_objects(tmp_path):
    """Resuming loads accelerate files with weights_only=True only: the scheduler is JSON, not a custom pickle."""
    out = tmp_path / "r"
    train_vqvae.run(load_config(VQVAEStageConfig, [*TINY_VQ, "--output_dir", str(out), "--max_steps", "2"]))
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert not list(ckpt.glob("custom_checkpoint_*"))
    state = json.loads((ckpt / "vqgen_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 2
    for f in ckpt.glob("*.bin"):  # every pickle in the folder loads under weights_only
        torch.load(str(f), weights_only=True)


# ------------------------------------------------------------------------------------------ crash consistency
def _kill_when_checkpointed(cmd: list[str], out: Path, rng: random.Random, timeout: float = 240) -> None:
    """Start ``cmd``, wait for a complete checkpoint at a random early step (2-10), sleep 0-30 ms, SIGKILL it.

    The kill moment is tied to training progress, not wall time, so it lands mid-run on a loaded or an idle
    machine alike (the tiny trainer finishes well under a second after its first checkpoint on an idle one).
    """
    first = rng.choice([2, 4, 6, 8, 10])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout

    def reached() -> bool:
        return any(int(p.parent.name.split("-")[1]) >= first
                   for p in (out / "checkpoints").glob("checkpoint-*/vqgen_state.json"))
    try:
        while not reached():
            assert proc.poll() is None, f"trainer exited before checkpoint {first}:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL, "the trainer finished before it was killed: test proves nothing"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not (out / "export").exists()


def _fake_half_written(out: Path) -> None:
    """What a kill inside save_checkpoint / rotation leaves: a temp folder and a folder without vqgen_state.json."""
    ck = out / "checkpoints"
    (ck / ".checkpoint-999.tmp").mkdir()
    (ck / ".checkpoint-999.tmp" / "model.safetensors").write_bytes(b"half")
    (ck / ".checkpoint-1.del").mkdir()
    (ck / "checkpoint-998").mkdir()  # renamed in by hand, no state file: not a checkpoint


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "export" / "model.safetensors")), load_file(str(b / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _check_resumed_checkpoints(out: Path) -> None:
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(".")], names  # temp / half-deleted folders cleaned
    assert "checkpoint-999" not in names


# The prior kinds' own randomness: AR random orders annealed over steps 4-20 of 40 (both sides of the kill), MaskGIT
# masks.
PRIOR_KINDS = {"prior": [], "prior_random_order": ["--order", "random", "--order_anneal_start", "0.1",
                                                   "--order_anneal_end", "0.5"],
               "prior_maskgit": ["--prior_kind", "maskgit"]}


@pytest.mark.parametrize("stage", ["vqvae", *PRIOR_KINDS])
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, stage, stage2):
    rng = random.Random(f"{stage}-{os.getpid()}")  # a different kill moment on every run
    if stage == "vqvae":
        mod, config, script = train_vqvae, VQVAEStageConfig, "train_vqvae.py"
        flags = [*TINY_VQ, "--n_epochs", "2", "--max_steps", "26", "--checkpointing_steps", "2"]
    else:
        mod, config, script = train_prior, PriorStageConfig, "train_prior.py"
        flags = ["--shards", str(stage2 / "shards"), *TINY_PRIOR, "--n_epochs_t", "2", "--max_steps", "40",
                 "--checkpointing_steps", "2", *PRIOR_KINDS[stage]]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _kill_when_checkpointed([sys.executable, script, *flags, "--output_dir", str(cut)], cut, rng)
    _fake_half_written(cut)
    mod.run(load_config(config, [*flags, "--output_dir", str(cut), "--resume", "latest"]))
    _check_resumed_checkpoints(cut)
    mod.run(load_config(config, [*flags, "--output_dir", str(ref)]))
    _assert_same_weights(ref, cut)


def test_resume_latest_skips_incomplete_checkpoints(tmp_path):
    from vqgen.run_dir import RunDir

    run = RunDir(tmp_path)
    ck = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        (ck / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (ck / f"checkpoint-{step}" / "vqgen_state.json").write_text("{}")
    (ck / ".checkpoint-8.tmp").mkdir()
    (ck / ".checkpoint-8.tmp" / "vqgen_state.json").write_text("{}")
    assert [d.name for d in run.checkpoint_dirs()] == ["checkpoint-2", "checkpoint-4"]
    assert run.resolve_resume("latest").name == "checkpoint-4"
    with pytest.raises(CheckpointError, match="not a complete vqgen checkpoint"):
        run.resolve_resume(str(ck / "checkpoint-6"))


def test_export_killed_between_renames_stays_loadable(tmp_path):
    out = tmp_path / "export"
    m = tiny_vqvae(0)
    sha = m.export_to(out)
    # the state a SIGKILL between `export -> .export.old` and `tmp -> export` leaves behind
    os.replace(out, tmp_path / ".export.old")
    (tmp_path / ".export.abc123.tmp").mkdir()
    assert load_export(out).sha256 == sha  # readers fall back to the moved-aside complete export
    assert load_export(tmp_path).sha256 == sha  # ... also through the run folder
    sha1 = tiny_vqvae(1).export_to(out)  # the next writer restores, cleans, then replaces
    assert load_export(out).sha256 == sha1 != sha
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_write_failure_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "export"
    sha = tiny_vqvae(0).export_to(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr("vqgen.export.save_file", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing the export .*previous export .*intact"):
        tiny_vqvae(1).export_to(out)
    monkeypatch.undo()
    assert load_export(out).sha256 == sha
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:  # any failure: old kept, temp removed
        (tmp / "x").write_text("new")
        raise RuntimeError("boom")
    assert load_export(out).sha256 == sha and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ------------------------------------------------------------------------------------------ numerical faults
def test_nan_steps_skipped_then_abort_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Steps 1-3 fine (checkpoint at 2), then NaN every time: 3 skips counted, abort with exit 2, checkpoint-2
    intact and resumable, no export."""
    calls = {"n": 0}
    real = train_vqvae.VQVAETask.compute_loss

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss, logs = real(self, model, batch)
        return (loss * float("nan") if calls["n"] > 3 else loss), logs

    monkeypatch.setattr(train_vqvae.VQVAETask, "compute_loss", poisoned)
    out = tmp_path / "r"
    argv = [*TINY_VQ, "--output_dir", str(out), "--checkpointing_steps", "2", "--max_bad_steps", "3",
            "--n_epochs", "1"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 2
    cap = capsys.readouterr()
    assert "3 consecutive non-finite losses: stopping" in cap.err and "Traceback" not in cap.err
    assert cap.out.count("non-finite loss") == 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    before = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert not (out / "export").exists()
    # one bad step in between good ones is skipped (counted) and training goes on
    calls["n"] = 0

    def one_bad(self, model, batch):
        calls["n"] += 1
        loss, logs = real(self, model, batch)
        return (loss * float("inf") if calls["n"] == 2 else loss), logs

    monkeypatch.setattr(train_vqvae.VQVAETask, "compute_loss", one_bad)
    loop = train_vqvae.run(load_config(VQVAEStageConfig,
        [*argv[:-2], "--n_epochs", "1", "--max_steps", "5", "--resume", "latest"]))
    assert loop.state.bad_steps_total == 1 and loop.state.global_step == 5
    after = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "export" / "model.safetensors")).values())


def test_fp16_on_cpu_refused_before_anything_is_touched(tmp_path, capsys):
    out = tmp_path / "r"
    argv = [*TINY_VQ, "--output_dir", str(out), "--max_steps", "1"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert run_cli(train_vqvae.run, VQVAEStageConfig,
                   [*argv, "--mixed_precision", "fp16", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "fp16 needs a GPU" in err and "bf16" in err and "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*")) == before  # --overwrite did not delete the old run


# ---------------------------------------------------------------------------------------------------- disk full
def test_disk_full_while_checkpointing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    argv = [*TINY_VQ, "--output_dir", str(out), "--n_epochs", "1", "--checkpointing_steps", "2", "--max_steps", "3"]
    import accelerate

    real = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        if output_dir.endswith("checkpoint-4.tmp"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")  # what torch.save says on ENOSPC
        return real(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 0  # checkpoints 2 and 3
    capsys.readouterr()
    argv = [*argv[:-1], "6", "--resume", "latest"]
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 2
    err = capsys.readouterr().err
    assert "disk full while writing checkpoint" in err and "checkpoint-4" in err and "intact" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    # raw ENOSPC from a plain write (e.g. metrics.jsonl) is answered the same way by run_cli
    monkeypatch.setattr(train_vqvae, "run", lambda a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")))
    assert run_cli(train_vqvae.run, VQVAEStageConfig, argv) == 2
    err = capsys.readouterr().err
    assert "disk full while writing metrics.jsonl" in err and "intact" in err and "Traceback" not in err


def test_disk_full_on_a_real_tiny_filesystem(tmp_path, capsys):
    """A 200 KB tmpfs (needs root): the export, the atomic JSON writer and sample.py all fail cleanly."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        from vqgen.fsutil import atomic_write_json
        from vqgen.models.vqvae import VQVAE, VQVAEConfig
        atomic_write_json(mnt / "state.json", {"v": 1})
        with pytest.raises(OSError) as e:
            atomic_write_json(mnt / "state.json", {"v": "x" * 300_000})
        assert e.value.errno == errno.ENOSPC
        assert json.loads((mnt / "state.json").read_text()) == {"v": 1}
        assert sorted(p.name for p in mnt.iterdir()) == ["state.json"]  # no temp file left
        big = VQVAE(VQVAEConfig(in_channels=1, image_size=16, num_channels=(64, 64), num_res_channels=(64, 64),
                                num_res_layers=1, num_embeddings=32, embedding_dim=8))
        with pytest.raises(DiskFullError, match="disk full while writing the export"):
            big.export_to(mnt / "export")
        assert not (mnt / "export").exists() and sorted(p.name for p in mnt.iterdir()) == ["state.json"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
