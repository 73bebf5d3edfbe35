"""Start-up of a simulated 8-rank job on a 20k-image folder vs one rank.

    python bench/startup.py [--images 20000 --ranks 8 --baseline_repo /path/to/older/vqgen]

Each simulated rank is a real process of a gloo group running what train_vqvae.py runs before training
(``prepare_first`` around ``build_dataset(<folder>)``). Reported: wall time from a barrier to the last rank holding
its dataset and the busiest rank's CPU time (process start and ``import torch`` excluded), with a cold and a warm
folder index. ``--baseline_repo`` times an older checkout the same way. Target: t(8 ranks) / t(1 rank) close to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import torch.distributed as dist
sys.path.insert(0, os.environ["BENCH_REPO"])
from vqgen.data import build_dataset
import accelerate, PIL.Image, torchvision.transforms  # imports are not data preparation: done before the clock
try:
    import vqgen.data.folder_index
    from vqgen.launch import prepare_first
except ImportError:
    pass
dist.init_process_group("gloo", init_method=os.environ["BENCH_INIT"], rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]))
dist.barrier()
t0, c0 = time.perf_counter(), time.process_time()
try:
    from vqgen.launch import prepare_first, start_processes           # new: one preparer per node, then all
    state = start_processes()
    with prepare_first(state):
        ds, _ = build_dataset(os.environ["BENCH_FOLDER"], image_size=32)
except ImportError:
    from vqgen.data import download_lock                              # old: every rank under one lock
    with download_lock(os.environ["BENCH_DATA"]):
        ds, _ = build_dataset(os.environ["BENCH_FOLDER"], image_size=32)
t1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"rank": dist.get_rank(), "t0": t0, "t1": t1, "cpu": c1 - c0, "n": len(ds)}), flush=True)
dist.barrier()
"""


def make_folder(root: Path, n: int) -> Path:
    from PIL import Image
    folder = root / f"imgs{n}"
    if (folder / ".done").exists():
        return folder
    for i in range(n):
        d = folder / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36, 36), (i % 256, (i // 256) % 256, 7)).save(d / f"{i:06d}.png")
    (folder / ".done").write_text("")
    return folder


def run_job(repo: Path, folder: Path, ranks: int, work: Path) -> tuple[float, float]:
    init = f"file://{work}/pg-{time.time_ns()}"
    env = {**os.environ, "BENCH_REPO": str(repo), "BENCH_FOLDER": str(folder), "BENCH_DATA": str(work / "data"),
           "BENCH_INIT": init, "WORLD_SIZE": str(ranks), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "LOCAL_WORLD_SIZE": str(ranks),
           "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"rank failed:\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return max(r["t1"] for r in rows) - min(r["t0"] for r in rows), max(r["cpu"] for r in rows)


def index_files(folder: Path) -> list[Path]:
    return [folder.parent / f".{folder.name}.vqgen-index.json"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20000, help="images in the synthetic folder (36x36 PNG)")
    p.add_argument("--ranks", type=int, default=8, help="simulated ranks of the job")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vqgen_bench_startup"),
                   help="where the folder is created (reused across runs)")
    p.add_argument("--baseline_repo", default=None, help="an older vqgen checkout to time the same way")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = make_folder(work, args.images)
    repos = [("this", ROOT)] + ([("baseline", Path(args.baseline_repo))] if args.baseline_repo else [])
    print(f"folder: {args.images} images in {folder}; job = {args.ranks} ranks vs 1 (seconds, prepare -> last rank "
          f"ready)")
    for name, repo in repos:
        for label in ("cold index", "warm index"):
            if label == "cold index":
                for f in index_files(folder):
                    f.unlink(missing_ok=True)
            (t1, c1) = run_job(repo, folder, 1, work)
            if label == "cold index":
                for f in index_files(folder):
                    f.unlink(missing_ok=True)
            (tw, cw) = run_job(repo, folder, args.ranks, work)
            print(f"{name:8s} {label}: wall 1 rank {t1:6.2f} s, {args.ranks} ranks {tw:6.2f} s, ratio {tw / t1:5.2f}"
                  f"; CPU of the busiest rank {c1:5.2f} s vs {cw:5.2f} s", flush=True)
            if name == "baseline":
                break  # the old code has no index: cold and warm are the same


if __name__ == "__main__":
    main()
