"""Chaos run: every stage SIGKILLed at random moments and resumed, a checkpoint and a shard damaged, duplicate jobs
started on a folder in use; the end result must equal an uninterrupted run's, bitwise.

    python bench/chaos.py [--kills 20] [--seed 0] [--out DIR]

The tokenizer (train_vqvae.py, 1 process) and the prior (train_prior.py, 2 processes through accelerate launch) are
killed K times each (in start-up, a training step, a checkpoint write, its rotation, the export) and resumed with
--resume latest; extraction (extract_codes.py) is killed K times and rerun. Each stage reads its uninterrupted
counterpart's input, so a difference is that stage's. Tiny models on the offline digits; a kill takes the launcher
and its ranks at once, like a lost node. Correctness, not timing: figures and runtime in docs/FAILURES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil  # (accelerate's dependency) a launcher's whole process tree

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE = Path(PY).parent / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
COMMON = ["--dataset", "digits", "--no_wandb", "--sample_and_save_freq", "1000", "--checkpointing_steps", "1",
          "--checkpoints_total_limit", "2"]
TOKENIZER = [*COMMON, "--num_channels", "8", "16", "--num_res_channels", "8", "16", "--num_res_layers", "1",
             "--num_embeddings", "32", "--embedding_dim", "8", "--batch_size", "64", "--val_images", "64", "--lr",
             "1e-3", "--lr_schedule", "constant"]
PRIOR = [*COMMON[2:], "--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2",
         "--batch_size", "32", "--num_samples", "4", "--val_batches", "2", "--warmup_steps", "2"]
EXTRACT = ["--dataset", "digits", "--split", "train", "test", "--shard_size", "25", "--batch_size", "25",
           "--no_progress"]
LOCK_REFUSAL = "is being written by another vqgen job"
DAMAGED = "is damaged"


@dataclass
class Tally:
    """What one stage went through."""

    name: str
    faults: Counter = field(default_factory=Counter)  # kind -> injected
    survived: int = 0
    failures: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    equal: bool = False
    compared: str = ""
    seconds: float = 0.0

    @property
    def injected(self) -> int:
        return sum(self.faults.values())


class Job:
    """One launch of a stage: its process tree, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, out: Path):
        self.log, self.out, self.tree, self.listed = log, out, [], False
        with open(log, "w") as f:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.proc.poll() is None

    def refresh(self) -> None:
        """Note the processes below the launcher (torch's agent gives each rank a session of its own)."""
        try:
            self.tree, self.listed = psutil.Process(self.proc.pid).children(recursive=True), True
        except psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        """SIGKILL the launcher and its ranks at once, like a lost node; then any process of this stage the list
        missed."""
        if not self.listed:
            self.refresh()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)  # the launcher first: it must not report its ranks' deaths
        for p in self.tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.proc.wait()
        for p in psutil.process_iter(["cmdline"]):
            if str(self.out) in (p.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def error(self) -> str | None:
        """A traceback or an ``error:`` line in this run's output (None: neither)."""
        text = self.text()
        found = re.search(r"^Traceback \(most recent call last\)|^\S+\.py: error:", text, re.M)
        return text[found.start(): found.start() + 1500] if found else None


def wait_until(job: Job, done: Callable[[], bool], timeout: float, poll: float = 0.005) -> bool:
    """True once ``done()``; False when the job exits first. A job that makes no progress in time is a failure.
    The job's process list is kept fresh meanwhile, so that the kill that follows is immediate."""
    start = time.monotonic()
    listed = start - 1
    while not done():
        now = time.monotonic()
        if not job.running():
            return done()
        if now > start + timeout:
            raise RuntimeError(f"no progress in {timeout:.0f} s (see {job.log})")
        if now - listed > 0.2:
            job.refresh()
            listed = now
        time.sleep(poll)
    return True


def launcher(processes: int) -> list[str]:
    """The command prefix of a stage's processes (2: accelerate_configs/cpu_2proc.yaml on a free port)."""
    if processes == 1:
        return [PY]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
            "--main_process_port", str(port)]


# ------------------------------------------------------------------------------------------------ folders
def newest_step(run: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*/vqgen_state.json")
             if p.parent.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def shards_done(out: Path) -> int:
    return len([p for p in out.glob("*.tar")])


def leftovers(out: Path) -> set[str]:
    """Names a kill can leave behind: temp checkpoints, rotated-out ones, temp exports and shards."""
    pats = ("checkpoints/.checkpoint-*", ".export.*", ".*.tar.tmp")
    return {str(p.relative_to(out)) for pat in pats for p in out.glob(pat)}


def phase(new: set[str], progressed: bool, work: str) -> str:
    """Where a kill landed, from what it left."""
    if any(n.startswith(".export.") for n in new):
        return "export"
    if any(n.endswith(".del") for n in new):
        return "checkpoint rotation"
    if any(n.startswith("checkpoints/.checkpoint-") for n in new):
        return "checkpoint write"
    if any(n.endswith(".tar.tmp") for n in new):
        return "shard write"
    return work if progressed else "start-up / resume"


# ------------------------------------------------------------------------------------------------ one stage
@dataclass
class Stage:
    name: str
    argv: Callable[[bool], list[str]]  # resume? -> command line
    out: Path
    progress: Callable[[Path], int]
    last: int  # progress value at the end (max_steps, number of shards)
    trainer: bool
    startup: tuple[float, float]  # range of start-up kill delays (s)
    damage: Callable[[Path], str | None]  # damages the newest checkpoint / a shard; returns what it did
    work: str  # what it does between writes
    duplicates: int = 0  # duplicate writers started while a run is going


def run_stage(stage: Stage, kills: int, rng: random.Random, logs: Path) -> Tally:  # noqa: C901 - one story
    """``kills`` runs killed at random moments, each resumed by the next; then one run to the end."""
    tally = Tally(stage.name)
    exports = max(1, kills // 7) if stage.trainer else 0  # the last kills land in the export
    duplicate_at = set(rng.sample(range(1, kills - exports), min(stage.duplicates, max(0, kills - exports - 1))))
    pending = 0  # faults whose survival the next run shows
    damaged = damage_pending = False  # a trainer's damaged checkpoint: survived when a run reports it and resumes
    for i in range(kills + 1):
        final = i == kills
        before, base = leftovers(stage.out), stage.progress(stage.out)
        stale = set(stage.out.glob(".export.*.tmp"))
        job = Job(stage.argv(i > 0), logs / f"{stage.name.split()[0]}-{i:02d}.log", stage.out)
        try:
            if final:
                job.proc.wait()
            elif i >= kills - exports:  # once the export has started (after the last checkpoint)
                wait_until(job, lambda old=stale: bool(set(stage.out.glob(".export.*.tmp")) - old), 900, poll=0.001)
                time.sleep(rng.uniform(0, 0.002))
            elif i not in duplicate_at and rng.random() < 0.15:
                deadline = time.monotonic() + rng.uniform(*stage.startup)
                while job.running() and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                target = min(base + rng.randint(1, 3), stage.last - 1)
                if target > base:
                    wait_until(job, lambda at=target: stage.progress(stage.out) >= at, 900)
                if i in duplicate_at and job.running():
                    duplicate(stage, job, tally, logs / f"{stage.name.split()[0]}-{i:02d}-duplicate.log")
                time.sleep(rng.uniform(0, 0.25 if stage.trainer else 0.04))
        except RuntimeError as e:
            tally.failures.append(f"run {i}: {e}")
            job.kill()
            break
        finished = not job.running()
        if not finished:
            job.kill()
        text, rc = job.text(), job.proc.returncode
        problem = job.error() or (f"exit status {rc} (see {job.log})" if finished and rc != 0 else None)
        if damage_pending and "resumed from" in text:
            damage_pending = DAMAGED not in text
            problem = problem or ("the damaged checkpoint was not reported" if damage_pending else None)
            tally.survived += not damage_pending
        if problem:
            tally.failures.append(f"run {i} ({job.log.name}): {problem}")
            break
        tally.survived, pending = tally.survived + pending, 0
        if finished:
            if not final:
                tally.failures.append(f"run {i} finished before its kill: only {i} kills landed")
            break
        kind = phase(leftovers(stage.out) - before, stage.progress(stage.out) > base, stage.work)
        tally.faults[f"kill during {kind}"] += 1
        pending += 1
        if not damaged and i >= kills // 2 and (what := stage.damage(stage.out)):
            damaged = True
            tally.faults[what] += 1
            damage_pending = stage.trainer
            pending += not stage.trainer
    if damage_pending:
        tally.failures.append("no run reported the damaged checkpoint")
    return tally


def duplicate(stage: Stage, main: Job, tally: Tally, log: Path) -> None:
    """The same job submitted again while the first is stalled (stopped, holding its folder): refused with one error
    line per rank and exit status 2; the first goes on when continued."""
    tree = [psutil.Process(main.proc.pid), *psutil.Process(main.proc.pid).children(recursive=True)]
    for p in tree:
        p.suspend()
    try:
        dup = Job(stage.argv(True), log, stage.out)
        dup.proc.wait()
    finally:
        for p in tree:
            p.resume()
    text = dup.text()
    tally.faults["duplicate job"] += 1
    if dup.proc.returncode != 0 and LOCK_REFUSAL in text and "/vqgen/" not in text:
        tally.survived += 1
    else:
        tally.failures.append(f"duplicate job not refused (exit {dup.proc.returncode}, see {log})")


def truncate_newest_checkpoint(run: Path) -> str | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in (run / "checkpoints").glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / "vqgen_state.json").exists())
    if len(steps) < 2:
        return None
    f = steps[-1][1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "damaged checkpoint (truncated weights)"


def truncate_a_shard(out: Path) -> str | None:
    done = sorted(out.glob("train-*.tar"))
    if not done:
        return None
    f = done[len(done) // 2]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "damaged shard (truncated)"


# ------------------------------------------------------------------------------------------------ comparisons
def same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor bitwise equal, and the same header metadata (safetensors writes its keys in a per-process
    hash order, so the files' bytes differ where their contents do not)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not (a.is_file() and b.is_file()):
        return False
    ta, tb = load_file(str(a)), load_file(str(b))
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        meta = fa.metadata() == fb.metadata()
    return meta and ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k])
                                                   for k in ta)


def compare_trainer(tally: Tally, chaos: Path, ref: Path, global_batch: int) -> None:
    tally.equal = same_weights(chaos / "export/model.safetensors", ref / "export/model.safetensors")
    tally.compared = "export weights (every tensor of model.safetensors)"
    steps = [newest_step(d) for d in (chaos, ref)]
    tally.lost = max(0, (steps[1] - steps[0]) * global_batch)
    tally.duplicated = max(0, (steps[0] - steps[1]) * global_batch)


def shard_keys(out: Path) -> Counter:
    keys = Counter()
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tf:
            keys.update(f"{shard.name.split('-')[0]}/{m.name.split('.')[0]}" for m in tf if m.name.endswith(
                "tokens.npy"))
    return keys


def compare_shards(tally: Tally, chaos: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.glob("*.tar"))
    tally.equal = same_bytes(chaos / "manifest.json", ref / "manifest.json") and names == sorted(
        p.name for p in chaos.glob("*.tar")) and all(same_bytes(chaos / n, ref / n) for n in names)
    tally.compared = f"manifest.json + {len(names)} shards"
    got, want = shard_keys(chaos), shard_keys(ref)
    tally.lost = sum((want - got).values())
    tally.duplicated = sum(n - 1 for n in got.values() if n > 1) + len(set(got) - set(want))


# ------------------------------------------------------------------------------------------------ the run
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per stage")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments, kinds and delays")
    ap.add_argument("--out", default="/tmp/vqgen-chaos", help="work folder (emptied first)")
    args = ap.parse_args()
    out, k = Path(args.out), args.kills
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    rng, t_start = random.Random(args.seed), time.perf_counter()
    ENV["ACCELERATE_USE_CPU"] = "true"  # accelerate_configs/cpu_2proc.yaml: 2 gloo processes on CPU
    tok_steps, prior_steps = 4 * k + 40, 3 * k + 30  # room for K kills that each let a run go 1-3 steps on

    def command(script: str, flags: list[str], processes: int, stage_out: Path, trainer: bool):
        return lambda resume: [*launcher(processes), str(ROOT / script), *flags, "--output_dir", str(stage_out),
                               *(["--resume", "latest"] if resume and trainer else [])]

    def chaos(name: str, folder: str, script: str, flags: list[str], processes: int, **stage) -> Tally:
        """The uninterrupted run into ref/<folder>, then the chaos run into chaos/<folder>."""
        t0 = time.perf_counter()
        ref, stage_out = out / "ref" / folder, out / "chaos" / folder
        trainer = stage["progress"] is newest_step
        proc = subprocess.run(command(script, flags, processes, ref, trainer)(False), cwd=ROOT, env=ENV,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the uninterrupted {name} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        last = stage.pop("last", None) or shards_done(ref)
        tally = run_stage(Stage(name if processes == 1 else f"{name} ({processes} processes)",
                                command(script, flags, processes, stage_out, trainer), stage_out, last=last,
                                trainer=trainer, **stage), k, rng, out / "logs")
        if trainer:
            compare_trainer(tally, stage_out, ref, 64)
        else:
            compare_shards(tally, stage_out, ref)
        tally.seconds = time.perf_counter() - t0
        return tally

    data = ["--data_dir", str(out / "data")]
    tallies = [
        chaos("tokenizer", "tokenizer", "train_vqvae.py", [*TOKENIZER, *data, "--max_steps", str(tok_steps)], 1,
              progress=newest_step, last=tok_steps, startup=(0.3, 4.0), damage=truncate_newest_checkpoint,
              work="a training step", duplicates=max(1, k // 10)),
        # extraction with the uninterrupted tokenizer, the prior on the uninterrupted shards: a difference is theirs
        chaos("extraction", "shards", "extract_codes.py",
              [*EXTRACT, *data, "--checkpoint", str(out / "ref/tokenizer/export")], 1,
              progress=shards_done, startup=(0.3, 3.0), damage=truncate_a_shard, work="encoding"),
        chaos("prior", "prior", "train_prior.py",
              [*PRIOR, "--shards", str(out / "ref/shards"), "--max_steps", str(prior_steps)], 2,
              progress=newest_step, last=prior_steps, startup=(1.0, 10.0), damage=truncate_newest_checkpoint,
              work="a training step", duplicates=1),
    ]
    report(tallies, args, time.perf_counter() - t_start)
    ok = all(t.equal and not t.failures and t.survived == t.injected and not t.lost and not t.duplicated
             for t in tallies)
    return 0 if ok else 1


def report(tallies: list[Tally], args, seconds: float) -> None:
    print(f"\nvqgen chaos run: --kills {args.kills} --seed {args.seed} (logs: {args.out}/logs)")
    for t in tallies:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(t.faults.items()))
        print(f"  {t.name}: {t.injected} faults injected, {t.survived} survived ({kinds}); samples lost "
              f"{t.lost}, duplicated {t.duplicated}; {t.compared} bitwise equal to the uninterrupted run: "
              f"{'yes' if t.equal else 'NO'} ({t.seconds / 60:.1f} min)")
        for f in t.failures:
            print(f"    FAILURE: {f}")
    injected, survived = sum(t.injected for t in tallies), sum(t.survived for t in tallies)
    print(f"  total: {injected} faults injected, {survived} survived, samples lost {sum(t.lost for t in tallies)}, "
          f"duplicated {sum(t.duplicated for t in tallies)}, all final results bitwise equal: "
          f"{'yes' if all(t.equal for t in tallies) else 'NO'}; runtime {seconds / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
