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
from ..hub import HubMixin
from .optim import adamw

IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index)


class PriorOutput(NamedTuple):
    logits: torch.Tensor   # (B, T, vocab)
    targets: torch.Tensor  # (B, T) long: the token each row of logits predicts; IGNORE where nothing is scored


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of ``logits (B, T, vocab)`` against ``targets (B, T)``, in fp32 (bf16 logits would lose
    the small probabilities); IGNORE targets are skipped. The one definition behind training, validation and
    evaluate.py."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction,
                           ignore_index=IGNORE)


class Prior(Exportable, nn.Module, HubMixin, tags=["image-generation", "token-prior"]):
    """Base of every prior kind. ``Prior.from_pretrained`` / ``from_export`` return the recorded kind's class."""

    EXPORT_KIND = "prior"
    exact_likelihood = True   # does forward give the exact per-token NLL (bits/token)? (MaskGIT: no)
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
        """Free what sampling allocated (KV caches); called after every :meth:`sample_tokens` batch."""

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
        return model


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
