"""spa-server's command line (thin: parse, call the library, print)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Single-packet authorization server: keeps services closed until a client "
    "sends one valid encrypted UDP packet.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """spa-server."""


@app.command()
def demo() -> None:
    """Show the protocol at work in a few lines: a grant, a replay and a tampered
    packet refused, two users behind one NAT address, a close."""
    from spa import demo_core

    raise typer.Exit(demo_core.run())


def main() -> None:
    app()
