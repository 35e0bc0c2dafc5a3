"""What every ``kdkit`` subcommand shares: the Typer app, the console, ``--set``, ``--version`` and the
one-line user errors (:class:`~kdkit.errors.KdkitError` prints one line and exits with status 2)."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import KdkitError

app = typer.Typer(
    help="kdkit: knowledge distillation for computer vision. Start with `kdkit demo --quick`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config value: a.b.0.c=value")]


def installed_version() -> str:
    """kdkit's version: the installed distribution's, else ``kdkit.__version__`` (a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdkit")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        console.print(f"kdkit {installed_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """kdkit: knowledge distillation for computer vision. Start with `kdkit demo --quick`."""


def user_errors(command):
    """Turn KdkitError into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KdkitError as exc:
            message = escape(str(exc))  # a message such as "[day,fog]" is text, not markup
            Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return run
