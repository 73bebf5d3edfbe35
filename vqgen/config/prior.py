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
PRIOR_ORDERS = ("raster", "random")       # --order of the AR prior in training
# A MaskGIT prior's own sampling defaults (sample.py's --decode_steps / --choice_temperature when not given):
# MaskGIT's 8 steps at 256 tokens and its choice temperature.
MASKGIT_DECODE_STEPS, MASKGIT_CHOICE_TEMPERATURE = 8, 4.5

# The prior registry: a kind is one line here, its settings in PriorConfig (flag(..., kind=NAME)) and its module.
PRIORS: dict[str, Kind] = {
    "ar": Kind("vqgen.models.priors.ar:ARPrior", "GPT over the token grid in raster order, KV-cache sampling"),
    "maskgit": Kind("vqgen.models.priors.maskgit:MaskGITPrior", "bidirectional transformer over masked tokens, "
                    "parallel decoding in --decode_steps steps"),
}
# Sampling settings only some kinds take (a given one is refused for the other kinds: one error line).
KIND_SAMPLING: dict[str, tuple[str, ...]] = {"maskgit": ("decode_steps", "choice_temperature")}


def check_kind_sampling(kind: str, settings: dict) -> None:
    """ConfigError when ``settings`` (sampling name -> value) sets one that a ``kind`` prior does not take."""
    for name, value in settings.items():
        owners = [k for k, names in KIND_SAMPLING.items() if name in names]
        if value is not None and owners and kind not in owners:
            raise ConfigError(f"--{name} is a sampling setting of --prior_kind {' / '.join(owners)}, but this prior "
                              f"is '{kind}'")


@dataclass(eq=False)  # ModelConfig.__eq__: the same model, however its flags were spelled
class PriorConfig(ModelConfig):
    """The prior flags (the original tool's names and defaults, plus vqgen's); vocabulary, grid and classes come
    from the shards (:meth:`build`)."""

    KIND_FIELD: ClassVar[str] = "prior_kind"
    NAME: ClassVar[str] = "prior"
    RENAMED: ClassVar[dict] = {"dim": "attn_layers_dim", "depth": "attn_layers_depth", "heads": "attn_layers_heads",
                               "dropout": "attn_dropout", "norm": "prior_norm", "mlp": "prior_mlp"}
    ABSENT_MEANT: ClassVar[dict] = {"prior_kind": "ar", "prior_norm": "layer", "prior_mlp": "gelu", "rope": False,
                                    "token_factors": 1, "factor_layers": 1, "order": "raster"}

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
    order: str = flag("raster", "token order in training: raster, or random (RAR: each sequence in a random "
                      "permutation, with the position of the token to predict added to each input; the share of "
                      "permuted sequences falls from 1 to 0 over --order_anneal_start..--order_anneal_end, so training "
                      "ends in raster order; sampling is raster order with the KV cache)", choices=PRIOR_ORDERS,
                      kind="ar")
    order_anneal_start: float = flag(0.5, "--order random: fraction of the run's optimizer steps until which every "
                                     "sequence is permuted (RAR: epoch 200 of 400)", kind="ar")
    order_anneal_end: float = flag(0.75, "--order random: fraction of the run's optimizer steps from which none is "
                                   "(linear in between; RAR: epoch 300 of 400)", kind="ar")
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
    def random_order_share(self, progress: float | None) -> float:
        """The share of training sequences drawn in a random order at ``progress`` (optimizer steps done / the
        run's steps; None: 0): 1 until --order_anneal_start, then linearly down to 0 at --order_anneal_end (RAR's
        ``get_rar_random_ratio``). 0 for --order raster."""
        if self.order != "random":
            return 0.0
        p, start, end = progress or 0.0, self.order_anneal_start, self.order_anneal_end
        if p < start:
            return 1.0
        if p >= end:
            return 0.0
        return 1.0 - (p - start) / (end - start)

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
        need(self.order in PRIOR_ORDERS, f"--order must be one of {', '.join(PRIOR_ORDERS)}, got {self.order!r}")
        need(0.0 <= self.order_anneal_start <= self.order_anneal_end <= 1.0,
             f"need 0 <= --order_anneal_start <= --order_anneal_end <= 1, got {self.order_anneal_start} and "
             f"{self.order_anneal_end}")
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
