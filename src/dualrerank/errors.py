"""User-facing errors.

Every error a user can cause (bad data, bad config, bad checkpoint) is a subclass of
`DualRerankError`; the CLI prints its message as one line and exits with status 2.
Anything else escaping to the CLI is a bug in dualrerank and keeps its traceback.
"""

from __future__ import annotations


class DualRerankError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class DataError(DualRerankError, ValueError):
    """Input data is malformed: the message names the field (or file and line) and the request."""


class ConfigError(DualRerankError, ValueError):
    """A config file or option is invalid: unknown key, wrong type, out of range."""


class CheckpointError(DualRerankError, OSError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class TrainingError(DualRerankError, RuntimeError):
    """Training cannot go on for a reason the user can fix (a diverging loss: too high a
    learning rate, or features with huge values)."""
