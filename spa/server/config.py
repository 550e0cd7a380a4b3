"""The server's configuration file (TOML): settings, services, clients.

Invariants:
- The file holds client secrets: it is written 0600 (atomically, through
  `safefs.Directory.replace`) and refused on load when group or others may
  read it.
- No link is followed (docs/threat-model.md, "Links the service user
  plants"): the file and the edit lock beside it are opened relative to the
  config directory's descriptor with O_NOFOLLOW and checked by fstat; root
  writes in the config directory only when root owns it.
- An edit reads the file once (what it validates is what it edits), and
  writes only if the file at the name is still that one: an edit another
  program saved meanwhile stops ours with one line, and is kept.
- Loading is strict: an unknown section or key, a wrong type or an invalid
  value raises ConfigError with one line naming the file, the key and the fix.
- Edits (`init`, `enroll`, `revoke`) go through tomlkit, so an admin's
  comments and layout survive them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import functools
import ipaddress
import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from spa.backends.cmdspec import CommandSpec, parse_spec
from spa.backends.names import MAX_INSTANCE, Names, instance_problem
from spa.clitools import UTC_FORMAT as UTC_FORMAT  # (re-exported: callers of config_mod)
from spa.clitools import format_utc as format_utc
from spa.clitools import parse_utc as parse_utc
from spa.core.errors import FormatError
from spa.core.gwhost import gateway_host_problem as gateway_host_problem  # (re-exported)
from spa.core.gwhost import host_name_problem
from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.otp import MIN_SECRET_BITS
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy, Service
from spa.core.sources import NOWHERE, SourceNetwork, canonical_sources, source_networks
from spa.core.uri import is_valid_client_name
from spa.core.wire import IPAddress
from spa.group.settings import GroupSettings
from spa.server.configvalue import describe, expect
from spa.server.errors import ConfigError, LocalError
from spa.server.groupconfig import parse_group
from spa.server.gwclash import gateway_clash
from spa.server.safefs import Directory, Stamp, open_dir, refuse_foreign_dir
from spa.server.secretfile import read_secret

DEFAULT_CONFIG = Path("/etc/spa/server.toml")
DEFAULT_STATE_DIR = Path("/var/lib/spa")
DEFAULT_PORT = 62201
FWKNOP_PORT = 62201  # fwknop's default port (the compat listener's, when ours is elsewhere)
BACKENDS = ("nftables", "iptables", "command", "memory")
MODES = ("capture", "udp")
HOLD_CHOICES = ("auto", "on", "off")  # the owned hold table (spa/backends/nftables.py)
DEFAULT_BACKEND = "nftables"  # grants expire in the kernel even if the daemon dies
DEFAULT_MODE = "capture"  # nothing bound to the knock port
DEFAULT_RETENTION_DAYS = 90
DEFAULT_DASHBOARD_LISTEN = "127.0.0.1:9713"  # loopback: reach it through an ssh tunnel

_SERVER_KEYS = {
    "server_id", "listen_port", "listen_address", "backend", "mode", "interface",
    "state_dir", "window", "event_retention_days", "flush_on_stop", "hold_table", "fwknop_port",
    "instance",
}
_SERVICE_KEYS = {"protocol", "port", "default_duration", "max_duration", "host", "listen_port"}
_CLIENT_KEYS = {"secret", "services", "allow_other_address", "revoked", "enrolled",
                "enroll_by", "otp_secret", "close_leases", "endpoint", "old_secret",
                "old_until", "sources", "kind", "fwknop_key", "fwknop_hmac_key"}
KIND_SPA, KIND_FWKNOP = "spa", "fwknop"  # a client's protocol (ClientEntry.kind)
OLD_KEY = "~old"  # key name suffix of a rotated-out secret in its grace period ('~' is
# never in a client name, so it cannot collide)


@dataclass(frozen=True, slots=True, repr=False)
class ClientEntry:
    name: str
    secret: bytes
    services: tuple[str, ...]
    allow_other_address: bool = False
    revoked: bool = False
    enrolled: str = ""
    enroll_by: str = ""  # pending: first knock due by this UTC time (empty: no limit)
    otp_secret: str = field(default="", repr=False)  # base32 TOTP secret (empty: no code)
    close_leases: bool = False  # revoked with --close: its leases end at once, too
    endpoint: str = ""  # HOST[:PORT] its URI names (for rotate)
    old_secret: bytes = field(default=b"", repr=False)  # the secret before a rotate ...
    old_until: str = ""  # ... which keeps working until this UTC time (grace)
    # networks its knocks may come from, canonical (spa.core.sources); empty: anywhere
    sources: tuple[str, ...] = ()
    # "spa" (our protocol) or "fwknop" (fwknop's packets on the compat port: the keys
    # below, as fwknop's KEY_BASE64 and HMAC_KEY_BASE64 decode; `secret` is empty)
    kind: str = "spa"
    fwknop_key: bytes = field(default=b"", repr=False)
    fwknop_hmac_key: bytes = field(default=b"", repr=False)

    def __repr__(self) -> str:
        return f"ClientEntry({self.name!r}, services={self.services}, revoked={self.revoked})"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    path: Path
    server_id: bytes = field(repr=False)
    listen_port: int = DEFAULT_PORT
    listen_address: str = "::"
    backend: str = DEFAULT_BACKEND
    mode: str = DEFAULT_MODE
    interface: str = ""
    state_dir: Path = DEFAULT_STATE_DIR
    window: float = 30.0
    event_retention_days: int = DEFAULT_RETENTION_DAYS
    flush_on_stop: bool = False
    hold_table: str = "auto"
    fwknop_port: int = 0  # the compat listener's UDP port for fwknop's packets (0: off)
    # several servers on one host: each its own tables and chain (spa/backends/names.py);
    # "" (the default): the names of every install before, `inet spa`
    instance: str = ""
    metrics_listen: str = ""  # [metrics] listen = "127.0.0.1:9712" (empty: no endpoint)
    geoip_database: Path | None = None  # [geoip] database = "/path/Country.mmdb"
    dashboard_listen: str = DEFAULT_DASHBOARD_LISTEN  # [dashboard] listen
    command: CommandSpec | None = None  # [command]: the command backend's argv templates
    # [group]: a member of a group on etcd (spa/server/groupconfig.py); None: standalone.
    # Its server id is the group's meta record's: server_id above must equal it.
    group: GroupSettings | None = None
    services: Mapping[str, Service] = field(default_factory=lambda: dict(DEFAULT_SERVICES))
    clients: Mapping[str, ClientEntry] = field(default_factory=dict)

    @property
    def names(self) -> Names:
        """This instance's tables, chain and ipsets in the kernel."""
        return Names(self.instance)

    def policy(self, activated: AbstractSet[str] = frozenset()) -> Policy:
        """The rules; `activated`: pending clients known to have knocked in time."""
        return Policy(dict(self.services),
                      {c.name: client_policy(c) for c in self.clients.values()}, activated)

    def otp_secrets(self) -> dict[str, str]:
        """name -> TOTP secret, for the clients that must send an authenticator code."""
        return {c.name: c.otp_secret for c in self.clients.values() if c.otp_secret}

    def secrets(self, now: float | None = None) -> dict[str, bytes]:
        """key name -> master secret, revoked clients included (they get
        `revoked`); with `now`, also NAME~old for a rotated-out secret still
        in its grace period."""
        found = {c.name: c.secret for c in self.clients.values() if c.kind == KIND_SPA}
        if now is not None:
            for c in self.clients.values():
                if (c.kind == KIND_SPA and c.old_secret and c.old_until
                        and parse_utc(c.old_until) > now):
                    found[c.name + OLD_KEY] = c.old_secret
        return found

    def grace_ends(self) -> dict[str, float]:
        """key name (NAME~old) -> when its grace period ends."""
        return {c.name + OLD_KEY: parse_utc(c.old_until) for c in self.clients.values()
                if c.old_secret and c.old_until}


def client_policy(entry: ClientEntry) -> ClientPolicy:
    """One client's rules, as the core's Policy holds them."""
    return ClientPolicy(entry.name, service_set(entry.services), entry.allow_other_address,
                        entry.revoked, parse_utc(entry.enroll_by) if entry.enroll_by else None,
                        network_set(entry.sources))


@functools.lru_cache(maxsize=256)
def service_set(services: tuple[str, ...]) -> frozenset[str]:
    """One frozenset per combination of services: 10^5 clients share a few
    (a set each was 24 MB, and 10^5 more objects for every full GC pass)."""
    return frozenset(services)


@functools.lru_cache(maxsize=256)
def network_set(sources: tuple[str, ...]) -> tuple[SourceNetwork, ...]:
    """One tuple of networks per distinct list, as `service_set` (10^5 clients
    of one office share one).  A list that does not parse (written into the
    store by hand: every command checks it) allows no source: it was meant
    to narrow access, so it never widens it."""
    try:
        return source_networks(sources)
    except FormatError:
        return NOWHERE


def b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64decode(text: str, size: int, what: str) -> bytes:
    """Raises ConfigError (never quoting the value: it may be a secret)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise ConfigError(f"{what} must be {size} bytes of base64url")
    return raw


def load(path: Path) -> ServerConfig:
    """Read and validate the config.  Raises ConfigError."""
    return parse(path, read_raw(path))


def read_raw(path: Path) -> bytes:
    """The config file's bytes (never through a link).  Raises ConfigError."""
    with _reading(path), open_dir(path.parent) as directory:
        raw, _ = _read(directory, path)
    return raw


def parse(path: Path, raw: bytes) -> ServerConfig:
    """Validate the config file's bytes.  Raises ConfigError."""
    data = _parse_toml(path, raw)
    unknown = set(data) - {"server", "services", "clients", "metrics", "geoip", "dashboard",
                           "command", "group"}
    if unknown:
        raise ConfigError(f"{path}: unknown section [{sorted(unknown)[0]}]")
    server = _table(path, data, "server")
    _no_unknown_keys(path, "server", server, _SERVER_KEYS)
    where = f"{path}: [server]"
    if "server_id" not in server:
        raise ConfigError(f"{where} has no server_id; create the file with: spa-server init")
    server_id = b64decode(_get(where, server, "server_id", str), SERVER_ID_SIZE,
                          f"{where} server_id")
    _refuse_zero_key(where, "server_id", server_id, "put a random one there (head -c16 "
                     "/dev/urandom | basenc --base64url), or create the file with spa-server "
                     "init")
    services = _services(path, data)
    clients = _clients(path, data, services)
    config = ServerConfig(
        path=path,
        server_id=server_id,
        listen_port=_port(where, _get(where, server, "listen_port", int, DEFAULT_PORT)),
        listen_address=_get(where, server, "listen_address", str, "::"),
        backend=_choice(where, "backend", _get(where, server, "backend", str, DEFAULT_BACKEND),
                        BACKENDS),
        mode=_choice(where, "mode", _get(where, server, "mode", str, DEFAULT_MODE), MODES),
        interface=_get(where, server, "interface", str, ""),
        state_dir=_state_dir(path, _get(where, server, "state_dir", str, str(DEFAULT_STATE_DIR))),
        window=float(_get(where, server, "window", (int, float), 30)),
        event_retention_days=_get(where, server, "event_retention_days", int,
                                  DEFAULT_RETENTION_DAYS),
        flush_on_stop=_get(where, server, "flush_on_stop", bool, False),
        hold_table=_choice(where, "hold_table", _get(where, server, "hold_table", str, "auto"),
                           HOLD_CHOICES),
        fwknop_port=_fwknop_port(where, server),
        instance=_instance(where, server),
        metrics_listen=_listen(path, data, "metrics", ""),
        geoip_database=_geoip(path, data),
        dashboard_listen=_listen(path, data, "dashboard", DEFAULT_DASHBOARD_LISTEN),
        command=_command(path, data),
        group=parse_group(path, data),
        services=services,
        clients=clients,
    )
    if config.fwknop_port and config.fwknop_port == config.listen_port:
        raise ConfigError(f"{where} fwknop_port = {config.fwknop_port} is listen_port too; "
                          "fwknop's packets need a port of their own: keep fwknop_port = "
                          f"{FWKNOP_PORT} (what fwknop clients send to) and set listen_port "
                          "to another, e.g. 62202")
    gateway = [name for name, service in services.items() if service.gateway]
    if gateway and config.backend not in ("nftables", "memory"):
        raise ConfigError(f"{path}: [services.{gateway[0]}] gateway services need backend "
                          "nftables")
    clash = gateway_clash(services, knock_ports=(config.listen_port, config.fwknop_port))
    if clash:
        raise ConfigError(f"{path}: {clash}")
    if config.backend == "command" and config.command is None:
        raise ConfigError(f"{where} backend = \"command\" needs a [command] table with allow "
                          "and remove (docs/backends.md)")
    if not 1 <= config.window <= 300:
        raise ConfigError(f"{where} window must be between 1 and 300 seconds")
    if config.event_retention_days < 1:
        raise ConfigError(f"{where} event_retention_days must be at least 1")
    return config


def _state_dir(path: Path, value: str) -> Path:
    """[server] state_dir; a relative one is beside the config file (not
    wherever the command runs), so every command finds the same state."""
    state_dir = Path(value)
    return state_dir if state_dir.is_absolute() else path.absolute().parent / state_dir


def _instance(where: str, server: Mapping[str, Any]) -> str:
    """[server] instance: "" (the default) or a short name of [a-z0-9_-]."""
    instance: str = _get(where, server, "instance", str, "")
    problem = instance_problem(instance)
    if problem is not None:
        raise ConfigError(f"{where} instance = {instance!r} {problem}; e.g. instance = "
                          f"\"site1\" (at most {MAX_INSTANCE} characters)")
    return instance


def _fwknop_port(where: str, server: Mapping[str, Any]) -> int:
    """[server] fwknop_port: 0 (the default) keeps the compat listener off."""
    port: int = _get(where, server, "fwknop_port", int, 0)
    return 0 if port == 0 else _port(where, port)


def _listen(path: Path, data: Mapping[str, Any], section: str, default: str) -> str:
    """[metrics] or [dashboard] listen = "HOST:PORT" (loopback unless the admin
    says otherwise)."""
    table = _table(path, data, section)
    _no_unknown_keys(path, section, table, {"listen"})
    where = f"{path}: [{section}]"
    listen: str = _get(where, table, "listen", str, default)
    if listen:
        check_listen(f"{where} listen =", listen, default or "127.0.0.1:9712")
    return listen


def check_listen(what: str, listen: str, example: str = DEFAULT_DASHBOARD_LISTEN) -> None:
    """HOST:PORT with a port in 1-65535.  Raises ConfigError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f'{what} {listen!r}: write HOST:PORT, e.g. "{example}"')


def _command(path: Path, data: Mapping[str, Any]) -> CommandSpec | None:
    """[command]: the command backend's templates (spa.backends.cmdspec)."""
    if "command" not in data:
        return None
    try:
        return parse_spec(_table(path, data, "command"))
    except ValueError as exc:
        raise ConfigError(f"{path}: [command] {exc}") from None


def _geoip(path: Path, data: Mapping[str, Any]) -> Path | None:
    """[geoip] database = "/var/lib/GeoIP/GeoLite2-Country.mmdb" (optional)."""
    table = _table(path, data, "geoip")
    _no_unknown_keys(path, "geoip", table, {"database"})
    database: str = _get(f"{path}: [geoip]", table, "database", str, "")
    return Path(database) if database else None


def _missing(path: Path) -> ConfigError:
    return ConfigError(
        f"config file {path} does not exist; create it with: spa-server --config {path} init")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """What reading the config raises, as one ConfigError line."""
    try:
        yield
    except FileNotFoundError:
        raise _missing(path) from None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied (run as root?)") from None
    except ConfigError:
        raise
    except LocalError as exc:  # a link, a FIFO, a hard link: safefs says which
        raise ConfigError(str(exc)) from None


def _read(directory: Directory, path: Path) -> tuple[bytes, Stamp]:
    """The config's bytes, and which version of the file they are.
    Raises ConfigError."""
    with _reading(path):
        raw, found = read_secret(directory, path.name)
    return raw, Stamp.of(found)


def _parse_toml(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _table(path: Path, data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {name} must be a table (got {describe(value)}): write "
                          f"[{name}] on a line of its own and its keys below it")
    return value


def _no_unknown_keys(path: Path, section: str, table: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}: [{section}] has unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(known))})")


def _get(where: str, table: Mapping[str, Any], key: str, kind: Any, default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise ConfigError(f"{where} needs {key}")
        return default
    return expect(where, key, table[key], kind, default)


def _port(where: str, port: int) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where} port {port} is out of range 1-65535")
    return port


def _choice(where: str, key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where} {key} = {value!r}; choose one of {', '.join(choices)}")
    return value


def _gateway_host(where: str, spec: Mapping[str, Any]) -> IPAddress | str | None:
    """A gateway service's destination: a literal address of one routed
    host, or a DNS host name, resolved when a lease starts (docs/install.md,
    section 11); None: a service of this host."""
    if "host" not in spec:
        return None
    host: str = _get(where, spec, "host", str)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        problem = host_name_problem(host)
        if problem:
            raise ConfigError(f"{where} host = {host!r} {problem}; write the internal host's "
                              "address or its DNS name") from None
        return host
    problem = gateway_host_problem(address)
    if problem:
        raise ConfigError(f"{where} host = {host!r} {problem}")
    return address


def _services(path: Path, data: Mapping[str, Any]) -> dict[str, Service]:
    table = _table(path, data, "services")
    if not table:
        return dict(DEFAULT_SERVICES)
    services = {}
    for name, spec in table.items():
        where = f"{path}: [services.{name}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table (got {describe(spec)}): write "
                              f"[services.{name}] on a line of its own and its keys below "
                              "it, e.g. port = 22")
        _no_unknown_keys(path, f"services.{name}", spec, _SERVICE_KEYS)
        host = _gateway_host(where, spec)
        try:
            services[name] = Service(
                name,
                _get(where, spec, "protocol", str, "tcp"),
                _get(where, spec, "port", int),
                _get(where, spec, "default_duration", int),
                _get(where, spec, "max_duration", int),
                None if isinstance(host, str) else host,
                _get(where, spec, "listen_port", int, 0),
                host if isinstance(host, str) else "",
            )
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return services


def _clients(path: Path, data: Mapping[str, Any], services: Mapping[str, Service]
             ) -> dict[str, ClientEntry]:
    clients = {}
    for name, spec in _table(path, data, "clients").items():
        where = f"{path}: [clients.{name}]"
        if not is_valid_client_name(name):
            raise ConfigError(f"{where}: bad client name")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table (got {describe(spec, quote=False)}): "
                              f"write [clients.{name}] on a line of its own and its keys "
                              "below it")
        _no_unknown_keys(path, f"clients.{name}", spec, _CLIENT_KEYS)
        allowed = _get(where, spec, "services", list)
        for service in allowed:
            if service not in services:
                raise ConfigError(f"{where} names unknown service {service!r}")
        kind = _choice(where, "kind", _get(where, spec, "kind", str, KIND_SPA),
                       (KIND_SPA, KIND_FWKNOP))
        fwknop = kind == KIND_FWKNOP
        clients[name] = ClientEntry(
            name=name,
            secret=b"" if fwknop else b64decode(_get(where, spec, "secret", str),
                                                MASTER_SECRET_SIZE, f"{where} secret"),
            services=tuple(allowed),
            allow_other_address=_get(where, spec, "allow_other_address", bool, False),
            revoked=_get(where, spec, "revoked", bool, False),
            enrolled=_get(where, spec, "enrolled", str, ""),
            enroll_by=_get(where, spec, "enroll_by", str, ""),
            otp_secret=_get(where, spec, "otp_secret", str, ""),
            close_leases=_get(where, spec, "close_leases", bool, False),
            endpoint=_get(where, spec, "endpoint", str, ""),
            old_secret=b64decode(_get(where, spec, "old_secret", str, ""), MASTER_SECRET_SIZE,
                                 f"{where} old_secret") if "old_secret" in spec else b"",
            old_until=_get(where, spec, "old_until", str, ""),
            sources=_sources(where, _get(where, spec, "sources", list, [])),
            kind=kind,
            fwknop_key=_key(where, spec, "fwknop_key", 32) if fwknop else b"",
            fwknop_hmac_key=_key(where, spec, "fwknop_hmac_key", 128) if fwknop else b"",
        )
        _check_utc(where, "old_until", clients[name].old_until)
        _check_utc(where, "enroll_by", clients[name].enroll_by)
        if clients[name].otp_secret:
            try:
                if len(base64.b32decode(clients[name].otp_secret,
                                        casefold=True)) * 8 < MIN_SECRET_BITS:
                    raise ValueError
            except (ValueError, binascii.Error):
                raise ConfigError(f"{where} otp_secret: not a base32 secret of 80 bits or "
                                  "more (enroll the client again with --otp)") from None
        for key in ("secret", "old_secret", "fwknop_key", "fwknop_hmac_key"):
            _refuse_zero_key(where, key, getattr(clients[name], key), ZERO_KEY_FIX[key])
    return clients


def _sources(where: str, texts: list[Any]) -> tuple[str, ...]:
    """A client's `sources`, canonical.  Raises ConfigError."""
    if not all(isinstance(text, str) for text in texts):
        raise ConfigError(f"{where} sources: give a list of networks as strings, "
                          'e.g. ["203.0.113.0/24", "2001:db8::/48"]')
    try:
        return canonical_sources(texts)
    except FormatError as exc:
        raise ConfigError(f"{where} sources: {exc}") from None
def _key(where: str, spec: Mapping[str, Any], key: str, most: int) -> bytes:
    """An fwknop key (1 to `most` bytes, base64url).  Raises ConfigError."""
    text: str = _get(where, spec, key, str)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if not 1 <= len(raw) <= most:
        raise ConfigError(f"{where} {key} must be 1 to {most} bytes of base64url")
    return raw


ZERO_KEY_FIX = {  # what to do instead of a key of zero bytes (_refuse_zero_key)
    "secret": "enroll the client with spa-server enroll (it makes a random secret)",
    "old_secret": "remove old_secret and old_until",
    "fwknop_key": "give the client's own KEY_BASE64 (spa-server import-fwknop)",
    "fwknop_hmac_key": "give the client's own HMAC_KEY_BASE64 (spa-server import-fwknop)",
}


def _refuse_zero_key(where: str, key: str, raw: bytes, fix: str) -> None:
    """A key of zero bytes is the example's placeholder (contrib/server.toml.example:
    "AAAA..."), known to everyone who read it: refused, whoever wrote it.
    Raises ConfigError."""
    if raw and not any(raw):
        raise ConfigError(f"{where} {key} is all zero bytes (the example's placeholder, a key "
                          f"anyone knows); {fix}")


def _check_utc(where: str, key: str, value: str) -> None:
    """Raises ConfigError unless `value` is empty or a UTC_FORMAT time."""
    if not value:
        return
    try:
        parse_utc(value)
    except ValueError:
        raise ConfigError(f"{where} {key} = {value!r}: not a UTC time like "
                          f"{format_utc(0)}") from None


# ---- edits -----------------------------------------------------------------

HEADER = """\
spa-server configuration.  It holds every client's secret: keep it 0600.
Edit services here; use `spa-server enroll` and `spa-server revoke` for clients.
A running server picks up changes within a second."""


def default_state_dir(path: Path, instance: str = "") -> Path:
    """Where `init` puts the state when not told: beside the system's config
    (/etc/spa/*.toml) the system's place, /var/lib/spa (an instance's: its
    directory /var/lib/spa/NAME, as spa-server@NAME.service makes it);
    beside any other config file (a try-out without /etc) a directory next to
    it, NAME-state for NAME.toml, so nothing needs root.  Absolute."""
    if path.absolute().parent == DEFAULT_CONFIG.parent:
        return DEFAULT_STATE_DIR / instance if instance else DEFAULT_STATE_DIR
    return path.absolute().parent / f"{path.stem}-state"


def render_new(*, server_id: bytes, listen_port: int, backend: str, state_dir: Path,
               mode: str = DEFAULT_MODE, protect: Iterable[Service] | None = None,
               instance: str = "") -> str:
    """The text of a fresh config file; `protect`: its services (default: ssh, https)."""
    doc = tomlkit.document()
    for line in HEADER.splitlines():
        doc.add(tomlkit.comment(line))
    server = tomlkit.table()
    server.add("server_id", b64encode(server_id))
    if instance:
        server.add("instance", instance)
        server["instance"].comment("its own tables: inet spa_NAME (docs/install.md)")
    server.add("listen_port", listen_port)
    server["listen_port"].comment("UDP port clients knock on")
    server.add("listen_address", "::")
    server.add("backend", backend)
    server["backend"].comment("nftables | iptables | memory")
    server.add("mode", mode)
    server["mode"].comment("capture (nothing bound) | udp (a bound socket)")
    server.add("interface", "")
    server["interface"].comment('capture mode: one interface, "" = all')
    server.add("state_dir", str(state_dir))
    server.add("window", 30)
    server["window"].comment("seconds of clock difference accepted")
    server.add("event_retention_days", DEFAULT_RETENTION_DAYS)
    server.add("flush_on_stop",
               tomlkit.item(False).comment("nftables: end live grants at stop (rules stay)"))
    doc.add("server", server)
    services = tomlkit.table(is_super_table=True)
    for service in DEFAULT_SERVICES.values() if protect is None else protect:
        services.add(service.name, _service_table(service))
    doc.add("services", services)
    doc.add("clients", tomlkit.table(is_super_table=True))
    return tomlkit.dumps(doc)


def _service_table(service: Service) -> tomlkit.items.Table:
    """A [services.NAME] table."""
    entry = tomlkit.table()
    entry.add("protocol", service.protocol)
    entry.add("port", service.port)
    entry.add("default_duration", service.default_duration)
    entry.add("max_duration", service.max_duration)
    if service.host is not None or service.host_name:
        entry.add("host", service.host_name or str(service.host))
    if service.listen_port:
        entry.add("listen_port", service.listen_port)
    return entry


def write_new(path: Path, text: str, *, force: bool) -> None:
    """Write a fresh config.  Raises ConfigError if it exists and not `force`."""
    with _config_dir(path, create=True) as directory:
        if directory.lstat(path.name) is not None and not force:
            raise ConfigError(f"{path} already exists; pass --force to overwrite it "
                              "(this forgets every enrolled client)")
        _write(directory, path, text)


@contextlib.contextmanager
def _config_dir(path: Path, *, create: bool = False) -> Iterator[Directory]:
    """The config's directory, open to write in.  Raises ConfigError,
    LocalError (root, and another user owns it)."""
    try:
        directory = open_dir(path.parent, create=create)
    except FileNotFoundError:
        raise _missing(path) from None
    except PermissionError:
        raise ConfigError(f"cannot write {path}: permission denied (run as root?)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with directory:
        refuse_foreign_dir(directory)
        yield directory


def _write(directory: Directory, path: Path, text: str, *, over: Stamp | None = None) -> None:
    """Put `text` at the config's name; with `over`, only if the file there
    is still that version.  Raises ConfigError."""
    if over is not None:
        found = directory.lstat(path.name)
        if found is None or Stamp.of(found) != over:
            raise ConfigError(f"{path} changed while this edit was being made (another "
                              "program wrote it); nothing was written: run the command again")
    try:
        directory.replace(path.name, text.encode("utf-8"))
    except PermissionError:
        raise ConfigError(f"cannot write {path}: permission denied (run as root?)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


@dataclass(slots=True)
class _Edit:
    """One read of the config: what it says, its document, which version."""
    directory: Directory
    path: Path
    config: ServerConfig
    doc: tomlkit.TOMLDocument
    stamp: Stamp

    def write(self) -> None:
        _write(self.directory, self.path, tomlkit.dumps(self.doc), over=self.stamp)


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[_Edit]:
    """Hold an exclusive lock for one read-modify-write of the config, so two
    edits at once (two dashboard revokes, the dashboard and the command line)
    cannot undo each other.  The lock file holds nothing (0644, beside the
    config; flock works on a read-only descriptor).  Raises ConfigError."""
    lock = f".{path.name}.lock"
    with _config_dir(path) as directory:
        try:
            fd = directory.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
        except PermissionError:
            raise ConfigError(f"cannot write {path}: permission denied (run as root?)") from None
        except LocalError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"cannot lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield _edit_document(directory, path)
        finally:
            os.close(fd)  # releases the lock


def _edit_document(directory: Directory, path: Path) -> _Edit:
    """Read the config once: validate those bytes, edit those bytes."""
    raw, stamp = _read(directory, path)
    config = parse(path, raw)
    return _Edit(directory, path, config, tomlkit.parse(raw.decode("utf-8")), stamp)


def _super_table(doc: tomlkit.TOMLDocument, name: str) -> tomlkit.items.Table:
    """The document's [NAME] table of tables, added if missing."""
    if name not in doc:
        doc.add(name, tomlkit.table(is_super_table=True))
    table = doc[name]
    assert isinstance(table, tomlkit.items.Table)
    return table


def add_client(path: Path, entry: ClientEntry) -> None:
    """Add a client to the file.  Raises ConfigError if the name is taken."""
    with _editing(path) as edit:
        clients = _super_table(edit.doc, "clients")
        if entry.name in clients:
            raise ConfigError(f"client {entry.name!r} is already enrolled; pick another name "
                              f"or revoke it first")
        table = tomlkit.table()
        table.add("secret", b64encode(entry.secret))
        table.add("services", list(entry.services))
        table.add("allow_other_address", entry.allow_other_address)
        table.add("revoked", False)
        table.add("enrolled", entry.enrolled)
        if entry.enroll_by:
            table.add("enroll_by", entry.enroll_by)
        if entry.otp_secret:
            table.add("otp_secret", entry.otp_secret)
        if entry.endpoint:
            table.add("endpoint", entry.endpoint)
        if entry.sources:
            table.add("sources", list(entry.sources))
        clients.add(entry.name, table)
        edit.write()


def set_revoked(path: Path, name: str, *, close: bool = False) -> bool:
    """Mark a client revoked (with `close`: its leases are to end at once too).
    Returns False if nothing changed.

    Raises ConfigError if there is no such client.
    """
    with _editing(path) as edit:
        clients = edit.doc.get("clients", {})
        if name not in clients:
            raise ConfigError(f"no client named {name!r}; see the list with: spa-server clients")
        entry = clients[name]
        if entry.get("revoked", False) and (not close or entry.get("close_leases", False)):
            return False
        entry["revoked"] = True
        if close:
            entry["close_leases"] = True
        edit.write()
        return True


def set_secret(path: Path, name: str, secret: bytes, *, old_until: str) -> ClientEntry:
    """Give a client a new secret; the old one stays as old_secret until
    `old_until` (empty: dropped now).  Returns the entry as it was.
    Raises ConfigError if there is no such client."""
    with _editing(path) as edit:
        before = edit.config.clients.get(name)
        clients = edit.doc.get("clients", {})
        if name not in clients or before is None:
            raise ConfigError(f"no client named {name!r}; see the list with: spa-server clients")
        entry = clients[name]
        for key in ("old_secret", "old_until"):
            if key in entry:
                del entry[key]
        if old_until:
            entry["old_secret"] = b64encode(before.secret)
            entry["old_until"] = old_until
        entry["secret"] = b64encode(secret)
        edit.write()
        return before


def add_services(path: Path, services: Iterable[Service], *, fwknop_port: int = 0) -> None:
    """Add [services.NAME] tables (one already there as given is kept) and,
    with `fwknop_port`, set [server] fwknop_port where it is unset.  A file
    whose [services] is empty (meaning the built-in ssh and https) gets those
    written out first, so an added service never takes them away.  The new
    text is checked as `load` checks it before it is written.
    Raises ConfigError (a name another service has, a port set meanwhile, a
    result `load` would refuse)."""
    with _editing(path) as edit:
        doc = edit.doc
        table = _super_table(doc, "services")
        if not table:
            for builtin in edit.config.services.values():
                table.add(builtin.name, _service_table(builtin))
        for service in services:
            have = edit.config.services.get(service.name)
            if have == service:
                continue
            if have is not None or service.name in table:
                raise ConfigError(f"{path}: [services.{service.name}] exists with other "
                                  "settings (another edit made it meanwhile?); run again")
            table.add(service.name, _service_table(service))
        if fwknop_port and edit.config.fwknop_port != fwknop_port:
            if edit.config.fwknop_port:
                raise ConfigError(f"{path}: [server] fwknop_port is {edit.config.fwknop_port}"
                                  " now (set meanwhile?); run again")
            server = doc["server"]
            assert isinstance(server, tomlkit.items.Table)
            port = tomlkit.item(fwknop_port).comment("fwknop's packets, for clients of kind "
                                                     "fwknop (0: off)")
            if "fwknop_port" in server:  # written as 0
                server["fwknop_port"] = port
            else:
                server.add("fwknop_port", port)
        parse(path, tomlkit.dumps(doc).encode("utf-8"))
        edit.write()


def set_group(path: Path, server_id: bytes, group: tomlkit.items.Table) -> ServerConfig:
    """Make this server a member (spa-server group join): [server] server_id
    becomes the group's and the [group] table is written (replacing one
    there), comments kept.  The new text is checked as `load` checks it
    before it is written.  Raises ConfigError."""
    with _editing(path) as edit:
        server = edit.doc["server"]
        assert isinstance(server, tomlkit.items.Table)
        server["server_id"] = b64encode(server_id)
        if "group" in edit.doc:
            edit.doc["group"] = group
        else:
            edit.doc.add("group", group)
        config = parse(path, tomlkit.dumps(edit.doc).encode("utf-8"))
        edit.write()
        return config
