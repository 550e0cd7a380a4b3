"""The admin commands that make and join a group (docs/groups.md,
"Administering a group"): init, join, status, and the import of a
standalone server's clients.

Invariants:
- As spa.server.admin_group: the store is an argument (the CLI connects;
  tests give the fake), time too; every refusal is one LocalError line.
- The meta record is created only if absent: a group's server id, once
  written, is never replaced by these commands.
- `join` writes the config only after the member's own login has read the
  group's meta record, and writes [server] server_id = the group's with the
  [group] table in one edit (comments kept, the result checked as `load`
  checks it).
- An import creates client records only where absent, for a server whose
  id is the group's (else their keys are bound to another id: refused).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spa.group import layout
from spa.group.clients import client_record
from spa.group.codec import RecordError
from spa.group.kv import KV
from spa.group.layout import Kind
from spa.group.policy import DEFAULT_ON_STORE_DOWN
from spa.group.records import (
    Activation,
    GroupMeta,
    Member,
    Revocation,
    decode_lease,
    decode_member,
    encode_activation,
    encode_meta,
    encode_revocation,
)
from spa.group.settings import DEFAULT_TIMEOUT, GroupSettings
from spa.server import config as config_mod
from spa.server.admin_group import client_entries
from spa.server.config import KIND_SPA, ClientEntry, ServerConfig
from spa.server.errors import LocalError
from spa.server.groupstore import read_meta, store_errors
from spa.store.states import STATES

# ---- the group itself -------------------------------------------------------


def init(kv: KV, settings: GroupSettings, user: str, *, server_id: bytes,
         now: float) -> GroupMeta:
    """Create the group's meta record (the group's name, `server_id`, now).
    Raises LocalError if the group exists (its record is never overwritten)."""
    meta = GroupMeta(settings.name, server_id, int(now))
    key = layout.meta_key(settings.name).encode()
    with store_errors(settings, user):
        created = kv.create(key, encode_meta(meta))
    if not created:
        raise LocalError(f"group {settings.name} exists already in etcd; join it with "
                         f"spa-server group join --group {settings.name} ..., or pick "
                         "another name")
    return meta


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What `import_clients` did, client by client (names only)."""

    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # the group holds the same record
    differ: list[str] = field(default_factory=list)  # the group holds another: kept as it is
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    def lines(self) -> list[str]:
        out = [f"added {len(self.added)}: {', '.join(self.added) or '-'}"]
        if self.unchanged:
            out.append(f"already in the group: {', '.join(self.unchanged)}")
        if self.differ:
            out.append(f"in the group with other keys or rules, kept as the group has them: "
                       f"{', '.join(self.differ)}")
        out += [f"skipped {name}: {why}" for name, why in self.skipped]
        return out


def import_clients(kv: KV, settings: GroupSettings, user: str, meta: GroupMeta,
                   config: ServerConfig, entries: Iterable[ClientEntry], *,
                   activated: dict[str, str], now: float) -> ImportReport:
    """Bring a standalone server's clients into the group whose server id is
    that server's own (`config.server_id` must be `meta.server_id`: their
    URIs name it, so their keys hold).  Each client's record is created if
    absent; a revoked one gets its revocation, a pending one that knocked in
    time (`activated`: name -> the enroll_by it met) its activation.
    fwknop clients are skipped (their keys are their own).  Running it again
    changes nothing.  Raises LocalError."""
    if config.server_id != meta.server_id:
        raise LocalError(f"group {meta.group} has another server id than {config.path}: the "
                         "clients enrolled here hold keys for this server's id, which the "
                         "group's members do not use; enroll them in the group anew (spa-server "
                         "enroll on a member), see docs/groups.md, \"Moving a standalone "
                         "server into a group\"")
    report = ImportReport()
    with store_errors(settings, user):
        for entry in entries:
            if entry.kind != KIND_SPA:
                report.skipped.append((entry.name, "an fwknop client (its keys are its own); "
                                       "move it to spa1:// with rotate, then import again"))
                continue
            try:
                key = layout.client_key(meta.group, entry.name).encode()
                record = client_record(entry, meta.server_id)
            except (RecordError, layout.GroupNameError) as exc:
                report.skipped.append((entry.name[:64], str(exc)))
                continue
            if kv.create(key, record):
                report.added.append(entry.name)
            else:
                found = kv.get(key)
                same = found is not None and found.value == record
                (report.unchanged if same else report.differ).append(entry.name)
                if not same:
                    continue
            _carry_states(kv, meta.group, entry, activated, now)
    return report


def _carry_states(kv: KV, group: str, entry: ClientEntry, activated: dict[str, str],
                  now: float) -> None:
    """A client's revocation and activation, as the standalone server had them."""
    if entry.revoked:
        kv.create(layout.revoked_key(group, entry.name).encode(),
                  encode_revocation(Revocation(entry.name, int(now), entry.close_leases)))
    if entry.enroll_by and activated.get(entry.name) == entry.enroll_by:
        kv.create(layout.activated_key(group, entry.name).encode(), encode_activation(
            Activation(entry.name, int(config_mod.parse_utc(entry.enroll_by)))))


# ---- status -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointState:
    url: str
    answered: bool
    detail: str  # "ok", or why not (one line)


@dataclass(frozen=True, slots=True)
class GroupStatus:
    meta: GroupMeta
    revision: int
    members: list[Member]
    counts: dict[str, int]  # state -> clients (spa.store.states.STATES)
    leases: int  # live leases of the group


def status(kv: KV, settings: GroupSettings, user: str, *, now: float) -> GroupStatus:
    """The group as etcd holds it: its meta, revision, members, clients by
    state and live leases.  Raises LocalError (etcd unreachable, refused)."""
    meta = read_meta(kv, settings, user)
    with store_errors(settings, user):
        members_raw, revision = kv.get_prefix(layout.kind_prefix(meta.group, Kind.MEMBER).encode())
        members = [decode_member(item.value) for item in members_raw]
        leases, _ = kv.get_prefix(layout.kind_prefix(meta.group, Kind.LEASE).encode())
        live = sum(1 for item in leases if decode_lease(item.value).until > now)
    rows = client_entries(kv, settings, user, meta, now=now)
    counts = dict.fromkeys(STATES, 0)
    for _, state in rows:
        counts[state.split(" ", 1)[0]] += 1
    return GroupStatus(meta, revision, members, counts, live)


def endpoint_states(settings: GroupSettings,
                    probe: Callable[[str], None]) -> list[EndpointState]:
    """Each endpoint's answer to `probe(url)` (a read of the meta key through
    that endpoint alone): ok, or the one line its LocalError says."""
    found = []
    for url in settings.endpoints:
        try:
            probe(url)
            found.append(EndpointState(url, True, "ok"))
        except LocalError as exc:
            found.append(EndpointState(url, False, str(exc)))
    return found


# ---- admin connections, join, import ----------------------------------------


def connection(base: GroupSettings | None, *, group: str | None, endpoints: Sequence[str],
               ca: Path | None, cert: Path | None, key: Path | None,
               timeout: float | None) -> GroupSettings:
    """How an admin command reaches the group: the config's [group] table
    where there is one, each option given instead of its value.  Its member
    and password file are the table's (or placeholders, unused: an admin
    command logs in as the admin).  Raises LocalError for what is missing."""
    from spa.server.groupconfig import check_timeout, parse_endpoints

    where = "--group" if base is None else "[group]"
    name = group or (base.name if base else None)
    if name is None:
        raise LocalError("name the group with --group NAME (or run it with the config of a "
                         "member, whose [group] table names it)")
    try:
        layout.check_group(name)
    except layout.GroupNameError as exc:
        raise LocalError(f"--group: {exc}") from None
    urls = parse_endpoints("--endpoint:", list(endpoints)) if endpoints else (
        base.endpoints if base else ())
    files = {"--ca": ca or (base.ca_file if base else None),
             "--cert": cert or (base.cert_file if base else None),
             "--key": key or (base.key_file if base else None)}
    missing = [option for option, value in files.items() if value is None]
    if not urls or missing:
        what = "--endpoint URL" if not urls else missing[0] + " FILE"
        raise LocalError(f"give {what}: this config has no [group] table to take it from "
                         f"({where}); e.g. --endpoint https://10.0.0.1:2379 --ca ca.crt "
                         "--cert admin.crt --key admin.key")
    seconds = check_timeout("--timeout", timeout) if timeout is not None else (
        base.timeout if base else DEFAULT_TIMEOUT)
    return GroupSettings(
        name=name, member=base.member if base else "admin", endpoints=urls,
        ca_file=files["--ca"] or Path(), cert_file=files["--cert"] or Path(),
        key_file=files["--key"] or Path(), user=base.user if base else "admin",
        password_file=base.password_file if base else Path("/dev/null"),
        on_store_down=base.on_store_down if base else DEFAULT_ON_STORE_DOWN,
        timeout=seconds)


def local_client_count(config: ServerConfig) -> int:
    """Clients of our protocol enrolled at this server itself (its client
    store, or the config's [clients] not moved there yet): their keys are
    bound to its server id.  fwknop clients are not counted (their keys are
    their own, whatever the server id).  Raises LocalError."""
    from spa.store.clients import CLIENTS_DB, ClientStore

    if config.clients:
        return sum(1 for c in config.clients.values() if c.kind == KIND_SPA and not c.revoked)
    if not os.path.lexists(config.state_dir / CLIENTS_DB):
        return 0
    with ClientStore.open_as_owner(config.state_dir, create=False) as store:
        return sum(1 for c in store.all() if c.kind == KIND_SPA and not c.revoked)


def join(path: Path, settings: GroupSettings, kv: KV, *,
         force: bool = False) -> tuple[ServerConfig, GroupMeta]:
    """Make the server of the config at `path` a member: check that its
    member login reads the group's meta record, then write the [group]
    table and the group's server id into the config.  Refused when the
    server has clients of its own, bound to another server id, unless
    `force`.  Raises LocalError."""
    from spa.server.groupconfig import group_table

    config = config_mod.load(path)
    if config.group is not None and config.group.name != settings.name:
        raise LocalError(f"{path} is a member of group {config.group.name} already; remove "
                         "its [group] table first to join another")
    meta = read_meta(kv, settings, settings.user)
    if config.server_id != meta.server_id and not force:
        count = local_client_count(config)
        if count:
            raise LocalError(
                f"{count} client(s) enrolled at this server hold keys for its own server id, "
                f"which group {meta.group} does not share: their URIs stop working here once "
                "it joins; move them first (docs/groups.md, \"Moving a standalone server "
                "into a group\") or pass --force")
    return config_mod.set_group(path, meta.server_id, group_table(settings)), meta


def import_here(path: Path, settings: GroupSettings, kv: KV, user: str, *,
                now: float) -> ImportReport:
    """`import_clients` with this server's own clients (its client store) and
    the pending ones that knocked in time (its state directory).
    Raises LocalError."""
    from spa.server.admin import open_store
    from spa.server.state import StateDir

    config = config_mod.load(path)
    meta = read_meta(kv, settings, user)
    with open_store(config, now=now) as store:
        entries = list(store.all())
    try:
        activated = StateDir(config.state_dir).load_activated()
    except LocalError:
        activated = {}
    return import_clients(kv, settings, user, meta, config, entries, activated=activated,
                          now=now)


def probe(kv: KV, settings: GroupSettings) -> None:
    """Read the meta key through `kv` (one endpoint).  Raises LocalError."""
    with store_errors(settings, settings.user):
        kv.get(layout.meta_key(settings.name).encode())
