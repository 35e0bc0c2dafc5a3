"""User-facing errors: the CLI prints their message as one line, without a traceback."""

from __future__ import annotations


class KdkitError(Exception):
    """A problem with the user's input (config, files, shapes) whose message says how to fix it."""


class ConfigError(KdkitError):
    """An invalid config: unknown key, bad value, missing file, unknown tap or term."""
