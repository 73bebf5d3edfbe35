"""Typed stage configs: every flag of every script is a dataclass field, declared once here with its help and default.

How it works
  * A flag is a field made with :func:`flag` (help, choices, aliases...). A field made with :func:`part` holds a
    shared group (:class:`DataConfig`, :class:`TrainConfig`, :class:`SamplingConfig`, the model flags). A stage
    config (:class:`VQVAEStageConfig` ... :class:`PipelineConfig`) composes parts and its own flags; its
    ``run(config)`` function (in the stage module) takes nothing else.
  * :func:`build_parser` walks the fields: one argparse option per flag, one option group per part, each default
    shown once in ``--help``. Two fields of one script with the same flag name are refused when the parser is
    built, so a flag can only be declared once per script.
  * :func:`load_config`: dataclass defaults < ``--config FILE.yaml`` (nested like the dataclasses; a file may hold
    one section per script, keyed by its name, e.g. ``train_prior.py:``) < flags given on the command line. With
    ``--resume`` the run folder's ``config.yaml`` (written by every trainer) comes right after the defaults.
  * A stage's defaults differ through ``part(TrainConfig, lr_schedule="cosine", ...)``: the one place saying so.

Adding a flag: add a field with ``flag(default, "help")`` to the part or stage config that owns the concept, read
it as ``config.<part>.<name>`` in the stage; it then exists in every script whose config holds that part, in YAML
under the part's name, and in ``config.yaml`` of every run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml

from .data import DATASETS
from .errors import ConfigError
from .models.prior import PriorConfig
from .models.vqvae import VQVAEConfig, level_params
from .run_dir import RunDir
from .sampling import check_sampling_args
from .shards.format import SPLITS

PRECISIONS = ("no", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------- the mechanism
def flag(default: Any = None, help: str = "", *, choices: Sequence | None = None, aliases: Sequence[str] = (),
         type: Any = None, metavar: str | None = None, value_aliases: dict | None = None, required: bool = False,
         persist: bool = True):
    """A command-line flag: a dataclass field with what argparse and YAML need.

    ``aliases``: older spellings (``"--output"``), accepted and listed next to the name in ``--help``.
    ``value_aliases``: older values mapped to current ones (``{"fp32": "no"}``). ``required``: must be set by a
    flag or the YAML file (checked after both are read). ``persist=False``: a per-invocation setting (``--resume``,
    ``--max_steps``...) that is not written to the run folder's config.yaml, so ``--resume`` never re-applies it.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases), "type": type,
            "metavar": metavar, "value_aliases": value_aliases or {}, "required": required, "persist": persist}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def part(cls: type, *, title: str | None = None, only: Sequence[str] | None = None, rename: dict | None = None,
         aliases: dict | None = None, help: dict | None = None, **defaults):
    """A shared group of flags inside a stage config.

    ``**defaults``: this stage's own defaults (the one place that says a stage differs). ``only``: the fields this
    stage exposes (the others keep their defaults and are not flags here). ``rename``/``aliases``: per-field flag
    name / extra old spellings in this stage. ``help``: per-field help text for this stage.
    """
    meta = {"part": True, "title": title, "only": tuple(only) if only else None, "rename": rename or {},
            "aliases": aliases or {}, "help": help or {}}
    return field(default_factory=lambda: cls(**copy.deepcopy(defaults)), metadata=meta)


@dataclass(frozen=True)
class _Flag:
    path: tuple[str, ...]      # field names from the stage config down: ("train", "lr")
    option: str                # "--lr"
    aliases: tuple[str, ...]
    help: str
    value: Any                 # the instance's value (the stage default when built from cls())
    kind: Any                  # resolved annotation: int, float | None, list[int], ...
    meta: dict

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _is_part(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("part"))


def _flags(cls: type, instance: Any = None, prefix: tuple[str, ...] = (), pmeta: dict | None = None) -> list[_Flag]:
    """Every flag of a config class, depth first, with this class's (stage-specific) defaults."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    pmeta = pmeta or {}
    out: list[_Flag] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_part(f):
            out += _flags(hints[f.name], getattr(instance, f.name), prefix + (f.name,), f.metadata)
            continue
        if pmeta.get("only") is not None and f.name not in pmeta["only"]:
            continue
        name = pmeta.get("rename", {}).get(f.name, f.name)
        aliases = tuple(f.metadata["aliases"]) + tuple(pmeta.get("aliases", {}).get(f.name, ()))
        out.append(_Flag(prefix + (f.name,), f"--{name}", aliases, pmeta.get("help", {}).get(f.name, f.metadata["help"]),
                         getattr(instance, f.name), hints[f.name], dict(f.metadata)))
    return out


def _base(kind: Any) -> tuple[Any, bool, bool]:
    """(element type, optional, is_list) of an annotation such as ``int | None`` or ``list[int]``."""
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) in (list, tuple):
        return typing.get_args(kind)[0], optional, True
    return kind, optional, False


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def build_parser(cls: type) -> argparse.ArgumentParser:
    """The argparse parser of a config class: flags given on the command line only (no defaults in the namespace:
    :func:`load_config` merges them over the YAML file and the defaults)."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(prog=getattr(cls, "PROG", None), description=doc,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of values, nested like the config (a file with sections keyed by script name "
                             "gives each script its section); flags given on the command line override it")
    groups: dict[tuple[str, ...], Any] = {}
    titles = {f.name: f.metadata.get("title") or f.name for f in dataclasses.fields(cls) if _is_part(f)}
    for fl in _flags(cls):
        where = fl.path[:1] if len(fl.path) > 1 else ()
        if where not in groups:
            groups[where] = parser.add_argument_group(titles.get(where[0]) if where else getattr(cls, "GROUP", None))
        elem, optional, is_list = _base(fl.kind)
        kw: dict[str, Any] = {"dest": fl.key}
        if elem is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = fl.meta["type"] or (_value_alias(elem, fl.meta["value_aliases"]) if fl.meta["value_aliases"]
                                             else elem)
            if is_list:
                kw["nargs"] = "+"
            if fl.meta["choices"]:
                kw["choices"] = fl.meta["choices"]
            kw["metavar"] = fl.meta["metavar"] or (None if fl.meta["choices"] else fl.option[2:].upper())
        shown = " (required)" if fl.meta["required"] else (
            "" if fl.value is None or fl.value is False else f" (default: {_show(fl.value)})")
        kw["help"] = fl.help + shown
        try:
            groups[where].add_argument(fl.option, *fl.aliases, **kw)
        except argparse.ArgumentError as e:
            raise TypeError(f"{cls.__name__}: {fl.key} declares {fl.option} a second time ({e})") from None
    return parser


def _value_alias(elem: type, aliases: dict):
    def convert(text: str):
        return elem(aliases.get(text, text))
    convert.__name__ = elem.__name__
    return convert


def _coerce(fl: _Flag, value: Any, where: str) -> Any:
    """A YAML or command-line value -> the field's type (ConfigError naming the key when it does not fit)."""
    elem, optional, is_list = _base(fl.kind)
    if value is None:
        if optional or fl.value is None:
            return None
        raise ConfigError(f"{where}{fl.key}: a value is required (null given)")

    def one(v):
        v = fl.meta["value_aliases"].get(v, v) if isinstance(v, str) else v
        try:
            if elem is bool:
                if not isinstance(v, bool):
                    raise ValueError("expected true or false")
                out = v
            elif elem is float:
                out = float(v)
            elif elem is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError("expected an integer")
                out = int(v)
            else:
                out = elem(v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}{fl.key}: {v!r} is not a valid {elem.__name__} ({e})") from None
        if fl.meta["choices"] and out not in fl.meta["choices"]:
            raise ConfigError(f"{where}{fl.key}: {out!r} is not one of {', '.join(map(str, fl.meta['choices']))}")
        return out

    if not is_list:
        return one(value)
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    flat: list = []
    for v in value if isinstance(value, (list, tuple)) else [value]:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])  # nargs='+' of "2 4 1 1" gives lists of lists
    return [one(v) for v in flat]


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _merge(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """A config from nested values over the class's defaults. Unknown keys (or keys that are not flags of this
    stage) are a ConfigError naming the key."""
    known = {fl.key: fl for fl in _flags(cls)}
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        if not isinstance(node, dict):
            raise ConfigError(f"{where}{prefix.rstrip('.') or 'the file'}: expected a mapping, got {node!r}")
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key in known:
                flat[key] = _coerce(known[key], v, where)
            elif isinstance(v, dict) and any(name.startswith(key + ".") for name in known):
                walk(v, key + ".")
            else:
                raise ConfigError(f"{where}unknown key {key!r} (this config has: "
                                  f"{', '.join(sorted({n.split('.')[0] for n in known}))})")
    walk(values, "")
    cfg = cls()
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        setattr(node, last, value)
    return cfg


def to_dict(cfg: Any, persisted_only: bool = False) -> dict:
    """The flag values of a config, nested like the dataclasses (what ``config.yaml`` and ``--config`` hold)."""
    out: dict[str, Any] = {}
    for fl in _flags(type(cfg), cfg):
        if persisted_only and not fl.meta["persist"]:
            continue
        value = fl.value
        out[fl.key] = list(value) if isinstance(value, tuple) else value
    return _nest(out)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg, persisted_only=True), sort_keys=False, default_flow_style=None)


def read_yaml(path: str | os.PathLike, cls: type) -> dict:
    """The values of a YAML config file for ``cls`` (its section when the file is keyed by script names)."""
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {p}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of flag values at the top level")
    sections = [k for k in data if str(k).endswith(".py")]
    if sections:
        prog = getattr(cls, "PROG", None)
        if len(sections) != len(data):
            raise ConfigError(f"--config {p}: mixes script sections ({', '.join(sections)}) with other keys")
        if prog not in data:
            raise ConfigError(f"--config {p} has no section for {prog} (has: {', '.join(sections)})")
        data = data[prog] or {}
    return data


def load_config(cls: type, argv: Sequence[str] | None = None) -> Any:
    """Flags (and ``--config``) -> a config of ``cls``: defaults < resumed run's config.yaml < file < flags."""
    given = vars(build_parser(cls).parse_args(argv))
    file = given.pop("config", None)
    layer = _merge(read_yaml(file, cls) if file else {}, _nest(given))
    saved = _resumed_layer(cls, layer)
    return from_dict(cls, _merge(saved, layer), where=f"{file}: " if file else "")


def _resumed_layer(cls: type, layer: dict) -> dict:
    """``--resume``: the values recorded in the run folder's config.yaml (flags given now still override them)."""
    train = layer.get("train") if isinstance(layer.get("train"), dict) else {}
    if not train.get("resume") or not train.get("output_dir"):
        return {}
    path = RunDir(train["output_dir"]).config_file
    return read_yaml(path, cls) if path.is_file() else {}


def validate(cfg: Any) -> Any:
    """Check a config (its parts first): required flags set, then each class's own ``check()``; returns it."""
    for fl in _flags(type(cfg), cfg):
        if fl.meta["required"] and fl.value is None:
            raise ConfigError(f"{fl.option} is required")
    _check_tree(cfg)
    return cfg


def _check_tree(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        if _is_part(f):
            _check_tree(getattr(cfg, f.name))
    if hasattr(cfg, "check"):
        cfg.check()


def int_list(text: str) -> list[int]:
    """Parse ``"2 4 1 1"`` or ``"2,4,1,1"`` (the seed passed list flags as one quoted string)."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by spaces or commas, got {text!r}") from None


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
                                             "says, else no)")
    seed: int = flag(0, "seed for init, data order and sampling")
    checkpointing_steps: int = flag(0, "save a training checkpoint every N optimizer steps (0: at the end of every "
                                    "epoch only)")
    checkpoints_total_limit: int = flag(3, "keep only the newest N checkpoints")
    resume: str | None = flag(None, "'latest' or a checkpoint folder: continue exactly where it stopped (the run's "
                              "config.yaml supplies every flag not given again)", persist=False)
    overwrite: bool = flag(False, "start over in an output_dir that holds another run", persist=False)
    max_bad_steps: int = flag(20, "stop after this many consecutive steps with a non-finite loss (each is skipped)")
    max_steps: int = flag(0, "stop after this many optimizer steps (0: run all epochs)", persist=False)
    sample_and_save_freq: int = flag(5, "every N epochs: validate, write an image grid, log metrics")
    no_wandb: bool = flag(False, "disable Weights & Biases logging")
    wandb_project: str = flag("vqgen", "wandb project name")
    stop_file: str | None = flag(None, "if this file appears (default <output_dir>/STOP), save a checkpoint and exit; "
                                 "the Slurm scripts create it on preemption, then requeue", persist=False)
    timeout_minutes: int = flag(30, "process-group timeout: a rank that dies makes the others fail instead of "
                                "hanging forever")

    def check(self) -> None:
        _positive(self, "batch_size", "n_epochs", "gradient_accumulation_steps", "checkpoints_total_limit",
                  "sample_and_save_freq", "max_bad_steps")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        _positive(self, "warmup_steps", "checkpointing_steps", "max_steps", zero_ok=True)


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
            dead_code_threshold=self.dead_code_threshold, restart_every=self.restart_every)
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

    def build(self, vocab_size: int, latent_h: int, latent_w: int, num_classes: int) -> PriorConfig:
        cfg = PriorConfig(vocab_size=int(vocab_size), latent_h=int(latent_h), latent_w=int(latent_w),
                          dim=self.attn_layers_dim, depth=self.attn_layers_depth, heads=self.attn_layers_heads,
                          dropout=self.attn_dropout, num_classes=max(int(num_classes), 0),
                          class_dropout=self.class_dropout)
        cfg.validate()
        return cfg


@dataclass
class ShardingConfig:
    """How stage 2 cuts its output (extract_codes.py, VQVAE_T.py)."""

    shard_size: int = flag(1000, "samples per shard, the unit of resume (1000: ~1.5 MB of 16x16 uint16 tokens; "
                           "ImageNet gives ~1300 shards, enough for shard-level splitting over ranks x workers)")
    hflip: bool = flag(False, "also store the tokens of the horizontally mirrored image as tokens_flip.npy")

    def check(self) -> None:
        _positive(self, "shard_size")


# ------------------------------------------------------------------------------------------------ stage configs
GRID_SAMPLING = ("num_samples", "temperature", "top_k", "top_p", "cfg_scale")


@dataclass
class VQVAEStageConfig:
    """Stage 1: train the VQ-VAE tokenizer (``accelerate launch train_vqvae.py --dataset ...``)."""

    PROG: ClassVar[str] = "train_vqvae.py"
    GROUP: ClassVar[str] = "stage 1"
    data: DataConfig = part(DataConfig, title="data")
    model: VQVAEFlags = part(VQVAEFlags, title="VQ-VAE model")
    train: TrainConfig = part(TrainConfig, title="training")
    recon_loss: str = flag("mse", "reconstruction loss", choices=("mse", "l1"))
    val_images: int = flag(2048, "validation images per evaluation (test split)")
    grid_images: int = flag(32, "images in each reconstruction grid")
    channels_last: bool = flag(False, "channels-last memory format: with --mixed_precision bf16 it measured 3-4x "
                               "MONAI's fp32 step on AMX CPUs (bench/train_step.py); slower in fp32 on GPU, so off "
                               "by default")

    def check(self) -> None:
        if self.val_images <= 0 or self.grid_images <= 0:
            raise ConfigError("--val_images and --grid_images must be > 0")


@dataclass
class ExtractConfig:
    """Stage 2: encode a dataset with a trained VQ-VAE export into WebDataset token shards + manifest.json."""

    PROG: ClassVar[str] = "extract_codes.py"
    GROUP: ClassVar[str] = "stage 2"
    checkpoint: str | None = flag(None, "stage-1 VQ-VAE export folder (runs/<name>/export)", required=True)
    split: list[str] = flag(["train"], "split(s) to extract; each merges into the same manifest", choices=SPLITS)
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


@dataclass
class PriorStageConfig:
    """Stage 3: train the autoregressive Transformer prior on token shards (``accelerate launch train_prior.py``)."""

    PROG: ClassVar[str] = "train_prior.py"
    GROUP: ClassVar[str] = "input"
    shards: str | None = flag(None, "stage-2 output folder (holds manifest.json)", required=True)
    checkpoint: str | None = flag(None, "tokenizer export used to decode sample grids (default: the path recorded "
                                  "in the manifest)")
    split: str = flag("train", "manifest split to train on", aliases=("--train_split",))
    val_split: str = flag("test", "held-out manifest split for bits/token (skipped if absent)")
    shuffle_buffer: int = flag(1000, "samples in the streaming shuffle buffer")
    num_workers: int = flag(0, "token-loading worker processes per process")
    val_batches: int = flag(50, "max held-out batches per evaluation")
    model: PriorFlags = part(PriorFlags, title="prior (transformer)")
    # The prior's own defaults: warm-up + cosine decay and AdamW weight decay, as GPT training does.
    train: TrainConfig = part(TrainConfig, title="training", lr_schedule="cosine", warmup_steps=100, weight_decay=0.05,
                              aliases={"lr": ("--lr_t",), "n_epochs": ("--n_epochs_t",)})
    sampling: SamplingConfig = part(SamplingConfig, title="samples during training", only=GRID_SAMPLING)

    def check(self) -> None:
        _positive(self, "num_workers", zero_ok=True)
        _positive(self, "val_batches", "shuffle_buffer")
        if self.sampling.num_samples <= 0:
            raise ConfigError("--num_samples must be > 0")


@dataclass
class SampleConfig:
    """Sample images: prior export -> token grids -> tokenizer export -> PNG grid + single PNGs + tokens.npy."""

    PROG: ClassVar[str] = "sample.py"
    GROUP: ClassVar[str] = "exports and output"
    checkpoint: str | None = flag(None, "tokenizer export folder (stage 1)", required=True)
    checkpoint_t: str | None = flag(None, "prior export folder (stage 3)", required=True)
    output_dir: str = flag(RunDir.SAMPLES, "where grid.png, images/ and tokens.npy go")
    batch_size: int = flag(64, "samples generated at once", aliases=("--sample_batch_size",))
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    mixed_precision: str = _precision("no", "autocast dtype of generation and decoding (GPU)", aliases=("--precision",),
                                      value_aliases={"fp32": "no"})
    sampling: SamplingConfig = part(SamplingConfig, title="sampling")

    def check(self) -> None:
        if self.sampling.num_samples <= 0 or self.batch_size <= 0:
            raise ConfigError("--num_samples and --batch_size must be > 0")


@dataclass
class EvalConfig:
    """Evaluate a run: tokenizer reconstruction over a split, prior samples vs the split, bits/token on held-out shards."""

    PROG: ClassVar[str] = "evaluate.py"
    GROUP: ClassVar[str] = "inputs and output"
    run_dir: str | None = flag(None, "run folder of VQVAE_T.py --train (holds vqvae/, prior/, shards/)")
    checkpoint: str | None = flag(None, "tokenizer export (default: <run_dir>/vqvae/export)")
    checkpoint_t: str | None = flag(None, "prior export (default: <run_dir>/prior/export; none: skip the prior)")
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
    data: DataConfig = part(DataConfig, title="data", dataset=None, only=("dataset", "data_dir", "num_workers"),
                            help={"dataset": "dataset to compare against (default: the one in the tokenizer export)"})
    sampling: SamplingConfig = part(SamplingConfig, title="sampling", num_samples=1000,
                                    only=GRID_SAMPLING + ("seed",), help={
                                        "num_samples": "images to generate for gFID/IS/precision/recall (0: skip)",
                                        "seed": "seed for sampling and the classifier"})

    def check(self) -> None:
        if self.sampling.num_samples < 0 or self.batch_size < 1 or self.pr_k < 1:
            raise ConfigError("need --num_samples >= 0, --batch_size >= 1, --pr_k >= 1")
        if self.sampling.num_samples == 1:
            raise ConfigError("--num_samples 1: FID/precision/recall need at least 2 samples (or 0 to skip the prior)")


# What VQVAE_T.py shares between its two trainers (each keeps its own stage defaults for the rest).
PIPELINE_TRAINING = ("batch_size", "n_epochs", "lr", "seed", "mixed_precision", "sample_and_save_freq", "no_wandb",
                     "wandb_project", "gradient_accumulation_steps", "max_grad_norm", "checkpointing_steps",
                     "checkpoints_total_limit", "max_bad_steps", "timeout_minutes")


@dataclass
class PipelineConfig:
    """One-command front end with the original VQVAE_T.py flags: ``--train`` (stages 1-3) and/or ``--sample``."""

    PROG: ClassVar[str] = "VQVAE_T.py"
    GROUP: ClassVar[str] = "what to run"
    train: bool = flag(False, "train stages 1-3 (resumable; finished stages are skipped)")
    sample: bool = flag(False, "sample from --checkpoint and --checkpoint_t")
    output_dir: str | None = flag(None, "run folder (default: runs/<dataset>)")
    checkpoint: str | None = flag(None, "tokenizer export for --sample (default: <output_dir>/vqvae/export)")
    checkpoint_t: str | None = flag(None, "prior export for --sample (default: <output_dir>/prior/export)")
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
