"""spa-client's command line (thin: parse, call the library, print)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Single-packet authorization client: sends one encrypted UDP packet that "
    "opens a service on a server for your address, for a while.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """spa-client."""


def main() -> None:
    app()
