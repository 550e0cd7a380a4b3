"""`spa-server group ...`: make, join and inspect a group of servers on etcd
(thin: parse, call spa.server.admin_groupsetup, print; docs/groups.md).

Passwords never come in an argument: an etcd password is read from a file
(0600, checked) or from standard input ('-').
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from spa import clitools
from spa.clitools import format_utc
from spa.core.errors import FormatError
from spa.core.keys import SERVER_ID_SIZE
from spa.group.kv import KV
from spa.group.policy import LOCAL_ONLY_RISK
from spa.group.settings import DEFAULT_TIMEOUT, GroupSettings
from spa.server import admin_groupsetup as setup
from spa.server import config as config_mod
from spa.server import groupstore
from spa.server.config import DEFAULT_CONFIG, ServerConfig
from spa.server.errors import LocalError
from spa.server.groupconfig import check_user, parse_group
from spa.server.groupstore import Login, read_password

STDIN = "-"  # --admin-password-file -: the password is standard input's first line
group_app = typer.Typer(
    help="A group of servers sharing one server id and one client table in etcd "
    "(docs/groups.md): init, join, status, import, roles.",
    no_args_is_help=True)

AdminUserOption = Annotated[str | None, typer.Option(
    "--admin-user", metavar="USER", envvar="SPA_GROUP_ADMIN_USER",
    help="The group admin's etcd user (its role may write the group's prefix).")]
AdminPasswordOption = Annotated[str | None, typer.Option(
    "--admin-password-file", metavar="FILE", envvar="SPA_GROUP_ADMIN_PASSWORD_FILE",
    help="Its password: a file (0600, one line), or - to read one line from standard "
    "input (asked for, without echo, on a terminal).  Never an argument.")]
GroupOption = Annotated[str | None, typer.Option(
    "--group", metavar="NAME", help="The group (default: the config's [group] name).")]
EndpointOption = Annotated[list[str] | None, typer.Option(
    "--endpoint", metavar="URL", help="An etcd client URL, https://HOST:PORT (repeat for "
    "each cluster member; default: the config's [group] endpoints).")]
CaOption = Annotated[Path | None, typer.Option(
    "--ca", metavar="FILE", help="The etcd cluster's CA certificate (default: [group] "
    "ca_file).")]
CertOption = Annotated[Path | None, typer.Option(
    "--cert", metavar="FILE", help="A client certificate the cluster's CA signed, without a "
    "CN (default: [group] cert_file).")]
KeyOption = Annotated[Path | None, typer.Option(
    "--key", metavar="FILE", help="Its key, 0600 (default: [group] key_file).")]
TimeoutOption = Annotated[float | None, typer.Option(
    "--timeout", metavar="SECONDS", help="Per etcd call and endpoint (default: [group] "
    "timeout, else 2).")]


def _config_path(ctx: typer.Context) -> Path:
    """The --config the root command was given."""
    path = ctx.find_root().params.get("config")  # as given: typer converts it for the callback
    return Path(path) if isinstance(path, str | Path) else DEFAULT_CONFIG


def local_errors() -> AbstractContextManager[None]:
    """Local errors: one line, exit status 2 (see spa.clitools)."""
    return clitools.local_errors("spa-server", LocalError, FormatError)


def admin_login(user: str | None, password_file: str | None) -> Login | None:
    """The admin's etcd login from the options, or None when neither is
    given.  Raises LocalError."""
    if user is None and password_file is None:
        return None
    if user is None or password_file is None:
        raise LocalError("give --admin-user USER and --admin-password-file FILE together "
                         "('-': the password from standard input)")
    check_user("--admin-user:", user)
    if password_file == STDIN:
        if sys.stdin.isatty():  # a person at a terminal: ask, without echo
            import getpass

            line = getpass.getpass(f"etcd password of {user}: ")
        else:
            line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise LocalError("--admin-password-file -: standard input held no password (give "
                             "it on one line)")
        return Login(user, line)
    return Login(user, read_password(Path(password_file), "admin password file"))


def need_admin(user: str | None, password_file: str | None, command: str) -> Login:
    login = admin_login(user, password_file)
    if login is None:
        raise LocalError(f"group {command} writes to etcd as the group's admin: give "
                         "--admin-user USER --admin-password-file FILE ('-': stdin)")
    return login


def _config(path: Path, *, required: bool) -> ServerConfig | None:
    """The config where it exists (or must).  Raises LocalError."""
    if not required and not os.path.lexists(path):
        return None
    return config_mod.load(path)


@dataclass(frozen=True, slots=True)
class AdminConnection:
    """The options of a command that writes the group as its admin: where
    etcd is (each defaults to the config's [group]) and the admin's login."""

    group: str | None = None
    endpoint: list[str] | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout: float | None = None
    admin_user: str | None = None
    admin_password_file: str | None = None

    def open(self, config: ServerConfig | None, command: str
             ) -> tuple[Login, GroupSettings, KV]:
        """The admin's login, the group's settings and the store, connected.
        Raises LocalError."""
        login = need_admin(self.admin_user, self.admin_password_file, command)
        settings = setup.connection(config.group if config else None, group=self.group,
                                    endpoints=self.endpoint or [], ca=self.ca, cert=self.cert,
                                    key=self.key, timeout=self.timeout)
        return login, settings, groupstore.connect(settings, login)


# AdminConnection's fields as options, in --help's order
_ADMIN_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                      annotation=option)
    for name, option in (("group", GroupOption), ("endpoint", EndpointOption),
                         ("ca", CaOption), ("cert", CertOption), ("key", KeyOption),
                         ("timeout", TimeoutOption), ("admin_user", AdminUserOption),
                         ("admin_password_file", AdminPasswordOption))]


def admin_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command (ctx, admin: AdminConnection, its own options...) the
    options of AdminConnection after ctx and before its own, and hand them
    to it as `admin`: the options are defined once for every such command."""
    ctx, *own = [param for param in inspect.signature(command, eval_str=True).parameters.values()
                 if param.name != "admin"]

    @functools.wraps(command)
    def with_options(**given: Any) -> None:
        admin = AdminConnection(**{param.name: given.pop(param.name)
                                   for param in _ADMIN_OPTIONS})
        command(admin=admin, **given)

    # what typer reads (inspect.signature honours __signature__)
    with_options.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [ctx, *_ADMIN_OPTIONS, *own])
    return with_options


@group_app.command("init")
@admin_options
def init(
    ctx: typer.Context,
    admin: AdminConnection,
    from_this_server: Annotated[bool, typer.Option(
        "--from-this-server", help="Give the group this server's own server id and bring "
        "its clients in: their URIs keep working at every member (one standalone server "
        "only: docs/groups.md).")] = False,
) -> None:
    """Create a group in etcd: its meta record, with a new random server id.

    Refused if the group exists.  Needs the group admin's etcd login."""
    path = _config_path(ctx)
    with local_errors():
        config = _config(path, required=from_this_server)
        login, settings, kv = admin.open(config, "init")
        now = time.time()
        if from_this_server:
            assert config is not None
            if config.group is not None:
                raise LocalError(f"{path} is a member of group {config.group.name} already; "
                                 "--from-this-server is for a standalone server")
            server_id = config.server_id
        else:
            server_id = os.urandom(SERVER_ID_SIZE)
        meta = setup.init(kv, settings, login.user, server_id=server_id, now=now)
        report = (setup.import_here(path, settings, kv, login.user, now=now)
                  if from_this_server else None)
    which = "this server's server id" if from_this_server else "a new random server id"
    typer.echo(f"group {meta.group} created in etcd with {which}")
    if report is not None:
        for line in report.lines():
            typer.echo(line)
    typer.echo(f"next, on each member: spa-server group join --group {meta.group} --member "
               "NAME --endpoint URL --ca FILE --cert FILE --key FILE --user USER "
               "--password-file FILE")


@group_app.command("import")
@admin_options
def import_(ctx: typer.Context, admin: AdminConnection) -> None:
    """Bring this server's own clients into the group (whose server id must be this
    server's: group init --from-this-server).  Running it again changes nothing."""
    path = _config_path(ctx)
    with local_errors():
        config = config_mod.load(path)
        login, settings, kv = admin.open(config, "import")
        report = setup.import_here(path, settings, kv, login.user, now=time.time())
    for line in report.lines():
        typer.echo(line)


def _default_member() -> str:
    return socket.gethostname().split(".")[0]


@group_app.command("join")
def join(
    ctx: typer.Context,
    group: Annotated[str, typer.Option("--group", metavar="NAME", help="The group.")],
    password_file: Annotated[Path, typer.Option(
        "--password-file", metavar="FILE", help="That user's password (0600, one line); "
        "the config names the file, never the password.")],
    endpoint: Annotated[list[str], typer.Option(
        "--endpoint", metavar="URL", help="An etcd client URL, https://HOST:PORT (repeat "
        "for each cluster member).")],
    ca: Annotated[Path, typer.Option("--ca", metavar="FILE",
                                     help="The etcd cluster's CA certificate.")],
    cert: Annotated[Path, typer.Option("--cert", metavar="FILE", help="This member's client "
                                       "certificate (the cluster's CA signed it; no CN).")],
    key: Annotated[Path, typer.Option("--key", metavar="FILE", help="Its key (0600).")],
    member: Annotated[str | None, typer.Option(
        "--member", metavar="NAME", help="This server's name in the group (default: the "
        "host name's first label).")] = None,
    user: Annotated[str | None, typer.Option(
        "--user", metavar="USER", help="This member's etcd user (its role reads the group "
        "and writes its claims, leases, activations and member record; default: "
        "GROUP-MEMBER, as group roles names it).")] = None,
    on_store_down: Annotated[str, typer.Option(
        "--on-store-down", metavar="MODE", help="fail_closed (grant nothing while etcd "
        "cannot be reached) or local_only (grant on the local replay cache alone: a knock "
        "captured on the way to one member is then accepted at another within the "
        "window).")] = "fail_closed",
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="Per etcd "
                                           "call and endpoint.")] = DEFAULT_TIMEOUT,
    force: Annotated[bool, typer.Option("--force", help="Join even though clients enrolled "
                                        "here (for this server's own id) stop working.")
                     ] = False,
) -> None:
    """Make this server a member: check its etcd login reads the group, then
    write the [group] table and the group's server id into its config.

    Comments in the config are kept.  Restart the server (or reload) afterwards."""
    path = _config_path(ctx)
    with local_errors():
        name = member or _default_member()
        table = {"name": group, "member": name,
                 "endpoints": list(endpoint), "ca_file": str(ca.absolute()),
                 "cert_file": str(cert.absolute()), "key_file": str(key.absolute()),
                 "user": user or f"{group}-{name}",
                 "password_file": str(password_file.absolute()),
                 "on_store_down": on_store_down, "timeout": timeout}
        settings = parse_group(path, {"group": table}, where="group join:")
        assert settings is not None
        kv = groupstore.connect(settings)
        _, meta = setup.join(path, settings, kv, force=force)
    typer.echo(f"{path}: [group] written; this server is member {settings.member} of group "
               f"{meta.group} (server id: the group's, created {format_utc(meta.created)})")
    if settings.on_store_down.value == "local_only":
        typer.echo(f"warning: {LOCAL_ONLY_RISK}")
    typer.echo("restart spa-server (systemctl restart spa-server) so it serves the group's "
               "clients")


@group_app.command("status")
def status(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """The group as etcd holds it: each endpoint's answer, the revision, the
    members, clients by state, live leases.  Exit 1 when no endpoint answers."""
    path = _config_path(ctx)
    with local_errors():
        config = config_mod.load(path)
        if config.group is None:
            raise LocalError(f"{path} names no group ([group]); join one with: spa-server "
                             "group join")
        settings = config.group

        def probe(url: str) -> None:
            setup.probe(groupstore.connect_one(settings, url), settings)

        endpoints = setup.endpoint_states(settings, probe)
        if not any(e.answered for e in endpoints):
            found = None
        else:
            found = setup.status(groupstore.connect(settings), settings, settings.user,
                                 now=time.time())
            groupstore.check_server_id(config, found.meta)
    if json_out:
        typer.echo(json.dumps({
            "group": settings.name, "member": settings.member,
            "endpoints": [{"url": e.url, "answered": e.answered, "detail": e.detail}
                          for e in endpoints],
            **({} if found is None else {
                "revision": found.revision, "created": found.meta.created,
                "members": [{"member": m.member, "started": m.started}
                            for m in found.members],
                "clients": found.counts, "leases": found.leases})}))
    else:
        typer.echo(f"group {settings.name}, this server member {settings.member}")
        for e in endpoints:
            typer.echo(f"  {e.url:<40} {e.detail}")
        if found is not None:
            typer.echo(f"revision {found.revision}; created {format_utc(found.meta.created)}")
            typer.echo(f"members ({len(found.members)}): " + (", ".join(
                f"{m.member} (since {format_utc(m.started)})" for m in found.members) or "-"))
            typer.echo(f"clients: {sum(found.counts.values())} (" + ", ".join(
                f"{n} {state}" for state, n in found.counts.items()) + ")")
            typer.echo(f"live leases: {found.leases}")
    if found is None:
        typer.echo("etcd: no endpoint answered", err=True)
        raise typer.Exit(1)


@group_app.command("roles")
def roles(
    group: Annotated[str, typer.Option("--group", metavar="NAME", help="The group.")],
    member: Annotated[list[str] | None, typer.Option(
        "--member", metavar="NAME", help="A member to make a user for (repeat).")] = None,
) -> None:
    """Print the etcdctl commands that make the group's roles and users.

    The admin's role writes the group; a member's reads it and writes only
    claims, leases, activations and its own member key (docs/groups.md,
    "Access").  Run them as etcd's root user; each `user add` asks for the
    password."""
    from spa.group import rbac
    from spa.group.layout import GroupNameError

    with local_errors():
        try:
            commands = rbac.role_commands(group, member or [])
        except GroupNameError as exc:
            raise LocalError(f"--group or --member: {exc}") from None
    typer.echo("# as etcd's root user (add your --endpoints, --cacert, --cert, --key); each "
               "`user add` asks for that user's password")
    for argv in commands:
        typer.echo(shlex.join(["etcdctl", *argv]))
    typer.echo("etcdctl auth enable   # once, if RBAC is not on yet")
