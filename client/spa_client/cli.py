"""spa-client's command line (thin: parse, call the library, print).

Exit status: 0 done (for `open`: the port accepts connections), 1 the port
did not open within --timeout, 2 usage or configuration error (one line, no
traceback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from spa import about, clitools, completion
from spa.clitools import run_app
from spa.core.errors import FormatError
from spa.core.uri import Enrollment, ServiceRef, parse, shell_cut
from spa.core.wire import NONCE_SIZE, Action
from spa_client import completers, knock
from spa_client.profile import (
    ENV_DIR,
    Profile,
    ProfileError,
    ProfileStore,
    default_dir,
    default_name,
)

if TYPE_CHECKING:
    from spa_client.doctor import Knocked  # doctor's module loads only when it runs

app = typer.Typer(
    help="Single-packet authorization client: sends one encrypted UDP packet that opens "
    "a service on a server for your address, for a while.\n\n"
    "Start with: spa-client enroll 'spa1://...' (the URI your admin gave you), then: "
    "spa-client open ssh HOST.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Context:
    directory: Path | None = None

    def store(self) -> ProfileStore:
        return ProfileStore(self.directory or default_dir())


_ctx = Context()


def local_errors() -> AbstractContextManager[None]:
    """Local errors: one line, exit status 2 (see spa.clitools)."""
    return clitools.local_errors("spa-client", ProfileError, knock.KnockError, FormatError)


# Commands are registered with typer in main(): only the one being run, or all
# of them for --help, a bare call or an unknown name.  Typer builds every
# registered command's parser at each start (about 1.5 ms a command here),
# which `open` should not pay for the seven it does not run.
_COMMANDS: dict[str, Callable[..., None]] = {}
_GLOBAL_OPTIONS_WITH_VALUE = {"--config-dir"}


def _command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(function: Callable[..., None]) -> Callable[..., None]:
        _COMMANDS[name] = function
        return function
    return register


def _invoked(argv: list[str]) -> str | None:
    """The command named in argv, if it is one of ours; None otherwise."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
        elif arg in ("-h", "--help"):
            return None
    return None


def register_commands(argv: list[str]) -> None:
    """Register the invoked command with typer (all of them when unsure); a
    second call adds only those not registered yet."""
    wanted = _invoked(argv)
    done = {info.name for info in app.registered_commands}
    for name, function in _COMMANDS.items():
        if (wanted is None or name == wanted) and name not in done:
            app.command(name=name)(function)


@app.callback()
def _root(
    version: Annotated[bool, about.version_option("spa-client")] = False,
    config_dir: Annotated[Path | None, typer.Option(
        "--config-dir", envvar=ENV_DIR, show_default=False,
        help="Where profiles live (default: your user config dir, "
        "~/.config/spa-client on Linux).")] = None,
) -> None:
    _ctx.directory = config_dir


@_command("enroll")
def enroll(
    uri: Annotated[str | None, typer.Argument(
        metavar="[URI]", help="The spa1:// URI from your admin ('-' reads it from standard "
        "input).")] = None,
    name: Annotated[str | None, typer.Option(help="Profile name (default: the server's "
                                             "host; an IPv6 address with '-' for ':').")
                    ] = None,
    qr_image: Annotated[Path | None, typer.Option(
        "--qr-image", metavar="FILE", help="Read the URI from a picture of its QR code "
        "(a screenshot, a photo, the PNG from spa-server enroll --png).")] = None,
) -> None:
    """Save an enrollment so that `open` can use it."""
    with local_errors():
        if (uri is None) == (qr_image is None):
            raise ProfileError("give the enrollment URI, or --qr-image FILE (one of the two)")
        if qr_image is not None:
            from spa_client.qrimage import QrImageError, read_uri

            try:
                text = read_uri(qr_image)
            except QrImageError as exc:
                raise ProfileError(str(exc)) from None
        else:
            text = sys.stdin.readline() if uri == "-" else str(uri)
        enrollment = _parse_argument(text, uri not in (None, "-"))
        profile = name or default_name(enrollment.host)
        path = _ctx.store().save(profile, enrollment)
    services = ", ".join(f"{s.name} ({s.protocol}/{s.port})" for s in enrollment.services)
    typer.echo(f"enrolled as {enrollment.client} at {enrollment.host}:{enrollment.port}; "
               f"profile {profile!r} saved in {path} (0600)")
    typer.echo(f"services: {services}")
    typer.echo(f"next: spa-client open {enrollment.services[0].name} {profile}")


def _parse_argument(text: str, typed: bool) -> Enrollment:
    """The enrollment a URI names.  A URI typed on the command line without
    quotes reaches us cut at its first '&': say so.  Raises FormatError."""
    try:
        return parse(text)
    except FormatError:
        head = shell_cut(text) if typed else None
        if head is None:
            raise
        raise FormatError("the URI was cut at '&' by the shell: put it in single quotes: "
                          f"spa-client enroll '{head}?sid=...&key=...&svc=...'") from None


def _progress(enabled: bool) -> Callable[[float, int], None]:
    def show(left: float, sends: int) -> None:
        if enabled:
            sys.stderr.write(f"\rwaiting for the port to open: {left:4.1f} s left, "
                             f"{sends} knock(s) sent ")
            sys.stderr.flush()
    return show


@_command("open")
def open_(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="Service to open, e.g. ssh.",
                                           autocompletion=completers.services)],
    host: Annotated[str, typer.Argument(metavar="HOST", help="Profile name or server host.",
                                        autocompletion=completers.hosts)],
    duration: Annotated[int | None, typer.Option(min=1, help="Seconds to ask for (the "
                                                 "server caps it; default: the service's "
                                                 "default).")] = None,
    allow_ip: Annotated[str | None, typer.Option(help="Ask for this address instead of the "
                                                 "packet's source (binds the grant to it).")
                        ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Send and exit 0 at once.")
                       ] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the port.")
                       ] = 5.0,
    otp: Annotated[str | None, typer.Option("--otp", metavar="CODE", help="The current code "
                                            "from your authenticator app, if your admin set "
                                            "one up (asked for when needed and not given).")
                   ] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep it open: re-knock before the "
                                       "lease ends and at once when your address changes, "
                                       "until Ctrl-C, which closes it.")] = False,
) -> None:
    """Knock to open SERVICE on HOST, then wait until its port accepts connections."""
    asked = duration or 0  # 0 asks for the service's default
    with local_errors():
        store = _ctx.store()
        profile = store.find(host)
        enrollment = profile.enrollment
        ref = knock.service_of(enrollment, service)
        address = knock.parse_allow_ip(allow_ip)
        code = _otp_code(otp, enrollment.otp, profile_name=host)
        targets = knock.resolve_all(enrollment.host, enrollment.port)
        if keep and enrollment.otp:
            raise knock.KnockError("--keep cannot renew for a profile that needs an "
                                   "authenticator code (each knock needs a new one); open "
                                   "with a longer --duration instead")
        if keep and not asked:
            asked = knock.KEEP_DEFAULT
        if no_wait or ref.protocol != "tcp":
            sent = knock.knock_each(
                knock.targets_for(targets, address=address, otp=code),
                lambda: knock.make_packet(enrollment, Action.OPEN, service, duration=asked,
                                          address=address, now=_now(),
                                          nonce=os.urandom(NONCE_SIZE), otp=code))
            typer.echo(f"knock sent: open {service} at {knock.shown(sent)}")
            return
        opened = knock.open_and_wait(enrollment, ref, targets, duration=asked,
                                     address=address, timeout=timeout,
                                     progress=_progress(sys.stderr.isatty()), otp=code,
                                     others_within=knock.OTHERS_WITHIN)
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if opened is None:
        typer.echo(f"spa-client: {service} ({ref.protocol}/{ref.port}) on "
                   f"{knock.shown(targets)} did not open within {timeout:g} s", err=True)
        raise typer.Exit(1)
    verb = "accepts" if len(opened.targets) == 1 else "accept"
    typer.echo(f"{service} is open: {knock.shown(opened.targets)} port {ref.port} {verb} "
               f"connections ({opened.took * 1000:.0f} ms)")
    if opened.shut:
        first = " (ssh tries it first)" if opened.shut[0] == targets[0] else ""
        typer.echo(f"spa-client: {knock.shown(opened.shut)}{first} did not open; "
                   f"`spa-client ssh-config {host}` makes ssh connect to the address that "
                   "opened", err=True)
    store.record_opened(profile.name, _now())  # for doctor; best effort, one small file
    if keep:
        _keep(enrollment, ref, targets, asked or knock.KEEP_DEFAULT)


@_command("close")
def close(
    service: Annotated[str, typer.Argument(metavar="SERVICE",
                                           help="Service to close, e.g. ssh.",
                                           autocompletion=completers.services)],
    host: Annotated[str, typer.Argument(metavar="HOST", help="Profile name or server host.",
                                        autocompletion=completers.hosts)],
) -> None:
    """End your own lease on SERVICE (others behind your address keep theirs)."""
    with local_errors():
        profile = _ctx.store().find(host)
        enrollment = profile.enrollment
        knock.service_of(enrollment, service)
        sent = _close_each(enrollment, service,
                           knock.resolve_all(enrollment.host, enrollment.port))
    typer.echo(f"close sent: {service} at {knock.shown(sent)}")


def _close_each(enrollment: Enrollment, service: str, targets: tuple[knock.Target, ...]
                ) -> tuple[knock.Target, ...]:
    """A close to each family's address: each ends the lease of the address
    it leaves from (a close needs no authenticator code)."""
    return knock.knock_each(targets, lambda: knock.make_packet(
        enrollment, Action.CLOSE, service, duration=0, address=None, now=_now(),
        nonce=os.urandom(NONCE_SIZE)))


def _otp_code(given: str | None, needed: bool, *, profile_name: str, tty: bool = False) -> str:
    """The authenticator code to send: --otp, or asked for on the terminal
    (with tty=True on /dev/tty: standard input may be ssh's channel)."""
    if given is not None:
        return knock.check_otp(given)
    if not needed:
        return ""
    if tty:
        try:
            with open("/dev/tty", "r+") as terminal:
                terminal.write("code from your authenticator app: ")
                terminal.flush()
                return knock.check_otp(terminal.readline().strip())
        except OSError:
            pass
    elif sys.stdin.isatty():
        return knock.check_otp(typer.prompt("code from your authenticator app"))
    raise knock.KnockError(f"profile {profile_name!r} needs a code from your "
                           "authenticator app: pass --otp CODE")


def _keep(enrollment: Enrollment, ref: ServiceRef, targets: tuple[knock.Target, ...],
          duration: int) -> None:
    """--keep: renew until Ctrl-C, then close.  A live countdown on a terminal,
    one line per renewal otherwise."""
    import signal
    import time

    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    live = sys.stderr.isatty()

    def show(event: str, left: float, address: str | None) -> None:
        if event == "tick":
            if live:
                sys.stderr.write(f"\r{ref.name} open; renewing in {left:4.0f} s "
                                 "(Ctrl-C closes it) ")
                sys.stderr.flush()
            return
        why = "your address changed" if event == "moved" else "renewed"
        line = (f"{clitools.format_utc(time.time())} {ref.name}: {why} (from {address or '?'}); "
                f"next in {left:.0f} s")
        sys.stderr.write(("\r\033[K" if live else "") + line + "\n")
        sys.stderr.flush()

    knock.keep_open(enrollment, ref, targets, duration=duration, show=show,
                    stop=lambda: interrupted)
    with local_errors():
        sent = _close_each(enrollment, ref.name, targets)
    if live:
        sys.stderr.write("\r\033[K")
    typer.echo(f"closed {ref.name} at {knock.shown(sent)}")


@_command("connect")
def connect(
    host: Annotated[str, typer.Argument(metavar="HOST", help="The server (ssh's %h).",
                                        autocompletion=completers.hosts)],
    port: Annotated[int, typer.Argument(metavar="PORT", min=1, max=65535,
                                        help="The TCP port (ssh's %p).")],
    otp: Annotated[str | None, typer.Option("--otp", metavar="CODE", help="Authenticator "
                                            "code, if needed (else asked on the terminal).")
                   ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the port.")
                       ] = 5.0,
) -> None:
    """Knock for PORT's service, wait, then relay stdin/stdout (ssh's ProxyCommand)."""
    import socket

    from spa_client.relay import relay

    with local_errors():
        store = _ctx.store()
        profile = store.find(host)
        enrollment = profile.enrollment
        ref = next((s for s in enrollment.services if s.protocol == "tcp" and s.port == port),
                   None)
        if ref is None:
            offered = ", ".join(f"{s.name} ({s.protocol}/{s.port})" for s in enrollment.services)
            raise knock.KnockError(f"profile {profile.name!r} has no TCP service on port {port} "
                                   f"(it has: {offered})")
        code = _otp_code(otp, enrollment.otp, profile_name=profile.name, tty=True)
        targets = knock.resolve_all(enrollment.host, enrollment.port)
        opened = knock.open_and_wait(enrollment, ref, targets, duration=0, address=None,
                                     timeout=timeout, progress=lambda left, sends: None,
                                     otp=code)
        if opened is None:
            raise knock.KnockError(f"{ref.name} (tcp/{port}) on {knock.shown(targets)} did not "
                                   f"open within {timeout:g} s (spa-client doctor {host} says "
                                   "why)")
        store.record_opened(profile.name, _now())  # for doctor, as open does
        target = opened.targets[0]  # the address that opened (first)
        try:
            sock = socket.create_connection((target.address, port), timeout=timeout)
        except OSError as exc:
            raise knock.KnockError(f"cannot connect to {target.address} port {port}: "
                                   f"{exc.strerror or exc}") from None
    sock.settimeout(None)
    with sock:
        relay(sock, sys.stdin.fileno(), sys.stdout.fileno())


@_command("ssh-config")
def ssh_config(
    host: Annotated[str, typer.Argument(metavar="HOST", help="Profile name or server host.",
                                        autocompletion=completers.hosts)],
) -> None:
    """Print the ~/.ssh/config lines that make `ssh HOST` knock first."""
    from spa_client import sshconfig
    from spa_client.profile import user_dir

    with local_errors():
        store = _ctx.store()
        profile = store.find(host)
        directory = store.directory.absolute()
        try:  # a new shell has neither --config-dir nor $SPA_CLIENT_DIR: say where
            found = sshconfig.lines(profile.enrollment.host, _program_path(),
                                    None if directory == user_dir().absolute() else directory)
        except sshconfig.SshConfigError as exc:
            raise ProfileError(f"cannot write the ProxyCommand: {exc}") from None
    for line in found:
        typer.echo(line)


def _program_path() -> str:
    """`spa-client` when that is the program on PATH, else this program's
    absolute path (a virtualenv's, a checkout's)."""
    import shutil
    from pathlib import Path as _Path

    found = shutil.which("spa-client")
    argv0 = _Path(sys.argv[0])
    if argv0.name == "spa-client" and argv0.exists():
        running = argv0.resolve()
        return "spa-client" if found and _Path(found).resolve() == running else str(running)
    return found or "spa-client"


@_command("doctor")
def doctor(
    host: Annotated[str, typer.Argument(metavar="HOST", help="Profile name or server host.",
                                        autocompletion=completers.hosts)],
    service: Annotated[str | None, typer.Option(help="Service to knock for (default: the "
                                                "profile's first).")] = None,
    otp: Annotated[str | None, typer.Option("--otp", metavar="CODE", help="The current code "
                                            "from your authenticator app, if the profile "
                                            "needs one (asked for on a terminal when not "
                                            "given).")] = None,
    time_server: Annotated[str, typer.Option("--time-server", metavar="HOST", help="Measure "
                                             "this clock against HOST by SNTP ('none': do "
                                             "not).")] = "pool.ntp.org",
) -> None:
    """Why a knock does not open: profile, name, clock, a real knock; one line to fix."""
    from spa_client import doctor as doc
    from spa_client import sntp

    server = None if time_server.lower() == "none" else time_server
    with local_errors():
        findings = doc.diagnose(
            _ctx.store(), host, resolve=lambda h, p: knock.shown(knock.resolve_all(h, p)),
            clock=doc.kernel_clock, time_server=server,
            time_offset=lambda: None if server is None else sntp.query_offset(server),
            knock=lambda profile: _doctor_knock(profile, service, otp), now=_now())
    for finding in findings:
        mark = {True: "ok  ", False: "FAIL", None: "??  "}[finding.ok]
        typer.echo(f"{mark} {finding.what}")
    typer.echo(doc.verdict(findings))
    if any(f.ok is False for f in findings):
        raise typer.Exit(1)


def _doctor_knock(profile: Profile, service: str | None, otp: str | None) -> Knocked:
    """doctor's knock: is the port open already; else knock (with the code,
    asked for as `open` does) and wait up to doctor's KNOCK_TIMEOUT."""
    from spa_client import doctor as doc

    e = profile.enrollment
    ref = e.services[0] if service is None else knock.service_of(e, service)
    targets = knock.resolve_all(e.host, e.port)
    if ref.protocol == "tcp" and _open_already(targets, ref):
        return doc.Knocked(doc.Fact.OPEN_ALREADY, ref)
    if e.otp and otp is None and not sys.stdin.isatty():
        return doc.Knocked(doc.Fact.NOT_SENT, ref)
    code = _otp_code(otp, e.otp, profile_name=profile.name)
    if ref.protocol != "tcp":
        knock.knock_each(knock.targets_for(targets, address=None, otp=code),
                         lambda: knock.make_packet(e, Action.OPEN, ref.name, duration=0,
                                                   address=None, now=_now(),
                                                   nonce=os.urandom(NONCE_SIZE), otp=code))
        return doc.Knocked(doc.Fact.UNPROBED, ref)
    opened = knock.open_and_wait(e, ref, targets, duration=0, address=None,
                                 timeout=doc.KNOCK_TIMEOUT, progress=lambda left, sends: None,
                                 otp=code, others_within=knock.OTHERS_WITHIN)
    if opened is None:
        return doc.Knocked(doc.Fact.SHUT, ref)
    return doc.Knocked(doc.Fact.OPENED, ref, opened.took,
                       opened=tuple(t.address for t in opened.targets),
                       shut=tuple(t.address for t in opened.shut))


def _open_already(targets: tuple[knock.Target, ...], ref: ServiceRef) -> bool:
    probe = knock.PortProbe(targets, ref.port)
    try:
        probe.start()
        return probe.wait(0.5) is not None
    finally:
        probe.close()


@_command("profiles")
def profiles() -> None:
    """List your enrolled servers and their services."""
    with local_errors():
        store = _ctx.store()
        found = [store.load(name) for name in store.names()]
    if not found:
        typer.echo(f"no profiles in {store.profiles}; enroll first: spa-client enroll URI")
        return
    typer.echo(f"{'PROFILE':<20} {'SERVER':<32} {'CLIENT':<20} SERVICES")
    for profile in found:
        e = profile.enrollment
        server = f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}"
        services = ", ".join(f"{s.name} ({s.protocol}/{s.port})" for s in e.services)
        extra = "  (needs an authenticator code)" if e.otp else ""
        typer.echo(f"{profile.name:<20} {server:<32} {e.client:<20} {services}{extra}")


@_command("forget")
def forget(
    host: Annotated[str, typer.Argument(metavar="HOST", help="Profile name or server host.",
                                        autocompletion=completers.hosts)],
) -> None:
    """Delete a profile (its secret goes with it; ask your admin to revoke the client)."""
    with local_errors():
        path = _ctx.store().forget(host)
    typer.echo(f"removed {path}; the server still knows this client until its admin runs "
               "spa-server revoke")


def _now() -> float:
    import time

    return time.time()


_command("completion")(completion.command("spa-client"))


def main() -> None:
    register_commands(sys.argv[1:])
    run_app(app, "spa-client")
