"""Typed stage configs: every flag of every script is a dataclass field declared here, with its help and default.

How it works (the mechanism is :mod:`vqgen.flags`)
  * A flag is a field made with ``flag`` (help, choices, aliases...). A field made with ``part`` holds a shared
    group (:class:`DataConfig`, :class:`TrainConfig`, :class:`SamplingConfig`, the model flags). A stage config
    (:class:`VQVAEStageConfig` ... :class:`PipelineConfig`) composes parts and its own flags; its ``run(config)``
    function (in the stage module) takes nothing else.
  * ``flags.build_parser`` walks the fields: one argparse option per flag, one option group per part, each default
    shown once in ``--help``. Two fields of one script with the same flag name are refused when the parser is
    built, so a flag can only be declared once per script.
  * ``flags.load_config``: dataclass defaults < ``--config FILE.yaml`` (nested like the dataclasses; a file may hold
    one section per script, keyed by its name, e.g. ``train_prior.py:``) < flags given on the command line. With
    ``--resume`` the run folder's ``config.yaml`` (written by every trainer) comes right after the defaults.
  * A stage's defaults differ through ``part(TrainConfig, lr_schedule="cosine", ...)``: the one place saying so.

Adding a flag: add a field with ``flag(default, "help")`` to the part or stage config that owns the concept, read
it as ``config.<part>.<name>`` in the stage; it then exists in every script whose config holds that part, in YAML
under the part's name, and in ``config.yaml`` of every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .data import DATASETS
from .data.augment import AugmentConfig
from .errors import ConfigError
from .flags import flag, int_list, part
from .hub import check_push_target
from .models.discriminator import NORMS
from .models.losses import DISC_LOSSES, VGG16_FILE
from .models.prior import PRIOR_MLPS, PRIOR_NORMS, PriorConfig
from .models.vqvae import ARCHS, VQVAEConfig, level_params
from .run_dir import RunDir
from .sampling import check_sampling_args
from .shards.format import SPLIT_RE

PRECISIONS = ("no", "fp16", "bf16")
# What every --checkpoint / --checkpoint_t accepts besides a local export folder (vqgen.hub, vqgen.models.tokenizer).
_HUB_REF = "hf:<user>/<repo>[/<subfolder>][@<revision>] (read from the local Hugging Face cache)"
_TOKENIZER_REFS = f"a diffusers VQModel folder (pip install \"vqgen[diffusers]\"), or {_HUB_REF} of either"


def _precision(default: str | None, help: str, **kw):
    return flag(default, help, choices=PRECISIONS, **kw)


def _positive(cfg: Any, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v < 0 or (v == 0 and not zero_ok):
            raise ConfigError(f"--{name} must be {'>= 0' if zero_ok else '> 0'}, got {v}")


def _model_default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# ------------------------------------------------------------------------------------------------- shared parts
@dataclass
class DataConfig:
    """Image input (stages 1 and 2, evaluate.py)."""

    dataset: str | None = flag("digits", f"registry name ({', '.join(DATASETS)}), a local image folder, a "
                               "save_to_disk folder, hf:<hub id or path>, or WebDataset shards (wds:<url>, *.tar, "
                               "{000..009}); 'digits' works offline")
    data_dir: str = flag("data", "where registry datasets are stored / downloaded to")
    image_size: int | None = flag(None, "resize + center-crop to this size (default: the dataset's own, 64 for "
                                  "generic inputs)")
    num_workers: int = flag(0, "data-loading worker processes per process")
    streaming: bool = flag(False, "read hf:<name> inputs with datasets' streaming mode (no full download; WebDataset "
                           "urls are always streamed): every rank and DataLoader worker reads its own shards")
    prepare_data_once: bool = flag(False, "--data_dir is shared by all nodes: one process of the job prepares the "
                                   "data (default: one per node), then all load it in parallel")

    def check(self) -> None:
        _positive(self, "num_workers", zero_ok=True)
        if self.image_size is not None:
            _positive(self, "image_size")


@dataclass
class TrainConfig:
    """What every trainer shares: run folder, batch, schedule, precision, checkpoints, logging, preemption."""

    output_dir: str | None = flag(None, "run folder: checkpoints/, export/, samples/, metrics", required=True)
    batch_size: int = flag(128, "batch size per process (global = this x processes x accumulation)")
    n_epochs: int = flag(100, "number of training epochs")
    lr: float = flag(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = flag(0.0, "AdamW weight decay (weight matrices and embeddings; not biases or norms)")
    warmup_steps: int = flag(0, "linear warm-up steps before the schedule")
    lr_schedule: str = flag("constant", "learning-rate schedule after warm-up (cosine: down to 10%% of the peak)",
                            choices=("constant", "cosine"))
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: str | None = _precision(None, "autocast precision (default: what `accelerate config`/launch "
                                             "says, else the fastest safe one for the device: bf16 on CUDA GPUs "
                                             "with bf16 tensor cores and for the VQ-VAE on CPUs with AMX, no "
                                             "elsewhere; see vqgen/perf.py)")
    seed: int = flag(0, "seed for init, data order and sampling")
    checkpointing_steps: int = flag(0, "save a training checkpoint every N optimizer steps (0: at the end of every "
                                    "epoch only)")
    checkpoints_total_limit: int = flag(3, "keep only the newest N checkpoints")
    resume: str | None = flag(None, "'latest' or a checkpoint folder: continue exactly where it stopped (the run's "
                              "config.yaml supplies every flag not given again)", persist=False)
    overwrite: bool = flag(False, "start over in an output_dir that holds another run", persist=False)
    max_bad_steps: int = flag(20, "stop after this many consecutive steps with a non-finite loss (each is skipped)")
    max_steps: int = flag(0, "stop after this many optimizer steps (0: run all epochs)", persist=False)
    max_minutes: float = flag(0.0, "stop after this many minutes of training, as --max_steps does (checkpoint, "
                              "export); counted from the first step, start-up excluded; 0: no limit", persist=False)
    sample_and_save_freq: int = flag(5, "every N epochs: validate, write an image grid, log metrics")
    report_to: str = flag("wandb", "experiment trackers: wandb (online when logged in and reachable, else offline in "
                          "<output_dir>/wandb with one warning), tensorboard (<output_dir>/logs), all, or none",
                          choices=("wandb", "tensorboard", "all", "none"))
    no_wandb: bool = flag(False, "drop wandb from --report_to (with the default: no tracker; the original tool's flag)")
    wandb_project: str = flag("vqgen", "wandb project name (also the TensorBoard subfolder of <output_dir>/logs)")
    push_to_hub: str | None = flag(None, "after training, upload the export folder (+ a model card) to this Hub model "
                                   "repo (<user>/<repo>; token from `hf auth login` or HF_TOKEN, checked before "
                                   "training); a failed upload only warns", metavar="REPO_ID")
    stop_file: str | None = flag(None, "if this file appears (default <output_dir>/STOP), save a checkpoint and exit; "
                                 "the Slurm scripts create it on preemption, then requeue", persist=False)
    timeout_minutes: int = flag(30, "process-group timeout: a rank that dies makes the others fail instead of "
                                "hanging forever")

    def check(self) -> None:
        _positive(self, "batch_size", "n_epochs", "gradient_accumulation_steps", "checkpoints_total_limit",
                  "sample_and_save_freq", "max_bad_steps")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        _positive(self, "warmup_steps", "checkpointing_steps", "max_steps", "max_minutes", zero_ok=True)
        check_push_target(self.push_to_hub)  # a missing token is found now, not after training


@dataclass
class SamplingConfig:
    """How tokens are drawn from a prior (sample.py, evaluate.py, training-time grids, VQVAE_T.py --sample)."""

    num_samples: int = flag(16, "number of images to generate")
    temperature: float = flag(1.0, "softmax temperature (0 = greedy)")
    top_k: int | None = flag(None, "keep only the k most likely tokens")
    top_p: float | None = flag(None, "nucleus sampling: the smallest set of tokens with probability mass >= p")
    cfg_scale: float = flag(1.0, "classifier-free guidance scale (1 = off; conditional priors)")
    class_label: int | None = flag(None, "class to generate (conditional priors; default: cycle through all "
                                   "classes)")
    seed: int = flag(0, "random seed (same seed -> same samples)")

    def check(self) -> None:
        _positive(self, "num_samples", zero_ok=True)
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg_scale)


_VQ = VQVAEConfig()


@dataclass
class VQVAEFlags:
    """The VQ-VAE flags (the original tool's names and defaults, plus the quantiser's knobs). :meth:`build` adds
    what the data decides (channels, image size) and gives the model's :class:`VQVAEConfig`."""

    num_res_layers: int = flag(_VQ.num_res_layers, "residual units per level in encoder and decoder")
    downsample_parameters: list[int] = flag(
        [2, 4, 1, 1], "encoder strided conv per level as 'stride kernel dilation padding': 4 numbers (all levels) "
        "or 4 per level, e.g. \"2 4 1 1\"", type=int_list, metavar="S K D P")
    upsample_parameters: list[int] = flag(
        [2, 4, 1, 1, 0], "decoder transposed conv per level as 'stride kernel dilation padding output_padding': 5 "
        "numbers (all levels) or 5 per level, e.g. \"2 4 1 1 0\"", type=int_list, metavar="S K D P OP")
    num_channels: list[int] = flag(list(_VQ.num_channels), "channels per level; the number of values is the number "
                                   "of levels")
    num_res_channels: list[int] = flag(list(_VQ.num_res_channels), "channels inside the residual units, one per level")
    num_embeddings: int = flag(_VQ.num_embeddings, "codebook size K")
    embedding_dim: int = flag(_VQ.embedding_dim, "code vector dimension")
    commitment_cost: float = flag(_VQ.commitment_cost, "weight of the commitment loss ||z - sg(q)||^2")
    ema_decay: float = flag(_VQ.decay, "EMA decay of the codebook statistics")
    ema_epsilon: float = flag(_VQ.epsilon, "Laplace smoothing of the EMA cluster sizes")
    dead_code_threshold: float = flag(_VQ.dead_code_threshold, "restart codes that won fewer than this many vectors "
                                      "per step (all ranks) over the last --restart_every steps; 0 disables")
    restart_every: int = flag(_VQ.restart_every, "the dead-code window: checked every this many training steps")
    vq_arch: str = flag(_VQ.arch, "encoder/decoder blocks: conv (MONAI's ReLU residual units) or resnet (taming/"
                        "LlamaGen GroupNorm + swish ResNet blocks); opt-in, no equal-time ablation yet", choices=ARCHS)
    vq_attention: bool = flag(False, "with --vq_arch resnet: self-attention at the lowest resolution")
    norm_groups: int = flag(_VQ.norm_groups, "GroupNorm groups of --vq_arch resnet")
    codebook_l2: bool = flag(False, "l2-normalised codebook and encoder outputs (LlamaGen): use with a small "
                             "--embedding_dim, e.g. 8")

    def build(self, in_channels: int, image_size: int) -> VQVAEConfig:
        """These flags + the dataset's channels/size -> a validated :class:`VQVAEConfig`."""
        levels = len(self.num_channels)
        if levels == 0:
            raise ConfigError("--num_channels needs at least one value (one per level)")
        if len(self.num_res_channels) != levels:
            raise ConfigError(f"--num_res_channels has {len(self.num_res_channels)} values but --num_channels has "
                              f"{levels} (one per level)")
        cfg = VQVAEConfig(
            in_channels=in_channels, image_size=image_size, num_channels=tuple(self.num_channels),
            num_res_channels=tuple(self.num_res_channels), num_res_layers=self.num_res_layers,
            downsample_parameters=level_params(self.downsample_parameters, 4, levels, "--downsample_parameters"),
            upsample_parameters=level_params(self.upsample_parameters, 5, levels, "--upsample_parameters"),
            num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
            commitment_cost=self.commitment_cost, decay=self.ema_decay, epsilon=self.ema_epsilon,
            dead_code_threshold=self.dead_code_threshold, restart_every=self.restart_every, arch=self.vq_arch,
            attention=self.vq_attention, norm_groups=self.norm_groups, codebook_l2=self.codebook_l2)
        cfg.validate()
        return cfg


@dataclass
class PriorFlags:
    """The prior flags (the original tool's names and defaults, plus dropout knobs). :meth:`build` adds what the
    shards decide (vocabulary, grid, classes) and gives the model's :class:`PriorConfig`."""

    attn_layers_dim: int = flag(_model_default(PriorConfig, "dim"), "transformer width (embedding dimension)")
    attn_layers_depth: int = flag(_model_default(PriorConfig, "depth"), "number of transformer blocks")
    attn_layers_heads: int = flag(_model_default(PriorConfig, "heads"), "attention heads (must divide the width)")
    attn_dropout: float = flag(_model_default(PriorConfig, "dropout"), "dropout on attention probabilities and "
                               "residual branches during training")
    class_dropout: float = flag(_model_default(PriorConfig, "class_dropout"), "probability of replacing a label by "
                                "the null class in training (enables --cfg_scale)")
    prior_norm: str = flag(_model_default(PriorConfig, "norm"), "normalisation layers of the prior (rms: LLaMA's "
                           "RMSNorm); opt-in", choices=PRIOR_NORMS)
    prior_mlp: str = flag(_model_default(PriorConfig, "mlp"), "MLP of the prior's blocks (swiglu: LLaMA's, same "
                          "parameter count); opt-in", choices=PRIOR_MLPS)
    rope: bool = flag(False, "2D rotary position embedding (row/column) on the prior's queries and keys, on top of "
                      "the learned positions (head dimension divisible by 4); opt-in")

    def build(self, vocab_size: int, latent_h: int, latent_w: int, num_classes: int) -> PriorConfig:
        cfg = PriorConfig(vocab_size=int(vocab_size), latent_h=int(latent_h), latent_w=int(latent_w),
                          dim=self.attn_layers_dim, depth=self.attn_layers_depth, heads=self.attn_layers_heads,
                          dropout=self.attn_dropout, num_classes=max(int(num_classes), 0),
                          class_dropout=self.class_dropout, norm=self.prior_norm, mlp=self.prior_mlp,
                          rope=self.rope)
        cfg.validate()
        return cfg


@dataclass
class ShardingConfig:
    """How stage 2 cuts its output (extract_codes.py, VQVAE_T.py)."""

    shard_size: int = flag(1000, "samples per shard, the unit of resume (1000: ~1.5 MB of 16x16 uint16 tokens; "
                           "ImageNet gives ~1300 shards, enough for shard-level splitting over ranks x workers)")
    hflip: bool = flag(False, "also store the tokens of the horizontally mirrored image as tokens_flip.npy")
    order_seed: int = flag(0, "map-style inputs are encoded in a permutation of the source order seeded by this: the "
                           "shards of a class-sorted folder mix classes (keys stay source indices)")

    def check(self) -> None:
        _positive(self, "shard_size")
        _positive(self, "order_seed", zero_ok=True)


@dataclass
class TokenReaderConfig:
    """How stage 3 reads token shards (train_prior.py; evaluate.py takes --verify_shards): vqgen/shards/reader.py."""

    verify_shards: str = flag("full", "shard checks: full = size of every shard at start-up + the sha256 of each "
                              "shard as the rank holding its first sample reads it; size = sizes only; none",
                              choices=("full", "size", "none"))
    reader_streams: int = flag(8, "shuffled read streams per process (a multiple of --num_workers reads every byte "
                               "once; the batches do not depend on --num_workers)")
    resampled: bool = flag(False, "draw shards with replacement (very large or growing shard sets); an epoch is "
                           "--epoch_samples samples per process")
    epoch_samples: int | None = flag(None, "samples per process per epoch with --resampled (default: split size / "
                                     "processes)")

    def check(self) -> None:
        _positive(self, "reader_streams")
        if self.epoch_samples is not None:
            _positive(self, "epoch_samples")
            if not self.resampled:
                raise ConfigError("--epoch_samples needs --resampled (without it an epoch is one pass over the split)")


@dataclass
class GANConfig:
    """The VQGAN recipe's terms of stage 1 (opt-in: the defaults train the plain VQ-VAE). See vqgen/train/gan.py."""

    disc_weight: float = flag(0.0, "weight of the PatchGAN adversarial loss (times the adaptive weight); 0: no "
                              "discriminator. Not with DeepSpeed or fp16 (a clear error says why)")
    disc_start: int = flag(0, "optimizer step from which the discriminator trains and the adversarial term counts "
                           "(taming: after the reconstruction has converged)")
    disc_loss: str = flag("hinge", "discriminator / adversarial loss", choices=DISC_LOSSES)
    disc_channels: int = flag(64, "channels of the discriminator's first conv (doubling per layer, at most x8)")
    disc_layers: int = flag(2, "PatchGAN conv layers (2: 6x6 patch logits on 32x32 images; taming uses 3 at 256px)")
    disc_norm: str = flag("batch", "discriminator normalisation (group: no running statistics)", choices=NORMS)
    disc_lr: float | None = flag(None, "discriminator learning rate (default: --lr); AdamW betas (0.5, 0.9)")
    no_adaptive_weight: bool = flag(False, "use disc_weight as is instead of scaling it by ||grad rec|| / ||grad "
                                    "gan|| at the decoder's last layer")
    perceptual_weight: float = flag(0.0, "weight of the LPIPS (VGG) loss; needs the lpips package and VGG-16 "
                                    "weights on disk (never downloaded)")
    lpips_weights: str | None = flag(None, f"torchvision's VGG-16 weights file for LPIPS (default: "
                                     f"<torch hub dir>/checkpoints/{VGG16_FILE})")

    def check(self) -> None:
        _positive(self, "disc_weight", "disc_start", "perceptual_weight", zero_ok=True)
        _positive(self, "disc_channels", "disc_layers")
        if self.disc_lr is not None:
            _positive(self, "disc_lr")

    @property
    def enabled(self) -> bool:
        return self.disc_weight > 0 or self.perceptual_weight > 0


# ------------------------------------------------------------------------------------------------ stage configs
GRID_SAMPLING = ("num_samples", "temperature", "top_k", "top_p", "cfg_scale")


class _Trainer:
    """A stage that trains in a run folder: ``--resume`` reuses the folder's config.yaml (flags given now win)."""

    @classmethod
    def saved_config(cls, values: dict):
        train = values.get("train") if isinstance(values.get("train"), dict) else {}
        if train.get("resume") and train.get("output_dir"):
            return RunDir(train["output_dir"]).config_file
        return None


@dataclass
class VQVAEStageConfig(_Trainer):
    """Stage 1: train the VQ-VAE tokenizer (``accelerate launch train_vqvae.py --dataset ...``)."""

    PROG: ClassVar[str] = "train_vqvae.py"
    GROUP: ClassVar[str] = "stage 1"
    data: DataConfig = part(DataConfig, title="data")
    augment: AugmentConfig = part(AugmentConfig, title="augmentation (training only)")
    model: VQVAEFlags = part(VQVAEFlags, title="VQ-VAE model")
    train: TrainConfig = part(TrainConfig, title="training")
    gan: GANConfig = part(GANConfig, title="VQGAN losses (opt-in)")
    val_dataset: str | None = flag(None, "validation input (default: the test split of --dataset; for WebDataset urls "
                                   "the same shards, read in order)")
    samples_per_epoch: int = flag(0, "streams: samples per epoch over all ranks, needed for streams of unknown length "
                                  "(remote urls, HF streams); 0: one pass over counted shards")
    shuffle_buffer: int = flag(1000, "streams: raw samples in each reader's shuffle buffer")
    recon_loss: str = flag("mse", "reconstruction loss", choices=("mse", "l1"))
    val_images: int = flag(2048, "validation images per evaluation (test split)")
    grid_images: int = flag(32, "images in each reconstruction grid")
    channels_last: bool | None = flag(None, "channels-last (NHWC) memory format for the VQ-VAE (default: on with "
                                      "bf16 autocast, whose fast CPU/GPU convolutions are NHWC kernels; off in "
                                      "fp32, where it is no faster on CPU and slower on GPU; see vqgen/perf.py)")

    def check(self) -> None:
        _positive(self, "val_images", "grid_images", "shuffle_buffer")
        _positive(self, "samples_per_epoch", zero_ok=True)


@dataclass
class ExtractConfig:
    """Stage 2: encode a dataset with a trained VQ-VAE export into WebDataset token shards + manifest.json."""

    PROG: ClassVar[str] = "extract_codes.py"
    GROUP: ClassVar[str] = "stage 2"
    checkpoint: str | None = flag(None, f"tokenizer: a stage-1 export folder (runs/<name>/export), {_TOKENIZER_REFS}",
                                  required=True)
    split: list[str] = flag(["train"], "split(s) to extract (train, test, val or any split name the dataset has); each "
                            "merges into the same manifest")
    output_dir: str | None = flag(None, "shard folder (default: shards/<dataset>)", aliases=("--output",))
    batch_size: int = flag(256, "images per encoder batch (per process)")
    mixed_precision: str = _precision("no", "autocast dtype for the encoder (the quantizer's argmin stays fp32)")
    overwrite: bool = flag(False, "discard everything vqgen wrote into --output_dir before (all splits) and start "
                           "fresh")
    no_progress: bool = flag(False, "no progress bar")
    sharding: ShardingConfig = part(ShardingConfig, title="shards")
    data: DataConfig = part(DataConfig, title="data", help={
        "image_size": "must be the tokenizer's image size (default: the tokenizer's)"})

    def check(self) -> None:
        _positive(self, "batch_size")
        bad = [s for s in self.split if not SPLIT_RE.match(s)]
        if bad or not self.split:
            raise ConfigError(f"--split: split names are letters, digits and _, got {bad or self.split}")


@dataclass
class PriorStageConfig(_Trainer):
    """Stage 3: train the autoregressive Transformer prior on token shards (``accelerate launch train_prior.py``)."""

    PROG: ClassVar[str] = "train_prior.py"
    GROUP: ClassVar[str] = "input"
    shards: str | None = flag(None, "stage-2 output folder (holds manifest.json)", required=True)
    checkpoint: str | None = flag(None, f"tokenizer used to decode sample grids: an export folder, {_TOKENIZER_REFS} "
                                  "(default: the one recorded in the manifest)")
    split: str = flag("train", "manifest split to train on", aliases=("--train_split",))
    val_split: str = flag("test", "held-out manifest split for bits/token (skipped if absent)")
    shuffle_buffer: int = flag(1000, "shuffle window of each read stream, in samples (a process holds up to "
                               "--reader_streams x this many decoded samples)")
    num_workers: int = flag(0, "token-loading worker processes per process")
    val_batches: int = flag(50, "max held-out batches per evaluation")
    prior_ema_decay: float = flag(0.0, "keep an EMA of the prior's weights with this decay (e.g. 0.999): validation, "
                                  "grids and the export use it; 0: off (opt-in)")
    reader: TokenReaderConfig = part(TokenReaderConfig, title="token reader")
    model: PriorFlags = part(PriorFlags, title="prior (transformer)")
    # The prior's own defaults: warm-up + cosine decay and AdamW weight decay, as GPT training does.
    train: TrainConfig = part(TrainConfig, title="training", lr_schedule="cosine", warmup_steps=100, weight_decay=0.05,
                              aliases={"lr": ("--lr_t",), "n_epochs": ("--n_epochs_t",)})
    sampling: SamplingConfig = part(SamplingConfig, title="samples during training", only=GRID_SAMPLING)

    def check(self) -> None:
        _positive(self, "num_workers", zero_ok=True)
        _positive(self, "val_batches", "shuffle_buffer")
        if not 0.0 <= self.prior_ema_decay < 1.0:
            raise ConfigError(f"--prior_ema_decay must be in [0, 1), got {self.prior_ema_decay}")
        _positive(self.sampling, "num_samples")


@dataclass
class SampleConfig:
    """Sample images: prior export -> token grids -> tokenizer export -> PNG grid + single PNGs + tokens.npy."""

    PROG: ClassVar[str] = "sample.py"
    GROUP: ClassVar[str] = "exports and output"
    checkpoint: str | None = flag(None, f"tokenizer: a stage-1 export folder, {_TOKENIZER_REFS}", required=True)
    checkpoint_t: str | None = flag(None, f"prior: a stage-3 export folder or {_HUB_REF}", required=True)
    output_dir: str = flag(RunDir.SAMPLES, "where grid.png, images/ and tokens.npy go")
    batch_size: int = flag(64, "samples generated at once", aliases=("--sample_batch_size",))
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    mixed_precision: str = _precision("no", "autocast dtype of generation and decoding (GPU; the old spelling "
                                      "--precision fp32 means no)", aliases=("--precision",),
                                      value_aliases={"fp32": "no"})
    npz: bool = flag(False, "also write samples.npz: uint8 images (N, H, W, 3) as arr_0, the input of the "
                     "ADM/LlamaGen gFID evaluator (written as decoded, constant memory)")
    no_png: bool = flag(False, "do not write images/NNNNN.png (e.g. with --npz for 50k samples)")
    grid_images: int = flag(256, "grid.png shows the first N samples (at most)")
    sampling: SamplingConfig = part(SamplingConfig, title="sampling")

    def check(self) -> None:
        _positive(self.sampling, "num_samples")
        _positive(self, "batch_size", "grid_images")


@dataclass
class EvalConfig:
    """Evaluate a run: tokenizer reconstruction over a split, prior samples vs the split, bits/token on held-out
    shards."""

    PROG: ClassVar[str] = "evaluate.py"
    GROUP: ClassVar[str] = "inputs and output"
    run_dir: str | None = flag(None, "run folder of VQVAE_T.py --train (holds vqvae/, prior/, shards/)")
    checkpoint: str | None = flag(None, f"tokenizer: an export folder, {_TOKENIZER_REFS} (default: "
                                  "<run_dir>/vqvae/export)")
    checkpoint_t: str | None = flag(None, f"prior: an export folder or {_HUB_REF} (default: <run_dir>/prior/export; "
                                    "none: skip the prior)")
    shards: str | None = flag(None, "token shard folder for bits/token (default: <run_dir>/shards)")
    split: str = flag("test", "split for reconstruction, FID reference and bits/token")
    max_images: int | None = flag(None, "use at most this many split images (default: all)")
    batch_size: int = flag(256, "images per batch (tokenizer, features, decoding)")
    output: str | None = flag(None, "eval JSON path (default: <run>/eval.json)")
    no_plots: bool = flag(False, "skip the PNG plots")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    features: str = flag("auto", "feature space of FID/IS/precision/recall (see vqgen/eval/features.py)",
                         choices=("auto", "inception", "classifier"))
    inception_weights: str | None = flag(None, "Inception-v3 weights file (implies --features inception; an error if "
                                         "it does not exist)")
    classifier_dir: str | None = flag(None, "root of the feature-classifier cache (default: --data_dir): "
                                      "<root>/classifier/<dataset>")
    retrain_classifier: bool = flag(False, "retrain the feature classifier even when cached")
    classifier_epochs: int = flag(15, "epochs when the feature classifier is trained")
    confidence_threshold: float = flag(0.9, "max softmax counted as a confident classification")
    pr_k: int = flag(3, "k of the k-NN manifold precision/recall")
    is_splits: int = flag(10, "splits of the Inception Score")
    reader: TokenReaderConfig = part(TokenReaderConfig, title="token shards", only=("verify_shards",))
    pr_images: int = flag(10000, "precision/recall use the features of the first N images of each set (memory: N x "
                          "feature size); FID and IS use every image")
    data: DataConfig = part(DataConfig, title="data", dataset=None,
                            only=("dataset", "data_dir", "num_workers", "prepare_data_once"),
                            help={"dataset": "dataset to compare against (default: the one in the tokenizer export)"})
    sampling: SamplingConfig = part(SamplingConfig, title="sampling", num_samples=1000,
                                    only=GRID_SAMPLING + ("seed",), help={
                                        "num_samples": "images to generate for gFID/IS/precision/recall (0: skip)",
                                        "seed": "seed for sampling and the classifier"})

    def check(self) -> None:
        if self.sampling.num_samples < 0 or self.batch_size < 1 or self.pr_k < 1 or self.pr_images < 2:
            raise ConfigError("need --num_samples >= 0, --batch_size >= 1, --pr_k >= 1, --pr_images >= 2")
        if self.sampling.num_samples == 1:
            raise ConfigError("--num_samples 1: FID/precision/recall need at least 2 samples (or 0 to skip the prior)")


# What VQVAE_T.py shares between its two trainers (each keeps its own stage defaults for the rest).
PIPELINE_TRAINING = ("batch_size", "n_epochs", "lr", "seed", "mixed_precision", "sample_and_save_freq", "report_to",
                     "no_wandb", "wandb_project", "gradient_accumulation_steps", "max_grad_norm", "checkpointing_steps",
                     "checkpoints_total_limit", "max_bad_steps", "timeout_minutes")


@dataclass
class PipelineConfig:
    """One-command front end with the original VQVAE_T.py flags: ``--train`` (stages 1-3) and/or ``--sample``."""

    PROG: ClassVar[str] = "VQVAE_T.py"
    GROUP: ClassVar[str] = "what to run"
    train: bool = flag(False, "train stages 1-3 (resumable; finished stages are skipped)")
    sample: bool = flag(False, "sample from --checkpoint and --checkpoint_t")
    output_dir: str | None = flag(None, "run folder (default: runs/<dataset>)")
    checkpoint: str | None = flag(None, f"tokenizer for --sample: an export folder, {_TOKENIZER_REFS} (default: "
                                  "<output_dir>/vqvae/export)")
    checkpoint_t: str | None = flag(None, f"prior for --sample: an export folder or {_HUB_REF} (default: "
                                    "<output_dir>/prior/export)")
    # The original tool's default dataset (mnist) holds here only; every other script defaults to digits.
    data: DataConfig = part(DataConfig, title="data", dataset="mnist")
    vqvae: VQVAEFlags = part(VQVAEFlags, title="VQ-VAE model (stage 1)")
    prior: PriorFlags = part(PriorFlags, title="prior (stage 3)")
    training: TrainConfig = part(TrainConfig, title="training (--lr/--n_epochs: stage 1; the rest: stages 1 and 3)",
                                 only=PIPELINE_TRAINING)
    prior_training: TrainConfig = part(TrainConfig, title="prior training (stage 3)", only=("lr", "n_epochs"),
                                       rename={"lr": "lr_t", "n_epochs": "n_epochs_t"},
                                       help={"lr": "prior learning rate", "n_epochs": "prior epochs"})
    sharding: ShardingConfig = part(ShardingConfig, title="token shards (stage 2)", only=("shard_size",))
    sampling: SamplingConfig = part(SamplingConfig, title="sampling (--sample and training-time grids)",
                                    only=GRID_SAMPLING)

    def check(self) -> None:
        if not (self.train or self.sample):
            raise ConfigError("nothing to do: pass --train, --sample or both")
