"""What the admin commands do: init, enroll, clients, revoke, status, events.

The CLI (spa/cli.py) parses and prints; these functions do the work and are
what the tests call.  This is an edge: it reads the clock and the CSPRNG and
hands them to the core.

Clients live in the client store (spa/store/clients.py) in the state
directory; the first command to open it moves any [clients] left in
server.toml there (spa/store/transfer.py `migrate`).  enroll, revoke and
rotate are one indexed statement each; listings read one page and count in
SQL (`client_page`, `client_counts`); nothing reads every client but export
and `load`/`client_states` (for tests and small setups, never a view).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from spa.backends.names import instance_problem
from spa.core.errors import FormatError
from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.otp import SECRET_BYTES, provisioning_uri
from spa.core.policy import DEFAULT_SERVICES, Service
from spa.core.sources import canonical_sources
from spa.core.uri import Enrollment, ServiceRef, check_host, is_valid_client_name, render
from spa.server import config as config_mod
from spa.server.config import ClientEntry, ServerConfig
from spa.server.errors import ConfigError, LocalError
from spa.server.events import EVENTS_DB, Event, read_events
from spa.server.geoip import Countries
from spa.server.groupstore import Login
from spa.server.plant import refuse_planted_state_dir
from spa.server.state import PairStatus, StateDir
from spa.store import transfer
from spa.store.clients import CLIENTS_DB, ClientStore
from spa.store.states import Activation, StateCounts

SERVICE_SPEC = re.compile(r"([A-Za-z][A-Za-z0-9_-]{0,31})=(tcp|udp)/(\d{1,5})\Z")


@contextlib.contextmanager
def open_store(config: ServerConfig, *, now: float) -> Iterator[ClientStore]:
    """The client store in the config's state directory (made if missing),
    after the one-time migration of server.toml's [clients]; root uses it
    as the directory's owner.  Raises LocalError."""
    refuse_planted_state_dir(config.state_dir, config=config.path)
    if not os.path.lexists(config.state_dir):
        StateDir(config.state_dir).ensure()
    if config.clients:
        transfer.migrate(config.path, config.state_dir, at=now)
    with ClientStore.open_as_owner(config.state_dir, create=True) as store:
        yield store


def load(path: Path, *, now: float | None = None) -> ServerConfig:
    """The config with every client from the store (reads them all: for
    tests and small setups; no command or page uses it).  Raises LocalError."""
    config = config_mod.load(path)
    with open_store(config, now=time.time() if now is None else now) as store:
        return replace(config, clients={entry.name: entry for entry in store.all()})


def service_of(spec: str) -> Service:
    """`ssh`, `https`, or NAME=tcp/PORT (NAME=udp/PORT) for another service
    (its leases last 30 min by default, 4 h at most, as https's).
    Raises ConfigError."""
    if spec in DEFAULT_SERVICES:
        return DEFAULT_SERVICES[spec]
    found = SERVICE_SPEC.match(spec)
    if found is None or not 1 <= int(found.group(3)) <= 65535:
        raise ConfigError(f"--service {spec!r}: give ssh, https, or NAME=tcp/PORT "
                          "(e.g. imaps=tcp/993)")
    https = DEFAULT_SERVICES["https"]
    return Service(found.group(1), found.group(2), int(found.group(3)),
                   https.default_duration, https.max_duration)


def init(path: Path, *, listen_port: int, backend: str, state_dir: Path | None, force: bool,
         services: Sequence[str] = ("ssh",), instance: str = "") -> list[Service]:
    """Write a fresh config with a new random server id, protecting
    `services` (see `service_of`); return them.  `state_dir` None: the
    default for this config file (`config.default_state_dir`); `instance`:
    [server] instance.  Raises ConfigError."""
    problem = instance_problem(instance)
    if problem is not None:
        raise ConfigError(f"--instance {instance!r} {problem}")
    if state_dir is None:
        state_dir = config_mod.default_state_dir(path, instance)
    if not 1 <= listen_port <= 65535:
        raise ConfigError(f"--listen-port {listen_port} is out of range 1-65535")
    if backend not in config_mod.BACKENDS:
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(config_mod.BACKENDS)}")
    chosen = list({s.name: s for s in map(service_of, services or ("ssh",))}.values())
    ports = [(s.protocol, s.port) for s in chosen]
    if len(set(ports)) != len(ports):
        raise ConfigError("two --service options name the same port; give each port once")
    refuse_planted_state_dir(state_dir, config=path)  # before anything is written
    server_id = os.urandom(SERVER_ID_SIZE)
    text = config_mod.render_new(server_id=server_id, listen_port=listen_port, backend=backend,
                                 state_dir=state_dir.absolute(), protect=chosen,
                                 instance=instance)
    config_mod.write_new(path, text, force=force)
    return chosen


def parse_endpoint(endpoint: str, default_port: int) -> tuple[str, int]:
    """HOST, HOST:PORT, V6, [V6] or [V6]:PORT (a bare IPv6 address takes no
    port: 2001:db8::1:99 is one address).  Raises LocalError."""
    text = endpoint.strip()
    port = default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise LocalError(f"--endpoint {endpoint!r}: IPv6 address is missing its ']'")
        if ":" not in host:
            raise LocalError(f"--endpoint {endpoint!r}: brackets are for an IPv6 address; "
                             "write a name or an IPv4 address without them")
        if rest:
            if not rest.startswith(":") or not (rest[1:].isascii() and rest[1:].isdigit()):
                raise LocalError(f"--endpoint {endpoint!r}: expected [IPv6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not (port_text.isascii() and port_text.isdigit()):
            raise LocalError(f"--endpoint {endpoint!r}: the port must be a number")
        port = int(port_text)
    else:
        host = text  # a name, an IPv4 address, or a bare IPv6 address
    if not 1 <= port <= 65535:
        raise LocalError(f"--endpoint {endpoint!r}: port {port} is out of range 1-65535")
    try:
        return check_host(host), port
    except FormatError as exc:
        raise LocalError(f"--endpoint: {exc}") from None


def enroll(path: Path, name: str, services: list[str], endpoint: str, *,
           expires: float | None = None, now: float | None = None, otp: bool = False,
           sources: Sequence[str] = ()) -> str:
    """Create a client with a new secret, store it, return its enrollment URI.
    With `expires` (seconds) the client is pending: its first knock must come
    within that time of `now`, or it is refused `enrollment_expired`.  With
    `sources` (networks), a knock from outside them is refused
    `source_not_allowed`.  Raises LocalError."""
    config = config_mod.load(path)
    when = time.time() if now is None else now
    entry, enrollment = new_client(config, name, services, endpoint, expires=expires,
                                   now=when, otp=otp, sources=sources)
    with open_store(config, now=when) as store:
        store.add(entry, at=when)
    return render(enrollment)


def enroll_client(path: Path, name: str, services: list[str], endpoint: str, *,
                  expires: float | None, now: float, otp: bool, sources: Sequence[str],
                  login: Login | None = None) -> tuple[str, str | None]:
    """`enroll` here, or in the group the config names (as the admin's etcd
    `login`): the URI, and the authenticator's otpauth:// URI with `otp`.
    Raises LocalError."""
    config = config_mod.load(path)
    if config.group is not None:
        from spa.server import admin_group

        made = admin_group.enroll_in(config, login, name, services, endpoint,
                                     expires=expires, now=now, otp=otp, sources=sources)
        return made.uri, made.otp_uri
    _refuse_login(config, login)
    uri = enroll(path, name, services, endpoint, expires=expires, now=now, otp=otp,
                 sources=sources)
    return uri, otp_uri(path, name) if otp else None


def _standalone_only(config: ServerConfig, what: str) -> None:
    """Refuse a command that works on this server's own client store when the
    config names a group (whose clients are in etcd).  Raises LocalError."""
    if config.group is not None:
        raise LocalError(f"{what}: this server is a member of group {config.group.name}, "
                         "whose clients are in etcd, without their secrets (spa-server "
                         "clients lists them, clients set changes their networks)")


def _refuse_login(config: ServerConfig, login: Login | None) -> None:
    if login is not None:
        from spa.server import admin_group

        admin_group.refuse_login(config, login)


def new_client(config: ServerConfig, name: str, services: Sequence[str], endpoint: str, *,
               expires: float | None, now: float, otp: bool, sources: Sequence[str],
               server_id: bytes | None = None,
               random: Callable[[int], bytes] = os.urandom) -> tuple[ClientEntry, Enrollment]:
    """A new client (its secret from `random`) and its enrollment, for the
    config's server id or `server_id` (a group's), checked as enroll checks
    it: its name, services, endpoint, sources and expiry.  Raises LocalError."""
    networks = parse_sources(sources)
    if not is_valid_client_name(name):
        raise LocalError(f"client name {name!r}: use letters, digits, '.', '_', '@', '-' "
                         "(at most 64, starting with a letter or digit)")
    if not services:
        raise LocalError(f"name at least one service with --service ({_known(config)})")
    for service in services:
        if service not in config.services:
            raise LocalError(f"unknown service {service!r}; known: {_known(config)} "
                             f"(add it under [services] in {config.path})")
    host, port = parse_endpoint(endpoint, config.listen_port)
    if expires is not None and not expires > 0:
        raise LocalError("--expires must be a positive duration, e.g. 15m")
    secret = random(MASTER_SECRET_SIZE)
    unique = tuple(dict.fromkeys(services))
    enroll_by = config_mod.format_utc(now + expires) if expires is not None else ""
    otp_secret = base64.b32encode(random(SECRET_BYTES)).decode() if otp else ""
    entry = ClientEntry(name, secret, unique, enrolled=config_mod.format_utc(now),
                        enroll_by=enroll_by, otp_secret=otp_secret, endpoint=endpoint.strip(),
                        sources=networks)
    enrollment = Enrollment(host, port, config.server_id if server_id is None else server_id,
                            name, secret, service_refs(config, unique), otp=otp,
                            expires=None if expires is None else int(now + expires))
    return entry, enrollment


def service_refs(config: ServerConfig, services: Sequence[str]) -> tuple[ServiceRef, ...]:
    """The services as a client's URI names them (this server's ports).
    Raises LocalError for a service this config does not define."""
    missing = [s for s in services if s not in config.services]
    if missing:
        raise LocalError(f"service {missing[0]!r} is not in {config.path} [services]; add it "
                         "there as the group's other members have it")
    return tuple(ServiceRef(s, config.services[s].protocol, config.services[s].client_port)
                 for s in services)


def parse_sources(texts: Sequence[str]) -> tuple[str, ...]:
    """--from NET (repeated) as canonical networks.  Raises LocalError."""
    try:
        return canonical_sources(texts)
    except FormatError as exc:
        raise LocalError(f"--from {exc}") from None


def describe_sources(sources: Sequence[str]) -> str:
    """Where a client may knock from, for a person."""
    return "only from " + ", ".join(sources) if sources else "from anywhere"


def set_sources(path: Path, name: str, sources: Sequence[str], *, now: float,
                login: Login | None = None) -> str:
    """Set the networks a client's knocks may come from (empty: anywhere);
    returns the line to print.  In the group the config names, in the
    client's record, as the admin's etcd `login`.  Raises LocalError (no
    such client, a bad network)."""
    networks = parse_sources(sources)
    config = config_mod.load(path)
    if config.group is not None:
        from spa.server import admin_group

        changed = admin_group.set_sources_in(config, login, name, networks)
    else:
        _refuse_login(config, login)
        with open_store(config, now=now) as store:
            changed = store.set_sources(name, networks, at=now)
    where = describe_sources(networks)
    if not changed:
        return f"{name}: knocks accepted {where} already; nothing changed"
    refused = "; a knock from elsewhere is refused source_not_allowed" if networks else ""
    applies = ("every member of the group applies it once it sees the change" if config.group
               else "a running server applies it within a second")
    return f"{name}: knocks accepted {where} now{refused} ({applies})"


def rotate(path: Path, name: str, *, grace: float, now: float,
           endpoint: str | None = None, login: Login | None = None) -> str:
    """A new secret for a client; the old one keeps working for `grace`
    seconds (0: stops at once).  Returns the new enrollment URI.  In the
    group the config names, as the admin's etcd `login`.
    Raises LocalError (no such client, revoked, no endpoint known)."""
    config = config_mod.load(path)
    if config.group is not None:
        from spa.server import admin_group

        return admin_group.rotate_in(config, login, name, grace=grace, now=now,
                                     endpoint=endpoint)
    _refuse_login(config, login)
    with open_store(config, now=now) as store:
        return _rotate(store, config, name, grace=grace, now=now, endpoint=endpoint)


def _rotate(store: ClientStore, config: ServerConfig, name: str, *, grace: float, now: float,
            endpoint: str | None) -> str:
    entry = store.get(name)
    if entry is None:
        raise LocalError(f"no client named {name!r}; see the list with: spa-server clients")
    if entry.revoked:
        raise LocalError(f"{name} is revoked; enroll a new client instead")
    if entry.kind == config_mod.KIND_FWKNOP:  # off fwknop: a spa1:// enrollment
        from spa.server.admin_fwknop import move

        return move(store, config, entry, endpoint=endpoint, now=now)
    where = endpoint or entry.endpoint
    if not where:
        raise LocalError(f"{name} was enrolled before endpoints were recorded: give "
                         "--endpoint HOST[:PORT] (as in its URI)")
    host, port = parse_endpoint(where, config.listen_port)
    if grace < 0:
        raise LocalError("--grace must be 0 or a positive duration, e.g. 10m")
    secret = os.urandom(MASTER_SECRET_SIZE)
    store.set_secret(name, secret, old_until=config_mod.format_utc(now + grace) if grace else "",
                     at=now)
    refs = tuple(ServiceRef(s, config.services[s].protocol, config.services[s].client_port)
                 for s in entry.services)
    return render(Enrollment(host, port, config.server_id, name, secret, refs,
                             otp=bool(entry.otp_secret)))


def otp_uri(path: Path, name: str) -> str | None:
    """The otpauth:// URI for a client's authenticator app (None: it has none)."""
    with open_store(config_mod.load(path), now=time.time()) as store:
        entry = store.get(name)
    if entry is None or not entry.otp_secret:
        return None
    return provisioning_uri(entry.otp_secret, name)


def _known(config: ServerConfig) -> str:
    return ", ".join(sorted(config.services))


@dataclass(frozen=True, slots=True)
class ClientPage:
    count: int  # clients in the store
    entries: list[ClientEntry]  # this page, by name
    states: dict[str, str]  # name -> state (see state_text)
    own: int = 0  # a member's listing of its group: clients in this server's own store


def client_page(path: Path, *, now: float, after: str = "", limit: int = 100, match: str = "",
                state: str = "", local: bool = False) -> ClientPage:
    """One page of the store's clients (keyset paging by name, filters in
    SQL, see ClientStore.page); of the group's, read from etcd as this
    member, when the config names a group (and not `local`: this server's
    own store all the same).  Raises LocalError."""
    config = config_mod.load(path)
    if config.group is not None and not local:
        from spa.server import admin_group

        count, rows = admin_group.client_page_in(config, now=now, after=after, limit=limit,
                                                 match=match, state=state)
        return ClientPage(count, [e for e, _ in rows], {e.name: text for e, text in rows},
                          own=_own_count(config))
    met = activation(config, now=now)
    with open_store(config, now=now) as store:
        count = store.count()
        entries = store.page(after=after, limit=limit, match=match, state=state,
                             activation=met)
    return ClientPage(count, entries, {e.name: state_text(e, met) for e in entries})


def _own_count(config: ServerConfig) -> int:
    """How many clients this server's own store holds (0: it has none).
    Raises LocalError."""
    if config.clients:
        return len(config.clients)
    if not os.path.lexists(config.state_dir / CLIENTS_DB):
        return 0
    with ClientStore.open_as_owner(config.state_dir, create=False) as store:
        return store.count()


def client_counts(path: Path, *, now: float) -> StateCounts:
    """Clients by state, counted in SQL (one statement, no client row read).
    Only reads: no store yet (or server.toml's clients not moved yet) is a
    LocalError saying so, never a new store.  Raises LocalError."""
    config = config_mod.load(path)
    if config.group is not None:
        raise LocalError(f"group {config.group.name}'s, in etcd: see spa-server group status")
    if config.clients:
        raise LocalError(f"{len(config.clients)} in {path}, not moved to the client store "
                         "yet (any admin command as root moves them)")
    with ClientStore.open_as_owner(config.state_dir, create=False) as store:
        return store.count_by_state(activation(config, now=now))


def export_clients(path: Path, fmt: str, *, now: float) -> str:
    """Every client, secrets included, as JSON or TOML (spa/store/transfer.py).
    Raises LocalError."""
    config = config_mod.load(path)
    _standalone_only(config, "clients export")
    with open_store(config, now=now) as store:
        return transfer.render(store.all(), fmt)


def import_clients(path: Path, source: Path, text: str, *, prune: bool,
                   now: float) -> transfer.ImportResult:
    """Make the store hold the file's clients (updated where they differ;
    with `prune`, only them).  Raises LocalError."""
    config = config_mod.load(path)
    _standalone_only(config, "clients import")
    entries = transfer.parse(source, text, config)
    with open_store(config, now=now) as store:
        return transfer.import_entries(store, entries, prune=prune, at=now)


def client_states(path: Path, *, now: float) -> dict[str, str]:
    """name -> state_text for every client (reads them all: tests and small setups)."""
    config = load(path, now=now)
    met = activation(config, now=now)
    return {name: state_text(entry, met) for name, entry in config.clients.items()}


def activation(config: ServerConfig, *, now: float) -> Activation:
    """What decides pending clients' states beside the store: the time and
    the state directory's activated.json (unreadable here, not root?
    pending clients show as pending or expired by their time alone)."""
    try:
        met = StateDir(config.state_dir).load_activated()
    except LocalError:
        met = {}
    return Activation(config_mod.format_utc(now), met)


def state_text(entry: ClientEntry, met: Activation) -> str:
    """revoked | active | pending until <UTC> | expired (pending, never used)."""
    state = met.state(entry)
    return f"pending until {entry.enroll_by}" if state == "pending" else state


@dataclass(frozen=True, slots=True)
class RevokeResult:
    name: str
    changed: bool
    leases: list[PairStatus]
    message: str


def revoke(path: Path, name: str, *, now: float, close: bool = False,
           login: Login | None = None) -> RevokeResult:
    """Mark a client revoked; say what happens to its active leases.  In the
    group the config names, as the admin's etcd `login`."""
    config = config_mod.load(path)
    if config.group is not None:
        from spa.server import admin_group

        done = admin_group.revoke_in(config, login, name, now=now, close=close)
        return RevokeResult(name, done.changed, [], done.message)
    _refuse_login(config, login)
    with open_store(config, now=now) as store:
        changed = store.set_revoked(name, close=close, at=now)
    held = [row for row in StateDir(config.state_dir).status(now) if name in row.clients]
    if not changed:
        return RevokeResult(name, False, held, f"{name} was already revoked")
    if close:
        tail = (f"its {len(held)} active lease(s) end within a second as well (the running "
                "server closes them; if it is stopped, at its start)" if held
                else "it holds no active lease")
    elif held:
        longest = max(row.seconds_left for row in held)
        tail = (f"its {len(held)} active lease(s) stay until they expire, at most "
                f"{longest:.0f} s from now (--close ends them now); sessions already open "
                "are not cut")
    else:
        tail = "it holds no active lease"
    return RevokeResult(name, True, held,
                        f"{name} is revoked: a running server refuses its knocks within a "
                        f"second (no restart needed); {tail}")


def status(path: Path, *, now: float) -> tuple[ServerConfig, StateDir, list[PairStatus]]:
    config = config_mod.load(path)
    state = StateDir(config.state_dir)
    return config, state, state.status(now)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90', '30s', '10m', '2h', '7d', '1w' -> seconds.  Raises LocalError."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise LocalError(f"duration {text!r}: write a number with s, m, h, d or w, e.g. 10m")
    return float(match.group(1)) * _UNIT[match.group(2)]


def stats(events_: list[Event], *, top: int = 10,
          countries: Countries | None = None) -> dict[str, object]:
    """Counts over events (each row weighted by its count): knocks accepted and
    refused by reason, by client and by service; dropped attempts and scans by
    source; the top sources of refusals, drops and scans; failed attempts
    (refused knocks and dropped connection attempts) and scans by country
    (with a GeoIP database) and by month (UTC)."""
    lookup = countries or Countries(None)

    def tally(rows: list[Event], key: Callable[[Event], str | None]) -> dict[str, int]:
        found: dict[str, int] = {}
        for row in rows:
            name = key(row) or "-"
            found[name] = found.get(name, 0) + row.count
        return dict(sorted(found.items(), key=lambda item: (-item[1], item[0])))

    def field(name: str) -> Callable[[Event], str | None]:
        return lambda row: cast("str | None", getattr(row, name))

    def country(row: Event) -> str:
        return lookup.country(row.source)

    accepted = [e for e in events_ if e.outcome == "accepted"]
    refused = [e for e in events_ if e.outcome == "refused"]
    dropped = [e for e in events_ if e.outcome == "dropped"]
    scans = [Event(e.time, e.outcome, source=e.source) for e in events_ if e.outcome == "scan"]
    failed = refused + dropped
    hostile = tally(failed, field("source"))
    failed_in: dict[str, list[Event]] = {}
    scans_in: dict[str, int] = {}
    for e in failed:
        failed_in.setdefault(_month(e.time), []).append(e)
    for e in scans:
        scans_in[_month(e.time)] = scans_in.get(_month(e.time), 0) + 1
    monthly: dict[str, dict[str, object]] = {
        month: {"failed": sum(e.count for e in failed_in.get(month, [])),
                "scans": scans_in.get(month, 0),
                "failed_by_country": tally(failed_in.get(month, []), country)}
        for month in sorted(failed_in.keys() | scans_in.keys())}
    return {
        "accepted": sum(e.count for e in accepted),
        "refused": sum(e.count for e in refused),
        "accepted_by_client": tally(accepted, field("client")),
        "accepted_by_service": tally(accepted, field("service")),
        "refused_by_reason": tally(refused, field("reason")),
        "refused_by_client": tally([e for e in refused if e.client], field("client")),
        "dropped": sum(e.count for e in dropped),
        "dropped_by_service": tally(dropped, field("service")),
        "dropped_by_source": dict(list(tally(dropped, field("source")).items())[:top]),
        "scans": len(scans),
        "scans_by_source": tally(scans, field("source")),
        "top_sources": dict(list(hostile.items())[:top]),
        "geoip": lookup.enabled,
        "failed_by_country": tally(failed, country),
        "scans_by_country": tally(scans, country),
        "monthly": monthly,
    }


def _month(when: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(when))


def countries(path: Path) -> Countries:
    """The configured GeoIP lookup (disabled without [geoip]).  Raises LocalError."""
    return Countries(config_mod.load(path).geoip_database)


def events(path: Path, *, since: float | None, now: float) -> list[Event]:
    config = config_mod.load(path)
    db = config.state_dir / EVENTS_DB
    try:
        return read_events(db, since=None if since is None else now - since)
    except FileNotFoundError:
        return []
    except LocalError:
        raise
    except Exception as exc:  # sqlite3 errors: a damaged or foreign file
        raise LocalError(f"cannot read events from {db}: {exc}") from None
