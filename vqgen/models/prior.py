"""The prior family: what every kind of prior (``--prior_kind``) shares and how one is built or loaded.

A prior maps token grids (B, T = h*w) and class labels to :class:`PriorOutput` (logits and the tokens they predict)
in training, and draws token grids in :meth:`Prior.sample_tokens`; :func:`build_prior` and :func:`load_prior`
dispatch on the config's ``prior_kind`` through :data:`vqgen.config.PRIORS`. The class embedding's last row is the
"null" class of unconditional priors and of classifier-free guidance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CFG_POWER, PRIORS, PriorConfig
from ..errors import CheckpointError, ConfigError
from ..export import Export, Exportable
from ..generation import read_generation_config, write_generation_config
from ..hub import HubMixin
from .optim import adamw
from .priors.heads import split_ids

IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index)


class PriorOutput(NamedTuple):
    # (B, T, vocab); from a factorised head (--token_factors K), a tuple of K (B, T, 2^bits_j): the logits of the
    # token's sub-tokens, most significant bits first, each given the ones before it
    logits: torch.Tensor | tuple[torch.Tensor, ...]
    targets: torch.Tensor  # (B, T) long: the token each row of logits predicts; IGNORE where nothing is scored


def token_cross_entropy(logits: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of ``logits (B, T, vocab)`` against ``targets (B, T)``, in fp32 (bf16 logits would lose
    the small probabilities); IGNORE targets are skipped. Factorised logits (a tuple): the sum of the sub-tokens'
    cross-entropies, which is the token's. The one definition behind training, validation and evaluate.py."""
    if isinstance(logits, tuple):
        bits = tuple(lg.shape[-1].bit_length() - 1 for lg in logits)             # widths are 2^bits_j
        subs = split_ids(targets.clamp_min(0), bits).masked_fill((targets == IGNORE)[..., None], IGNORE)
        return sum(token_cross_entropy(lg, subs[..., j], reduction) for j, lg in enumerate(logits))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction,
                           ignore_index=IGNORE)


class Prior(Exportable, nn.Module, HubMixin, tags=["image-generation", "token-prior"]):
    """Base of every prior kind. ``Prior.from_pretrained`` / ``from_export`` return the recorded kind's class."""

    EXPORT_KIND = "prior"
    exact_likelihood = True   # does forward give the exact per-token NLL (bits/token)? (MaskGIT: no)
    compiled_decoding = False  # does sample_tokens take compile=True (a compiled decode step)?
    # The sampling settings stored with the export (generation_config.json, vqgen.generation): what generate() uses
    # for a value not passed. None for a new model; set to None to sample with the built-in defaults.
    generation_config: dict | None = None
    nll_name = "bits_per_token"   # what :func:`token_nll` in bits measures, as metrics name it

    def __init__(self, config: PriorConfig):
        super().__init__()
        config.validate()
        self.config = config

    # ---- the kind's contract ---------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                progress: float | None = None) -> PriorOutput:
        """``tokens (B, T)`` (or (B, h, w)), ``labels (B,)`` or None -> logits and their targets. ``progress``: the
        share of the run's optimizer steps done, for schedules over training (the AR prior's ``--order random``)."""
        raise NotImplementedError

    def sample_tokens(self, labels: torch.Tensor, use_cfg: bool, cfg_scale: float, cfg_schedule: str,
                      sample_kw: dict, cfg_power: float = CFG_POWER, **options) -> torch.Tensor:
        """Draw ``(B, T)`` tokens for ``labels`` (already (cond ‖ null) when ``use_cfg``: B = len(labels) // 2);
        called by :func:`vqgen.models.sampling.generate` in eval and inference mode. The guidance at step i of n is
        ``guidance_at(cfg_scale, cfg_schedule, i, n, cfg_power)``."""
        raise NotImplementedError

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per scored token (a convenience; training calls ``forward`` under DDP)."""
        out = self(tokens, labels)
        return token_cross_entropy(out.logits, out.targets)

    def release_caches(self) -> None:
        """Free what sampling allocated (KV caches, compiled decoding's graphs); called after every
        :meth:`sample_tokens` batch of eager decoding."""

    # ---- shared ----------------------------------------------------------------------------------------------
    def resolve_labels(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """``None`` or ``-1`` -> the null class; class ids are checked against ``num_classes``."""
        null = self.config.null_class
        if labels is None:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.numel() != batch:
            raise ConfigError(f"got {labels.numel()} labels for a batch of {batch}")
        labels = torch.where(labels < 0, torch.full_like(labels, null), labels)
        # The range check syncs with the device: done for user-facing calls (eval/sampling), not per training
        # step, whose labels come from shards validated at extraction.
        if not self.training and bool((labels > null).any()):
            raise ConfigError(f"labels must be -1 or in [0, {self.config.num_classes}) for this prior "
                              f"(num_classes={self.config.num_classes}); got {labels.tolist()}")
        return labels

    def training_labels(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Labels as trained: the null class with probability ``class_dropout`` (enables classifier-free guidance)."""
        labels = self.resolve_labels(labels, batch, device)
        if self.training and self.config.class_dropout > 0 and self.config.num_classes > 0:
            drop = torch.rand(batch, device=device) < self.config.class_dropout   # torch RNG: reproducible
            labels = labels.masked_fill(drop, self.config.null_class)
        return labels

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, nanoGPT's ``estimate_mfu`` count: ``6N + 12*L*H*Q*T`` with
        N the parameters in matrix products (all but the lookup tables: embeddings, position table), L blocks, H
        heads, Q the head dimension, T the sequence length (attention over the full T, as nanoGPT counts it)."""
        c = self.config
        lookup = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        n = sum(p.numel() for name, p in self.named_parameters() if id(p) not in lookup and "pos_emb" not in name)
        return 6.0 * n + 12.0 * c.attn_layers_depth * c.attn_layers_heads * c.head_dim * c.seq_len

    def configure_optimizer(self, lr: float, weight_decay: float, device_type: str) -> torch.optim.Optimizer:
        """AdamW with GPT's betas (0.9, 0.95): a lower beta2 steadies Transformer training (GPT-3, nanoGPT)."""
        return adamw(self, lr, weight_decay, (0.9, 0.95), device_type)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- exports ---------------------------------------------------------------------------------------------
    @classmethod
    def from_loaded_export(cls, exp: Export) -> "Prior":
        try:
            cfg = PriorConfig.from_dict(dict(exp.config))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{exp.path}: bad prior config: {e}") from None
        impl = PRIORS[cfg.prior_kind].load()
        if not issubclass(impl, cls):
            raise CheckpointError(f"{exp.path} holds a '{cfg.prior_kind}' prior, not a {cls.__name__}")
        model = impl(cfg)
        try:
            model.load_state_dict(exp.state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{exp.path}: weights do not fit the prior config: {e}") from None
        if exp.path.is_dir():
            model.generation_config = read_generation_config(exp.path, exp.sha256)
        return model

    def export_to(self, out_dir, meta=None) -> str:
        """The export, and the stored sampling settings when this prior has them (``save_pretrained`` keeps them;
        they name the weights they were chosen for, so edited weights do not inherit them silently)."""
        sha = super().export_to(out_dir, meta)
        gc = self.generation_config
        if gc is not None:
            write_generation_config(out_dir, gc, gc.get("chosen_by", {}), gc.get("prior_sha256"))
        return sha


def build_prior(config: PriorConfig) -> Prior:
    """A new prior of ``config.prior_kind`` (random weights; seed torch first for reproducible ones)."""
    return PRIORS[config.prior_kind].load()(config)


def load_prior(ref) -> Prior:
    """An exported prior of any kind (export folder, run folder or ``hf:`` ref), in eval mode on the CPU."""
    return Prior.from_export(ref)


@torch.no_grad()
def token_nll(prior: Prior, loader, device, max_batches: int | None = None) -> tuple[float, int]:
    """Summed cross-entropy (nats) of ``prior`` over the ``(tokens, labels)`` batches of ``loader`` and the count of
    scored tokens; labels are used when the prior is class-conditional. Run it under the caller's autocast, if any."""
    conditional = prior.config.num_classes > 0
    total, count = 0.0, 0
    for i, (tokens, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = prior(tokens.to(device), labels.to(device) if conditional else None)
        total += float(token_cross_entropy(out.logits, out.targets, reduction="sum"))
        count += int((out.targets != IGNORE).sum())
    return total, count
