"""The stage configs: one per script, composing the shared parts (:mod:`.parts`) and the model configs
(:mod:`.tokenizer`, :mod:`.prior`). Every flag of every script is declared once, in this package; a stage's
``run(config)`` takes nothing else. How a flag is added: docs/ARCHITECTURE.md ("The config system").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .flags import flag, part
from .parts import (
    _HUB_REF,
    _TOKENIZER_REFS,
    SPLIT_RE,
    AugmentConfig,
    DataConfig,
    GANConfig,
    SamplingConfig,
    ShardingConfig,
    TokenReaderConfig,
    TrainConfig,
    TuneConfig,
    _positive,
    _precision,
)
from .prior import PriorConfig, check_kind_sampling
from .tokenizer import VQVAEConfig

CONFIG_FILE = "config.yaml"   # a trainer's resolved config in its run folder (vqgen.run_dir.RunDir.CONFIG)


# ------------------------------------------------------------------------------------------------ stage configs
# Stage defaults that differ from TrainConfig's, shared with VQVAE_T.py (chosen by equal-time runs: docs/RESULTS.md).
VQVAE_LR = 1e-3
PRIOR_LR = 1e-3
PRIOR_WARMUP = 100
VQVAE_BATCH = 32
GRID_SAMPLING = ("num_samples", "temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule", "cfg_power",
                 "decode_steps", "choice_temperature", "label_mode")
SAMPLING_CHOICE = ("unconditional", "sampling_defaults")   # the scripts that sample a finished prior
# Stage 2 and evaluate.py read the data the tokenizer export records unless these flags are given.
_DATA_HELP = {name: f.metadata["help"] for name, f in DataConfig.__dataclass_fields__.items()}
INHERITED_DATA = {"dataset": _DATA_HELP["dataset"] + " (default: the one the tokenizer export records)",
                  "data_dir": _DATA_HELP["data_dir"] + " (default: the one the tokenizer export records, else data)",
                  "image_size": "must be the tokenizer's image size (default: the tokenizer's)"}


class _Trainer:
    """A stage that trains in a run folder: ``--resume`` reuses the folder's config.yaml (flags given now win)."""

    @classmethod
    def saved_config(cls, values: dict):
        train = values.get("train") if isinstance(values.get("train"), dict) else {}
        if train.get("resume") and train.get("output_dir"):
            return f"{train['output_dir']}/{CONFIG_FILE}"
        return None


@dataclass
class VQVAEStageConfig(_Trainer):
    """Stage 1: train the VQ-VAE tokenizer (``accelerate launch train_vqvae.py --dataset ...``)."""

    PROG: ClassVar[str] = "train_vqvae.py"
    GROUP: ClassVar[str] = "stage 1"
    # A run folder's config.yaml written before --codebook_l2 existed meant the plain codebook (--resume keeps it).
    SAVED_DEFAULTS: ClassVar[dict] = {"model": {"codebook_l2": False}}
    data: DataConfig = part(DataConfig, title="data")
    augment: AugmentConfig = part(AugmentConfig, title="augmentation (training only)")
    model: VQVAEConfig = part(VQVAEConfig, title="VQ-VAE model")
    train: TrainConfig = part(TrainConfig, title="training", lr=VQVAE_LR, lr_schedule="cosine",
                              batch_size=VQVAE_BATCH)
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
    data: DataConfig = part(DataConfig, title="data", dataset=None, data_dir=None, help=INHERITED_DATA)

    def check(self) -> None:
        _positive(self, "batch_size")
        bad = [s for s in self.split if not SPLIT_RE.match(s)]
        if bad or not self.split:
            raise ConfigError(f"--split: split names are letters, digits and _, got {bad or self.split}")


@dataclass
class PriorStageConfig(_Trainer):
    """Stage 3: train the Transformer prior (AR or MaskGIT) on token shards (``accelerate launch train_prior.py``)."""

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
    ignore_labels: bool = flag(False, "train an unconditional prior even when the shards carry class labels: all of "
                               "its capacity for unconditional samples, as an unlabelled dataset gets")
    reader: TokenReaderConfig = part(TokenReaderConfig, title="token reader")
    model: PriorConfig = part(PriorConfig, title="prior (transformer)")
    # The prior's own defaults: warm-up + cosine decay and AdamW weight decay, as GPT training does.
    train: TrainConfig = part(TrainConfig, title="training", lr=PRIOR_LR, lr_schedule="cosine",
                              warmup_steps=PRIOR_WARMUP, weight_decay=0.05,
                              aliases={"lr": ("--lr_t",), "n_epochs": ("--n_epochs_t",), "batch_size": ("--batch_size_t",),
                                       "warmup_steps": ("--warmup_steps_t",)})
    sampling: SamplingConfig = part(SamplingConfig, title="samples during training", only=GRID_SAMPLING)
    tuning: TuneConfig = part(TuneConfig, title="sampling settings stored with the export")

    def check(self) -> None:
        _positive(self, "num_workers", zero_ok=True)
        _positive(self, "val_batches", "shuffle_buffer")
        if not 0.0 <= self.prior_ema_decay < 1.0:
            raise ConfigError(f"--prior_ema_decay must be in [0, 1), got {self.prior_ema_decay}")
        _positive(self.sampling, "num_samples")
        if self.tuning.tune_sampling != "none" and self.tuning.tune_minutes >= self.train.timeout_minutes:
            raise ConfigError(f"--tune_minutes {self.tuning.tune_minutes:g} must stay below --timeout_minutes "
                              f"{self.train.timeout_minutes} (the other processes wait for the main one meanwhile)")
        check_kind_sampling(self.model.prior_kind, self.sampling.kind_kwargs())


@dataclass
class SampleConfig:
    """Sample images: prior export -> token grids -> tokenizer export -> PNG grid + single PNGs + tokens.npy."""

    PROG: ClassVar[str] = "sample.py"
    GROUP: ClassVar[str] = "exports and output"
    checkpoint: str | None = flag(None, f"tokenizer: a stage-1 export folder, {_TOKENIZER_REFS}", required=True)
    checkpoint_t: str | None = flag(None, f"prior: a stage-3 export folder or {_HUB_REF}", required=True)
    output_dir: str = flag("samples", "where grid.png, images/ and tokens.npy go")
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
    data: DataConfig = part(DataConfig, title="data", dataset=None, data_dir=None,
                            only=("dataset", "data_dir", "num_workers", "prepare_data_once"),
                            help=INHERITED_DATA)
    sampling: SamplingConfig = part(SamplingConfig, title="sampling", num_samples=1000,
                                    only=GRID_SAMPLING + ("seed", "compile") + SAMPLING_CHOICE, help={
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
    vqvae: VQVAEConfig = part(VQVAEConfig, title="VQ-VAE model (stage 1)")
    prior: PriorConfig = part(PriorConfig, title="prior (stage 3)")
    # batch_size None: each trainer keeps its own default (VQVAE_BATCH for stage 1, 128 for the prior) unless given.
    training: TrainConfig = part(TrainConfig, title="training (--lr/--n_epochs: stage 1; the rest: stages 1 and 3)",
                                 only=PIPELINE_TRAINING, lr=VQVAE_LR, batch_size=None, help={
                                     "batch_size": f"batch size per process of both trainers (default: each "
                                                   f"stage's own: {VQVAE_BATCH} for the VQ-VAE, "
                                                   f"{TrainConfig().batch_size} for the prior)"})
    prior_training: TrainConfig = part(TrainConfig, title="prior training (stage 3)",
                                       only=("lr", "n_epochs", "batch_size", "warmup_steps"),
                                       rename={"lr": "lr_t", "n_epochs": "n_epochs_t", "batch_size": "batch_size_t",
                                               "warmup_steps": "warmup_steps_t"},
                                       lr=PRIOR_LR, batch_size=None, warmup_steps=PRIOR_WARMUP,
                                       help={"lr": "prior learning rate", "n_epochs": "prior epochs",
                                             "batch_size": "prior batch size per process (default: --batch_size if "
                                                           "given, else the prior's own)",
                                             "warmup_steps": "prior warm-up steps before its cosine schedule"})
    sharding: ShardingConfig = part(ShardingConfig, title="token shards (stage 2)", only=("shard_size",))
    sampling: SamplingConfig = part(SamplingConfig, title="sampling (--sample and training-time grids)",
                                    only=GRID_SAMPLING + ("compile",) + SAMPLING_CHOICE)
    tuning: TuneConfig = part(TuneConfig, title="sampling settings stored with the prior (stage 3)")

    def check(self) -> None:
        if not (self.train or self.sample):
            raise ConfigError("nothing to do: pass --train, --sample or both")
        if self.train and not self.checkpoint_t:   # the prior sampled is the one trained here
            check_kind_sampling(self.prior.prior_kind, self.sampling.kind_kwargs())
