"""Peak memory of evaluate.py with 2k and 20k generated images (target: flat within ~10%).

    python bench/eval_memory.py [--small 2000 --large 20000 --image_size 64 --baseline_repo /path/to/older/vqgen]

A random-init tokenizer for 64x64 one-channel images (16x16 tokens; ``--image_size 128 --levels 3`` keeps 16x16
tokens with 4x the pixels, so that 10x fewer samples hold as many bytes) and a tiny random prior are exported to a temp
folder; each evaluation runs in its own process (``evaluate.run`` on the digits test split, classifier features
trained for one epoch and cached) and reports its peak resident memory (``ru_maxrss``). Printed: the peak RSS at
both sizes and their ratio; with ``--baseline_repo`` the same for an older checkout, which held every image
(20k x 64 x 64 fp32 = 330 MB of generated images alone, plus their reconstructions and features).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, os.environ["BENCH_REPO"])
import torch
torch.set_num_threads(2)
from vqgen.config import EvalConfig
from vqgen.eval import evaluate
from vqgen.config import load_config
run = os.environ["BENCH_RUN"]
res = evaluate.run(load_config(EvalConfig, ["--run_dir", run, "--num_samples", os.environ["BENCH_N"],
    "--batch_size", "256", "--classifier_dir", os.path.join(run, "clf"), "--classifier_epochs", "1", "--no_plots",
    "--output", os.path.join(run, "eval_%s.json" % os.environ["BENCH_N"])]))
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "fid": res["prior"]["fid"], "seconds": res.get("seconds", {}).get("total")}))
"""


def make_run(root: Path, image_size: int, levels: int) -> Path:
    import torch
    sys.path.insert(0, str(ROOT))
    from vqgen.config import PriorConfig
    from vqgen.export import ExportMeta
    from vqgen.models.prior import build_prior
    from vqgen.models.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(in_channels=1, image_size=image_size, num_channels=(16,) * levels,
                            num_res_channels=(16,) * levels, num_res_layers=1, num_embeddings=64,
                            embedding_dim=8)).eval()
    sha = tok.export_to(root / "vqvae/export", meta=ExportMeta(dataset={"name": "digits"}))
    h, w = tok.config.latent_size
    build_prior(PriorConfig(vocab_size=64, latent_h=h, latent_w=w, attn_layers_dim=32, attn_layers_depth=1,
                            attn_layers_heads=2, num_classes=10)).export_to(
        root / "prior/export", meta=ExportMeta(tokenizer_sha256=sha))
    return root


def measure(repo: Path, run: Path, n: int) -> dict:
    env = {**os.environ, "BENCH_REPO": str(repo), "BENCH_RUN": str(run), "BENCH_N": str(n), "OMP_NUM_THREADS": "2",
           "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=7200)
    if p.returncode:
        raise SystemExit(f"evaluate failed ({repo}, n={n}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=2000, help="generated images, small run")
    p.add_argument("--large", type=int, default=20000, help="generated images, large run")
    p.add_argument("--image_size", type=int, default=64, help="image size of the tokenizer (digits upsampled)")
    p.add_argument("--levels", type=int, default=2, help="tokenizer levels (tokens: image_size / 2**levels per side)")
    p.add_argument("--baseline_repo", default=None, help="an older vqgen checkout (with the typed configs, e.g. "
                   "main before the constant-memory evaluation) to measure the same way")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.image_size, args.levels)
        measure(ROOT, run, 2)  # trains and caches the feature classifier once (not measured)
        for name, repo in [("this", ROOT)] + ([("baseline", Path(args.baseline_repo))] if args.baseline_repo else []):
            a, b = measure(repo, run, args.small), measure(repo, run, args.large)
            print(f"{name:8s} peak RSS: {args.small} images {a['maxrss_mb']:7.0f} MB ({a['seconds']} s), "
                  f"{args.large} images {b['maxrss_mb']:7.0f} MB ({b['seconds']} s): ratio "
                  f"{b['maxrss_mb'] / a['maxrss_mb']:.3f}", flush=True)


if __name__ == "__main__":
    main()
