"""``python -m kdkit`` (the form ``torchrun ... -m kdkit`` runs): the CLI, then a clean distributed exit."""

from __future__ import annotations


def main() -> None:
    """Run the ``kdkit`` command; after success under torchrun, leave the process group cleanly."""
    from .cli import app
    from .engine.distributed import shutdown

    ok = False
    try:
        app()
    except SystemExit as exc:  # typer always ends with SystemExit
        ok = exc.code in (None, 0)
        raise
    finally:
        shutdown(ok)


if __name__ == "__main__":
    main()
