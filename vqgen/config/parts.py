"""The shared parts of the stage configs (:mod:`vqgen.config.stages`): data, augmentation, training, sampling,
shards, the token reader and the discriminator. Each is a dataclass whose fields are flags (:mod:`.flags`); a
stage config composes them with ``part(...)``. The choice lists live here, so the modules that use them import
the config, never the other way round.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .datasets import DATASETS
from .flags import flag
from .prior import MASKGIT_CHOICE_TEMPERATURE, MASKGIT_DECODE_STEPS

PRECISIONS = ("no", "fp16", "bf16")
VIEW_MODES, TENCROP_VIEWS = ("tencrop", "random"), 10   # extract_codes.py --view_mode / --views (vqgen.data.views)
CFG_SCHEDULES = ("constant", "linear", "power")
CFG_POWER = 2.75   # --cfg_power's built-in value: RAR-B's guidance_scale_pow
LABEL_MODES = ("cycle", "frequencies")   # --label_mode: the class labels of a conditional prior's samples
COMPILE_DECODING = False  # --compile's default (sample.py, evaluate.py, VQVAE_T.py): on once benchmarks show it pays
SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")   # split names: also parts of shard file names
DISC_NORMS, DISC_LOSSES = ("batch", "group"), ("hinge",)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG-16 ImageNet weights (what lpips' net="vgg" loads)
# What every --checkpoint / --checkpoint_t accepts besides a local export folder (vqgen.hub, vqgen.models.tokenizer).
_HUB_REF = "hf:<user>/<repo>[/<subfolder>][@<revision>] (read from the local Hugging Face cache)"
_TOKENIZER_REFS = f"a diffusers VQModel folder (pip install \"vqgen[diffusers]\"), or {_HUB_REF} of either"


def _precision(default: str | None, help: str, **kw):
    return flag(default, help, choices=PRECISIONS, **kw)


def _positive(cfg: Any, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is None:        # "the stage decides" (VQVAE_T.py's --batch_size): the stage's own check sees its value
            continue
        if v < 0 or (v == 0 and not zero_ok):
            raise ConfigError(f"--{name} must be {'>= 0' if zero_ok else '> 0'}, got {v}")


# ------------------------------------------------------------------------------------------------- shared parts
@dataclass
class DataConfig:
    """Image input (stages 1 and 2, evaluate.py)."""

    dataset: str | None = flag("digits", f"registry name ({', '.join(DATASETS)}), a local image folder, a "
                               "save_to_disk folder, hf:<hub id or path>, or WebDataset shards (wds:<url>, *.tar, "
                               "{000..009}); 'digits' works offline")
    data_dir: str | None = flag("data", "where registry datasets are stored / downloaded to")
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
class AugmentConfig:
    """Stage-1 training augmentation (train_vqvae.py's ``augment`` part): seeded per sample, never on validation."""

    random_crop: bool = flag(False, "upsample by 1.125 and take a random crop (LlamaGen); training batches only")
    hflip: bool = flag(False, "mirror half of the training images (seeded per sample); not extraction's --hflip, which "
                       "stores the tokens of mirrored images for the prior")


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


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, cfg_scale: float,
                        cfg_schedule: str = "constant", cfg_power: float = CFG_POWER, decode_steps: int | None = None,
                        choice_temperature: float | None = None) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k must be >= 1 (0 or unset: no top-k filter), got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be in (0, 1] (or unset), got {top_p}")
    if not math.isfinite(cfg_scale):
        raise ConfigError(f"cfg_scale must be finite, got {cfg_scale}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ConfigError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
    if not (cfg_power >= 0 and math.isfinite(cfg_power)):
        raise ConfigError(f"cfg_power must be >= 0 (0 = constant guidance), got {cfg_power}")
    if decode_steps is not None and decode_steps < 1:
        raise ConfigError(f"decode_steps must be >= 1 (or unset: the prior's own), got {decode_steps}")
    if choice_temperature is not None and not (choice_temperature >= 0 and math.isfinite(choice_temperature)):
        raise ConfigError(f"choice_temperature must be >= 0 (or unset: the prior's own), got {choice_temperature}")


# How tokens are drawn when neither a flag nor the prior's stored setting (generation_config.json) says otherwise.
# A resolved setting spells every value out: no top-k filter is top_k 0, no nucleus filter top_p 1 (as in Hugging
# Face's generation configs), because None means "not set" wherever settings are merged.
BUILTIN_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0, "cfg_schedule": "constant",
                    "cfg_power": CFG_POWER}
UNCONDITIONAL_SAMPLING = ("temperature", "top_k", "top_p")   # what an unconditional setting holds (no guidance)
SAMPLING_DEFAULTS = ("stored", "builtin")                    # --sampling_defaults
_STORED = " (default: the prior's stored setting, else {})"


def draw_settings(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  cfg_scale: float | None = None, cfg_schedule: str | None = None, cfg_power: float | None = None,
                  stored: dict | None = None, conditional: bool = True) -> tuple[dict, dict]:
    """The one rule for every sampler: a value given (not None) > the prior's stored setting for this mode (``stored``:
    generation_config.json's ``"conditional"`` or ``"unconditional"`` entry) > :data:`BUILTIN_SAMPLING`. Unconditional
    sampling has no guidance. Returns (every keyword argument of :func:`vqgen.models.sampling.generate` spelled out,
    ``top_k 0`` / ``top_p 1`` for no filter; where each came from: "given" | "stored" | "built-in")."""
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale,
             "cfg_schedule": cfg_schedule, "cfg_power": cfg_power}
    stored = stored or {}
    out, source = {}, {}
    for name, builtin in BUILTIN_SAMPLING.items():
        if given[name] is not None:
            out[name], source[name] = given[name], "given"
        elif name in stored and (conditional or name in UNCONDITIONAL_SAMPLING):
            out[name], source[name] = stored[name], "stored"
        else:
            out[name], source[name] = builtin, "built-in"
    out["top_k"] = 0 if out["top_k"] is None else out["top_k"]
    out["top_p"] = 1.0 if out["top_p"] is None else out["top_p"]
    check_sampling_args(out["temperature"], out["top_k"] or None, out["top_p"], out["cfg_scale"], out["cfg_schedule"],
                        out["cfg_power"])
    if not conditional:   # the null class alone: guidance would compare it with itself
        out["cfg_scale"], out["cfg_schedule"], out["cfg_power"] = 1.0, "constant", CFG_POWER
        for name in ("cfg_scale", "cfg_schedule", "cfg_power"):
            source.pop(name)
    return out, source


@dataclass
class SamplingConfig:
    """How tokens are drawn from a prior (sample.py, evaluate.py, training-time grids, VQVAE_T.py --sample). A value
    left unset comes from the prior's stored setting (generation_config.json in its export), else the built-in
    default (:func:`draw_settings`)."""

    num_samples: int = flag(16, "number of images to generate")
    temperature: float | None = flag(None, "softmax temperature (0 = greedy)" + _STORED.format(1))
    top_k: int | None = flag(None, "keep only the k most likely tokens (0: no top-k filter)" + _STORED.format("none"))
    top_p: float | None = flag(None, "nucleus sampling: the smallest set of tokens with probability mass >= p (1: no "
                               "filter)" + _STORED.format("none"))
    cfg_scale: float | None = flag(None, "classifier-free guidance scale (1 = off; conditional priors)"
                                   + _STORED.format(1))
    cfg_schedule: str | None = flag(None, "guidance over the tokens (MaskGIT: over the decoding steps): constant "
                                    "(--cfg_scale for every token), linear (1 at the first token -> --cfg_scale at the "
                                    "last: more varied samples at a given scale) or power (RAR's: 1 + (scale - 1) * (1 "
                                    "- cos((i / n) ** --cfg_power * pi)) / 2 at token i of n)"
                                    + _STORED.format("constant"), choices=CFG_SCHEDULES)
    cfg_power: float | None = flag(None, "exponent of --cfg_schedule power (RAR's guidance_scale_pow; 0 = constant, "
                                   "higher = guidance later)" + _STORED.format(CFG_POWER))
    decode_steps: int | None = flag(None, "MaskGIT priors: parallel decoding steps (default: the prior's own, "
                                    f"{MASKGIT_DECODE_STEPS}); not for --prior_kind ar")
    choice_temperature: float | None = flag(None, "MaskGIT priors: Gumbel noise on the confidence that picks which "
                                            "tokens stay, decaying linearly to 0 over the steps (default: the prior's "
                                            f"own, {MASKGIT_CHOICE_TEMPERATURE}); not for --prior_kind ar")
    unconditional: bool = flag(False, "sample a class-conditional prior unconditionally (its null class, no "
                               "guidance), with its stored unconditional setting")
    sampling_defaults: str = flag("stored", "where unset sampling values come from: stored = the prior export's "
                                  "generation_config.json (chosen on held-out data at the end of training), else the "
                                  "built-in defaults; builtin = the built-in defaults only", choices=SAMPLING_DEFAULTS)
    class_label: int | None = flag(None, "class to generate (conditional priors; default: as --label_mode says)")
    label_mode: str = flag("cycle", "class labels of a conditional prior's samples: cycle (0, 1, ..., C-1, 0, ...) or "
                           "frequencies (drawn from the training split's class frequencies recorded with the prior, "
                           "seeded by --seed, then guided: the data's mix of classes without choosing them; "
                           "--unconditional: the null class)", choices=LABEL_MODES)
    seed: int = flag(0, "random seed (same seed -> same samples)")
    compile: bool = flag(COMPILE_DECODING, "decode with a compiled step (torch.compile, static KV cache: CUDA graphs "
                         "on GPU, Inductor on CPU; AR priors, others decode eagerly): the same tokens as eager "
                         "decoding up to float rounding. Each batch size and dtype compiles once, first: it pays "
                         "off over many batches (evaluate.py's 50k samples), not for one small grid "
                         "(docs/RESULTS.md)")

    def check(self) -> None:
        _positive(self, "num_samples", zero_ok=True)
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 1 (0: no top-k filter), got {self.top_k}")
        if self.unconditional and (self.class_label is not None or self.label_mode != "cycle"):
            raise ConfigError("--unconditional samples the null class: it contradicts --class_label and --label_mode "
                              f"{self.label_mode}; pass one of them")
        if self.unconditional and self.cfg_scale not in (None, 1.0):
            raise ConfigError("--cfg_scale needs class labels: it has no effect with --unconditional (the null class "
                              "guided by itself)")
        self.draw_kwargs()   # the values given, with the built-in defaults for the rest

    def draw_kwargs(self) -> dict:
        """How to draw tokens, as :func:`vqgen.models.sampling.generate` takes it (every caller passes the same set):
        these values, the built-in defaults for those not set (a prior's stored setting:
        :func:`vqgen.generation.resolve_sampling`), and the kind's own settings (None: the prior's own)."""
        out = draw_settings(self.temperature, self.top_k, self.top_p, self.cfg_scale, self.cfg_schedule,
                            self.cfg_power)[0]
        check_sampling_args(**out, decode_steps=self.decode_steps, choice_temperature=self.choice_temperature)
        return {**out, **self.kind_kwargs()}

    def kind_kwargs(self) -> dict:
        """The settings only some prior kinds read (MaskGIT's), None where not given: the prior's own."""
        return {k: v for k, v in (("decode_steps", self.decode_steps),
                                  ("choice_temperature", self.choice_temperature)) if v is not None}


TUNE_MODES = ("auto", "none")


@dataclass
class TuneConfig:
    """The choice of sampling settings at the end of prior training (vqgen/eval/tune.py), stored with the export."""

    tune_sampling: str = flag("auto", "after training, choose the guidance scale and schedule, temperature and top-k "
                              "(conditional and unconditional settings separately) by the FID of samples against "
                              "held-out train images in the dataset classifier's features, and store the winners in "
                              "the export as generation_config.json, which sampling uses whenever a flag is not "
                              "given. auto: when the tokenizer's dataset is on disk and has class labels (else one "
                              "note); none: skip", choices=TUNE_MODES)
    tune_minutes: float = flag(3.0, "time budget of that search, checked between candidate settings (the feature "
                               "classifier's one-time training, cached for evaluate.py, is not counted)")
    tune_samples: int = flag(500, "samples per candidate setting")

    def check(self) -> None:
        if not self.tune_minutes > 0:
            raise ConfigError(f"--tune_minutes must be > 0, got {self.tune_minutes}")
        if self.tune_samples < 2:
            raise ConfigError(f"--tune_samples must be >= 2 (an FID needs two samples), got {self.tune_samples}")


@dataclass
class ShardingConfig:
    """How stage 2 cuts its output (extract_codes.py, VQVAE_T.py)."""

    shard_size: int = flag(1000, "samples per shard, the unit of resume (1000: ~1.5 MB of 16x16 uint16 tokens; "
                           "ImageNet gives ~1300 shards, enough for shard-level splitting over ranks x workers)")
    hflip: bool = flag(False, "also store the tokens of the horizontally mirrored image as tokens_flip.npy")
    views: int = flag(1, "augmented views per image, their tokens stored in one sample (tokens.npy [views, h, w]); "
                      "the prior reads one view per image per epoch. The encoder sees --batch_size x views images. "
                      "Views include mirrored crops: not with --hflip")
    view_mode: str = flag("tencrop", "how --views are made from the image upsampled by 1.125: tencrop = 4 corners + "
                          "center, each also mirrored (LlamaGen's --ten-crop; needs --views 10); random = random "
                          "crops, each mirrored with p = 1/2, seeded by (--order_seed, image, view)",
                          choices=VIEW_MODES)
    order_seed: int = flag(0, "map-style inputs are encoded in a permutation of the source order seeded by this: the "
                           "shards of a class-sorted folder mix classes (keys stay source indices)")

    def check(self) -> None:
        _positive(self, "shard_size", "views")
        _positive(self, "order_seed", zero_ok=True)
        if self.views > 1 and self.hflip:
            raise ConfigError("--hflip with --views: the views already include mirrored crops; pass one of them")
        if self.views > 1 and self.view_mode == "tencrop" and self.views != TENCROP_VIEWS:
            raise ConfigError(f"--view_mode tencrop makes {TENCROP_VIEWS} views: pass --views {TENCROP_VIEWS}, or "
                              f"--view_mode random for {self.views} random crops")


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
    disc_norm: str = flag("batch", "discriminator normalisation (group: no running statistics)", choices=DISC_NORMS)
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
