"""VQ-VAE tokenizer: conv encoder → EMA vector quantiser → conv decoder, with any number of levels.

Adapted from: MONAI ``monai/networks/nets/vqvae.py`` (the seed's model; same block structure: per level a
strided conv + residual units, a 3x3 conv to/from the embedding, transposed convs back up), rewritten with plain
``nn.Conv2d``/``nn.ConvTranspose2d`` (no Dropout(0) or wrapper layers; channels-last friendly) and the quantiser in
:mod:`vqgen.quantizer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..export import Export, Exportable
from ..hub import HubMixin
from .blocks import build_resnet_decoder, build_resnet_encoder
from .optim import adamw
from .quantizer import VectorQuantizerEMA

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "silu": lambda: nn.SiLU()}
ARCHS = ("conv", "resnet")
DOWN_FIELDS = "stride, kernel, dilation, padding"
UP_FIELDS = "stride, kernel, dilation, padding, output_padding"


def _conv_out(size: int, stride: int, kernel: int, dilation: int, padding: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _deconv_out(size: int, stride: int, kernel: int, dilation: int, padding: int, output_padding: int) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def level_params(values: Sequence, per: int, levels: int, flag: str) -> tuple[tuple[int, ...], ...]:
    """Flat ints or nested lists → ``levels`` tuples of ``per`` ints: one tuple broadcast to all levels, or one per
    level. ConfigError otherwise."""
    flat: list[int] = []
    for v in values or []:  # ``nargs='+'`` of "2 4 1 1" strings gives nested lists: [[2, 4, 1, 1], ...]
        if isinstance(v, (list, tuple)):
            flat.extend(int(x) for x in v)
        else:
            flat.append(int(v))
    if len(flat) == per:
        return (tuple(flat),) * levels
    if len(flat) == per * levels:
        return tuple(tuple(flat[i * per:(i + 1) * per]) for i in range(levels))
    raise ConfigError(f"{flag} has {len(flat)} numbers; expected {per} (one level, repeated) or "
                      f"{per}*{levels}={per * levels} (one per level for {levels} levels)")


@dataclass
class VQVAEConfig:
    """Everything needed to rebuild a VQ-VAE; ``asdict`` goes into every export.

    ``downsample_parameters``: per level (stride, kernel, dilation, padding) of the encoder's strided conv.
    ``upsample_parameters``: per level (stride, kernel, dilation, padding, output_padding) of the decoder's
    transposed conv (level 0 of the decoder is the deepest). ``dead_code_threshold``: a code that won fewer than
    this many vectors per training step (summed over ranks) over the last ``restart_every`` steps is restarted at
    an encoder output drawn in proportion to its quantisation error (see :mod:`vqgen.models.quantizer`); 1.0
    (OpenAI Jukebox's choice; EnCodec uses 2) means "wins less than one vector per step"; 0 disables restarts.
    ``restart_every``: the length of that window, in training steps. ``init_kmeans_iters``: Lloyd iterations
    refining the codebook initialisation from the first batch (0 = random encoder outputs only).
    """

    in_channels: int = 1
    image_size: int = 32
    num_channels: tuple[int, ...] = (256, 256)
    num_res_channels: tuple[int, ...] = (256, 256)
    num_res_layers: int = 2
    downsample_parameters: tuple[tuple[int, int, int, int], ...] = ((2, 4, 1, 1), (2, 4, 1, 1))
    upsample_parameters: tuple[tuple[int, int, int, int, int], ...] = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    num_embeddings: int = 256
    embedding_dim: int = 32
    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 1.0
    restart_every: int = 10
    init_kmeans_iters: int = 10
    activation: str = "relu"
    arch: str = "conv"            # "conv": MONAI's ReLU residual units; "resnet": GroupNorm + swish blocks (blocks.py)
    attention: bool = False       # "resnet" only: self-attention at the lowest resolution (encoder and decoder)
    norm_groups: int = 32         # "resnet" only: GroupNorm groups (fewer when the channels do not divide)
    codebook_l2: bool = False     # l2-normalised codes and encoder outputs (LlamaGen); pair with a small embedding_dim

    def __post_init__(self):
        self.num_channels = tuple(int(c) for c in self.num_channels)
        self.num_res_channels = tuple(int(c) for c in self.num_res_channels)
        L = len(self.num_channels)
        # One set of level params means "the same for every level" (the seed's "2 4 1 1", MONAI's flat tuple):
        # a flat (s, k, d, p[, op]) tuple, or per-level tuples that are all identical (e.g. the defaults with
        # another number of levels), is broadcast to all L levels. Differing per-level tuples stay as given and
        # validate() insists on exactly L of them.
        for name, per in (("downsample_parameters", 4), ("upsample_parameters", 5)):
            v = getattr(self, name)
            if len(v) == per and all(isinstance(x, int) for x in v):
                v = (tuple(v),)
            v = tuple(tuple(int(x) for x in p) if isinstance(p, (list, tuple)) else p for p in v)
            if L and len(v) not in (0, L) and all(p == v[0] for p in v):
                v = (v[0],) * L
            setattr(self, name, v)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        """Rebuild from ``asdict``/JSON (lists become tuples); unknown fields → ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown VQ-VAE config field(s): {', '.join(unknown)}")
        try:
            cfg = cls(**d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid VQ-VAE config: {e}") from None
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_levels(self) -> int:
        return len(self.num_channels)

    def encoder_sizes(self) -> list[int]:
        sizes = [self.image_size]
        for p in self.downsample_parameters:
            sizes.append(_conv_out(sizes[-1], *p))
        return sizes

    def decoder_sizes(self) -> list[int]:
        sizes = [self.encoder_sizes()[-1]]
        for p in self.upsample_parameters:
            sizes.append(_deconv_out(sizes[-1], *p))
        return sizes

    @property
    def latent_size(self) -> tuple[int, int]:
        s = self.encoder_sizes()[-1]
        return (s, s)

    def validate(self) -> None:
        L = self.num_levels
        if L < 1:
            raise ConfigError("num_channels must list at least one level")
        if len(self.num_res_channels) != L:
            raise ConfigError(f"num_res_channels has {len(self.num_res_channels)} values but num_channels has {L} "
                              f"(one per level): {list(self.num_res_channels)} vs {list(self.num_channels)}")
        for name, value in (("num_channels", self.num_channels), ("num_res_channels", self.num_res_channels)):
            if any(c <= 0 for c in value):
                raise ConfigError(f"{name} must be positive, got {list(value)}")
        for name in ("in_channels", "image_size", "num_embeddings", "embedding_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_res_layers < 0:
            raise ConfigError(f"num_res_layers must be >= 0, got {self.num_res_layers}")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"decay (EMA) must be in (0, 1), got {self.decay}")
        if self.epsilon <= 0 or self.commitment_cost < 0 or self.dead_code_threshold < 0:
            raise ConfigError(f"need epsilon > 0, commitment_cost >= 0, dead_code_threshold >= 0; got "
                              f"{self.epsilon}, {self.commitment_cost}, {self.dead_code_threshold}")
        if self.restart_every < 1 or self.init_kmeans_iters < 0:
            raise ConfigError(f"need restart_every >= 1 and init_kmeans_iters >= 0; got {self.restart_every}, "
                              f"{self.init_kmeans_iters}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.attention and self.arch != "resnet":
            raise ConfigError("attention (--vq_attention) needs arch 'resnet' (--vq_arch resnet)")
        if self.norm_groups < 1:
            raise ConfigError(f"norm_groups must be >= 1, got {self.norm_groups}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for name, params, per, what in (("downsample_parameters", self.downsample_parameters, 4, DOWN_FIELDS),
                                        ("upsample_parameters", self.upsample_parameters, 5, UP_FIELDS)):
            if len(params) != L or any(not isinstance(p, tuple) or len(p) != per for p in params):
                raise ConfigError(f"{name} must hold {L} tuples of {per} ints ({what}), one per level; got "
                                  f"{[list(p) if isinstance(p, tuple) else p for p in params]}")
            for i, p in enumerate(params):
                s, k, d, pad = p[:4]
                if s < 1 or k < 1 or d < 1 or pad < 0:
                    raise ConfigError(f"{name} level {i} = {list(p)} ({what}): need stride, kernel, dilation >= 1 "
                                      f"and padding >= 0")
                if per == 5 and not 0 <= p[4] < max(s, d):
                    raise ConfigError(f"{name} level {i} = {list(p)}: output_padding must be >= 0 and smaller than "
                                      f"stride or dilation (PyTorch ConvTranspose2d rule)")
        enc = self.encoder_sizes()
        if min(enc) < 1:
            raise ConfigError(f"downsample_parameters shrink {self.image_size}x{self.image_size} images to nothing: "
                              f"encoder sizes {' -> '.join(map(str, enc))}; use fewer levels or smaller strides")
        dec = self.decoder_sizes()
        if min(dec) < 1 or dec[-1] != self.image_size:
            raise ConfigError(f"the decoder does not give back the image size: encoder {' -> '.join(map(str, enc))}, "
                              f"decoder {' -> '.join(map(str, dec))} (expected {self.image_size}); adjust "
                              f"upsample_parameters ({UP_FIELDS}) or downsample_parameters")


# ---------------------------------------------------------------------------------------------------------------
class ResidualUnit(nn.Module):
    """act(x + conv3x3(act(conv3x3(x)))) as in MONAI's VQVAEResidualUnit."""

    def __init__(self, channels: int, res_channels: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.act1 = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(res_channels, channels, 3, padding=1)
        self.act2 = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act1(self.conv1(x)))
        return self.act2(h.add_(x))  # in place on a fresh tensor: conv backward does not need its output


def build_encoder(cfg: VQVAEConfig) -> nn.Sequential:
    if cfg.arch == "resnet":
        return build_resnet_encoder(cfg)
    layers: list[nn.Module] = []
    prev = cfg.in_channels
    for ch, res, (s, k, d, p) in zip(cfg.num_channels, cfg.num_res_channels, cfg.downsample_parameters):
        layers += [nn.Conv2d(prev, ch, k, stride=s, padding=p, dilation=d), ACTIVATIONS[cfg.activation]()]
        layers += [ResidualUnit(ch, res, cfg.activation) for _ in range(cfg.num_res_layers)]
        prev = ch
    layers.append(nn.Conv2d(prev, cfg.embedding_dim, 3, padding=1))
    return nn.Sequential(*layers)


def build_decoder(cfg: VQVAEConfig) -> nn.Sequential:
    if cfg.arch == "resnet":
        return build_resnet_decoder(cfg)
    chans, res_chans = cfg.num_channels[::-1], cfg.num_res_channels[::-1]
    L = cfg.num_levels
    layers: list[nn.Module] = [nn.Conv2d(cfg.embedding_dim, chans[0], 3, padding=1)]
    for i, (s, k, d, p, op) in enumerate(cfg.upsample_parameters):
        layers += [ResidualUnit(chans[i], res_chans[i], cfg.activation) for _ in range(cfg.num_res_layers)]
        last = i == L - 1
        out = cfg.in_channels if last else chans[i + 1]
        layers.append(nn.ConvTranspose2d(chans[i], out, k, stride=s, padding=p, output_padding=op, dilation=d))
        if not last:
            layers.append(ACTIVATIONS[cfg.activation]())
    return nn.Sequential(*layers)


class VQVAEOutput(NamedTuple):
    recon: torch.Tensor       # (B, C, H, W)
    vq_loss: torch.Tensor     # scalar fp32 commitment loss
    indices: torch.Tensor     # (B, h, w) long
    perplexity: torch.Tensor  # scalar


class VQVAE(Exportable, nn.Module, HubMixin, tags=["vq-vae", "image-tokenizer"]):
    """Conv VQ-VAE tokenizer. ``from_pretrained``/``save_pretrained``/``push_to_hub``: see :mod:`vqgen.hub`."""

    EXPORT_KIND = "vqvae"

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = build_encoder(config)
        self.quantizer = VectorQuantizerEMA(config.num_embeddings, config.embedding_dim, config.commitment_cost,
                                            config.decay, config.epsilon, config.dead_code_threshold,
                                            config.restart_every, config.init_kmeans_iters, config.codebook_l2)
        self.decoder = build_decoder(config)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output layer: where the VQGAN adaptive weight compares gradient norms."""
        return self.decoder[-1].weight

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        q = self.quantizer(self.encoder(x))
        return VQVAEOutput(self.decoder(q.quantized), q.loss, q.indices, q.perplexity)

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → code indices (B, h, w) long. Never updates the codebook, in any mode."""
        return self.quantizer.indices_of(self.encoder(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) (or (B, h*w)) → images (B, C, H, W)."""
        h, w = self.config.latent_size
        if indices.dim() == 2 and indices.shape[1] == h * w:
            indices = indices.view(-1, h, w)
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (h, w):
            raise ValueError(f"decode_indices expects (B, {h}, {w}) code indices, got {tuple(indices.shape)}")
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.num_embeddings):
            raise ValueError(f"code indices must be in [0, {self.config.num_embeddings}), got "
                             f"[{int(indices.min())}, {int(indices.max())}] (tokens from another tokenizer?)")
        return self.decoder(self.quantizer.embed(indices))

    def configure_optimizer(self, lr: float, weight_decay: float, device_type: str) -> torch.optim.Optimizer:
        """AdamW with the usual betas (0.9, 0.999) of convolutional autoencoders (MONAI, taming)."""
        return adamw(self, lr, weight_decay, (0.9, 0.999), device_type)

    # ---- exports ---------------------------------------------------------------------------------------------
    @classmethod
    def from_loaded_export(cls, exp: Export) -> "VQVAE":
        try:
            cfg = VQVAEConfig.from_dict(dict(exp.config))
        except ConfigError as e:
            raise CheckpointError(f"{exp.path}: its config is not a valid VQ-VAE config ({e})") from None
        model = cls(cfg)
        _check_state_dict(model, exp.state_dict, exp.path)
        model.load_state_dict(exp.state_dict, strict=True)
        return model


def _check_state_dict(model: nn.Module, sd: dict, where) -> None:
    """A short, readable CheckpointError instead of load_state_dict's wall of keys."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    # The codebook first: its shape (K, D) is usually the most telling difference.
    keys = sorted(want, key=lambda k: not k.startswith("quantizer."))
    shapes = [f"{k}: export {list(sd[k].shape)} vs config {list(want[k].shape)}"
              for k in keys if k in sd and sd[k].shape != want[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 2} more)" if len(items) > 2 else ""
            parts.append(f"{len(items)} {label}: {'; '.join(items[:2])}{more}")
    raise CheckpointError(f"{where}: the weights do not match the VQ-VAE config stored with them ({' | '.join(parts)})."
                          f" The export is corrupt or was assembled from two different models; re-export it.")
