"""User-facing errors.

Anything raised as a :class:`VQGenError` is a problem with the user's input (a missing file, a bad flag, a
checkpoint from another config...). The command-line wrappers print its message without a traceback and
exit with status 2; everything else is a bug and keeps its traceback.
"""


class VQGenError(Exception):
    """A clear, specific problem the user can fix; printed without a traceback."""


class ConfigError(VQGenError, ValueError):
    """Bad flag values or inconsistent configuration."""


class DatasetUnavailableError(VQGenError, RuntimeError):
    """A dataset is not on disk and cannot be downloaded (offline machine, no credentials...)."""


class CheckpointError(VQGenError, ValueError):
    """A missing, corrupt, unsafe or mismatched checkpoint/export."""


class ShardError(VQGenError, ValueError):
    """Missing, corrupt or mismatched WebDataset shards / manifest."""


class TrainingAborted(VQGenError, RuntimeError):
    """Training stopped on purpose (e.g. too many consecutive non-finite losses)."""


class DiskFullError(VQGenError, RuntimeError):
    """The disk (or quota) filled up while writing; what was written before is intact (atomic writes)."""


class FolderInUseError(VQGenError, RuntimeError):
    """Another job is writing the same output folder (one writer per folder: vqgen.lock)."""
