"""The error boundary of every script: flags -> config -> checks -> ``run(config)``, user errors as one line, exit 2.

A script names its stage as ``"module:function"``: the stage (and torch) is imported only after the flags are parsed
and :func:`vqgen.preflight.check` passed, so ``--help`` and a wrong input answer in about a second.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable, Sequence

from .config import load_config
from .errors import VQGenError
from .fsutil import is_disk_full
from .lock import release_all


def _strip_worker_traceback(msg: str) -> str:
    """A VQGenError raised in a DataLoader worker arrives as "Caught X in DataLoader worker process 0.\\nOriginal
    Traceback ...": keep only the original message (its last line), no traceback wall."""
    if "Original Traceback" in msg:
        lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
        last = lines[-1]
        m = re.match(r"^[A-Za-z_][\w.]*(?:Error|Exception|Aborted): (.*)$", last)
        return m.group(1) if m else last
    return msg


def _error_line(text: str) -> None:
    """One write of the line and its newline: ranks of a job share stderr unbuffered, and print() writes the text
    and the newline separately, so two ranks' lines could interleave into one."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _exit_if_distributed(status: int) -> None:
    """After a user error raised on every rank of a multi-process job: end this rank now with ``status``. A normal
    interpreter exit runs gloo's/NCCL's C++ destructors, which may abort ("terminate called without an active
    exception", SIGABRT) and the launcher reports a crash instead of the user error."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        release_all()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_cli(run: Callable[[Any], object] | str, config_cls: type, argv: Sequence[str] | None = None) -> int:
    """Parse flags (and ``--config``) into ``config_cls``, run the torch-free checks, import ``run`` when it is given
    as ``"module:function"`` and call ``run(config)``; a :class:`VQGenError` prints ``error: ...`` and exits 2, no
    traceback.

    A full disk (ENOSPC/EDQUOT, also as wrapped by torch.save/safetensors) is a user problem too: one clear line,
    exit 2. Every vqgen write is atomic (temp + rename), so the previous state is intact.
    """
    prog = getattr(config_cls, "PROG", None) or "vqgen"
    try:
        cfg = load_config(config_cls, argv)  # --help and flag errors end here, before any heavy import
        from . import preflight

        preflight.check(cfg)
        if isinstance(run, str):
            module, _, name = run.partition(":")
            run = getattr(importlib.import_module(module), name)
        run(cfg)
    except VQGenError as e:
        _error_line(f"{prog}: error: {_strip_worker_traceback(str(e))}")
        _exit_if_distributed(2)
        return 2
    except Exception as e:  # noqa: BLE001 - only a full disk is handled here; anything else keeps its traceback
        if not is_disk_full(e):
            raise
        where = getattr(e, "filename", None)
        _error_line(f"{prog}: error: disk full while writing{f' {where}' if where else ''} ({e.__class__.__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'no space left'}); vqgen replaces files atomically, so "
                    f"the previous checkpoints, exports and shards are intact. Free some space and rerun (training: "
                    f"--resume latest)")
        _exit_if_distributed(2)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        release_all()  # a run that stopped early frees its folders too (the process may go on: tests, notebooks)
    return 0
