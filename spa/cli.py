"""spa-server's command line (thin: parse, call the library, print).

Every local problem (bad config, bad argument, port in use, no permission)
ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from spa import about, clitools, completion
from spa.cli_group import AdminPasswordOption, AdminUserOption, admin_login, group_app
from spa.clitools import run_app
from spa.core.errors import FormatError
from spa.server import admin
from spa.server.config import DEFAULT_CONFIG, DEFAULT_PORT, DEFAULT_STATE_DIR, default_state_dir
from spa.server.errors import LocalError
from spa.server.fwknopd_files import DEFAULT_ACCESS, DEFAULT_CONF
from spa.server.state import (
    StateDir,
    describe_filter,
    describe_gate,
    describe_group,
    describe_holder,
)

app = typer.Typer(
    help="Single-packet authorization server: keeps services closed until a client "
    "sends one valid encrypted UDP packet, then opens them for that client's address "
    "for a limited time.\n\n"
    "Start with: spa-server init, spa-server enroll NAME --service ssh --endpoint HOST, "
    "spa-server run.  Or try it all at once: spa-server demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Config file (TOML, 0600).",
                                            readable=False,
                                            envvar="SPA_SERVER_CONFIG")]


class Context:
    config: Path = DEFAULT_CONFIG


_ctx = Context()


def local_errors() -> AbstractContextManager[None]:
    """Local errors: one line, exit status 2 (see spa.clitools)."""
    return clitools.local_errors("spa-server", LocalError, FormatError)


@app.callback()
def _root(config: ConfigOption = DEFAULT_CONFIG,
          version: Annotated[bool, about.version_option("spa-server")] = False) -> None:
    _ctx.config = config


@app.command()
def init(
    listen_port: Annotated[int, typer.Option(help="UDP port clients knock on.")] = DEFAULT_PORT,
    backend: Annotated[str, typer.Option(help="Firewall: nftables, iptables or memory "
                                         "(memory blocks nothing: tests and demos).")
                       ] = "nftables",
    state_dir: Annotated[Path | None, typer.Option(
        help="Where leases, the replay cache and events live.  Default: "
        f"{DEFAULT_STATE_DIR} (/var/lib/spa/NAME with --instance) for a config in "
        f"{DEFAULT_CONFIG.parent}, else NAME-state beside a config NAME.toml.",
        show_default=False)] = None,
    instance: Annotated[str, typer.Option(
        help="Instance name, for several servers on one host (spa-server@NAME.service): "
        "its own tables inet spa_NAME and spa_hold_NAME, iptables chain SPA_NAME.  "
        "[a-z0-9_-], at most 16.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config "
                                        "(forgets every client).")] = False,
    service: Annotated[list[str] | None, typer.Option(
        "--service", "-s", metavar="SERVICE", help="A service to hide behind the gate "
        "(repeat): ssh, https, or NAME=tcp/PORT (e.g. imaps=tcp/993).  Default: ssh only. "
        "From the first run its port is closed to everyone but knocking clients.")] = None,
) -> None:
    """Create the config file with a new random server id and the services to hide."""
    with local_errors():
        chosen = admin.init(_ctx.config, listen_port=listen_port, backend=backend,
                            state_dir=state_dir, force=force, services=service or ["ssh"],
                            instance=instance)
        state = state_dir.absolute() if state_dir else default_state_dir(_ctx.config, instance)
    typer.echo(f"wrote {_ctx.config} (0600): server id created, port {listen_port}/udp, "
               f"backend {backend}, state in {state} ([server] state_dir)"
               + (f", instance {instance}" if instance else ""))
    from spa.server.coexist import closed_ports

    typer.echo(closed_ports(chosen).capitalize() + " (more: [services] in the config)")
    typer.echo(f"next: spa-server --config {_ctx.config} enroll NAME --service "
               f"{chosen[0].name} --endpoint HOST")


_FROM_HELP = ("Accept its knocks only from this network (repeat), e.g. 203.0.113.0/24 or "
              "2001:db8::/48; a knock from elsewhere is refused (source_not_allowed).")
FromOption = Annotated[list[str] | None, typer.Option(
    "--from", metavar="NET", help=_FROM_HELP + "  Default: from anywhere.")]


@app.command()
def enroll(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Client name, e.g. alice-laptop.")],
    service: Annotated[list[str], typer.Option("--service", "-s",
                                               help="A service it may open (repeat).")],
    endpoint: Annotated[str, typer.Option(help="HOST[:PORT] clients send to (this server "
                                          "as they reach it); an IPv6 address bare or in "
                                          "brackets, [V6]:PORT with a port.")],
    uri_only: Annotated[bool, typer.Option("--uri-only", help="Print only the URI.")] = False,
    qr: Annotated[bool, typer.Option("--qr", help="Also print the URI as a QR code (fits 80 "
                                     "columns) for a phone or laptop camera.")] = False,
    png: Annotated[Path | None, typer.Option("--png", metavar="FILE", help="Also write the "
                                             "QR code to FILE as a PNG (0600: it holds the "
                                             "secret).")] = None,
    otp: Annotated[bool, typer.Option("--otp", help="Also require a code from an "
                                      "authenticator app (Aegis, Google Authenticator, "
                                      "FreeOTP...) in every open knock; prints its QR code.")
                   ] = False,
    expires: Annotated[str | None, typer.Option(
        "--expires", metavar="DURATION", help="The enrollment must be used within this time "
        "(e.g. 15m, 2h, 1d): a first knock after it is refused (enrollment_expired).")
    ] = None,
    sources: FromOption = None,
    fwknop: Annotated[bool, typer.Option("--fwknop", help="A client that sends fwknop's "
                                         "packets (the fwknop CLI, Fwknop2, fwknop-gui) to "
                                         "the compat port: prints its .fwknoprc stanza, and "
                                         "with --qr the code Fwknop2 scans.")] = False,
    admin_user: AdminUserOption = None,
    admin_password_file: AdminPasswordOption = None,
) -> None:
    """Enroll a client: create its secret and print its enrollment URI.

    When the config names a group ([group]), the client is the group's: its
    record (derived keys, no secret) goes to etcd, as the group admin's etcd
    user (--admin-user, --admin-password-file), and it knocks at any member."""
    if fwknop:
        enroll_fwknop(name, service, endpoint, qr=qr, stanza_only=uri_only,
                      other=otp or expires is not None or png is not None)
        return
    with local_errors():
        if png is not None and (png.is_dir() or not png.parent.is_dir()):
            raise LocalError(f"--png {png}: not a file in an existing directory")
        seconds = None if expires is None else parse_duration(expires, "--expires")
        uri, otp_uri = admin.enroll_client(
            _ctx.config, name, service, endpoint, expires=seconds, now=time.time(), otp=otp,
            sources=sources or (), login=admin_login(admin_user, admin_password_file))
        if png is not None:
            from spa.server import qr as qr_mod

            try:
                qr_mod.write_png(uri, png)
                if otp_uri is not None:
                    qr_mod.write_png(otp_uri, otp_png(png))
            except OSError as exc:
                raise LocalError(f"cannot write {png}: {exc.strerror}; {name} is enrolled "
                                 f"all the same: revoke {name} and enroll it again") from None
    if uri_only:
        typer.echo(uri)
        return
    typer.echo(f"enrolled {name} for {', '.join(dict.fromkeys(service))}. Give this URI to "
               "the user over a private channel (it holds the client's secret):\n")
    typer.echo(f"  {uri}\n")
    if sources:
        typer.echo(f"knocks accepted {admin.describe_sources(admin.parse_sources(sources))}: "
                   "a knock from elsewhere is refused (source_not_allowed); change it with: "
                   f"spa-server clients set {name} --from NET or --no-from\n")
    if seconds is not None:
        typer.echo(f"it must be used within {expires}: a first knock after that is refused "
                   "(enrollment_expired); spa-server clients shows whether it was\n")
    if qr:
        import sys

        from spa.server import qr as qr_mod

        typer.echo("or let them scan this code (it holds the same secret):\n")
        typer.echo(qr_mod.terminal_text(uri, ansi=sys.stdout.isatty()))
    if otp_uri is not None:
        import sys

        from spa.server import qr as qr_mod

        typer.echo("second factor: scan this code with the user's authenticator app (issuer "
                   f"'spa', account {name!r}); every open knock then needs its current code:\n")
        typer.echo(qr_mod.terminal_text(otp_uri, ansi=sys.stdout.isatty()))
        typer.echo(f"  {otp_uri}\n")
    if png is not None:
        typer.echo(f"QR code written to {png} (0600; delete it once scanned)")
        if otp_uri is not None:
            typer.echo(f"authenticator QR code written to {otp_png(png)} (0600)")
    typer.echo(f"on the client: spa-client enroll '<URI>' (or --qr-image FILE)   then: "
               f"spa-client open {service[0]} HOST")


def enroll_fwknop(name: str, services: list[str], endpoint: str, *, qr: bool,
                  stanza_only: bool, other: bool) -> None:
    """enroll --fwknop: keys as fwknop --key-gen makes them, the stanza, the QR code."""
    from spa.server import admin_fwknop

    with local_errors():
        if other:
            raise LocalError("--fwknop takes --service, --endpoint, --qr and --uri-only "
                             "(fwknop's packets carry no authenticator code or deadline)")
        made = admin_fwknop.enroll(_ctx.config, name, services, endpoint)
    if stanza_only:
        typer.echo(made.fwknoprc(), nl=False)
        return
    typer.echo(f"enrolled {name} for {', '.join(dict.fromkeys(services))} as an fwknop client "
               f"(legacy: fwknop's packets on port {made.port}/udp). Give the user its keys "
               "over a private channel.\n\nFor the fwknop CLI, add to ~/.fwknoprc, then "
               f"knock with: fwknop -n {name}\n")
    typer.echo(made.fwknoprc())
    if qr:
        import sys

        from spa.server import qr as qr_mod

        typer.echo("For Fwknop2 (Android) or fwknop-gui: scan this code (it holds the keys), "
                   f"then set the server to {made.host}, port {made.port}, access "
                   f"{','.join(made.access)}, HMAC SHA256:\n")
        typer.echo(qr_mod.terminal_text(made.qr_text(), ansi=sys.stdout.isatty()))
    typer.echo(f"to move it to spa1:// later: {admin_fwknop.move_command(name, endpoint)}")


@app.command("import-fwknop")
def import_fwknop(
    access: Annotated[Path, typer.Option(help="fwknopd's access.conf (its %include files "
                                         "are read too).")] = DEFAULT_ACCESS,
    conf: Annotated[Path | None, typer.Option(help="fwknopd.conf, for its port and packet "
                                              "age.  Default: /etc/fwknop/fwknopd.conf, or "
                                              "fwknopd's defaults where there is none.")
                    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing; print the "
                                          "same plan.")] = False,
) -> None:
    """Import fwknopd's clients: each stanza becomes an fwknop client, keys kept.

    Its SOURCE becomes the client's networks, its OPEN_PORTS services (a new
    one for a port none has), fwknopd's port fwknop_port.  Prints, per
    stanza, what it could not carry over and why; never a key.  A second run
    changes nothing (a stanza is matched to a client by its HMAC key)."""
    from spa.server import admin_fwknop
    from spa.server.fwknop_import import render

    with local_errors():
        made = admin_fwknop.import_fwknopd(_ctx.config, access, conf or DEFAULT_CONF,
                                           conf_given=conf is not None, dry_run=dry_run,
                                           now=time.time())
    for line in render(made, dry_run=dry_run):
        typer.echo(line)


def otp_png(png: Path) -> Path:
    """Where --png puts the authenticator code: beside the enrollment code."""
    return png.with_name(f"{png.stem}-otp{png.suffix or '.png'}")


def parse_duration(text: str, option: str) -> float:
    """A positive duration for `option` ('90s', '15m', '2h', '1d').  Raises LocalError."""
    try:
        seconds = admin.parse_duration(text)
    except LocalError:
        seconds = 0.0
    if not seconds > 0:
        raise LocalError(f"{option} {text!r}: give a positive duration with s, m, h, d or w, "
                         "e.g. 15m")
    return seconds


@app.command()
def rotate(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The client to re-key.")],
    grace: Annotated[str, typer.Option(metavar="DURATION", help="How long the old secret "
                                       "keeps working (e.g. 10m; 0: it stops at once).")
                     ] = "0",
    endpoint: Annotated[str | None, typer.Option(help="HOST[:PORT] for the new URI (default: "
                                                 "the one it was enrolled with).")] = None,
    qr: Annotated[bool, typer.Option("--qr", help="Also print the new URI as a QR code.")
                  ] = False,
    admin_user: AdminUserOption = None,
    admin_password_file: AdminPasswordOption = None,
) -> None:
    """Give a client a new secret and URI; a running server switches within a second.

    For a lost device, a leaked URI, or a photo of its QR code.  In a group:
    the group's record gets the new keys (as the group admin's etcd user), and
    --endpoint is needed (the group keeps none per client)."""
    with local_errors():
        seconds = 0.0 if grace.strip() == "0" else parse_duration(grace, "--grace")
        uri = admin.rotate(_ctx.config, name, grace=seconds, now=time.time(),
                           endpoint=endpoint,
                           login=admin_login(admin_user, admin_password_file))
    when = "stops working now" if not seconds else f"keeps working for {grace}"
    typer.echo(f"{name} has a new secret; the old one {when}. Its new URI (give it to the "
               "user privately; they enroll it again with spa-client enroll):\n")
    typer.echo(f"  {uri}\n")
    if qr:
        import sys

        from spa.server import qr as qr_mod

        typer.echo(qr_mod.terminal_text(uri, ansi=sys.stdout.isatty()))


clients_app = typer.Typer(help="List, change, export and import clients.",
                          no_args_is_help=False)
app.add_typer(clients_app, name="clients")
app.add_typer(group_app, name="group")
EXPORT_FORMAT = Annotated[str, typer.Option("--format", help="json or toml.")]


@clients_app.callback(invoke_without_command=True)
def clients(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Clients on this page (1-10000).")] = 100,
    after: Annotated[str, typer.Option(help="Start after this name (the page before's "
                                       "last).")] = "",
    match: Annotated[str, typer.Option(help="Only names containing this.")] = "",
    state: Annotated[str, typer.Option(help="revoked, active, pending or expired.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (no "
                                          "secrets).")] = False,
    local: Annotated[bool, typer.Option("--local", help="On a group's member: this "
                                        "server's own clients, not the group's.")] = False,
) -> None:
    """List enrolled clients, a page at a time, by name (on a group's member: the group's)."""
    if ctx.invoked_subcommand is not None:
        return
    with local_errors():
        page = admin.client_page(_ctx.config, now=time.time(), after=after, limit=limit,
                                 match=match, state=state, local=local)
    if page.own:
        typer.echo(f"this server's own store holds {page.own} client(s) too, not the group's: "
                   "spa-server clients --local", err=True)
    if as_json:
        typer.echo(json.dumps({"count": page.count, "clients": [
            {"name": e.name, "state": page.states[e.name], "services": list(e.services),
             "enrolled": e.enrolled, "endpoint": e.endpoint, "otp": bool(e.otp_secret),
             "sources": list(e.sources), "kind": e.kind} for e in page.entries]}))
        return
    if not page.entries:
        typer.echo("no clients enrolled; add one with: spa-server enroll NAME --service ssh "
                   "--endpoint HOST" if not page.count else f"no client matches ({page.count} "
                   "enrolled)")
        return
    width = max(8, *(len(v) for v in page.states.values()))
    typer.echo(f"{'NAME':<24} {'STATE':<{width}} {'SERVICES':<24} {'ENROLLED':<20} FROM")
    legacy = []
    for entry in page.entries:
        kind = " (fwknop, legacy)" if entry.kind == "fwknop" else ""
        typer.echo(f"{entry.name:<24} {page.states[entry.name]:<{width}} "
                   f"{','.join(entry.services):<24} {entry.enrolled or '-':<20} "
                   f"{','.join(entry.sources) or 'anywhere'}{kind}")
        if kind and not entry.revoked:
            legacy.append(entry)
    if legacy:
        from spa.server.admin_fwknop import move_command

        typer.echo("\nstill on fwknop's packets; each moves to spa1:// (a new URI and QR "
                   "code, its fwknop keys stop) with:")
        for entry in legacy:
            typer.echo(f"  {move_command(entry.name, entry.endpoint)}")
    more = f"; next page: --after {page.entries[-1].name}" if len(page.entries) == limit else ""
    typer.echo(f"{len(page.entries)} shown of {page.count} client(s){more}", err=True)


@clients_app.command("export")
def clients_export(
    file: Annotated[Path | None, typer.Argument(help="Write here (0600, must not exist); "
                                                "without: stdout.")] = None,
    fmt: EXPORT_FORMAT = "json",
) -> None:
    """Every client with its secrets, for configuration management or a backup."""
    with local_errors():
        text = admin.export_clients(_ctx.config, fmt, now=time.time())
        if file is None:
            typer.echo("warning: this holds every client's secret; keep it as you keep "
                       "server.toml", err=True)
            sys.stdout.write(text)
            return
        write_private(file, text)
    typer.echo(f"exported to {file} (0600)")


@clients_app.command("import")
def clients_import(
    file: Annotated[Path, typer.Argument(help="A file `clients export` wrote (JSON or "
                                         "TOML).")],
    prune: Annotated[bool, typer.Option("--prune", help="Also remove clients the file does "
                                        "not hold.")] = False,
) -> None:
    """Make the store hold the file's clients (the same file twice changes nothing)."""
    with local_errors():
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}"
                             ) from None
        result = admin.import_clients(_ctx.config, file, text, prune=prune, now=time.time())
    for what, names in (("added", result.added), ("updated", result.updated),
                        ("removed", result.removed)):
        typer.echo(f"{what} {len(names)}: {', '.join(names) or '-'}")


@clients_app.command("set")
def clients_set(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The client to change.")],
    sources: Annotated[list[str] | None, typer.Option(
        "--from", metavar="NET", help=_FROM_HELP + "  Replaces the list it had.")] = None,
    no_from: Annotated[bool, typer.Option("--no-from", help="Accept its knocks from "
                                          "anywhere again.")] = False,
    admin_user: AdminUserOption = None,
    admin_password_file: AdminPasswordOption = None,
) -> None:
    """Change where a client may knock from; a running server applies it within a second.

    --from replaces the whole list (repeat it for several networks)."""
    with local_errors():
        if bool(sources) == no_from:
            raise LocalError("give --from NET (repeat for several networks) or --no-from, "
                             "one of the two")
        line = admin.set_sources(_ctx.config, name, sources or (), now=time.time(),
                                 login=admin_login(admin_user, admin_password_file))
    typer.echo(line)


def write_private(file: Path, text: str) -> None:
    """A new file, 0600, never through a link.  Raises LocalError."""
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise LocalError(f"{file} exists; remove it or name another file") from None
    except OSError as exc:
        raise LocalError(f"cannot write {file}: {exc.strerror}") from None
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


@app.command()
def revoke(name: Annotated[str, typer.Argument(metavar="NAME", help="The client to revoke.")],
           close: Annotated[bool, typer.Option("--close", help="Also end its live leases now "
                                               "(others sharing its address keep theirs; "
                                               "open sessions are not cut).")] = False,
           admin_user: AdminUserOption = None,
           admin_password_file: AdminPasswordOption = None,
           ) -> None:
    """Revoke a client: its knocks are refused from now on (no restart needed).

    In a group: at every member (revoked/NAME in etcd, as the group admin's
    etcd user)."""
    with local_errors():
        result = admin.revoke(_ctx.config, name, now=time.time(), close=close,
                              login=admin_login(admin_user, admin_password_file))
    typer.echo(result.message)


@app.command("dashboard-password")
def dashboard_password(
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the password from standard "
                                        "input (first line), for scripts; never pass it in "
                                        "an argument.")] = False,
) -> None:
    """Set the dashboard's password; setting it again signs every session out.

    Stored as an Argon2id hash, 0600, in the state directory."""
    import getpass
    import sys

    from spa.server import config as config_mod
    from spa.server import webauth

    with local_errors():
        state_dir = config_mod.load(_ctx.config).state_dir
        if stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            if not sys.stdin.isatty():
                raise LocalError("no terminal to ask for the password on; pipe it in with "
                                 "--stdin")
            password = getpass.getpass("new dashboard password: ")
            webauth.check_new_password(password)
            if getpass.getpass("the same again: ") != password:
                raise LocalError("the two passwords differ; nothing was changed")
        path = webauth.save(state_dir, webauth.make_credentials(password))
    typer.echo(f"dashboard password set ({path}, 0600, Argon2id); open sessions are signed "
               "out.  Start it with: spa-server dashboard")


@app.command()
def dashboard(
    listen: Annotated[str | None, typer.Option(
        help="HOST:PORT to serve on (default: \\[dashboard] listen, else 127.0.0.1:9713). "
        "Keep it on loopback and reach it through an ssh tunnel.")] = None,
    secure_cookie: Annotated[bool, typer.Option(
        "--secure-cookie", help="Behind a TLS proxy: the browser sends the session cookie "
        "over HTTPS only (plain http://127.0.0.1 logins then stop working).")] = False,
) -> None:
    """Serve the web dashboard (loopback; reach it through an ssh tunnel).

    Open leases with live countdowns, the activity table, knocks and scans
    over time, clients with revoke buttons.  Set a password first with
    spa-server dashboard-password."""
    from spa.server import config as config_mod
    from spa.server import dashboard as web
    from spa.server.logline import log_to_stderr as log

    def ready(url: str) -> None:
        port = url.rstrip("/").rpartition(":")[2]
        log(f"dashboard on {url} (from your laptop: ssh -L {port}:{where} THIS-SERVER, then "
            f"open http://127.0.0.1:{port}/)")

    with local_errors():
        config = config_mod.load(_ctx.config)
        where = listen or config.dashboard_listen
        if listen is not None:
            config_mod.check_listen("--listen", listen)
        host = where.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "::1", "localhost"):
            log(f"warning: serving on {host}, not loopback: the dashboard speaks plain HTTP, "
                "so the password would cross the network in clear; prefer an ssh tunnel")
        web.serve(web.Dashboard(_ctx.config, log=log), where, on_ready=ready,
                  secure_cookie=secure_cookie)


@app.command()
def run(
    backend: Annotated[str | None, typer.Option(help="Override the config's backend.")] = None,
    mode: Annotated[str | None, typer.Option(help="capture or udp (override the config).")
                    ] = None,
    interface: Annotated[str | None, typer.Option(help="Capture on this interface only.")
                         ] = None,
) -> None:
    """Serve until SIGTERM or SIGINT (SIGHUP reloads the config)."""
    from spa.server import runner

    with local_errors():
        server = runner.build(_ctx.config, backend=backend, mode=mode, interface=interface)
        server.start()
    stop = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        server.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    with local_errors():
        try:
            server.serve(stop)
        finally:
            server.shutdown()


@app.command()
def gate(
    backend: Annotated[str | None, typer.Option(help="Override the config's backend.")] = None,
    remove: Annotated[bool, typer.Option(
        "--remove", help="Remove every table, chain and ipset spa made (any config's) "
        "instead: the protected ports open again.  Stop spa-server first.")] = False,
) -> None:
    """Close the protected ports now, without serving (at boot, before the network).

    Installs the firewall table from the config, with the leases the daemon
    saved still open, and exits; contrib/systemd/spa-gate.service runs it
    before the network comes up.  Atomic: nothing is deleted first.
    With --remove, takes spa out of the firewall (the package's removal runs it)."""
    from spa.server import config as config_mod
    from spa.server import runner
    from spa.server.coexist import closed_ports

    if remove:
        _remove_gate()
        return
    with local_errors():
        line = runner.install_gate(_ctx.config, backend=backend)
        config = config_mod.load(_ctx.config)
    typer.echo(line)
    if (backend or config.backend) != "command":
        typer.echo(f"spa: {closed_ports(config.services)}")


def _remove_gate() -> None:
    from spa.backends.libnft import default_runner
    from spa.backends.teardown import remove_all

    with local_errors():
        try:
            nft = default_runner()
        except LocalError:
            nft = None  # no nftables at all: no table of ours either
        removal = remove_all(nft)
        for line in removal.removed:
            typer.echo(f"removed {line}")
        if not removal.removed and not removal.failed:
            typer.echo("spa has nothing in the firewall")
        if _uses_command_backend():
            typer.echo("the command backend's grants are on the firewall its programs drive, "
                       "not here: stop spa-server with flush_on_stop = true first, or remove "
                       "them there (docs/backends.md)")
        if removal.failed:
            raise LocalError("could not remove " + "; ".join(removal.failed))


def _uses_command_backend() -> bool:
    """Whether the config (if it can be read at all) names the command backend."""
    from spa.server import config as config_mod

    try:
        return config_mod.load(_ctx.config).backend == "command"
    except LocalError:
        return False


@app.command()
def check() -> None:
    """Does the host's firewall let through what spa lets in?  Exit 1 if not.

    Reads the live ruleset and, per protected service (and the knock port in
    udp mode), names every other firewall chain that would drop it, with the
    exact line to add.  The daemon runs the same check at start, after each
    reload and after another program changes the ruleset."""
    from spa.server import config as config_mod
    from spa.server.coexist import closed_ports, report
    from spa.server.gwroute import refuse_own_hosts

    with local_errors():
        config = config_mod.load(_ctx.config)
        refuse_own_hosts(config.services, config.path)
        if config.backend == "command":
            raise LocalError("check reads this host's nftables ruleset; the command backend's "
                             "grants are on the firewall its programs drive: check there "
                             "that a grant's rule comes before any that drops the port")
        if config.backend != "nftables":
            raise LocalError(f"check reads nftables rulesets; this config's backend is "
                             f"{config.backend} (the iptables backend's chain runs first in "
                             "INPUT, so the filter table's other rules cannot undo a grant)")
        from spa.backends.libnft import default_runner

        found = report(default_runner(), config)
        running = StateDir(config.state_dir).running_server()
    typer.echo(f"spa: {closed_ports(config.services)}")
    for line in found.lines:
        typer.echo(line)
    if running:
        typer.echo(f"kernel filter: {describe_filter(running.get('filter'))}")
    typer.echo(found.summary)
    if found.problems:
        raise typer.Exit(1)


def _format_left(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.999))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@app.command()
def status(json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
           ) -> None:
    """Show active leases: address, service, clients holding it, time left."""
    now = time.time()
    with local_errors():
        _, state, rows = admin.status(_ctx.config, now=now)
        running = state.running_server()
        info = state.backend_info()
    if json_out:
        typer.echo(json.dumps([{"address": r.address, "service": r.service,
                                "clients": r.clients, "seconds_left": round(r.seconds_left, 1)}
                               for r in rows]))
        return
    try:  # counted in SQL: no client row is read
        counts = admin.client_counts(_ctx.config, now=now)
        enrolled = (f"{counts.total} (" + ", ".join(f"{n} {name}" for name, n in counts.items())
                    + ")")
    except LocalError as exc:
        enrolled = str(exc)
    who = (f"running ({describe_holder(running, now)}, port {running.get('port')}/udp, "
           f"backend {running.get('backend')})" if running else "not running")
    typer.echo(f"server: {who}")
    typer.echo(f"clients: {enrolled}")
    if running:
        typer.echo(f"gate: {describe_gate(running.get('gate'), hold=running.get('hold'))}")
        typer.echo(f"kernel filter: {describe_filter(running.get('filter'))}")
        member = describe_group(running.get("group"))
        if member is not None:
            typer.echo(f"group: {member}")
        compat = running.get("fwknop")
        if isinstance(compat, dict):
            typer.echo(f"fwknop compat: port {compat.get('port')}/udp, {compat.get('clients')} "
                       "client(s) on fwknop's packets (legacy; spa-server clients says how "
                       "to move each)")
        checked = running.get("check")
        if isinstance(checked, dict):
            typer.echo(f"check: {checked.get('summary')}")
    if not running and rows and info.get("expires_by_itself") is False:
        typer.echo(f"warning: backend {info.get('backend')} cannot expire grants while the "
                   "server is down; they end when it starts again")
    if not rows:
        typer.echo("no active leases")
        return
    typer.echo(f"{'ADDRESS':<40} {'SERVICE':<10} {'LEFT':>9}  CLIENTS")
    for r in rows:
        typer.echo(f"{r.address:<40} {r.service:<10} {_format_left(r.seconds_left):>9}  "
                   f"{', '.join(r.clients)}")


@app.command()
def events(
    since: Annotated[str | None, typer.Option(help="Only this recent: 30s, 10m, 2h, 7d.")
                     ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Show what happened: knocks accepted and refused (with the reason), leases."""
    now = time.time()
    with local_errors():
        window = None if since is None else admin.parse_duration(since)
        rows = admin.events(_ctx.config, since=window, now=now)
    if json_out:
        typer.echo(json.dumps([e.as_dict() for e in rows]))
        return
    if not rows:
        typer.echo("no events" + (f" in the last {since}" if since else ""))
        return
    typer.echo(f"{'TIME':<20} {'OUTCOME':<11} {'ACTION':<6} {'REASON':<20} {'CLIENT':<14} "
               f"{'SOURCE':<28} {'SERVICE':<8} {'DUR':>5} {'COUNT':>6}")
    for e in rows:
        typer.echo(f"{clitools.format_utc(e.time):<20} {e.outcome:<11} {e.action or '-':<6} "
                   f"{e.reason or '-':<20} {e.client or '-':<14} "
                   f"{e.source or '-':<28} {e.service or '-':<8} "
                   f"{'-' if e.duration is None else e.duration:>5} {e.count:>6}")


@app.command()
def stats(
    since: Annotated[str | None, typer.Option(help="Only this recent: 24h, 7d, 30d.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Counts: knocks by reason, client and service; drops, scans; by month and country.

    From the event store: knocks accepted and refused (by reason, client,
    service), attempts the firewall dropped, scans, the busiest hostile
    sources, failed attempts by month (and by country with a GeoIP database)."""
    now = time.time()
    with local_errors():
        window = None if since is None else admin.parse_duration(since)
        report = admin.stats(admin.events(_ctx.config, since=window, now=now),
                             countries=admin.countries(_ctx.config))
    if json_out:
        typer.echo(json.dumps(report))
        return
    span = f"the last {since}" if since else "all recorded time"
    typer.echo(f"in {span}: {report['accepted']} knocks accepted, {report['refused']} "
               f"refused, {report['dropped']} attempts dropped by the firewall, "
               f"{report['scans']} scans")
    for title, key in (("accepted by client", "accepted_by_client"),
                       ("accepted by service", "accepted_by_service"),
                       ("refused by reason", "refused_by_reason"),
                       ("refused by client", "refused_by_client"),
                       ("dropped by service", "dropped_by_service"),
                       ("dropped by source", "dropped_by_source"),
                       ("scans by source", "scans_by_source"),
                       ("top sources of refusals and drops", "top_sources"),
                       *((("failed attempts by country", "failed_by_country"),
                          ("scans by country", "scans_by_country")) if report["geoip"] else ())):
        _print_table(title, report[key])
    monthly = report["monthly"]
    assert isinstance(monthly, dict)
    if monthly:
        typer.echo("failed attempts by month (refused knocks and dropped connections; UTC)"
                   + (", top countries" if report["geoip"] else ""))
        for month, row in monthly.items():
            top = ", ".join(f"{code} {count}" for code, count
                            in list(row["failed_by_country"].items())[:5])
            typer.echo(f"  {month}  {row['failed']:>8} failed {row['scans']:>5} scans"
                       + (f"   {top}" if report["geoip"] else ""))
    if not report["geoip"]:
        typer.echo("(countries: set [geoip] database = \"/path/GeoLite2-Country.mmdb\" in the "
                   "config)")


def _print_table(title: str, table: object) -> None:
    assert isinstance(table, dict)
    if table:
        typer.echo(f"{title}:")
        for name, count in table.items():
            typer.echo(f"  {name:<40} {count:>8}")


@app.command()
def demo(
    loopback: Annotated[bool, typer.Option("--loopback", help="Run on loopback with the "
                                           "memory backend, even as root.")] = False,
) -> None:
    """Watch it work: a grant, a replay and a tampered packet refused, a close.

    As root: two network namespaces, a real sshd hidden by nftables, a real ssh
    login before and after the knock.  Elsewhere (or with --loopback): a real
    server on loopback with the memory backend.  Leaves nothing behind."""
    from spa import demo_netns
    from spa.demo import run as run_loopback

    reason = "--loopback asked for" if loopback else demo_netns.unavailable()
    with local_errors():
        if reason is None:
            raise typer.Exit(demo_netns.run())
        if not loopback:
            typer.echo(f"(network namespaces unavailable: {reason}; running the loopback "
                       "demo instead)")
        raise typer.Exit(run_loopback())


app.command("completion")(completion.command("spa-server"))


def main() -> None:
    run_app(app, "spa-server")
