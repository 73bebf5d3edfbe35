"""How long each script takes to print ``--help`` (the config is torch-free, so argparse answers before torch loads).

``python bench/help_time.py [--runs 5]``: per script, the median wall time of ``python <script> --help`` in fresh
processes, and whether the config package alone imports torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_vqvae.py", "extract_codes.py", "train_prior.py", "sample.py", "evaluate.py", "VQVAE_T.py")


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per script (the median is reported)")
    args = p.parse_args(argv)
    out = {}
    for script in SCRIPTS:
        times = [wall([sys.executable, script, "--help"]) for _ in range(args.runs)]
        out[script] = statistics.median(times)
        print(f"{script:18s} --help  median {out[script]:.2f} s  (min {min(times):.2f}, max {max(times):.2f})",
              flush=True)
    probe = "import sys, vqgen.config; print('torch' in sys.modules)"
    loads = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"import vqgen.config loads torch: {loads}")
    return out


if __name__ == "__main__":
    main()
