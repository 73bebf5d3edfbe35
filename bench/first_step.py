"""Time from a command to the first training step of each stage, and of the answers that must come fast.

    python bench/first_step.py [--repeats 3] [--tiny] [--threads N]

Every row is a fresh process, as a user types it (median of ``--repeats``): ``--help`` of each script, a missing
dataset offline, an uncached ``hf:`` model, then each stage on the offline digits at the demo's sizes, from the
command to its first optimizer step (stages 1 and 3) or its first output line and end (stage 2, sampling,
evaluation). One table, and ``--out``/first_step.json. Details: docs/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_vqvae.py", "extract_codes.py", "train_prior.py", "sample.py", "evaluate.py", "VQVAE_T.py")
DEMO_VQ = ["--num_channels", "64", "--num_res_channels", "64", "--num_res_layers", "1", "--num_embeddings", "128"]
DEMO_PRIOR = ["--attn_layers_dim", "128", "--attn_layers_depth", "4", "--attn_layers_heads", "4"]
TINY_VQ = ["--num_channels", "16", "--num_res_channels", "16", "--num_res_layers", "1", "--num_embeddings", "32",
           "--embedding_dim", "8"]
TINY_PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2"]


def timed(argv: list[str], env: dict, marks: dict[str, str], watch: Path | None = None) -> dict[str, float]:
    """Run ``argv``; seconds from the start to the first stdout line containing each ``marks`` value, to ``watch``
    appearing (key "first_step"), and to the exit ("exit")."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll():
        while watch is not None and not stop.is_set():
            if watch.is_file() and watch.stat().st_size > 0:
                seen["first_step"] = time.perf_counter() - t0
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        for key, text in marks.items():
            if key not in seen and text in line:
                seen[key] = time.perf_counter() - t0
    proc.wait()
    seen["exit"] = time.perf_counter() - t0
    stop.set()
    seen["returncode"] = proc.returncode
    seen["output_tail"] = "".join(out)[-1500:]
    return seen


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each row (the median is reported)")
    p.add_argument("--tiny", action="store_true", help="tiny models, one repeat: checks the plumbing")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "vqgen_bench_first_step"), help="work folder")
    args = p.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    vq, prior = (TINY_VQ, TINY_PRIOR) if args.tiny else (DEMO_VQ, DEMO_PRIOR)
    data = str(work / "data")
    rows: dict[str, list[dict]] = {}

    def row(name, argv, marks=None, watch=None, env_extra=None, ok=(0,)):
        for r in range(repeats):
            res = timed(argv(r), {**env, **(env_extra or {})}, marks or {}, watch(r) if watch else None)
            if res["returncode"] not in ok:
                raise SystemExit(f"{name} exited {res['returncode']}:\n{res['output_tail']}")
            rows.setdefault(name, []).append(res)

    for s in SCRIPTS:
        row(f"{s} --help", lambda r, s=s: [s, "--help"])
    row("missing dataset (train_vqvae.py, offline)", lambda r: [
        "train_vqvae.py", "--dataset", "cifar10", "--data_dir", str(work / "empty"), "--output_dir",
        str(work / "never")], env_extra={"VQGEN_OFFLINE": "1"}, ok=(2,))
    row("uncached hf: model (sample.py, offline)", lambda r: [
        "sample.py", "--checkpoint", "hf:nobody/tok", "--checkpoint_t", "hf:nobody/prior"],
        env_extra={"HF_HUB_OFFLINE": "1"}, ok=(2,))
    run = lambda r, stage: work / f"r{r}" / stage  # noqa: E731
    common = ["--no_wandb", "--max_steps", "3", "--overwrite"]
    row("stage 1: train_vqvae.py", lambda r: ["train_vqvae.py", "--dataset", "digits", "--data_dir", data, *vq,
                                              "--batch_size", "64", "--output_dir", str(run(r, "vqvae")), *common],
        {"ready": "***** training"}, lambda r: run(r, "vqvae") / "metrics.jsonl")
    row("stage 2: extract_codes.py", lambda r: ["extract_codes.py", "--checkpoint", str(run(r, "vqvae") / "export"),
                                                "--split", "train", "test", "--output_dir", str(run(r, "shards")),
                                                "--overwrite", "--no_progress"], {"ready": "extracting"})
    row("stage 3: train_prior.py", lambda r: ["train_prior.py", "--shards", str(run(r, "shards")), *prior,
                                              "--batch_size", "64", "--output_dir", str(run(r, "prior")),
                                              "--tune_sampling", "none", *common],
        {"ready": "***** training"}, lambda r: run(r, "prior") / "metrics.jsonl")
    row("sample.py (16 samples)", lambda r: ["sample.py", "--checkpoint", str(run(r, "vqvae") / "export"),
                                             "--checkpoint_t", str(run(r, "prior") / "export"), "--output_dir",
                                             str(run(r, "samples"))], {"ready": "sampling,"})
    row("evaluate.py (100 samples)", lambda r: ["evaluate.py", "--checkpoint", str(run(r, "vqvae") / "export"),
                                                "--checkpoint_t", str(run(r, "prior") / "export"), "--num_samples",
                                                "100", "--no_plots", "--output", str(run(r, "eval.json"))],
        {"ready": "sampling,"})

    def med(name, key):
        vals = [r[key] for r in rows[name] if key in r]
        return statistics.median(vals) if vals else None

    print(f"\nseconds from the command (median of {repeats}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; threads {args.threads or 'default'})")
    print("| command | ready (banner / first line) | first optimizer step | exit |\n|---|---|---|---|")
    summary = {}
    for name in rows:
        summary[name] = {k: med(name, k) for k in ("ready", "first_step", "exit")}
        cells = ["" if summary[name][k] is None else f"{summary[name][k]:.2f}" for k in ("ready", "first_step", "exit")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    (work / "first_step.json").write_text(json.dumps({"summary": summary, "repeats": repeats, "tiny": args.tiny,
                                                      "threads": args.threads}, indent=2))
    return summary


if __name__ == "__main__":
    main()
