"""The VQ-VAE tokenizer's config (``train_vqvae.py``'s model flags, stored in every tokenizer export) and the
registry of quantizers. Torch-free: the model is :class:`vqgen.models.vqvae.VQVAE`.

A flag's name is the field's name and the export's key; exports written with earlier names load through
``RENAMED`` / ``ABSENT_MEANT`` (:class:`~vqgen.config.kinds.ModelConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from ..errors import ConfigError
from .flags import flag, int_list
from .kinds import ModelConfig, QuantizerKind, choices, describe

ARCHS = ("conv", "resnet")
ACTIVATIONS = ("relu", "silu")
DOWN_FIELDS = "stride, kernel, dilation, padding"
UP_FIELDS = "stride, kernel, dilation, padding, output_padding"


def _conv_out(size: int, stride: int, kernel: int, dilation: int, padding: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _deconv_out(size: int, stride: int, kernel: int, dilation: int, padding: int, output_padding: int) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def level_params(values: Sequence, per: int, levels: int, name: str) -> tuple[tuple[int, ...], ...]:
    """Flat ints (or per-level lists) -> ``levels`` tuples of ``per`` ints: one tuple broadcast to every level, or
    one per level. ConfigError otherwise."""
    flat: list[int] = []
    for v in values or []:
        flat.extend(int(x) for x in v) if isinstance(v, (list, tuple)) else flat.append(int(v))
    if len(flat) == per:
        return (tuple(flat),) * levels
    if len(flat) == per * levels:
        return tuple(tuple(flat[i * per:(i + 1) * per]) for i in range(levels))
    raise ConfigError(f"--{name} has {len(flat)} numbers; expected {per} (one level, repeated) or "
                      f"{per}*{levels}={per * levels} (one per level for {levels} levels)")


# The quantizer registry: a kind is one line here, its settings in VQVAEConfig (flag(..., kind=NAME)) and its module.
QUANTIZERS: dict[str, QuantizerKind] = {
    "vq": QuantizerKind("vqgen.models.quantizers.vq:VectorQuantizerEMA", "EMA codebook, dead-code restarts",
                        codebook_size=lambda c: c.num_embeddings, code_dim=lambda c: c.embedding_dim),
    "fsq": QuantizerKind("vqgen.models.quantizers.fsq:FSQ", "finite scalar quantization, no codebook",
                         codebook_size=lambda c: math.prod(c.fsq_levels), code_dim=lambda c: len(c.fsq_levels)),
    "lfq": QuantizerKind("vqgen.models.quantizers.lfq:LFQ", "lookup-free binary codes, entropy penalty",
                         codebook_size=lambda c: 2 ** c.lfq_bits, code_dim=lambda c: c.lfq_bits),
}


@dataclass(eq=False)  # ModelConfig.__eq__: the same model, however its flags were spelled
class VQVAEConfig(ModelConfig):
    """The VQ-VAE flags (the original tool's names and defaults, plus the quantizer's); ``in_channels`` and
    ``image_size`` come from the data (:meth:`build`)."""

    KIND_FIELD: ClassVar[str] = "quantizer"
    NAME: ClassVar[str] = "VQ-VAE"
    RENAMED: ClassVar[dict] = {"decay": "ema_decay", "epsilon": "ema_epsilon", "arch": "vq_arch",
                               "attention": "vq_attention"}
    ABSENT_MEANT: ClassVar[dict] = {"quantizer": "vq", "codebook_l2": False, "vq_arch": "conv",
                                    "vq_attention": False, "norm_groups": 32}

    in_channels: int = 1
    image_size: int = 32
    num_res_layers: int = flag(2, "residual units per level in encoder and decoder")
    downsample_parameters: list[int] = flag(
        [2, 4, 1, 1], "encoder strided conv per level as 'stride kernel dilation padding': 4 numbers (all levels) "
        "or 4 per level, e.g. \"2 4 1 1\"", type=int_list, metavar="S K D P")
    upsample_parameters: list[int] = flag(
        [2, 4, 1, 1, 0], "decoder transposed conv per level as 'stride kernel dilation padding output_padding': 5 "
        "numbers (all levels) or 5 per level, e.g. \"2 4 1 1 0\"", type=int_list, metavar="S K D P OP")
    num_channels: list[int] = flag([256, 256], "channels per level; the number of values is the number of levels")
    num_res_channels: list[int] = flag([256, 256], "channels inside the residual units, one per level")
    vq_arch: str = flag("conv", "encoder/decoder blocks: conv (MONAI's ReLU residual units) or resnet (taming/"
                        "LlamaGen GroupNorm + swish ResNet blocks); opt-in", choices=ARCHS)
    vq_attention: bool = flag(False, "with --vq_arch resnet: self-attention at the lowest resolution")
    norm_groups: int = flag(32, "GroupNorm groups of --vq_arch resnet (fewer when the channels do not divide)")
    activation: str = "relu"
    quantizer: str = flag("vq", f"how encoder outputs become tokens: {describe(QUANTIZERS)}; each kind's settings "
                          "are listed below", choices=choices(QUANTIZERS))
    num_embeddings: int = flag(256, "codebook size K", kind="vq")
    embedding_dim: int = flag(8, "code vector dimension (8 with the l2 codebook, LlamaGen's choice)", kind="vq")
    commitment_cost: float = flag(0.25, "weight of the commitment loss ||z - sg(q)||^2", kind=("vq", "lfq"))
    ema_decay: float = flag(0.99, "EMA decay of the codebook statistics", kind="vq")
    ema_epsilon: float = flag(1e-5, "Laplace smoothing of the EMA cluster sizes", kind="vq")
    dead_code_threshold: float = flag(1.0, "restart codes that won fewer than this many vectors per step (all "
                                      "ranks) over the last --restart_every steps; 0 disables", kind="vq")
    restart_every: int = flag(10, "the dead-code window: checked every this many training steps", kind="vq")
    codebook_l2: bool = flag(True, "l2-normalised codebook and encoder outputs (LlamaGen's low-dimensional "
                             "codebook, with --embedding_dim 8)", kind="vq")
    init_kmeans_iters: int = 10   # Lloyd iterations refining the codebook's data initialisation
    fsq_levels: list[int] = flag([8, 5, 5, 5], "levels per code channel (codes = their product; the channels = their "
                                 "count); each >= 3, e.g. 8 5 5 5 = 1000 codes, 8 8 8 5 5 5 = 64000", kind="fsq")
    lfq_bits: int = flag(10, "bits per code (codes = 2^bits, channels = bits), up to 20", kind="lfq")
    lfq_entropy_weight: float = flag(0.1, "weight of the entropy penalty (per-sample entropy minus "
                                     "--lfq_diversity_gamma x codebook entropy)", kind="lfq")
    lfq_diversity_gamma: float = flag(1.0, "weight of the codebook-entropy term inside the penalty (higher: more "
                                      "codes used)", kind="lfq")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.num_channels)

    @property
    def down_levels(self) -> tuple[tuple[int, ...], ...]:
        """(stride, kernel, dilation, padding) of each level's strided conv."""
        return level_params(self.downsample_parameters, 4, self.num_levels, "downsample_parameters")

    @property
    def up_levels(self) -> tuple[tuple[int, ...], ...]:
        """(stride, kernel, dilation, padding, output_padding) of each decoder level (level 0 is the deepest)."""
        return level_params(self.upsample_parameters, 5, self.num_levels, "upsample_parameters")

    def encoder_sizes(self) -> list[int]:
        sizes = [self.image_size]
        for p in self.down_levels:
            sizes.append(_conv_out(sizes[-1], *p))
        return sizes

    def decoder_sizes(self) -> list[int]:
        sizes = [self.encoder_sizes()[-1]]
        for p in self.up_levels:
            sizes.append(_deconv_out(sizes[-1], *p))
        return sizes

    @property
    def latent_size(self) -> tuple[int, int]:
        s = self.encoder_sizes()[-1]
        return (s, s)

    @property
    def codebook_size(self) -> int:
        """Number of distinct tokens (the prior's vocabulary)."""
        return QUANTIZERS[self.quantizer].codebook_size(self)

    @property
    def code_dim(self) -> int:
        """Channels of the encoder's output (one code vector per latent position)."""
        return QUANTIZERS[self.quantizer].code_dim(self)

    def build(self, in_channels: int, image_size: int) -> "VQVAEConfig":
        """These flags + the data's channels and size -> a validated config of the model to build."""
        cfg = dataclasses.replace(self, in_channels=int(in_channels), image_size=int(image_size))
        cfg.validate()
        return cfg

    # ---- checks --------------------------------------------------------------------------------------------
    @classmethod
    def upgrade(cls, d: dict) -> dict:
        d = super().upgrade(d)
        for name in ("downsample_parameters", "upsample_parameters", "num_channels", "num_res_channels"):
            if isinstance(d.get(name), (list, tuple)):  # earlier exports: per-level lists
                flat = []
                for v in d[name]:
                    flat.extend(v) if isinstance(v, (list, tuple)) else flat.append(v)
                d[name] = [int(x) for x in flat]
        return d

    def to_dict(self) -> dict:
        """As exports and run records store it: the level parameters spelled out for every level."""
        d = super().to_dict()
        d["downsample_parameters"] = [x for level in self.down_levels for x in level]
        d["upsample_parameters"] = [x for level in self.up_levels for x in level]
        return d

    def check(self) -> None:
        L = self.num_levels
        if L < 1:
            raise ConfigError("--num_channels needs at least one value (one per level)")
        if len(self.num_res_channels) != L:
            raise ConfigError(f"--num_res_channels has {len(self.num_res_channels)} values but --num_channels has "
                              f"{L} (one per level): {list(self.num_res_channels)} vs {list(self.num_channels)}")
        for name in ("num_channels", "num_res_channels"):
            if any(c <= 0 for c in getattr(self, name)):
                raise ConfigError(f"--{name} must be positive, got {list(getattr(self, name))}")
        if self.num_res_layers < 0 or self.norm_groups < 1:
            raise ConfigError(f"need --num_res_layers >= 0 and --norm_groups >= 1, got {self.num_res_layers}, "
                              f"{self.norm_groups}")
        if self.vq_attention and self.vq_arch != "resnet":
            raise ConfigError("--vq_attention needs --vq_arch resnet")
        if self.activation not in ACTIVATIONS or self.vq_arch not in ARCHS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS} and vq_arch one of {ARCHS}")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"--quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        for name, levels, per, what in (("downsample_parameters", self.down_levels, 4, DOWN_FIELDS),
                                        ("upsample_parameters", self.up_levels, 5, UP_FIELDS)):
            for i, p in enumerate(levels):
                s, k, d, pad = p[:4]
                if s < 1 or k < 1 or d < 1 or pad < 0:
                    raise ConfigError(f"--{name} level {i} = {list(p)} ({what}): need stride, kernel, dilation >= 1 "
                                      f"and padding >= 0")
                if per == 5 and not 0 <= p[4] < max(s, d):
                    raise ConfigError(f"--{name} level {i} = {list(p)}: output_padding must be >= 0 and smaller "
                                      f"than stride or dilation (PyTorch ConvTranspose2d rule)")
        if self.quantizer == "vq":
            self._check_vq()
        elif self.quantizer == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 3):
            raise ConfigError(f"--fsq_levels needs values >= 3 (2 levels cannot be centred on 0: use --quantizer lfq "
                              f"for binary codes), got {list(self.fsq_levels)}")
        elif self.quantizer == "lfq" and not 1 <= self.lfq_bits <= 20:
            raise ConfigError(f"--lfq_bits must be in [1, 20], got {self.lfq_bits}")

    def _check_vq(self) -> None:
        if self.num_embeddings <= 0 or self.embedding_dim <= 0:
            raise ConfigError(f"need --num_embeddings > 0 and --embedding_dim > 0, got {self.num_embeddings}, "
                              f"{self.embedding_dim}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_epsilon <= 0 or self.commitment_cost < 0 or self.dead_code_threshold < 0:
            raise ConfigError(f"need --ema_epsilon > 0, --commitment_cost >= 0, --dead_code_threshold >= 0; got "
                              f"{self.ema_epsilon}, {self.commitment_cost}, {self.dead_code_threshold}")
        if self.restart_every < 1 or self.init_kmeans_iters < 0:
            raise ConfigError(f"need --restart_every >= 1 and init_kmeans_iters >= 0; got {self.restart_every}, "
                              f"{self.init_kmeans_iters}")

    def validate(self) -> None:
        self.check()
        if self.in_channels <= 0 or self.image_size <= 0:
            raise ConfigError(f"in_channels and image_size must be > 0, got {self.in_channels}, {self.image_size}")
        enc = self.encoder_sizes()
        if min(enc) < 1:
            raise ConfigError(f"--downsample_parameters shrink {self.image_size}x{self.image_size} images to nothing: "
                              f"encoder sizes {' -> '.join(map(str, enc))}; use fewer levels or smaller strides")
        dec = self.decoder_sizes()
        if min(dec) < 1 or dec[-1] != self.image_size:
            raise ConfigError(f"the decoder does not give back the image size: encoder {' -> '.join(map(str, enc))}, "
                              f"decoder {' -> '.join(map(str, dec))} (expected {self.image_size}); adjust "
                              f"--upsample_parameters ({UP_FIELDS}) or --downsample_parameters")
