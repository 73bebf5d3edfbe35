"""Command-line flags of every stage (moved here from the stage modules; typed stage configs come next).

Each shared flag group is declared once: data (--dataset ...), the VQ-VAE and prior model flags, training and
sampling. Stage modules build their parsers from these groups.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from .errors import ConfigError
from .models.prior import PriorConfig
from .models.vqvae import VQVAEConfig, level_params
from .data import DATASETS


# ------------------------------------------------------------------------------------------------ flag types
def int_list(text: str) -> list[int]:
    """Parse ``"2 4 1 1"`` or ``"2,4,1,1"`` (the seed passed list flags as one quoted string)."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by spaces or commas, got {text!r}") from None


def flatten_int_lists(values: Sequence) -> list[int]:
    """``nargs='+'`` with ``type=int_list`` gives a list of lists: ``--x "2 4" 1 1`` -> [2, 4, 1, 1]."""
    out: list[int] = []
    for v in values or []:
        out.extend(v if isinstance(v, list) else [v])
    return out


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v



# ------------------------------------------------------------------------------------------------- data
def add_data_arguments(parser) -> None:
    """``--dataset``, ``--data_dir``, ``--image_size`` (shared by every stage)."""
    parser.add_argument("--dataset", default="digits",
                        help=f"registry name ({', '.join(DATASETS)}), a local image folder, a save_to_disk folder, "
                             "hf:<hub id or path>, or WebDataset shards (wds:<url>, *.tar, {000..009}); "
                             "'digits' works offline (default: %(default)s)")
    parser.add_argument("--data_dir", default="data",
                        help="where registry datasets are stored / downloaded to (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="resize + center-crop to this size (default: the dataset's own, 64 for generic inputs)")


# ----------------------------------------------------------------------------------------------- models
def add_vqvae_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The seed's (GenerativeZoo VQVAE_T.py) VQ-VAE flags with its defaults, plus the quantiser's knobs."""
    d = VQVAEConfig()
    g = parser.add_argument_group("VQ-VAE model")
    g.add_argument("--num_res_layers", type=int, default=d.num_res_layers,
                   help="residual units per level in encoder and decoder")
    g.add_argument("--downsample_parameters", nargs="+", type=int_list, default="2 4 1 1",
                   help="encoder strided conv per level as 'stride kernel dilation padding': 4 numbers (all levels) "
                        "or 4 per level, e.g. \"2 4 1 1\"")
    g.add_argument("--upsample_parameters", nargs="+", type=int_list, default="2 4 1 1 0",
                   help="decoder transposed conv per level as 'stride kernel dilation padding output_padding': "
                        "5 numbers (all levels) or 5 per level, e.g. \"2 4 1 1 0\"")
    g.add_argument("--num_channels", nargs="+", type=int, default=list(d.num_channels),
                   help="channels per level; the number of values is the number of levels")
    g.add_argument("--num_res_channels", nargs="+", type=int, default=list(d.num_res_channels),
                   help="channels inside the residual units, one per level")
    g.add_argument("--num_embeddings", type=int, default=d.num_embeddings, help="codebook size K")
    g.add_argument("--embedding_dim", type=int, default=d.embedding_dim, help="code vector dimension")
    g.add_argument("--commitment_cost", type=float, default=d.commitment_cost,
                   help="weight of the commitment loss ||z - sg(q)||^2")
    g.add_argument("--ema_decay", type=float, default=d.decay, help="EMA decay of the codebook statistics")
    g.add_argument("--ema_epsilon", type=float, default=d.epsilon, help="Laplace smoothing of the EMA cluster sizes")
    g.add_argument("--dead_code_threshold", type=float, default=d.dead_code_threshold,
                   help="restart codes whose EMA usage (assignments per step, all ranks) is below this; 0 disables")
    g.add_argument("--restart_every", type=int, default=d.restart_every,
                   help="check for dead codes every this many training steps")
    return parser


def vqvae_config_from_args(args: argparse.Namespace, in_channels: int, image_size: int) -> VQVAEConfig:
    """Flags (see :func:`add_vqvae_arguments`) + the dataset's channels/size → a validated :class:`VQVAEConfig`."""
    d = VQVAEConfig()
    num_channels = [int(c) for c in flatten_int_lists(getattr(args, "num_channels", d.num_channels))]
    num_res_channels = [int(c) for c in flatten_int_lists(getattr(args, "num_res_channels", d.num_res_channels))]
    L = len(num_channels)
    if L == 0:
        raise ConfigError("--num_channels needs at least one value (one per level)")
    if len(num_res_channels) != L:
        raise ConfigError(f"--num_res_channels has {len(num_res_channels)} values but --num_channels has {L} "
                          f"(one per level)")
    down = getattr(args, "downsample_parameters", "2 4 1 1")
    up = getattr(args, "upsample_parameters", "2 4 1 1 0")
    down = int_list(down) if isinstance(down, str) else down
    up = int_list(up) if isinstance(up, str) else up
    cfg = VQVAEConfig(
        in_channels=in_channels,
        image_size=image_size,
        num_channels=tuple(num_channels),
        num_res_channels=tuple(num_res_channels),
        num_res_layers=getattr(args, "num_res_layers", d.num_res_layers),
        downsample_parameters=level_params(down, 4, L, "--downsample_parameters"),
        upsample_parameters=level_params(up, 5, L, "--upsample_parameters"),
        num_embeddings=getattr(args, "num_embeddings", d.num_embeddings),
        embedding_dim=getattr(args, "embedding_dim", d.embedding_dim),
        commitment_cost=getattr(args, "commitment_cost", d.commitment_cost),
        decay=getattr(args, "ema_decay", d.decay),
        epsilon=getattr(args, "ema_epsilon", d.epsilon),
        dead_code_threshold=getattr(args, "dead_code_threshold", d.dead_code_threshold),
        restart_every=getattr(args, "restart_every", d.restart_every),
    )
    cfg.validate()
    return cfg


def add_prior_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Seed-compatible prior flags (GenerativeZoo VQVAE_T.py) plus dropout knobs."""
    g = parser.add_argument_group("prior (transformer)")
    g.add_argument("--attn_layers_dim", type=int, default=96, help="transformer width (embedding dimension)")
    g.add_argument("--attn_layers_depth", type=int, default=12, help="number of transformer blocks")
    g.add_argument("--attn_layers_heads", type=int, default=8, help="attention heads (must divide the width)")
    g.add_argument("--attn_dropout", type=float, default=0.0,
                   help="dropout on attention probabilities and residual branches during training")
    g.add_argument("--class_dropout", type=float, default=0.1,
                   help="probability of replacing a label by the null class in training (enables --cfg_scale)")
    return parser


def prior_config_from_args(args: argparse.Namespace, vocab_size: int, latent_h: int, latent_w: int,
                           num_classes: int) -> PriorConfig:
    cfg = PriorConfig(vocab_size=int(vocab_size), latent_h=int(latent_h), latent_w=int(latent_w),
                      dim=args.attn_layers_dim, depth=args.attn_layers_depth, heads=args.attn_layers_heads,
                      dropout=args.attn_dropout, num_classes=max(int(num_classes), 0),
                      class_dropout=args.class_dropout)
    cfg.validate()
    return cfg


# -------------------------------------------------------------------------------------- training, sampling
def add_training_arguments(parser: argparse.ArgumentParser, *, lr_flag: str = "--lr", epochs_flag: str = "--n_epochs",
                           default_lr: float = 2e-4, default_epochs: int = 100) -> None:
    """Flags every trainer shares (the seed's names where it had them)."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", required=True, help="run folder: checkpoints/, export/, samples/, metrics")
    g.add_argument("--batch_size", type=int, default=128, help="batch size per process (global = this x processes x accumulation)")
    g.add_argument(epochs_flag, dest="n_epochs", type=int, default=default_epochs, help="number of training epochs")
    g.add_argument(lr_flag, dest="lr", type=float, default=default_lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps before the cosine decay")
    g.add_argument("--lr_schedule", choices=["constant", "cosine"], default="constant",
                   help="learning-rate schedule after warm-up")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: what `accelerate config`/launch says, else no)")
    g.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes per rank")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    g.add_argument("--checkpointing_steps", type=int, default=0,
                   help="save a training checkpoint every N optimizer steps (0: at the end of every epoch only)")
    g.add_argument("--checkpoints_total_limit", type=int, default=3, help="keep only the newest N checkpoints")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: continue exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds another run")
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss (each is skipped)")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: run all epochs)")
    g.add_argument("--sample_and_save_freq", type=int, default=5,
                   help="every N epochs: validate, write an image grid, log metrics")
    g.add_argument("--no_wandb", action="store_true", help="disable Weights & Biases logging")
    g.add_argument("--wandb_project", default="vqgen", help="wandb project name")
    g.add_argument("--stop_file", default=None,
                   help="if this file appears (default <output_dir>/STOP), save a checkpoint and exit; the Slurm "
                        "scripts create it on preemption, then requeue")
    g.add_argument("--timeout_minutes", type=int, default=30,
                   help="process-group timeout: a rank that dies makes the others fail instead of hanging forever")


def check_training_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "n_epochs", "gradient_accumulation_steps", "checkpoints_total_limit",
                 "sample_and_save_freq", "max_bad_steps"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {args.lr}")
    for name in ("warmup_steps", "num_workers", "checkpointing_steps", "max_steps"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--num_samples", type=int, default=16, help="number of images to generate")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    g.add_argument("--top_k", type=int, default=None, help="keep only the k most likely tokens")
    g.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    g.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--class_label", type=int, default=None,
                   help="class to generate (conditional priors; default: cycle through all classes)")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same samples)")
    g.add_argument("--sample_batch_size", "--batch_size", dest="sample_batch_size", type=int, default=64,
                   help="samples generated at once")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype on GPU")
