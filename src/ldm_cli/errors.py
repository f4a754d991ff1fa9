"""Errors a user can cause, and the exit code each one maps to.

docs/ARCHITECTURE.md, "Errors and exit codes": exit 0 on success, 2 on a usage or configuration error, 1 on a failure at
run time. Every error carries one clear line; the CLI prints it without a traceback.
"""

from __future__ import annotations


class LdmError(Exception):
    """A failure at run time that the user should read as one line (exit code 1)."""

    exit_code = 1


class UsageError(LdmError):
    """Bad input: a config key or value, a path, a checkpoint of the wrong kind (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or `--set` override that does not validate; one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(UsageError):
    """A data source that does not exist or holds no usable image."""


class DiskFullError(LdmError):
    """A write that does not fit on its disk (exit 1): names the path and the space."""


class CheckpointError(UsageError):
    """A checkpoint file that is missing, corrupt, not safetensors, or of the wrong kind."""
