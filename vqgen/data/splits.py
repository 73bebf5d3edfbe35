"""Split names: the one table of split aliases that every data source uses.

A split is asked for by its normal name (``train``, ``val``, ``test``; other spellings are normalised first). A
source whose data names splits differently (folder names, Hugging Face split names) tries
:func:`split_candidates` in order; a held-out split that does not exist is stood in for by the other one (many
datasets ship only ``test`` or only ``validation``).
"""

from __future__ import annotations

import re

from ..errors import ConfigError

SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation", "valid"), "test": ("test", "testing")}
STAND_IN = {"train": None, "val": "test", "test": "val"}


def normalize_split(split: str) -> str:
    """``"Validation"`` -> ``"val"``; ConfigError for a name that is no split."""
    s = str(split).lower()
    for norm, aliases in SPLIT_ALIASES.items():
        if s in aliases:
            return norm
    if re.fullmatch(r"[a-z0-9_]+", s):
        return s  # another split name: HF datasets and split folders may have it (registry sets refuse it)
    raise ConfigError(f"unknown split {split!r}: use train, val (validation), test or a split name of the dataset")


def split_candidates(split: str) -> list[str]:
    """Names under which a source may store ``split`` (normalised), its own spellings first, then its stand-in's."""
    split = normalize_split(split)
    if split not in SPLIT_ALIASES:
        return [split]
    other = STAND_IN[split]
    return list(SPLIT_ALIASES[split]) + (list(SPLIT_ALIASES[other]) if other else [])


ALL_SPLIT_NAMES = tuple(name for names in SPLIT_ALIASES.values() for name in names)
