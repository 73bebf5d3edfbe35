"""The slurm/ scripts on a real local Slurm cluster: two fake nodes (n1, n2) on this host, CPU only.

The session fixture starts a private munged (own key and socket), slurmctld and one slurmd per fake node from
Debian's slurm-wlm, with state, spool and logs under a temp dir and free ports, and tears it all down at the end.
It skips, saying why, only when slurmctld is not installed (.ci/run installs slurm-wlm + munge).
The jobs run the real sbatch scripts with the CPU overrides the scripts document (docs/CLUSTER.md):
GPUS_PER_NODE=0 PROCS_PER_NODE=1 HEAD_ADDR=127.0.0.1 RDZV_BACKEND=static ACCELERATE_USE_CPU=true.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vqgen import shards

ROOT = Path(__file__).resolve().parents[1]
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
TINY_VQ = ("--num_channels 16 32 --num_res_channels 16 32 --num_res_layers 1 --num_embeddings 32 --embedding_dim 8 "
           "--batch_size 64 --no_wandb --val_images 64 --lr 1e-3")
TINY_PRIOR = ("--attn_layers_dim 32 --attn_layers_depth 2 --attn_layers_heads 2 --batch_size 64 --n_epochs_t 1 "
              "--max_steps 4 --warmup_steps 2 --no_wandb --num_samples 4 --val_batches 2 --tune_sampling none")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """A two-node Slurm cluster on localhost (nodes n1, n2, partition debug)."""

    def __init__(self, base: Path):
        self.dir = base
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None
        self.env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf"), "PATH": SBIN}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        d, user = self.dir, getpass.getuser()
        d.chmod(0o700)  # munged refuses a socket directory others can write to
        for sub in ("state", "spool/n1", "spool/n2", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "munge.socket"
        subprocess.run([_which("munged"), f"--socket={sock}", f"--key-file={key}", f"--pid-file={d}/munged.pid",
                        f"--log-file={d}/log/munged.log", f"--seed-file={d}/munged.seed", "--force"],
                       check=True, capture_output=True, timeout=30)  # daemonizes
        self.munged_pid = int((d / "munged.pid").read_text().split()[0])
        ctld, n1, n2 = _free_ports(3)
        (d / "slurm.conf").write_text(f"""\
ClusterName=vqgentest
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1} CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2} CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        conf = str(d / "slurm.conf")
        self._spawn([_which("slurmctld"), "-D", "-f", conf], d / "log/slurmctld.out")
        time.sleep(1)
        for node in ("n1", "n2"):
            self._spawn([_which("slurmd"), "-D", "-N", node, "-f", conf], d / f"log/slurmd-{node}.out")
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if states.get("n1") == "idle" and states.get("n2") == "idle":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm did not come up: {out.stdout} {out.stderr}\n{self.logs()}")
            time.sleep(0.5)

    def _spawn(self, cmd: list[str], log: Path) -> None:
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.squeue():
            time.sleep(0.5)
        for p in reversed(self.procs):  # slurmds, then slurmctld
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.dir / "log").glob("*")))

    # ------------------------------------------------------------------ jobs
    def squeue(self) -> str:
        return subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=("COMPLETED",)) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in until:
                return info
            if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                raise AssertionError(f"job {job_id} ended {state}: {info}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout}s: {info}\n{self.squeue()}")
            time.sleep(1)

    def cpu_env(self, **extra) -> dict[str, str]:
        """Environment for the sbatch scripts on this CPU-only fake cluster (sbatch passes it to the job)."""
        return {**self.env, "GPUS_PER_NODE": "0", "PROCS_PER_NODE": "1", "HEAD_ADDR": "127.0.0.1",
                "RDZV_BACKEND": "static", "ACCELERATE_USE_CPU": "true", "ACCELERATE_EXTRA": "--mixed_precision no",
                "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
                "WANDB_MODE": "offline", "VQGEN_ROOT": str(ROOT), "DATASET": "digits", **extra}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if _which("slurmctld") is None:
        pytest.skip("slurmctld not installed (apt-get install -y slurm-wlm munge; .ci/run does this)")
    missing = [n for n in ("slurmd", "munged", "sbatch", "scontrol", "sinfo", "squeue", "scancel") if not _which(n)]
    if missing:
        pytest.skip(f"Slurm/munge tools missing: {', '.join(missing)} (apt-get install -y slurm-wlm munge)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<no {path}>"


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_pipeline_three_stages_on_two_nodes(slurm, tmp_path):
    run = tmp_path / "run"
    data = f"--data_dir {tmp_path / 'data'}"
    env = slurm.cpu_env(NODES="2", RUN_DIR=str(run),
                        VQVAE_ARGS=f"{TINY_VQ} {data} --n_epochs 1 --max_steps 4",
                        EXTRACT_ARGS=f"{data} --batch_size 256 --shard_size 500",
                        PRIOR_ARGS=TINY_PRIOR)
    out = subprocess.run([str(ROOT / "slurm/pipeline.sh")], env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = dict(line.split() for line in out.stdout.split("\n") if line.strip())
    assert set(ids) == {"vqvae", "extract", "prior"}
    assert f"afterok:{ids['vqvae']}" in slurm.job(ids["extract"]).get("Dependency", "") or \
        slurm.job(ids["extract"]).get("JobState") != "PENDING"
    try:
        for stage in ("vqvae", "extract", "prior"):
            info = slurm.wait(ids[stage], timeout=240)
            assert info["NumNodes"] == "2" and info["ExitCode"] == "0:0", info
    except AssertionError:
        raise AssertionError("\n".join(_read(p) for p in sorted((run / "logs").glob("*.out"))) + slurm.logs())
    logs = {s: _read(run / "logs" / f"{s}-{ids[s]}.out") for s in ids}
    for stage in ("vqvae", "prior"):
        assert "2 node(s) x 1 process(es)" in logs[stage]
        assert "processes = 2" in logs[stage], logs[stage][-3000:]
        ckpt = run / stage / "checkpoints/checkpoint-4"
        assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
        assert (run / stage / "export/model.safetensors").exists()
    man = shards.Manifest.read(run / "shards")
    assert man.splits["train"].total == 1500 and man.splits["test"].total == 297
    ranks = {s.name.split("-")[1] for s in man.splits["train"].shards}
    assert ranks == {"r000", "r001"}  # each node's rank encoded its own part
    assert "on 2 process(es)" in logs["extract"]


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    env = slurm.cpu_env(RUN_DIR=str(run), VQVAE_ARGS=f"{TINY_VQ} --data_dir {tmp_path / 'data'} --n_epochs 15 "
                                                      f"--sample_and_save_freq 100")
    out = subprocess.run(["sbatch", "--parsable", "-N", "2", "--output", str(run / "logs/vqvae-%j.out"),
                          str(ROOT / "slurm/train_vqvae.sbatch")], env=env, capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    log = run / "logs" / f"vqvae-{job}.out"
    ckpts = run / "vqvae/checkpoints"
    deadline = time.monotonic() + 180
    while not (ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir())):
        assert time.monotonic() < deadline, _read(log) + slurm.logs()
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _read(log)
        time.sleep(0.3)
    # what `#SBATCH --signal=B:USR1@180` does before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True, timeout=30)
    deadline = time.monotonic() + 120
    while slurm.job(job).get("Restarts", "0") == "0":
        assert time.monotonic() < deadline, f"job was not requeued\n{_read(log)}"
        assert slurm.job(job).get("JobState") not in ("COMPLETED", "FAILED"), _read(log)
        time.sleep(0.5)
    # Slurm holds a requeued job ~2 minutes (BeginTime) before it may start again; a real cluster waits, we don't.
    # But not at once: slurmd revokes the old launch credential at whole-second resolution, so a restart within
    # the same second is refused as "Job credential revoked" (seen here once). Wait for PENDING and 2 s.
    while slurm.job(job).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, f"requeued job never became PENDING\n{_read(log)}"
        time.sleep(0.3)
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, timeout=30)
    info = slurm.wait(job, timeout=240)
    text = _read(log)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert "SIGUSR1 received" in text and "requeueing job" in text, text[-3000:]
    assert "stop requested" in text  # the loop saw the stop file, checkpointed on every rank, exited 0
    m = re.search(r"resumed from \S*checkpoint-(\d+): step (\d+)", text)
    assert m, text[-3000:]
    assert 0 < int(m.group(2)) < 15 * 12  # stopped mid-run, resumed there
    assert "(restart 1)" in text
    assert (ckpts / "checkpoint-180").is_dir() and (run / "vqvae/export/model.safetensors").exists()
    assert not (run / "vqvae/STOP").exists()
