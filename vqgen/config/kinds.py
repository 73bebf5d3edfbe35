"""Kinds of model parts (a quantizer, a prior) and what every model config shares.

Registries are plain dicts of :class:`Kind` at the end of the light config modules (``QUANTIZERS`` in
:mod:`vqgen.config.tokenizer`, ``PRIORS`` in :mod:`vqgen.config.prior`): the config knows names and settings, and
the heavy module is imported only when a model is built (:meth:`Kind.load`).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ..errors import ConfigError


@dataclass(frozen=True)
class Kind:
    """``impl``: ``"package.module:Name"`` of the class (or loader function) that implements the kind."""

    impl: str
    help: str = ""

    def load(self) -> Any:
        module, _, name = self.impl.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class QuantizerKind(Kind):
    """A quantizer also says, from the tokenizer config, how many codes it has and how many channels a code has."""

    codebook_size: Callable[[Any], int] = lambda cfg: 0
    code_dim: Callable[[Any], int] = lambda cfg: 0


def choices(registry: dict[str, Kind]) -> tuple[str, ...]:
    return tuple(registry)


def describe(registry: dict[str, Kind]) -> str:
    """``"vq (EMA codebook), fsq (...)"``: the kinds for a flag's help text."""
    return ", ".join(f"{name} ({k.help})" if k.help else name for name, k in registry.items())


class ModelConfig:
    """What every model config shares: the dict stored in exports (only the settings of the chosen kinds), read
    back through :meth:`upgrade` so that exports and run folders of earlier vqgen versions keep loading.

    ``RENAMED``: an earlier key -> the field's name now. ``ABSENT_MEANT``: for fields added since the first export
    format, what an export without them meant (which can differ from today's default).
    """

    RENAMED: ClassVar[dict[str, str]] = {}
    ABSENT_MEANT: ClassVar[dict[str, Any]] = {}
    NAME: ClassVar[str] = "model"

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        d = {cls.RENAMED.get(k, k): v for k, v in d.items()}
        return {**cls.ABSENT_MEANT, **d}

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild from an export's config dict (earlier spellings accepted); ConfigError when it does not fit."""
        d = cls.upgrade(dict(d))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.NAME} config field(s) {', '.join(unknown)} (written by a newer vqgen?)")
        try:
            cfg = cls(**d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid {cls.NAME} config: {e}") from None
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """JSON-able settings: every field except the settings of kinds not chosen."""
        chosen = getattr(self, getattr(self, "KIND_FIELD", ""), None)
        out = {}
        for f in dataclasses.fields(self):
            kinds = f.metadata.get("kinds")
            if kinds and chosen not in kinds:
                continue
            v = getattr(self, f.name)
            out[f.name] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, (list, tuple)) else v
        return out

    def __eq__(self, other) -> bool:
        """Equal when they describe the same model (``"2 4 1 1"`` for every level equals it spelled per level)."""
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    __hash__ = None

    def check(self) -> None:
        """What can be checked from the flags alone (run when a stage config is validated)."""

    def validate(self) -> None:
        """Everything, the data-decided fields included (run before a model is built)."""
        self.check()
