"""The admin commands on a group's clients (docs/groups.md, "Administering a
group"): enroll, revoke, rotate and the client list when the config names a
group (init, join, status and import: spa.server.admin_groupsetup).

Invariants:
- Every function takes the store (a kv.KV) as an argument: the CLI opens it
  (spa.server.groupstore.connect, as the admin's etcd user for a write, the
  member's for a read), the tests give the in-memory fake.  Time and
  randomness are arguments too.
- What reaches etcd is what spa.group writes: client records (derived keys
  only: `client_record`), revocations.  A master secret never
  leaves this process but in the URI printed for the admin (enroll, rotate).
- A client record is created only if absent (etcd's create-if-absent): an
  enroll never overwrites a client.  A
  revocation is a key of its own, so a rotate racing it cannot undo it.
- Every refusal is a LocalError of one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from spa.core.keys import MASTER_SECRET_SIZE, derive_keys
from spa.core.otp import provisioning_uri
from spa.core.uri import Enrollment, render
from spa.group import layout
from spa.group.clients import GroupClient, client_record, decode_client, encode_client
from spa.group.kv import KV
from spa.group.layout import Kind
from spa.group.records import (
    GroupMeta,
    Revocation,
    decode_activation,
    decode_lease,
    decode_revocation,
    encode_revocation,
)
from spa.group.settings import GroupSettings
from spa.server import config as config_mod
from spa.server import groupstore
from spa.server.config import ClientEntry, ServerConfig
from spa.server.errors import LocalError
from spa.server.groupstore import Login, check_server_id, read_meta, store_errors
from spa.store.states import STATES
from spa.store.states import Activation as States

# ---- clients ------------------------------------------------------------------


def _prefix(group: str, kind: Kind) -> bytes:
    return layout.kind_prefix(group, kind).encode()


def as_entry(client: GroupClient, *, revoked: Revocation | None) -> ClientEntry:
    """A group's client as the client list shows it (no secret: the group has none)."""
    return ClientEntry(
        client.name, b"", client.services, client.allow_other_address,
        revoked=revoked is not None,
        enrolled="" if client.enrolled is None else config_mod.format_utc(client.enrolled),
        enroll_by="" if client.enroll_by is None else config_mod.format_utc(client.enroll_by),
        otp_secret=client.otp_secret, close_leases=revoked is not None and revoked.close,
        sources=client.sources)


def client_entries(kv: KV, settings: GroupSettings, user: str, meta: GroupMeta, *,
                   now: float) -> list[tuple[ClientEntry, str]]:
    """Every client of the group by name, with its state text (revoked,
    active, pending until <UTC>, expired).  Raises LocalError."""
    with store_errors(settings, user):
        clients, _ = kv.get_prefix(_prefix(meta.group, Kind.CLIENT))
        revoked_raw, _ = kv.get_prefix(_prefix(meta.group, Kind.REVOKED))
        activated_raw, _ = kv.get_prefix(_prefix(meta.group, Kind.ACTIVATED))
        revoked = {r.client: r for r in (decode_revocation(i.value) for i in revoked_raw)}
        met = {a.client: config_mod.format_utc(a.enroll_by)
               for a in (decode_activation(i.value) for i in activated_raw)}
        decided = States(config_mod.format_utc(now), met)
        rows = []
        for item in clients:
            entry = as_entry(decode_client(item.value, meta.server_id),
                             revoked=revoked.get(_name_of(meta.group, item.key)))
            state = decided.state(entry)
            rows.append((entry, f"pending until {entry.enroll_by}" if state == "pending"
                         else state))
    return rows


def _name_of(group: str, key: bytes) -> str:
    return layout.parse_key(group, key.decode()).parts[0]


def _client(kv: KV, settings: GroupSettings, user: str, meta: GroupMeta,
            name: str) -> tuple[GroupClient, Revocation | None]:
    """One client of the group and its revocation.  Raises LocalError."""
    if not layout_ok(name):
        raise LocalError(f"no client named {name[:64]!r} in group {meta.group}")
    with store_errors(settings, user):
        item = kv.get(layout.client_key(meta.group, name).encode())
        if item is None:
            raise LocalError(f"no client named {name!r} in group {meta.group}; see the list "
                             "with: spa-server clients")
        revoked = kv.get(layout.revoked_key(meta.group, name).encode())
        return (decode_client(item.value, meta.server_id),
                None if revoked is None else decode_revocation(revoked.value))


def layout_ok(name: str) -> bool:
    try:
        layout.check_client(name)
    except layout.GroupNameError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Enrolled:
    uri: str
    otp_uri: str | None


def enroll(kv: KV, settings: GroupSettings, user: str, config: ServerConfig, name: str,
           services: Sequence[str], endpoint: str, *, expires: float | None, now: float,
           otp: bool, sources: Sequence[str],
           random: Callable[[int], bytes] = os.urandom) -> Enrolled:
    """Enroll a client in the group: a new secret (drawn here, kept nowhere
    but the URI), its record (derived keys) created in etcd only if no client
    has the name.  Raises LocalError."""
    from spa.server.admin import new_client

    meta = read_meta(kv, settings, user)
    check_server_id(config, meta)
    entry, enrollment = new_client(config, name, services, endpoint, expires=expires,
                                   now=now, otp=otp, sources=sources,
                                   server_id=meta.server_id, random=random)
    with store_errors(settings, user):
        if kv.get(layout.revoked_key(meta.group, name).encode()) is not None:
            raise LocalError(f"group {meta.group} holds a revocation of {name!r} but no "
                             "client: pick another name")
        created = kv.create(layout.client_key(meta.group, name).encode(),
                            client_record(entry, meta.server_id))
    if not created:
        raise LocalError(f"client {name!r} is already enrolled in group {meta.group}; pick "
                         "another name (or rotate it: spa-server rotate)")
    return Enrolled(render(enrollment),
                    provisioning_uri(entry.otp_secret, name) if entry.otp_secret else None)


@dataclass(frozen=True, slots=True)
class Revoked:
    changed: bool
    message: str


def revoke(kv: KV, settings: GroupSettings, user: str, name: str, *, now: float,
           close: bool = False) -> Revoked:
    """Write revoked/<name> (with `close`: its leases are to end at once).
    Raises LocalError (no such client)."""
    meta = read_meta(kv, settings, user)
    _, revocation = _client(kv, settings, user, meta, name)
    if revocation is not None and (not close or revocation.close):
        return Revoked(False, f"{name} was already revoked in group {meta.group}")
    at = int(now) if revocation is None else revocation.at
    with store_errors(settings, user):
        kv.put(layout.revoked_key(meta.group, name).encode(),
               encode_revocation(Revocation(name, at, close)))
        leases, _ = kv.get_prefix(layout.client_leases_prefix(meta.group, name).encode())
        ends = [decode_lease(item.value).until for item in leases]
    live = [until for until in ends if until > now]
    if close:
        tail = (f"its {len(live)} live lease(s) in the group end as well, at each member that "
                "granted one" if live else "it holds no live lease in the group")
    elif live:
        tail = (f"its {len(live)} live lease(s) stay until they expire, at most "
                f"{max(live) - now:.0f} s from now (--close ends them now)")
    else:
        tail = "it holds no live lease in the group"
    return Revoked(True, f"{name} is revoked in group {meta.group}: every member refuses its "
                   f"knocks once it sees the change (no restart needed); {tail}")


def rotate(kv: KV, settings: GroupSettings, user: str, config: ServerConfig, name: str, *,
           grace: float, now: float, endpoint: str | None,
           random: Callable[[int], bytes] = os.urandom) -> str:
    """A new secret for a client of the group: its record gets the new
    derived keys, and the old ones until `grace` seconds from now (0: they
    stop at once).  Returns the new URI.  Raises LocalError."""
    from spa.server.admin import parse_endpoint, service_refs

    if not endpoint:
        raise LocalError(f"give --endpoint HOST[:PORT] for {name}'s new URI (a group keeps no "
                         "endpoint per client: the group's knock address, as at enroll)")
    if grace < 0:
        raise LocalError("--grace must be 0 or a positive duration, e.g. 10m")
    host, port = parse_endpoint(endpoint, config.listen_port)
    meta = read_meta(kv, settings, user)
    check_server_id(config, meta)
    client, revocation = _client(kv, settings, user, meta, name)
    if revocation is not None:
        raise LocalError(f"{name} is revoked in group {meta.group}; enroll a new client "
                         "instead")
    refs = service_refs(config, client.services)
    secret = random(MASTER_SECRET_SIZE)
    until = math.ceil(now + grace) if grace else None
    rotated = replace(client, keys=derive_keys(secret, meta.server_id),
                      old_keys=client.keys if until else None, old_until=until)
    with store_errors(settings, user):
        kv.put(layout.client_key(meta.group, name).encode(), encode_client(rotated))
    return render(Enrollment(host, port, meta.server_id, name, secret, refs,
                             otp=bool(client.otp_secret)))


def set_sources(kv: KV, settings: GroupSettings, user: str, config: ServerConfig,
                name: str, networks: tuple[str, ...]) -> bool:
    """Write the client's record again with `networks` (canonical; empty:
    anywhere); whether it changed.  Raises LocalError (no such client)."""
    meta = read_meta(kv, settings, user)
    check_server_id(config, meta)
    client, _ = _client(kv, settings, user, meta, name)
    if client.sources == networks:
        return False
    with store_errors(settings, user):
        kv.put(layout.client_key(meta.group, name).encode(),
               encode_client(replace(client, sources=networks)))
    return True


# ---- from the config file (what spa.server.admin calls in group mode) -------

def need_login(config: ServerConfig, login: Login | None, command: str) -> Login:
    """The admin's etcd login for a command that writes.  Raises LocalError."""
    assert config.group is not None
    if login is None:
        raise LocalError(f"{command} in group {config.group.name} writes to etcd as the "
                         "group's admin: give --admin-user NAME and --admin-password-file "
                         "FILE ('-': read it from standard input)")
    return login


def refuse_login(config: ServerConfig, login: Login | None) -> None:
    """--admin-user on a standalone server's config is a mistake: say so."""
    if login is not None and config.group is None:
        raise LocalError(f"--admin-user is for a group member's config; {config.path} has no "
                         "[group] table (join a group with: spa-server group join)")


def _open(config: ServerConfig, login: Login | None) -> tuple[GroupSettings, KV, str]:
    assert config.group is not None
    kv = groupstore.connect(config.group, login)
    return config.group, kv, config.group.user if login is None else login.user


def enroll_in(config: ServerConfig, login: Login | None, name: str, services: Sequence[str],
              endpoint: str, *, expires: float | None, now: float, otp: bool,
              sources: Sequence[str]) -> Enrolled:
    settings, kv, user = _open(config, need_login(config, login, "enroll"))
    return enroll(kv, settings, user, config, name, services, endpoint, expires=expires,
                  now=now, otp=otp, sources=sources)


def revoke_in(config: ServerConfig, login: Login | None, name: str, *, now: float,
              close: bool) -> Revoked:
    settings, kv, user = _open(config, need_login(config, login, "revoke"))
    return revoke(kv, settings, user, name, now=now, close=close)


def rotate_in(config: ServerConfig, login: Login | None, name: str, *, grace: float,
              now: float, endpoint: str | None) -> str:
    settings, kv, user = _open(config, need_login(config, login, "rotate"))
    return rotate(kv, settings, user, config, name, grace=grace, now=now, endpoint=endpoint)


def set_sources_in(config: ServerConfig, login: Login | None, name: str,
                   networks: tuple[str, ...]) -> bool:
    settings, kv, user = _open(config, need_login(config, login, "clients set"))
    return set_sources(kv, settings, user, config, name, networks)


def client_page_in(config: ServerConfig, *, now: float, after: str, limit: int, match: str,
                   state: str) -> tuple[int, list[tuple[ClientEntry, str]]]:
    """One page of the group's clients, read as this member: (how many the
    group has, the page's rows with their states).  Raises LocalError."""
    from spa.store.clients import FILTERS, PAGE_LIMIT_MAX

    if state not in FILTERS:
        raise LocalError(f"--state {state!r}: choose one of {', '.join(STATES)}")
    if not 1 <= limit <= PAGE_LIMIT_MAX:
        raise LocalError(f"--limit {limit}: give 1 to {PAGE_LIMIT_MAX}")
    settings, kv, user = _open(config, None)
    meta = read_meta(kv, settings, user)
    check_server_id(config, meta)
    rows = client_entries(kv, settings, user, meta, now=now)
    shown = [(entry, text) for entry, text in rows
             if entry.name > after and match in entry.name
             and (not state or text.split(" ", 1)[0] == state)]
    return len(rows), shown[:limit]
