"""Shared command-line plumbing: argument types for list flags and the error boundary of every script."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import VQGenError


def int_list(text: str) -> list[int]:
    """Parse ``"2 4 1 1"`` or ``"2,4,1,1"`` (the seed passed list flags as one quoted string)."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by spaces or commas, got {text!r}") from None


def flatten_int_lists(values: Sequence) -> list[int]:
    """``nargs='+'`` with ``type=int_list`` gives a list of lists: ``--x "2 4" 1 1`` -> [2, 4, 1, 1]."""
    out: list[int] = []
    for v in values or []:
        out.extend(v if isinstance(v, list) else [v])
    return out


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse flags and run ``main(args)``; a :class:`VQGenError` prints ``error: ...`` and exits 2, no traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except VQGenError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
