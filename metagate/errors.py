"""Exceptions with messages that name the problem."""

from __future__ import annotations


class MetagateError(Exception):
    """Base class of metagate's errors."""


class InputError(MetagateError, ValueError):
    """Bad data: shapes, label ranges, NaN logits, bad gate weights."""


class ConfigError(MetagateError, ValueError):
    """An invalid option or an unknown task/gate name."""


class StaleCacheError(MetagateError):
    """A teacher cache does not match the data, unit ids or teacher checkpoint."""


class CheckpointError(MetagateError):
    """A checkpoint is corrupt, truncated or from an incompatible run."""


class StorageError(MetagateError, OSError):
    """A file or directory cannot be written or read: it is a file, under a file, read-only, or the disk is full."""
