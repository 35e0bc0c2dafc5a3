"""The ``kdkit`` command: demo, train, eval, inspect, prepare, compare, list, train-style (:mod:`.run`),
export, profile, predict, drive (:mod:`.deploy`); :mod:`.common` holds the app and its user-error
handling. Importing the two command modules registers their subcommands, in this order in ``--help``."""

# isort: off
from .common import app, installed_version, user_errors
from . import run  # noqa: F401
from . import deploy  # noqa: F401

# isort: on

__all__ = ["app", "installed_version", "user_errors"]
