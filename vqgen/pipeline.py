"""``VQVAE_T.py``: the one-command front end with the original tool's (GenerativeZoo VQVAE_T.py) flags.

``--train`` runs stage 1 (VQ-VAE), stage 2 (token shards for the train and test splits) and stage 3 (prior)
in sequence under ``<output_dir>/{vqvae,shards,prior}``. Each stage resumes where it stopped, and a rerun
skips the stages whose export/manifest is complete. ``--sample`` writes ``<output_dir>/samples`` from
``--checkpoint``/``--checkpoint_t`` (default: the exports of ``--train``).

Unlike the seed: list flags take lists, the prior depth is honoured, ``--num_samples`` is honoured, the
VQ-VAE is frozen (eval mode, its codes cached once) while the prior trains, and samples go to PNG files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import extract, sample
from .config import int_list
from .train import prior_task as train_prior
from .train import vqvae_task as train_vqvae
from .errors import ConfigError
from .shards import MANIFEST_NAME


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="VQVAE_T.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--train", action="store_true", help="train stages 1-3 (resumable; finished stages are skipped)")
    a("--sample", action="store_true", help="sample from --checkpoint and --checkpoint_t")
    a("--dataset", default="mnist", help="dataset name (see vqgen/data.py), image folder, hf:<name> or .tar urls")
    a("--data_dir", default="data", help="where datasets live / are downloaded")
    a("--image_size", type=int, default=None, help="override the dataset's image size")
    a("--output_dir", default=None, help="run folder (default: runs/<dataset>)")
    a("--no_wandb", action="store_true", help="disable wandb logging")
    a("--batch_size", type=int, default=128, help="batch size (both stages)")
    a("--n_epochs", type=int, default=100, help="VQ-VAE epochs")
    a("--lr", type=float, default=2e-4, help="VQ-VAE learning rate")
    a("--lr_t", type=float, default=2e-4, help="prior learning rate")
    a("--n_epochs_t", type=int, default=100, help="prior epochs")
    a("--num_res_layers", type=int, default=2, help="residual blocks per level")
    a("--downsample_parameters", nargs="+", type=int_list, default=[[2, 4, 1, 1]],
      help="stride kernel dilation padding, once (every level) or per level")
    a("--upsample_parameters", nargs="+", type=int_list, default=[[2, 4, 1, 1, 0]],
      help="stride kernel dilation padding output_padding, once or per level")
    a("--num_channels", nargs="+", type=int, default=[256, 256], help="channels per level (levels = count)")
    a("--num_res_channels", nargs="+", type=int, default=[256, 256], help="residual channels per level")
    a("--num_embeddings", type=int, default=256, help="codebook size")
    a("--embedding_dim", type=int, default=32, help="code dimension")
    a("--attn_layers_dim", type=int, default=96, help="prior width")
    a("--attn_layers_depth", type=int, default=12, help="prior depth")
    a("--attn_layers_heads", type=int, default=8, help="prior attention heads")
    a("--attn_dropout", type=float, default=0.0, help="prior dropout")
    a("--checkpoint", default=None, help="tokenizer export for --sample (default: <output_dir>/vqvae/export)")
    a("--checkpoint_t", default=None, help="prior export for --sample (default: <output_dir>/prior/export)")
    a("--num_samples", type=int, default=16, help="images to sample")
    a("--sample_and_save_freq", type=int, default=5, help="epochs between validation/sample grids")
    a("--num_workers", type=int, default=0, help="data-loading workers")
    # vqgen extras (defaults keep the seed's behaviour)
    a("--seed", type=int, default=0, help="random seed")
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="autocast precision for training")
    a("--shard_size", type=int, default=10000, help="samples per token shard (stage 2)")
    a("--temperature", type=float, default=1.0, help="sampling temperature")
    a("--top_k", type=int, default=None, help="top-k sampling")
    a("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale")
    return p


def _flag_list(name: str, values) -> list[str]:
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return [f"--{name}", *map(str, flat)]


def stage_dirs(args) -> dict[str, Path]:
    out = Path(args.output_dir or f"runs/{Path(str(args.dataset)).name}")
    return {"root": out, "vqvae": out / "vqvae", "shards": out / "shards", "prior": out / "prior",
            "samples": out / "samples"}


def _common_training(args, stage_dir: Path) -> list[str]:
    argv = ["--output_dir", str(stage_dir), "--batch_size", str(args.batch_size), "--num_workers",
            str(args.num_workers), "--seed", str(args.seed), "--sample_and_save_freq", str(args.sample_and_save_freq)]
    if args.no_wandb:
        argv.append("--no_wandb")
    if args.mixed_precision:
        argv += ["--mixed_precision", args.mixed_precision]
    if (stage_dir / "run_config.json").exists():
        argv += ["--resume", "latest"]
    return argv


def _data_flags(args) -> list[str]:
    argv = ["--dataset", str(args.dataset), "--data_dir", args.data_dir]
    if args.image_size:
        argv += ["--image_size", str(args.image_size)]
    return argv


def vqvae_argv(args, d: dict[str, Path]) -> list[str]:
    return [*_data_flags(args), *_common_training(args, d["vqvae"]), "--n_epochs", str(args.n_epochs),
            "--lr", str(args.lr), "--num_res_layers", str(args.num_res_layers),
            *_flag_list("downsample_parameters", args.downsample_parameters),
            *_flag_list("upsample_parameters", args.upsample_parameters),
            *_flag_list("num_channels", args.num_channels), *_flag_list("num_res_channels", args.num_res_channels),
            "--num_embeddings", str(args.num_embeddings), "--embedding_dim", str(args.embedding_dim)]


def extract_argv(args, d: dict[str, Path], split: str) -> list[str]:
    return [*_data_flags(args), "--checkpoint", str(d["vqvae"] / "export"), "--split", split,
            "--output", str(d["shards"]), "--batch_size", str(args.batch_size), "--num_workers",
            str(args.num_workers), "--shard_size", str(args.shard_size)]


def prior_argv(args, d: dict[str, Path]) -> list[str]:
    return ["--shards", str(d["shards"]), "--checkpoint", str(d["vqvae"] / "export"),
            *_common_training(args, d["prior"]), "--n_epochs_t", str(args.n_epochs_t), "--lr_t", str(args.lr_t),
            "--attn_layers_dim", str(args.attn_layers_dim), "--attn_layers_depth", str(args.attn_layers_depth),
            "--attn_layers_heads", str(args.attn_layers_heads), "--attn_dropout", str(args.attn_dropout),
            "--num_samples", str(args.num_samples),
            "--temperature", str(args.temperature), "--cfg_scale", str(args.cfg_scale),
            *(["--top_k", str(args.top_k)] if args.top_k else [])]


def _split_done(shard_dir: Path, split: str) -> bool:
    m = shard_dir / MANIFEST_NAME
    return m.exists() and split in json.loads(m.read_text()).get("splits", {})


def _run(module, argv: list[str]) -> bool:
    """Run one stage in-process; False when a trainer stopped early (preemption/stop file): stop the chain."""
    print(f"\n$ {module.__name__.split('.')[-1]}.py {' '.join(argv)}", flush=True)
    result = module.main(module.build_parser().parse_args(argv))
    state = getattr(result, "state", None)
    return state is None or state.finished


def main(args: argparse.Namespace) -> None:
    if not (args.train or args.sample):
        raise ConfigError("nothing to do: pass --train, --sample or both")
    d = stage_dirs(args)
    if args.train:
        if (d["vqvae"] / "export" / "config.json").exists():
            print(f"stage 1: {d['vqvae'] / 'export'} exists, skipping", flush=True)
        elif not _run(train_vqvae, vqvae_argv(args, d)):
            print("stage 1 stopped before the end; rerun the same command to continue", flush=True)
            return
        for split in ("train", "test"):
            if _split_done(d["shards"], split):
                print(f"stage 2: {split} shards in {d['shards']} complete, skipping", flush=True)
            else:
                _run(extract, extract_argv(args, d, split))
        if (d["prior"] / "export" / "config.json").exists():
            print(f"stage 3: {d['prior'] / 'export'} exists, skipping", flush=True)
        elif not _run(train_prior, prior_argv(args, d)):
            print("stage 3 stopped before the end; rerun the same command to continue", flush=True)
            return
    if args.sample and int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch: main process only
        argv = ["--checkpoint", args.checkpoint or str(d["vqvae"] / "export"),
                "--checkpoint_t", args.checkpoint_t or str(d["prior"] / "export"),
                "--output_dir", str(d["samples"]), "--num_samples", str(args.num_samples), "--seed", str(args.seed),
                "--temperature", str(args.temperature), "--cfg_scale", str(args.cfg_scale),
                *(["--top_k", str(args.top_k)] if args.top_k else [])]
        _run(sample, argv)
