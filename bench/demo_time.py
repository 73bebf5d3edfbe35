"""``make demo`` candidates side by side: wall time per stage and the demo's metrics, one fresh run each.

    python bench/demo_time.py [--candidates shipped no_dropout ...] [--threads 2 1] [--tiny]

Each candidate is ``configs/digits_demo.yaml`` plus flags (:data:`CANDIDATES`, or ``NAME='FLAGS | EVAL FLAGS'``), run
as ``make demo`` runs it, in its own output and data folder (each pays for its feature classifier, as a fresh clone
does). One table: seconds per stage (from the output lines' time stamps) and the demo's metrics. Run it on an idle
machine; ``--tiny`` only checks the plumbing. Details: docs/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_demo.yaml"
# name -> (VQVAE_T.py flags over the config, evaluate.py flags over the config)
CANDIDATES = {
    "shipped": ("", ""),
    # the same prior without attention dropout (SDPA's fused kernel: faster, but it overfits the 1500 images)
    "no_dropout": ("--attn_dropout 0", ""),
    # half the prior's steps: batch 128 for 20 epochs, no dropout (the config of commit 09e8091)
    "batch128_20ep": ("--attn_dropout 0 --batch_size_t 128 --n_epochs_t 20 --warmup_steps_t 20", ""),
}
TINY = ("--n_epochs 1 --n_epochs_t 1 --num_samples 8 --tune_samples 20", "--num_samples 20 --max_images 60")
MARKS = {"stage 1": "== stage 1", "stage 2": "== stage 2", "stage 3": "== stage 3",
         "tuning": "choosing sampling settings", "sampling": "== sampling"}


def run_logged(argv: list[str], env: dict, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run ``argv``: (wall seconds, [(seconds since start, line)]), the output also written to ``log``."""
    t0 = time.perf_counter()
    lines = []
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            f.write(line)
        proc.wait()
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0, lines


def stage_seconds(wall: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds of each phase of a VQVAE_T.py run, from the first line of each phase to the next phase's."""
    starts = [("start-up", 0.0)]
    for name, mark in MARKS.items():
        hit = next((t for t, line in lines if mark in line), None)
        if hit is not None and name not in dict(starts):
            starts.append((name, hit))
    starts.sort(key=lambda x: x[1])
    return {name: nxt[1] - t for (name, t), nxt in zip(starts, starts[1:] + [("end", wall)])}


def metrics(eval_json: Path) -> dict:
    r = json.loads(eval_json.read_text())
    tok, prior = r["tokenizer"], r.get("prior", {})
    clf = prior.get("classifier", {})
    return {"psnr": tok["psnr"], "gfid": prior.get("fid"), "confident": clf.get("confident_fraction"),
            "bits_per_token": prior.get("bits_per_token"),
            "sampling": {k: prior.get(k) for k in ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", nargs="+", default=["shipped", "no_dropout"],
                   help=f"names ({', '.join(CANDIDATES)}) or NAME='TRAIN FLAGS | EVAL FLAGS'")
    p.add_argument("--threads", nargs="+", type=int, default=[0], help="OMP_NUM_THREADS values to run each "
                   "candidate with (0: torch's default)")
    p.add_argument("--out", default="runs/bench_demo", help="output folder (one run folder per candidate)")
    p.add_argument("--tiny", action="store_true", help="1 epoch per stage, few samples: checks the plumbing")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in args.candidates:
        name, _, flags = spec.partition("=")
        train_flags, _, eval_flags = (flags or " | ".join(CANDIDATES[name])).partition("|")
        if args.tiny:
            train_flags, eval_flags = f"{train_flags} {TINY[0]}", f"{eval_flags} {TINY[1]}"
        for threads in args.threads:
            key = f"{name}@{threads or 'default'}"
            run = out / key.replace("@", "_t")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            data = ["--data_dir", str(run / "data")]
            train, lines = run_logged(["VQVAE_T.py", "--config", str(CONFIG), "--output_dir", str(run / "run"), *data,
                                       *shlex.split(train_flags)], env, run.with_suffix(".log"))
            ev, _ = run_logged(["evaluate.py", "--config", str(CONFIG), "--run_dir", str(run / "run"),
                                *shlex.split(eval_flags)], env, run.with_suffix(".log"))
            results[key] = {"seconds": {**stage_seconds(train, lines), "evaluate": ev, "total": train + ev},
                            **metrics(run / "run" / "eval.json"), "train_flags": train_flags,
                            "eval_flags": eval_flags}
            (out / "results.json").write_text(json.dumps(results, indent=2))
            print(f"{key}: {results[key]['seconds']['total']:.0f} s", flush=True)
    cols = ["start-up", "stage 1", "stage 2", "stage 3", "tuning", "sampling", "evaluate", "total"]
    print(f"\n{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; seconds per phase; targets: total <= 300, PSNR >= "
          f"29, gFID <= 8, confident >= 99%")
    print("| candidate | " + " | ".join(cols) + " | PSNR | gFID | confident | bits/token | sampling |")
    print("|---" * (len(cols) + 6) + "|")
    for key, r in results.items():
        s = r["seconds"]
        setting = ", ".join(f"{k} {v}" for k, v in r["sampling"].items() if v is not None)
        conf = f"{100 * r['confident']:.1f}%" if r["confident"] is not None else ""
        print(f"| {key} | " + " | ".join(f"{s[c]:.0f}" if c in s else "" for c in cols)
              + f" | {r['psnr']:.1f} | {r['gfid']:.2f} | {conf} | {r['bits_per_token']:.3f} | {setting} |")
    return results


if __name__ == "__main__":
    main()
