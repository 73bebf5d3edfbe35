"""The prior's config (``train_prior.py``'s model flags, stored in every prior export) and the registry of prior
kinds. Torch-free: the models live in :mod:`vqgen.models.priors`.

A flag's name is the field's name and the export's key; exports written with earlier names load through
``RENAMED`` / ``ABSENT_MEANT`` (:class:`~vqgen.config.kinds.ModelConfig`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .flags import flag
from .kinds import Kind, ModelConfig, choices, describe

PRIOR_NORMS, PRIOR_MLPS = ("layer", "rms"), ("gelu", "swiglu")

# The prior registry: a kind is one line here, its settings in PriorConfig (flag(..., kind=NAME)) and its module.
PRIORS: dict[str, Kind] = {
    "ar": Kind("vqgen.models.priors.ar:ARPrior", "GPT over the token grid in raster order, KV-cache sampling"),
}


@dataclass(eq=False)  # ModelConfig.__eq__: the same model, however its flags were spelled
class PriorConfig(ModelConfig):
    """The prior flags (the original tool's names and defaults, plus vqgen's); vocabulary, grid and classes come
    from the shards (:meth:`build`)."""

    KIND_FIELD: ClassVar[str] = "prior_kind"
    NAME: ClassVar[str] = "prior"
    RENAMED: ClassVar[dict] = {"dim": "attn_layers_dim", "depth": "attn_layers_depth", "heads": "attn_layers_heads",
                               "dropout": "attn_dropout", "norm": "prior_norm", "mlp": "prior_mlp"}
    ABSENT_MEANT: ClassVar[dict] = {"prior_kind": "ar", "prior_norm": "layer", "prior_mlp": "gelu", "rope": False,
                                    "token_factors": 1, "factor_layers": 1}

    vocab_size: int = 0                 # the tokenizer's codebook size
    latent_h: int = 0
    latent_w: int = 0
    num_classes: int = 0                # 0 = unconditional
    prior_kind: str = flag("ar", f"kind of prior: {describe(PRIORS)}", choices=choices(PRIORS))
    attn_layers_dim: int = flag(96, "transformer width (embedding dimension)")
    attn_layers_depth: int = flag(12, "number of transformer blocks")
    attn_layers_heads: int = flag(8, "attention heads (must divide the width)")
    attn_dropout: float = flag(0.0, "dropout on attention probabilities and residual branches during training")
    class_dropout: float = flag(0.1, "probability of replacing a label by the null class in training (enables "
                                "--cfg_scale)")
    prior_norm: str = flag("layer", "normalisation layers of the prior (rms: LLaMA's RMSNorm); opt-in",
                           choices=PRIOR_NORMS)
    prior_mlp: str = flag("gelu", "MLP of the prior's blocks (swiglu: LLaMA's, same parameter count); opt-in",
                          choices=PRIOR_MLPS)
    rope: bool = flag(False, "2D rotary position embedding (row/column) on the prior's queries and keys, on top of "
                      "the learned positions (head dimension divisible by 4); opt-in")
    token_factors: int = flag(1, "split each token id into this many sub-tokens (its bits, most significant first): "
                              "the input sums K small tables and the output predicts the K sub-tokens in turn within "
                              "a token (Open-MAGVIT2's factorised head) instead of two vocabulary x width tables, "
                              "meant for large vocabularies (2^14 codes and up); 1: off", metavar="K")
    factor_layers: int = flag(1, "with --token_factors > 1: Transformer blocks over (hidden state, embeddings of the "
                              "sub-tokens drawn so far) that predict a token's sub-tokens")
    mlp_ratio: float = 4.0

    @property
    def seq_len(self) -> int:
        return self.latent_h * self.latent_w

    @property
    def null_class(self) -> int:
        """Index of the unconditional ("null") row of the class embedding."""
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return self.attn_layers_dim // self.attn_layers_heads

    @property
    def factor_bits(self) -> tuple[int, ...]:
        """Bits of each sub-token, most significant first (the token's ceil(log2 vocab) bits, split as evenly as
        possible, the larger parts first); ``(bits,)`` when ``token_factors`` is 1."""
        total = max(1, (self.vocab_size - 1).bit_length())
        q, r = divmod(total, self.token_factors)
        return (q + 1,) * r + (q,) * (self.token_factors - r)

    def build(self, vocab_size: int, latent_h: int, latent_w: int, num_classes: int) -> "PriorConfig":
        """These flags + what the shards say -> a validated config of the model to build."""
        cfg = dataclasses.replace(self, vocab_size=int(vocab_size), latent_h=int(latent_h), latent_w=int(latent_w),
                                  num_classes=max(int(num_classes), 0))
        cfg.validate()
        return cfg

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"prior config: {msg}")
        need(self.prior_kind in PRIORS, f"--prior_kind must be one of {', '.join(PRIORS)}, got {self.prior_kind!r}")
        need(self.attn_layers_dim >= 1 and self.attn_layers_depth >= 1 and self.attn_layers_heads >= 1,
             f"--attn_layers_dim/_depth/_heads must be >= 1, got {self.attn_layers_dim}/{self.attn_layers_depth}/"
             f"{self.attn_layers_heads}")
        need(self.attn_layers_dim % self.attn_layers_heads == 0,
             f"--attn_layers_dim ({self.attn_layers_dim}) must be divisible by --attn_layers_heads "
             f"({self.attn_layers_heads})")
        need(0.0 <= self.attn_dropout < 1.0, f"--attn_dropout must be in [0, 1), got {self.attn_dropout}")
        need(0.0 <= self.class_dropout < 1.0, f"--class_dropout must be in [0, 1), got {self.class_dropout}")
        need(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        need(self.prior_norm in PRIOR_NORMS and self.prior_mlp in PRIOR_MLPS,
             f"--prior_norm must be one of {PRIOR_NORMS} and --prior_mlp one of {PRIOR_MLPS}")
        need(1 <= self.token_factors <= 8 and self.factor_layers >= 1,
             f"--token_factors must be in [1, 8] and --factor_layers >= 1, got {self.token_factors}, "
             f"{self.factor_layers}")
        need(not self.rope or self.head_dim % 4 == 0,
             f"--rope needs a head dimension (--attn_layers_dim / --attn_layers_heads = {self.head_dim}) divisible "
             f"by 4")

    def validate(self) -> None:
        self.check()
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 2):
            raise ConfigError(f"prior config: vocab_size must be >= 2, got {self.vocab_size}")
        if min(self.factor_bits) < 1:
            raise ConfigError(f"prior config: --token_factors {self.token_factors} is more than the "
                              f"{sum(self.factor_bits)} bits of a {self.vocab_size}-code token")
        if self.latent_h < 1 or self.latent_w < 1 or self.num_classes < 0:
            raise ConfigError(f"prior config: the token grid must be >= 1x1 and num_classes >= 0 (0 = "
                              f"unconditional), got {self.latent_h}x{self.latent_w}, {self.num_classes}")
