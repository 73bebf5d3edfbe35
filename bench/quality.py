"""Quality on real Fashion-MNIST: the original tool's recipe vs vqgen's prior kinds, same sizes, same budget.

Rows (``--rows``): ``peer`` (GenerativeZoo's recipe on MONAI, bench/peer_recipe.py), ``peer_frozen`` (its bug fixed),
``vqgen`` (its own scripts, the raster AR prior), ``rar`` (``--order random``), ``maskgit8`` / ``maskgit16`` (one
MaskGIT prior, 8 or 16 decoding steps). Each row gets ``--budget_minutes`` for stages 1-3; the vqgen rows of a run
share one stage 1 + shards (``--reuse_tokenizer``: an earlier run's) and are charged its time. Scored by one code path
(vqgen.eval's) against the test split in the offline classifier's features, in ``--modes`` null / marginal / cond;
sampling settings are chosen on a validation set carved from TRAIN, never the test split. Details: docs/NOTES.md.

Run: ``make bench-quality``; ``python bench/quality.py --budget_minutes 0.5 --samples 500`` checks the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DATASET = "fashionmnist"
# The sizes: 64/64 channels, 1 residual layer, 256 codes, 8x8 tokens. The code vector dimension and the batch
# sizes are left to the defaults (code dimension 8 with the l2 codebook, stage-1 batch 32, prior batch 128 since the
# ablations; the peer's and vqgen's "before": code dimension 32, batch 128, i.e. --vqvae_flags "--no_codebook_l2
# --embedding_dim 32 --lr 2e-4 --lr_schedule constant --batch_size 128" --prior_flags "--lr 2e-4").
SIZES_VQ = ["--num_channels", "64", "64", "--num_res_channels", "64", "64", "--num_res_layers", "1"]
VQ_CODES = ["--num_embeddings", "256"]  # the EMA codebook's size; FSQ / LFQ rows size theirs (--fsq_levels, --lfq_bits)
SIZES_PRIOR = ["--attn_layers_dim", "128", "--attn_layers_depth", "6", "--attn_layers_heads", "8"]


class Stage(NamedTuple):
    """A budgeted vqgen training stage: its script, its epochs flag and its config class (imported when needed)."""
    script: str
    epochs_flag: str
    config_name: str

    def config(self):
        import vqgen.config
        return getattr(vqgen.config, self.config_name)


# What a row was trained with: --resample keeps these from the row's results.json.
TRAINING_ARGS = ("budget_minutes", "stage1_share", "calibration_steps", "vqvae_flags", "prior_flags", "seed")
# An ablation, e.g. the quantizer one: one --out and --row_name per row, then bench/ablation_table.py over the folders:
#   --vqvae_flags "--quantizer fsq --fsq_levels 8 5 5 5" --row_name fsq1000 --out runs/bq30/fsq1000
STAGE1 = Stage("train_vqvae.py", "--n_epochs", "VQVAEStageConfig")
PRIOR = Stage("train_prior.py", "--n_epochs_t", "PriorStageConfig")
COND_GRID = ([{"cfg_scale": c, "temperature": t} for c in (1.5, 2.0, 3.0) for t in (0.8, 1.0)]
             + [{"cfg_scale": c, "cfg_schedule": "linear", "temperature": t} for c in (3.0, 4.5) for t in (0.8, 1.0)]
             + [{"cfg_scale": c, "cfg_schedule": "power", "cfg_power": p} for c in (4.5, 8.0) for p in (1.0, 2.75)])
NULL_GRID = [{"temperature": t, "top_k": k} for t in (0.9, 1.0) for k in (None, 64)]
# MaskGIT: the choice temperature (Gumbel noise on the confidence) is its diversity knob
MASKGIT_COND_GRID = [{"cfg_scale": c, "cfg_schedule": s, "choice_temperature": ct} for c in (2.0, 3.0, 4.5)
                     for s in ("constant", "linear") for ct in (1.0, 4.5)]
MASKGIT_NULL_GRID = [{"temperature": t, "choice_temperature": ct} for t in (0.9, 1.0) for ct in (1.0, 4.5)]
MODES = ("null", "marginal", "cond")


class PriorRow(NamedTuple):
    """A vqgen row: its prior's extra train_prior.py flags, the run folder holding that prior (rows that differ in
    sampling only share one), the sampling settings fixed for the row, and its label in the table."""
    prior_flags: tuple[str, ...]
    trained: str
    fixed: dict
    label: str

    def grid(self, mode: str) -> list[dict]:
        maskgit = "--prior_kind" in self.prior_flags
        grid = (MASKGIT_NULL_GRID if maskgit else NULL_GRID) if mode == "null" else \
            (MASKGIT_COND_GRID if maskgit else COND_GRID)
        return [{**s, **self.fixed} for s in grid]


VQGEN_ROWS = {"vqgen": PriorRow((), "vqgen", {}, "vqgen AR, raster order (today)"),
              "rar": PriorRow(("--order", "random"), "rar", {}, "vqgen AR, random order (RAR)"),
              "maskgit8": PriorRow(("--prior_kind", "maskgit"), "maskgit", {"decode_steps": 8}, "vqgen MaskGIT, 8 steps"),
              "maskgit16": PriorRow(("--prior_kind", "maskgit"), "maskgit", {"decode_steps": 16},
                                    "vqgen MaskGIT, 16 steps")}
MODE_LABELS = {"null": "unconditional (null class)", "marginal": "unconditional (labels ~ class frequencies, CFG)",
               "cond": "class-conditional"}
LABELS = {("peer", "null"): "original recipe as GenerativeZoo runs it (unconditional)",
          ("peer_frozen", "null"): "original recipe, its VQ-VAE kept frozen while the prior trains",
          **{(row, mode): f"{spec.label}, {MODE_LABELS[mode]}" for row, spec in VQGEN_ROWS.items() for mode in MODES}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--budget_minutes", type=float, default=30.0, help="wall-clock minutes for stages 1-3 of each row")
    a("--stage1_share", type=float, default=1 / 3, help="share of the budget for stage 1 (the rest: stages 2+3)")
    a("--rows", nargs="+", default=["peer", "peer_frozen", "vqgen"], choices=["peer", "peer_frozen", *VQGEN_ROWS],
      help="rows to run")
    a("--modes", nargs="+", default=list(MODES), choices=MODES, help="how the vqgen rows are sampled and scored")
    a("--reuse_tokenizer", default=None, metavar="ROW_DIR",
      help="a vqgen row folder of an earlier run (<out>/vqgen): its stage-1 export and shards serve every vqgen row "
           "here, each charged the stage-1 and extraction time recorded there (rows then differ in the prior only)")
    a("--out", default="runs/bench_quality", help="output folder")
    a("--data_dir", default="data", help="vqgen data folder (Fashion-MNIST: Debian's dataset-fashion-mnist is found "
                                         "by vqgen's registry)")
    a("--samples", type=int, default=5000, help="samples per row for gFID / precision / recall")
    a("--floor_images", type=int, default=5000, help="train images for the real-data and tokenizer floors")
    a("--val_images", type=int, default=5000, help="train images of the validation reference (sampling settings)")
    a("--val_samples", type=int, default=1000, help="samples per candidate sampling setting on the validation set")
    a("--classifier_epochs", type=int, default=15, help="epochs of the feature classifier when it must be trained")
    a("--calibration_steps", type=int, default=20, help="steps of each vqgen calibration run")
    a("--vqvae_flags", default="", help="extra train_vqvae.py flags of the vqgen row (one string)")
    a("--prior_flags", default="", help="extra train_prior.py flags of the vqgen row (one string)")
    a("--row_name", default="", help="name of the vqgen row in the tables (bench/ablation_table.py; default: the "
                                     "--out folder's name); --resample keeps the trained row's")
    a("--seed", type=int, default=0, help="seed of every row")
    a("--tokenizer_only", action="store_true", help="train stage 1 and the shards of one vqgen row within its share "
      "of the budget and score the tokenizer only (a quantizer ablation's first pass; its folder then serves "
      "--reuse_tokenizer of full rows)")
    a("--redo", action="store_true", help="recompute rows that already have results")
    a("--resample", action="store_true", help="keep the vqgen rows' trained models in --out and redo only their "
                                             "choice of sampling settings and their sample scores (sampling levers)")
    args = p.parse_args(argv)
    if args.reuse_tokenizer and not (Path(args.reuse_tokenizer) / STAGE12_FILE).is_file():
        p.error(f"--reuse_tokenizer {args.reuse_tokenizer}: no {STAGE12_FILE} there (a vqgen row folder of "
                f"bench/quality.py holds it once its stages 1-2 are done)")
    if not (args.budget_minutes > 0 and 0 < args.stage1_share < 1 and args.samples >= 2 and args.val_samples >= 2
            and args.calibration_steps >= 11):
        p.error("need --budget_minutes > 0, 0 < --stage1_share < 1, --samples >= 2, --val_samples >= 2, "
                "--calibration_steps > 10 (two logged steps: 10 and the last)")
    return args


# -------------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """One feature space, one test-split reference and one code path (vqgen.eval) for every row."""

    def __init__(self, args):
        from vqgen.config import EvalConfig, load_config
        from vqgen.eval import batches as B
        from vqgen.eval.features import build_feature_space

        self.args, self.B = args, B
        self.cfg = load_config(EvalConfig, ["--data_dir", args.data_dir, "--features", "classifier",
                                            "--classifier_epochs", str(args.classifier_epochs), "--batch_size", "500",
                                            "--num_samples", str(args.samples), "--seed", str(args.seed)])
        self.device = torch.device("cpu")
        self.space = build_feature_space(self.cfg, DATASET, 32, 1, self.device)
        self.test_ds = B.open_split(DATASET, "test", args.data_dir, 32, 1)
        self.train_ds = B.open_split(DATASET, "train", args.data_dir, 32, 1)
        perm = torch.randperm(len(self.train_ds), generator=torch.Generator().manual_seed(1)).tolist()
        self.floor_ds = torch.utils.data.Subset(self.train_ds, perm[:args.floor_images])
        self.val_ds = torch.utils.data.Subset(self.train_ds, perm[-args.val_images:])
        self.test = self.real_set(self.test_ds)
        self.val = self.real_set(self.val_ds)

    def real_set(self, ds):
        s = self.B.new_set(self.cfg, len(ds), self.space, 1)
        for idx, x, _ in self.B.split_batches(ds, None, self.cfg.batch_size):
            s.update(*self.space.batch(x), idx)
        s.reduce()
        return s

    def image_set(self, images: torch.Tensor, asked: torch.Tensor | None):
        """Feature set of generated ``images`` (N, 1, 32, 32) in [-1, 1], as batches.eval_samples builds it."""
        s = self.B.new_set(self.cfg, len(images), self.space, 1)
        bs = self.cfg.batch_size
        for i in range(0, len(images), bs):
            x = images[i:i + bs]
            f, lg = self.space.batch(x)
            s.update(f, lg, torch.arange(i, i + len(x)), asked[i:i + bs] if asked is not None else None,
                     self.B.class_logits(self.space, x, lg))
        s.reduce()
        return s

    def scores(self, fake, ref=None, with_labels: bool = False) -> dict:
        from vqgen.eval import stream_stats
        out = stream_stats.quality(ref if ref is not None else self.test, fake, self.cfg.pr_k)
        c = fake.classifier_stats(with_labels)
        out.update(confident=c["confident_fraction"], coverage=c["class_coverage"], class_counts=c["class_counts"])
        if "label_accuracy" in c:
            out["label_accuracy"] = c["label_accuracy"]
        return out

    def real_floor(self) -> dict:
        from types import SimpleNamespace
        tc = SimpleNamespace(image_size=32, in_channels=1)
        return self.B.reference_scores(self.space, self.test, DATASET, self.cfg, tc, self.args.floor_images)

    @torch.no_grad()
    def tokenizer(self, tok) -> dict:
        from vqgen.eval import stream_stats
        metrics, _, _, _ = self.B.eval_real(tok, self.space, self.test_ds, self.cfg, self.device, 0, 1)
        _, _, _, recon = self.B.eval_real(tok, self.space, self.floor_ds, self.cfg, self.device, 0, 1)
        return {"psnr": metrics["psnr"], "ssim": metrics["ssim"], "codebook_usage": metrics["codebook_usage"],
                "perplexity": metrics["perplexity"], "codebook_size": metrics["codebook_size"],
                "codes_used": metrics["codes_used"], "floor_fid": stream_stats.frechet(self.test, recon),
                **{f"floor_{k}": v for k, v in stream_stats.quality(self.test, recon, self.cfg.pr_k).items()
                   if k in ("precision", "recall")}}


# ------------------------------------------------------------------------------------------------ vqgen row
def run_script(script: str, flags: list[str], log: Path) -> float:
    """Run a vqgen script in a fresh process; returns its wall time. Output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {script} {' '.join(flags)}\n")
        f.flush()
        r = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=ROOT, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"error: {script} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t


def step_seconds(metrics: Path, batch_size: int) -> float:
    """Seconds per optimizer step between the last two logged steps of a run (samples/s counts from the epoch's
    start, so the difference leaves the first step's warm-up out)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if "samples_per_s" in line]
    a, b = rows[-2], rows[-1]
    ta, tb = a["step"] * batch_size / a["samples_per_s"], b["step"] * batch_size / b["samples_per_s"]
    return (tb - ta) / max(1, b["step"] - a["step"])


def batch_size_of(stage, flags: list[str]) -> int:
    """The batch size the ``stage`` (:data:`STAGE1` or :data:`PRIOR`) trains with for ``flags``, read through its
    script's own config loader (flag aliases, ``--x=y``, ``--config`` files and the last of repeated flags all
    count), e.g. an ablation's 32."""
    from vqgen.config import load_config
    return load_config(stage.config(), flags).train.batch_size


def budgeted_stage(stage, flags: list[str], out: Path, budget_s: float, args, log: Path) -> dict:
    """Calibrate the step time, then train ``budget_s`` seconds' worth of steps (``--max_minutes`` as hard stop)."""
    calib, script = out.with_name(out.name + "_calib"), stage.script
    run_script(script, flags + ["--output_dir", str(calib), "--overwrite", "--max_steps", str(args.calibration_steps),
                                "--sample_and_save_freq", "1000"], log)
    per_step = step_seconds(calib / "metrics.jsonl", batch_size_of(stage, flags + ["--output_dir", str(calib)]))
    steps = max(1, int(budget_s / per_step))
    wall = run_script(script, flags + ["--output_dir", str(out), "--overwrite", "--max_steps", str(steps),
                                       "--max_minutes", f"{budget_s / 60:.4f}", stage.epochs_flag, "1000"], log)
    done = json.loads((sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                       [-1] / "vqgen_state.json").read_text())["global_step"]
    # fewer steps than planned: the --max_minutes hard stop fired, i.e. the stage trained for the whole budget
    return {"process_s": wall, "steps": done, "planned_steps": steps, "calibrated_step_s": per_step,
            "train_s": budget_s if done < steps else done * per_step, "hard_stop": done < steps}


def sample_images(prior, tok, n: int, setting: dict, mode: str, seed: int):
    """(images (n, 1, 32, 32), asked labels or None, seconds spent sampling tokens), drawn as evaluate.py draws
    them (vqgen.models.sampling) in ``mode`` (``--label_mode`` cycle for cond, frequencies for marginal; null: ``--unconditional``)."""
    from vqgen.config import SamplingConfig
    from vqgen.models.sampling import class_labels, decode_to_images, generate
    labels = class_labels(prior, n, None, "frequencies" if mode == "marginal" else "cycle", seed,
                          unconditional=mode == "null")
    g = torch.Generator().manual_seed(seed)
    kw = SamplingConfig(**setting).draw_kwargs()   # a grid entry names fields; the rest keep sample.py's defaults
    t = time.perf_counter()
    toks = generate(prior, n, labels=labels, **kw, generator=g, batch_size=512)
    secs = time.perf_counter() - t
    return decode_to_images(tok, toks, 500).clamp(-1, 1), labels if mode != "null" else None, secs


def pick_setting(ev: Evaluator, prior, tok, grid: list[dict], mode: str, args) -> tuple[dict, list]:
    """The setting of ``grid`` with the lowest FID of ``--val_samples`` samples against the TRAIN validation set."""
    trials = []
    for s in grid:
        imgs, labels, _ = sample_images(prior, tok, args.val_samples, s, mode, seed=args.seed + 1)
        sc = ev.scores(ev.image_set(imgs, labels), ref=ev.val)
        trials.append({**s, **{f"val_{k}": sc[k] for k in ("fid", "precision", "recall")}})
    best = min(trials, key=lambda t: t["val_fid"])
    return {k: v for k, v in best.items() if not k.startswith("val_")}, trials


def stage1_sizes(args) -> list[str]:
    """The issue's stage-1 sizes for the row's quantizer (read from ``--vqvae_flags`` by the script's own loader):
    ``--num_embeddings`` is a setting of ``--quantizer vq`` only."""
    from vqgen.config import load_config
    quantizer = load_config(STAGE1.config(), args.vqvae_flags.split()).model.quantizer
    return SIZES_VQ + (VQ_CODES if quantizer == "vq" else [])


STAGE12_FILE = "stage12.json"   # in a vqgen row folder: where its tokenizer and shards are, and what they cost


def train_stages12(args, run: Path, log: Path) -> dict:
    """Stage 1 within its share of the budget, then the shards of both splits; recorded in ``run/stage12.json``."""
    from vqgen.fsutil import atomic_write_json
    b1 = 60 * args.budget_minutes * args.stage1_share
    s1 = budgeted_stage(STAGE1, ["--dataset", DATASET, "--data_dir", args.data_dir, "--no_wandb", "--seed",
                                 str(args.seed), *stage1_sizes(args), *args.vqvae_flags.split()], run / "vqvae", b1, args, log)
    t2 = run_script("extract_codes.py", ["--dataset", DATASET, "--data_dir", args.data_dir, "--checkpoint",
                                         str(run / "vqvae/export"), "--split", "train", "test", "--output",
                                         str(run / "shards"), "--overwrite", "--no_progress"], log)
    rec = {"tokenizer": str((run / "vqvae/export").resolve()), "shards": str((run / "shards").resolve()),
           "stage1_s": s1["train_s"], "stage2_s": t2, "stage1": s1, "vqvae_flags": args.vqvae_flags}
    atomic_write_json(run / STAGE12_FILE, rec)
    return rec


def train_vqgen_row(args, out: Path, spec: PriorRow, stage12: Path | None) -> dict:
    """Stages 1-3 of a vqgen row in ``out/<spec.trained>`` within the budget -> the row's timings. ``stage12``: a
    row folder whose stage 1 and shards this row reuses (and is charged for), or None to train its own."""
    run = out / spec.trained
    run.mkdir(parents=True, exist_ok=True)
    log = run / "stages.log"
    s12 = json.loads((stage12 / STAGE12_FILE).read_text()) if stage12 else train_stages12(args, run, log)
    b3 = max(1.0, 60 * args.budget_minutes - s12["stage1_s"] - s12["stage2_s"])
    # the bench chooses the sampling settings itself (pick_setting), on its own validation set: no --tune_sampling
    s3 = budgeted_stage(PRIOR, ["--shards", s12["shards"], "--no_wandb", "--seed", str(args.seed), "--num_samples",
                                "16", *SIZES_PRIOR, "--tune_sampling", "none", *spec.prior_flags,
                                *args.prior_flags.split()], run / "prior", b3, args, log)
    return {"stage1_s": s12["stage1_s"], "stage2_s": s12["stage2_s"], "stage3_s": s3["train_s"],
            "stage1": s12["stage1"], "stage3": s3, "tokenizer": s12["tokenizer"],
            "stages12_from": str(stage12.resolve()) if stage12 else None}


def score_vqgen_row(ev: Evaluator, args, out: Path, row: str, timings: dict) -> dict:
    """The trained row's tokenizer scores, and its samples' scores at the settings chosen on the validation set."""
    from vqgen.models.prior import Prior
    from vqgen.models.vqvae import VQVAE

    spec = VQGEN_ROWS[row]
    tok = VQVAE.from_export(timings.get("tokenizer") or out / "vqgen/vqvae/export").eval()
    prior = Prior.from_export(out / spec.trained / "prior/export").eval()
    res = {"timings": timings, "tokenizer": ev.tokenizer(tok), "samples": {}}
    for mode in args.modes:
        setting, trials = pick_setting(ev, prior, tok, spec.grid(mode), mode, args)
        imgs, labels, secs = sample_images(prior, tok, args.samples, setting, mode, seed=args.seed)
        res["samples"][mode] = {"setting": setting, "val_trials": trials, "sampling_s": secs,
                                "images_per_s": args.samples / secs,
                                **ev.scores(ev.image_set(imgs, labels), with_labels=labels is not None)}
        save_grid(imgs[:64], out / f"samples_{row}_{mode}.png")
    return res


def score_tokenizer_row(ev: Evaluator, args, out: Path) -> dict:
    """``--tokenizer_only``: stage 1 and the shards in ``out/vqgen`` (kept for ``--reuse_tokenizer``), scored."""
    from vqgen.models.vqvae import VQVAE

    run = out / "vqgen"
    run.mkdir(parents=True, exist_ok=True)
    s12 = json.loads((run / STAGE12_FILE).read_text()) if (run / STAGE12_FILE).exists() else \
        train_stages12(args, run, run / "stages.log")
    return {"timings": s12, "tokenizer": ev.tokenizer(VQVAE.from_export(s12["tokenizer"]).eval())}


def run_vqgen_rows(ev: Evaluator, args, out: Path, results: dict) -> None:
    """Train (unless ``--resample``) and score the vqgen rows of ``--rows``; results are written after each."""
    from vqgen.fsutil import atomic_write_json
    stage12 = Path(args.reuse_tokenizer) if args.reuse_tokenizer else None
    # priors trained before (an earlier run into --out): maskgit16 scores the prior maskgit8 trained
    trained = {} if args.redo else {VQGEN_ROWS[r].trained: results[r]["timings"] for r in VQGEN_ROWS if r in results}
    for row in [r for r in args.rows if r in VQGEN_ROWS]:
        spec = VQGEN_ROWS[row]
        if stage12 is None and not args.redo and (out / spec.trained / STAGE12_FILE).is_file():
            stage12 = out / spec.trained                   # stage 1 and shards trained by an earlier run into --out
        if args.resample:
            timings = results[row]["timings"]
        elif row in results and not args.redo:
            continue
        else:
            if spec.trained not in trained:
                trained[spec.trained] = train_vqgen_row(args, out, spec, stage12)
            timings = trained[spec.trained]
            stage12 = stage12 or out / spec.trained       # the next rows differ in the prior only
            results[row] = {"timings": timings}
            atomic_write_json(out / "results.json", results)   # trained: a failure while scoring keeps --resample open
        results[row] = score_vqgen_row(ev, args, out, row, timings)
        write_outputs(results, out, args)


# ------------------------------------------------------------------------------------------------- peer rows
def load_train01(args) -> torch.Tensor:
    """All train images through vqgen's registry (28 -> 32, [-1, 1]) mapped to the peer's [0, 1]."""
    from vqgen.data import build_dataset
    ds, _ = build_dataset(DATASET, "train", args.data_dir)
    xs = [x for x, _ in torch.utils.data.DataLoader(ds, batch_size=1000)]
    return (torch.cat(xs) + 1) / 2


def run_peer_rows(rows: list[str], ev: Evaluator, args, out: Path, results: dict) -> None:
    import peer_recipe as P

    cfg = P.PeerConfig(seed=args.seed)
    x01 = load_train01(args)
    b1 = 60 * args.budget_minutes * args.stage1_share
    b3 = 60 * args.budget_minutes - b1
    vqvae, best1, st1 = P.train_vqvae(cfg, x01, b1, print)
    buggy_mode = vqvae.training
    latent_hw = P.latent_shape(vqvae, x01)

    def saved_vqvae():  # what its --sample loads: the stage-1 checkpoint
        m = P.build_vqvae(cfg)
        m.load_state_dict(best1)
        return m.eval()

    tok_metrics = ev.tokenizer(P.MonaiTokenizer(saved_vqvae()))
    for row in rows:
        frozen = row == "peer_frozen"
        m = saved_vqvae() if frozen else vqvae  # the frozen row: the same stage 1, in eval mode
        m.train(buggy_mode and not frozen)
        _, transformer, st3 = P.train_transformer(cfg, m, x01, b3, frozen=frozen, log=print)
        t = time.perf_counter()
        imgs = P.sample(cfg, saved_vqvae(), transformer, args.samples, latent_hw, seed=args.seed)
        secs = time.perf_counter() - t
        imgs = (imgs * 2 - 1).clamp(-1, 1)
        results[row] = {"timings": {"stage1_s": st1.seconds, "stage3_s": st3.seconds, "stage1_steps": st1.steps,
                                    "stage3_steps": st3.steps, "stage1_epochs": st1.epochs,
                                    "stage3_epochs": st3.epochs},
                        "bug": {"vqvae_train_mode_after_stage1": buggy_mode,
                                "prior_steps_with_vqvae_in_train_mode": st3.vqvae_train_mode_steps},
                        "tokenizer": tok_metrics,
                        "samples": {"null": {"setting": {"temperature": 1.0}, "sampling_s": secs,
                                             **ev.scores(ev.image_set(imgs, None))}}}
        save_grid(imgs[:64], out / f"samples_{row}_null.png")
        write_outputs(results, out, args)


# ---------------------------------------------------------------------------------------------------- output
def save_grid(images: torch.Tensor, path: Path) -> None:
    from vqgen.images import save_image_grid
    save_image_grid(images, path, nrow=8, min_cell=48)


def side_by_side(out: Path, names: list[str]) -> Path | None:
    from PIL import Image
    files = [out / f"samples_{n}.png" for n in names if (out / f"samples_{n}.png").exists()]
    if not files:
        return None
    ims = [Image.open(f).convert("L") for f in files]
    gap = 8
    canvas = Image.new("L", (sum(i.width for i in ims) + gap * (len(ims) - 1), max(i.height for i in ims)), 255)
    x = 0
    for im in ims:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    path = out / "samples_side_by_side.png"
    canvas.save(path)
    return path


def table(results: dict) -> str:
    lines = ["| | stage-1 s | stages 2+3 s | PSNR | SSIM | usage | tokenizer floor | gFID | precision | recall | "
             "confident | classes | sampling settings | sampling s | images/s |", "|" + "---|" * 15]
    if "real" in results and "fid" in results["real"]:
        r = results["real"]
        lines.append(f"| real train images | | | | | | | {r['fid']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} "
                     f"| | | | | |")
    name = results.get("config", {}).get("row_name")
    for (row, mode), label in LABELS.items():
        if row not in results or mode not in results[row]["samples"]:
            continue
        if row == "vqgen" and name:
            label = label.replace("vqgen", f"vqgen ({name})", 1)
        r, s, tk = results[row], results[row]["samples"][mode], results[row]["tokenizer"]
        tm = r["timings"]
        setting = ", ".join(f"{k} {v}" for k, v in s["setting"].items() if v is not None)
        lines.append(f"| {label} | {tm['stage1_s']:.0f} | {tm.get('stage2_s', 0) + tm['stage3_s']:.0f} | "
                     f"{tk['psnr']:.1f} | {tk['ssim']:.3f} | {100 * tk['codebook_usage']:.0f}% | "
                     f"{tk['floor_fid']:.2f} | {s['fid']:.2f} | {s['precision']:.2f} | {s['recall']:.2f} | "
                     f"{100 * s['confident']:.0f}% | {s['coverage'] * 10:.0f} | {setting} | {s['sampling_s']:.0f} | "
                     f"{s['images_per_s']:.0f} |" if "images_per_s" in s else " |")
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, args) -> None:
    from vqgen.fsutil import atomic_write_bytes, atomic_write_json
    atomic_write_json(out / "results.json", results)
    names = [f"{r}_{m}" for (r, m) in LABELS if m != "marginal"]   # marginal grids look like cond ones
    grid = side_by_side(out, names)
    md = [f"# Quality benchmark: Fashion-MNIST, {args.budget_minutes:g} min per row for stages 1-3 "
          f"(stage 1: {100 * args.stage1_share:.0f}%)", "", table(results), "",
          f"{args.samples} samples per row against the 10k test images, features of the offline Fashion-MNIST "
          f"classifier (vqgen.eval.classifier); tokenizer floor = {args.floor_images} train images through the "
          f"tokenizer. Side by side: {grid}"]
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if args.resample:
        missing = [r for r in args.rows if r in VQGEN_ROWS and r not in results]
        if missing or not any(r in VQGEN_ROWS for r in args.rows):
            print(f"error: --resample needs a trained vqgen row in {out} (no results.json with "
                  f"{', '.join(missing) or 'one'})", file=sys.stderr)
            sys.exit(2)
        # the saved models were trained with the saved settings: those describe the row (and the ablation table)
        vars(args).update({k: results["config"][k] for k in TRAINING_ARGS})
        args.row_name = args.row_name or results["config"].get("row_name", "")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ev = Evaluator(args)
    results["real"] = ev.real_floor()
    results["config"] = vars(args)
    peers = [r for r in args.rows if r.startswith("peer") and (args.redo or r not in results)]
    if peers and not args.resample and not args.tokenizer_only:   # a quantizer row scores vqgen's tokenizer only
        run_peer_rows(peers, ev, args, out, results)
    if args.tokenizer_only:
        results["tokenizer_only"] = score_tokenizer_row(ev, args, out)
    else:
        run_vqgen_rows(ev, args, out, results)
    results["bench_seconds"] = time.perf_counter() - t0
    write_outputs(results, out, args)
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
