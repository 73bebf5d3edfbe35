"""Stage 3: train the autoregressive Transformer prior on token shards (``accelerate launch train_prior.py``).

Reads only the shards written by stage 2 (never images, never the encoder): vocabulary, sequence length and
class count come from the shard manifest. The tokenizer export is loaded on the main process only to decode
sample grids, and must be the one the shards were made with (manifest sha256).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import shards
from ..config import add_prior_arguments, add_training_arguments, prior_config_from_args
from ..errors import ConfigError
from ..eval.metrics import bits_per_token, token_nll
from ..export import load_export
from ..models.prior import Prior
from ..sampling import class_labels, decode_to_images, generate, save_image_grid
from .loop import TrainLoop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_prior.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--shards", required=True, help="stage-2 output folder (holds manifest.json)")
    g.add_argument("--checkpoint", default=None,
                   help="tokenizer export used to decode sample grids (default: the path recorded in the manifest)")
    g.add_argument("--train_split", default="train", help="manifest split to train on")
    g.add_argument("--val_split", default="test", help="held-out manifest split for bits/token (skipped if absent)")
    g.add_argument("--shuffle_buffer", type=int, default=1000, help="samples in the streaming shuffle buffer")
    add_prior_arguments(p)
    add_training_arguments(p, lr_flag="--lr_t", epochs_flag="--n_epochs_t")
    p.set_defaults(lr_schedule="cosine", warmup_steps=100, weight_decay=0.05)
    g = p.add_argument_group("samples during training")
    g.add_argument("--num_samples", type=int, default=16, help="images in each sample grid")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for grids")
    g.add_argument("--top_k", type=int, default=None, help="top-k filtering for grids")
    g.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale for grids")
    g.add_argument("--val_batches", type=int, default=50, help="max held-out batches per evaluation")
    return p


class PriorTask:
    """Stage-3 plug-in for :class:`TrainLoop`."""

    name = "prior"

    def __init__(self, args, model: Prior, manifest: dict, tokenizer_sha: str):
        self.args, self.model, self.manifest, self.tokenizer_sha = args, model, manifest, tokenizer_sha
        self.conditional = model.config.num_classes > 0
        self.last_metrics: dict[str, float] = {}
        self._tokenizer = None

    def batches_per_epoch(self, world_size: int) -> int:
        per_rank = shards.split_total(self.manifest, self.args.train_split) // world_size
        return math.ceil(per_rank / self.args.batch_size)

    def epoch_batches(self, epoch: int, skip_batches: int, rank: int, world_size: int):
        return shards.make_token_loader(
            self.args.shards, self.args.train_split, batch_size=self.args.batch_size, seed=self.args.seed,
            epoch=epoch, rank=rank, world_size=world_size, num_workers=self.args.num_workers, shuffle=True,
            shuffle_buffer=self.args.shuffle_buffer, skip_batches=skip_batches)

    def _labels(self, labels: torch.Tensor):
        return labels if self.conditional else None

    def compute_loss(self, model, batch):
        tokens, labels = batch
        logits = model(tokens, self._labels(labels))  # call forward: DDP syncs gradients through it
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return loss, {"bpt": loss.detach() / math.log(2)}  # bits/token; a tensor until the loop logs it

    @torch.no_grad()
    def validation_bits(self, loop: TrainLoop) -> float | None:
        if self.args.val_split not in self.manifest["splits"]:
            return None
        loader = shards.make_token_loader(self.args.shards, self.args.val_split, batch_size=self.args.batch_size,
                                          seed=0, epoch=0, rank=0, world_size=1, num_workers=0, shuffle=False,
                                          hflip=False)  # held-out bits/token on the images as they are
        with loop.accelerator.autocast():
            total, count = token_nll(loop.unwrapped_model, loader, loop.accelerator.device, self.args.val_batches)
        return bits_per_token(total / max(1, count))

    def tokenizer(self, device):
        from ..models.vqvae import VQVAE

        if self._tokenizer is None:
            if self.args.checkpoint:  # checked against the manifest in main()
                self._tokenizer = VQVAE.from_export(self.args.checkpoint).to(device).eval()
        return self._tokenizer

    @torch.no_grad()
    def evaluate(self, loop: TrainLoop, epoch: int) -> dict[str, float]:
        if not loop.is_main:
            return {}
        metrics = {}
        bpt = self.validation_bits(loop)
        if bpt is not None:
            metrics["val/bits_per_token"] = bpt
        tok = self.tokenizer(loop.accelerator.device)
        if tok is not None:
            model = loop.unwrapped_model
            n = self.args.num_samples
            labels = class_labels(model, n, None)  # balanced over the classes; None when unconditional
            labels = labels.to(loop.accelerator.device) if labels is not None else None
            g = torch.Generator(device=loop.accelerator.device).manual_seed(self.args.seed)
            tokens = generate(model, n, labels=labels, temperature=self.args.temperature, top_k=self.args.top_k,
                              cfg_scale=self.args.cfg_scale, generator=g)
            images = decode_to_images(tok, tokens, n)
            path = Path(self.args.output_dir) / "samples" / f"samples_epoch{epoch + 1:04d}.png"
            save_image_grid(images, path, nrow=int(math.ceil(math.sqrt(n))), min_cell=48)
        self.last_metrics = metrics  # (generate restores the model's mode; fit sets train() every epoch)
        return metrics

    def export(self, loop: TrainLoop) -> None:
        meta = {"stage": "prior", "tokenizer_sha256": self.tokenizer_sha, "step": loop.state.global_step,
                "shards": {k: self.manifest.get(k) for k in ("dataset", "codebook_size", "latent_h", "latent_w",
                                                             "num_classes")},
                "tokenizer_path": self.args.checkpoint,
                "metrics": self.last_metrics}
        loop.unwrapped_model.export_to(Path(self.args.output_dir) / "export", meta=meta)
        loop.print(f"export written to {Path(self.args.output_dir) / 'export'}")


def main(args: argparse.Namespace) -> TrainLoop:
    from accelerate.utils import set_seed

    manifest = shards.read_manifest(args.shards)
    if args.train_split not in manifest["splits"]:
        raise ConfigError(f"{args.shards}: no '{args.train_split}' split in the manifest "
                          f"(has: {sorted(manifest['splits'])})")
    tokenizer_sha = manifest["tokenizer"]["sha256"]
    # sha256 of every shard against the manifest before training: a corrupt or truncated shard is named now, not
    # hours into an epoch (and a same-size bit flip, which the tar reader cannot see, is caught too).
    for split in (args.train_split, args.val_split):
        if split in manifest["splits"]:
            shards.verify_shards(args.shards, split)
    # The tokenizer that decodes sample grids is checked here, on every rank, before training: a mismatch found
    # later inside the main-process-only evaluation would leave the other ranks waiting at a barrier.
    tok_path = args.checkpoint or manifest["tokenizer"].get("path")
    if args.checkpoint or (tok_path and Path(tok_path).exists()):
        shards.check_tokenizer(manifest, load_export(tok_path, expected_kind="vqvae").sha256)
        args.checkpoint = tok_path
    else:
        print(f"note: the tokenizer recorded in the manifest ({tok_path}) is not on disk and --checkpoint is not "
              f"given: training runs, but no sample grids are written", flush=True)
    if args.num_samples <= 0:
        raise ConfigError("--num_samples must be > 0")
    config = prior_config_from_args(args, vocab_size=manifest["codebook_size"], latent_h=manifest["latent_h"],
                                    latent_w=manifest["latent_w"], num_classes=max(0, manifest.get("num_classes", 0)))
    set_seed(args.seed)
    model = Prior(config)
    run_config = {"stage": "prior", "model": dataclasses.asdict(config), "tokenizer_sha256": tokenizer_sha,
                  "args": {k: v for k, v in vars(args).items() if k != "resume"}}
    loop = TrainLoop(args, PriorTask(args, model, manifest, tokenizer_sha), run_config)
    loop.fit()
    return loop
