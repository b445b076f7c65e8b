"""Errors that cloak raises, each mapped to one exit code by ``cloak.cli.main``.

Library code raises these; only the CLI turns them into exit codes (ARCHITECTURE §5).
"""

from __future__ import annotations


class CloakError(Exception):
    """Base class. ``exit_code`` is what the CLI returns; ``hint`` is the next step for the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # message, then the hint on its own line
        base = super().__str__()
        return f"{base}\nhint: {self.hint}" if self.hint else base


class UsageError(CloakError):
    """Bad flags, options or configuration (exit 2)."""

    exit_code = 2


class UnknownArgumentError(UsageError, TypeError):
    """A keyword the Python API does not take: a UsageError like any bad flag, and a TypeError as Python's
    own ``f(no_such=1)`` is, so either ``except`` catches it."""


class InputError(CloakError):
    """A missing, unreadable or unsupported input file or directory (exit 3)."""

    exit_code = 3


class OutputError(CloakError):
    """An output file or folder cannot be created or written: read-only, no permission, disk full (exit 3,
    like an unreadable input: the path given is unusable)."""

    exit_code = 3


class OutputExistsError(UsageError):
    """The output would overwrite something without ``--force`` (exit 2)."""


class ModelUnavailableError(CloakError):
    """Weights are not in the cache or a local path is not a model (exit 4)."""

    exit_code = 4


class PartialFailure(CloakError):
    """Some items failed under ``--keep-going`` (exit 5)."""

    exit_code = 5


class GateFailed(CloakError):
    """A ``--fail-if`` score gate was not met (exit 6)."""

    exit_code = 6


EXIT_OK = 0
EXIT_INTERRUPTED = 130
