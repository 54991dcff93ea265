"""The project's own exceptions: mistakes a user can fix.

Every entry point turns a `VitError` into one line, `error: <message>`, and exit status 1
(`vit.cli`); any other exception is a bug and keeps its traceback. Each class also derives from
the built-in exception that Python code would expect (ValueError, FloatingPointError), so
library callers that catch those keep working.
"""

from __future__ import annotations


class VitError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""


class ConfigError(VitError, ValueError):
    """An override or config value that is invalid or out of range (names the key and the range)."""


class DataError(VitError, ValueError):
    """A dataset or image that is missing, empty or unreadable."""


class CheckpointError(VitError, ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit its recorded model."""


class DivergedError(VitError, FloatingPointError):
    """Training produced a non-finite loss (too high a learning rate, or bad data)."""


class ExportError(VitError, RuntimeError):
    """An exported model that does not reproduce PyTorch's outputs."""
