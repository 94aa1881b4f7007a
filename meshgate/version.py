"""``--version`` for both commands: the installed distribution's version."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

import typer

import meshgate

__all__ = ["version", "version_callback"]


def version() -> str:
    try:
        return dist_version("meshgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return meshgate.__version__


def version_callback(prog: str) -> Callable[[bool], None]:
    """A typer option callback that prints ``PROG VERSION`` and exits."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {version()}")
            raise typer.Exit()

    return show
