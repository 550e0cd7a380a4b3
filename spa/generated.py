"""The files made from the command line's definitions, and the command that
makes them: `python -m spa.generated` (from the repository's root) writes

    contrib/man/spa-server.8            contrib/man/spa-client.1
    contrib/completion/spa-server.bash  contrib/completion/_spa-server
    contrib/completion/spa-client.bash  contrib/completion/_spa-client

and `--check` only says which differ (exit 1).  A unit test does the same
check, so the committed files never drift from the commands; the Debian
package installs them from these paths.  Imports the server's command line:
a development tool, never run by the daemon or the client.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spa import about, completion, manpage

COMMAND = "python -m spa.generated"
PROGRAMS = ("spa-server", "spa-client")


def server_page(version: str) -> manpage.Page:
    from spa.cli import app
    from spa.server.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR
    from spa.server.fwknopd_files import DEFAULT_ACCESS, DEFAULT_CONF

    return manpage.Page(
        program="spa-server", section=8, app=app, version=version,
        summary="single-packet authorization server",
        environment=(
            ("NOTIFY_SOCKET", "Set by systemd (Type=notify): run reports READY=1 once it "
                              "serves, and its status."),
            ("WATCHDOG_USEC", "Set by systemd (WatchdogSec=): run sends WATCHDOG=1 every "
                              "half of it while the receive loop is alive."),
        ),
        files=(
            (str(DEFAULT_CONFIG), "The config file (TOML, 0600): server id, port, backend, "
                                  "services; --config or SPA_SERVER_CONFIG names another."),
            (str(DEFAULT_STATE_DIR), "The state directory (state_dir in the config): the "
                                     "client store (clients.db), leases, the replay cache, "
                                     "the event store (events.sqlite3), the dashboard "
                                     "password."),
            (str(DEFAULT_ACCESS), "fwknopd's client stanzas, read by import-fwknop."),
            (str(DEFAULT_CONF), "fwknopd's config, read by import-fwknop for its port and "
                                "packet age."),
        ),
        exit_status=(
            ("0", "Done."),
            ("1", "check found a firewall rule that undoes a grant."),
            ("2", "A usage or configuration error, said in one line on standard error."),
            ("130", "Interrupted (Ctrl-C)."),
        ),
        see_also=("spa-client(1)", "nft(8)", "iptables(8)", "systemd.service(5)",
                  "fwknopd(8)"),
    )


def client_page(version: str) -> manpage.Page:
    from spa_client import cli
    from spa_client.profile import ENV_DIR

    cli.register_commands([])  # all of them (main registers only the one it runs)
    return manpage.Page(
        program="spa-client", section=1, app=cli.app, version=version,
        summary="single-packet authorization client",
        environment=(
            (ENV_DIR, "Where profiles live, when --config-dir is not given."),
        ),
        files=(
            ("~/.config/spa-client/profiles/", "One file per enrolled server, NAME.toml "
             "(0600: it holds the client's secret); under $XDG_CONFIG_HOME when set, "
             f"under ${ENV_DIR} or --config-dir when given (the user config directory on "
             "other systems)."),
        ),
        exit_status=(
            ("0", "Done (for open: the port accepts connections)."),
            ("1", "The port did not open within --timeout, or doctor found a failure."),
            ("2", "A usage or configuration error, said in one line on standard error."),
            ("130", "Interrupted (Ctrl-C)."),
        ),
        see_also=("spa-server(8)", "ssh(1)", "ssh_config(5)"),
    )


def render_all(version: str | None = None) -> dict[str, str]:
    """Each generated file's path (relative to the repository) and text."""
    shown = about.package_version() if version is None else version
    files = {
        "contrib/man/spa-server.8": manpage.render(server_page(shown)),
        "contrib/man/spa-client.1": manpage.render(client_page(shown)),
    }
    for program in PROGRAMS:
        files[f"contrib/completion/{program}.bash"] = completion.script(program, "bash")
        files[f"contrib/completion/_{program}"] = completion.script(program, "zsh")
    return files


def stale(root: Path, files: dict[str, str]) -> list[str]:
    """The paths under `root` whose text differs from `files` (or are missing)."""
    out = []
    for relative, text in files.items():
        path = root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(relative)
    return out


def main(argv: list[str]) -> int:
    """Write the files under the current directory; --check: only compare."""
    root = Path.cwd()
    files = render_all()
    if "--check" in argv:
        differ = stale(root, files)
        for relative in differ:
            print(f"{relative} is out of date; regenerate with: {COMMAND}", file=sys.stderr)
        return 1 if differ else 0
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
