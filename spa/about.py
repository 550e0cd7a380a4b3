"""What `spa-server --version` and `spa-client --version` print.

One line: the program, the installed package's version (from its metadata,
"unknown" when there is none, e.g. run from a source tree never installed),
and the protocol it speaks (the URI scheme and the packet format's version
byte, docs/protocol.md).  Imports nothing of the server: the client uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from spa.core.uri import SCHEME
from spa.core.wire import VERSION

DISTRIBUTION = "spa"
UNKNOWN = "unknown"


def package_version(distribution: str = DISTRIBUTION) -> str:
    """The installed distribution's version, or "unknown" without metadata."""
    from importlib import metadata  # only for --version: not on every start

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def version_line(program: str, version: str | None = None) -> str:
    """e.g. "spa-server 0.1.0 (protocol spa1, wire version 1)"."""
    shown = package_version() if version is None else version
    return f"{program} {shown} (protocol {SCHEME}, wire version {VERSION})"


def version_callback(program: str) -> Callable[[bool], None]:
    """The --version option's callback (eager): print the line, exit 0."""
    def show(value: bool) -> None:
        if value:
            typer.echo(version_line(program))
            raise typer.Exit()
    return show


def version_option(program: str) -> Any:  # typer.Option's type: Any
    """`--version` for a program's root callback."""
    return typer.Option("--version", callback=version_callback(program), is_eager=True,
                        help="Print the version and the protocol version, then exit.")
