"""User-facing errors: the `pyvmm` command prints their message as one line and exits non-zero."""

from __future__ import annotations


class PyvmmError(Exception):
    """An error the user can act on; its message says what is wrong and how to fix it."""


class BootError(PyvmmError):
    """The guest image cannot be booted (wrong format, does not fit, truncated...)."""


class ConfigError(PyvmmError):
    """A machine option is invalid."""
