"""spa-server's entry point: first a cheap check that the server's libraries
are installed, then the command line.

`pip install .` (or `pipx install .`) installs the client alone: PyNaCl, pyotp,
typer and platformdirs.  The server's libraries are the `server` extra
(pyproject.toml).  Where they are missing, spa-server says in one line what to
install and exits 2, before importing spa.cli (which imports them all and would
end in a traceback).  The check only looks the modules up (find_spec), it
imports none of them: a few milliseconds.
"""

from __future__ import annotations

import importlib.util
import sys

# The `server` extra's distributions (pyproject.toml) and the top-level module
# each installs.  tests/unit/test_client_alone.py checks this against
# pyproject.toml and the installed metadata.
SERVER_MODULES: dict[str, str] = {
    "tomlkit": "tomlkit",
    "python-iptables": "iptc",
    "segno": "segno",
    "prometheus-client": "prometheus_client",
    "maxminddb": "maxminddb",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "jinja2": "jinja2",
    "itsdangerous": "itsdangerous",
    "python-multipart": "multipart",  # also python_multipart from 0.0.13; both ship this
    "cryptography": "cryptography",
}

# Checked only where spa-server would fail without it in a traceback: the
# iptables backend says itself, in one line, that it needs python-iptables
# (spa/backends/iptables.py), and the Debian package only recommends it.
OPTIONAL = frozenset({"iptc"})

INSTALL_HINT = ("spa-server needs the server's libraries: pip install 'spa[server]' "
                "(or install the Debian package: docs/install.md)")


def missing_modules(modules: dict[str, str] = SERVER_MODULES) -> list[str]:
    """The top-level modules of `modules` (but OPTIONAL ones) that cannot be
    found, in order."""
    missing = []
    for module in modules.values():
        if module in OPTIONAL:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def missing_line(missing: list[str]) -> str:
    """The one line spa-server prints when `missing` is not empty."""
    named = missing[0] + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    return f"spa-server: error: no module {named}; {INSTALL_HINT}"


def main() -> None:
    missing = missing_modules()
    if missing:
        sys.stderr.write(missing_line(missing) + "\n")
        sys.exit(2)
    from spa.cli import main as cli_main

    cli_main()
