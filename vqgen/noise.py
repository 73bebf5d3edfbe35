"""Third-party start-up messages a vqgen user cannot act on, silenced at their source. Each is named here; nothing
else is hidden (vqgen's own warnings and every other library message still print).
"""

from __future__ import annotations

import logging

# logger name -> message prefixes dropped from it
DROPPED = {
    # DeepSpeed probes for an accelerator when imported (accelerate imports it) and logs this on every machine
    # without a GPU, although vqgen chooses the device itself and DeepSpeed runs only when a launch asks for it.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def silence() -> None:
    """Install the filters (idempotent). A filter sits on the logger by name, so it works before the library is
    imported: DeepSpeed's logger keeps it when it configures itself."""
    for name, prefixes in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
