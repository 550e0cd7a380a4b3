"""Enrollment URIs as QR codes: in the terminal, and as a PNG file.

Invariants (issue 7):
- The terminal code uses one character per module column and half a line per
  module row (Unicode half blocks), so a URI of the usual length (QR version
  8-10) with a two-module quiet zone is 53-61 columns: it fits an 80-column
  terminal.  On a terminal the colours are set explicitly (white modules on
  black, ANSI), so it reads the same in light and dark themes; written to a
  file or a pipe it is plain text in which a full block is a light module.
- The PNG holds the client's secret: it is written 0600, atomically
  (spa.server.secretfile), never world-readable even for a moment.
"""

from __future__ import annotations

import io
from pathlib import Path

import segno

from spa.server.secretfile import write_private

BORDER = 2  # modules of quiet zone around the terminal code (scanners read 2 fine)
PNG_SCALE = 8  # pixels per module in the PNG
LIGHT_ON_DARK = "\x1b[97;40m"  # bright white foreground, black background
RESET = "\x1b[0m"


def _code(uri: str) -> segno.QRCode:
    return segno.make(uri, error="m", micro=False)


def terminal_text(uri: str, *, ansi: bool) -> str:
    """The QR code of `uri` as lines of half blocks (see the invariants)."""
    out = io.StringIO()
    _code(uri).terminal(out=out, compact=True, border=BORDER)
    lines = out.getvalue().rstrip("\n").split("\n")
    if ansi:
        lines = [f"{LIGHT_ON_DARK}{line}{RESET}" for line in lines]
    return "\n".join(lines) + "\n"


def write_png(uri: str, path: Path) -> None:
    """Write the QR code of `uri` to `path` as a PNG, 0600.  Raises OSError."""
    out = io.BytesIO()
    _code(uri).save(out, kind="png", scale=PNG_SCALE, border=4)
    # the admin's own path: a link among its directories is theirs to follow
    write_private(path.parent.resolve() / path.name, out.getvalue())
