"""The nftables backend (the default): sets with timeouts in our own table.

Invariants (docs/threat-model.md, "Firewall"; STYLE principle 6):
- Everything lives in our tables `inet spa` and `inet spa_hold` (an
  instance's: `inet spa_NAME`, `inet spa_hold_NAME`, spa/backends/names.py);
  no other table, chain or rule is touched.  `start` is idempotent and atomic (one
  transaction: a restart never deletes the table first): it creates what is
  missing, rewrites our one chain, and keeps the sets' elements (grants that
  outlived a crash).
- Two tables, one gate.  `inet spa` outlives the daemon (a crash or kill -9
  leaves the ports closed and the grants expiring on time).  `inet spa_hold`
  holds the same grants and drops the same ports, right after ours, in a
  table this process owns (`flags owner`): no other program may change or
  delete it, `nft flush ruleset` passes it by, and the kernel removes it when
  the daemon ends.  So while the daemon runs, a reload of the host's
  ruleset opens nothing even before `repair` puts `inet spa` back (the
  kernel lets our repair commit only 2-35 ms after the flush).  Every grant
  and removal goes to both tables in the same transaction.  libnftables
  before 1.0.9 frees a table's single flag while printing it in JSON
  (garbage in `nft -j list ruleset` for every program, heap corruption in
  ours, seen): this module never lists the hold table in JSON
  (`safe_ruleset`), and the daemon says so at start.
- Accepted new connections carry GATE_MARK in the packet mark, so a host
  table that drops by default can accept exactly what spa let in.
- Per protected service, an IPv4 and an IPv6 set with `flags timeout`.  A
  grant is an element whose timeout is the lease's expiry (whole seconds,
  rounded up), so the kernel closes access on time even if the daemon dies.
  A renewal replaces the element's timeout in one atomic transaction.  A
  grant for an address the backend believes absent is a single `create`
  (which fails if the element exists after all); if the kernel refuses the
  transaction, it is sent again with every grant in the add+delete+add form,
  so a wrong belief costs time, never a wrong timeout.
- The chain (hook input, before the usual filter chains): established and
  related traffic accepted (a session survives its lease), but never a TCP
  SYN without ACK (conntrack passes one that matches an entry it still holds
  as established: a stale session's port would open anew); new connections
  to a protected port accepted only from that service's sets; everything else
  to a protected port dropped, never rejected (a scanner sees "filtered").
- Every dropped attempt on a protected port is counted in the kernel, per
  (source, port), in the dynamic sets drops_v4 / drops_v6 (elements time
  out after DROPS_TIMEOUT of silence; at most DROPS_SIZE): no packet wakes
  the daemon, which reads the counters now and then (`drops`).
- `stop` leaves live grants to expire by themselves, or with flush=True
  empties the sets; the rules stay, so protected ports stay closed.
- A named gateway service's grants are (address . destination) elements
  (spa/backends/nftgateway.py); the backend keeps each open pair's
  destination (`_dest`: from the changes, the kernel's elements at start, a
  reconcile), and every rendering of held grants (repair, replace, the
  hold table) uses it.  A pair whose destination it does not know is left
  closed.
- One daemon per instance, one instance per port (docs/install.md, "Several
  instances on one host"): the first start refuses, in one line, when our
  hold table is already there (another live daemon of this instance owns
  it; one on its way out is given HOLD_GONE seconds), and every start
  refuses a port that another instance's gate table drops (each would drop
  the other's grants).  Nothing is installed then.
- `repair` compares `inet spa` with what nftables listed right after we
  installed it (spa/backends/nftrepair.py) and puts it back in one
  transaction; `watch` hears every commit (spa/backends/nftwatch.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from spa.backends.base import Change, Destinations, Held
from spa.backends.libnft import Document, NftRunner
from spa.backends.names import DEFAULT_NAMES, FAMILY, Names, instance_of_table, is_hold_table
from spa.backends.nftgateway import gated_elements, local_services, published_named
from spa.backends.nftrender import (
    CHAIN,
    DROPS_SIZE,
    DROPS_TIMEOUT,
    PRIORITY,
    parse_drops,
    parse_gated_ports,
    parse_held,
    render_allow,
    render_changes,
    render_flush,
    render_hold,
    render_remove,
    render_start,
    set_name,
    timeout_seconds,
)
from spa.backends.nftrepair import diagnose, render_repair, render_replace, shape
from spa.backends.nftwatch import NftWatch
from spa.core.leases import Allow
from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server.errors import LocalError

__all__ = [
    "CHAIN",
    "DROPS_SIZE",
    "DROPS_TIMEOUT",
    "FAMILY",
    "PRIORITY",
    "NftablesBackend",
    "parse_drops",
    "parse_held",
    "render_allow",
    "render_changes",
    "render_flush",
    "render_hold",
    "render_remove",
    "render_start",
    "set_name",
    "timeout_seconds",
]


class NftablesBackend:
    name = "nftables"
    expires_by_itself = True

    def __init__(self, runner: NftRunner, *, flush_on_stop: bool = False,
                 hold: bool | None = None, names: Names = DEFAULT_NAMES) -> None:
        """`hold`: keep the gate in an owned table too (default: where the
        runner can own tables, i.e. libnftables).  `names`: the instance's
        tables."""
        self.runner = runner
        self.names = names
        self.flush_on_stop = flush_on_stop
        self._hold_wanted = runner.owns_tables and hold is not False
        self._hold = False  # the hold table is installed
        self.hold_note = ""  # why there is no hold table, for the log
        self.flags_note = ""  # what the hold table costs other programs here, for the log
        self._services: dict[str, Service] = {}
        # Elements we believe the kernel holds (a hint for `create`: grants
        # that expired in the kernel linger here until their Remove).
        self._present: set[tuple[IPAddress, str]] = set()
        self._dest: Destinations = {}  # named gateway services' open pairs -> destination
        self._gated: dict[str, set[IPAddress]] = {}  # `gate_addresses`: before any lease
        self._shape = ""  # our table as nftables listed it right after we installed it
        self._started = False  # a start ran (a reload's start is not the first)

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        """Install (or take back) our table in one transaction: what another
        program left in it goes, grants that outlived a crash stay.  When
        nftables refuses (another process owns a table of that name), the
        hold table still goes in and `repair` reports the failure."""
        tables = self._inet_tables()
        if self._hold_wanted and not self._started and self.names.hold in tables:
            tables = self._wait_for_hold_to_go()
        self._refuse_shared_ports(services, tables)
        self._services = dict(services)
        names = self.names
        try:
            flags = self._flags()
            dest = self._dest
            if flags:  # not safe to list in JSON (see _flags): start afresh
                self.runner.run(render_replace(self._services, {}, now, names=names))
            else:
                listing = (self._json_listing() if flags is not None else None) or {}
                held = parse_held(listing, self._services, now, names=names, destinations=dest)
                try:
                    self.runner.run(render_repair(listing, self._services, held, now,
                                                  names=names, destinations=dest,
                                                  gated=self._gated))
                except LocalError:  # something in the way: start afresh, the grants kept
                    self.runner.run(render_replace(self._services, held, now, names=names,
                                                   destinations=dest, gated=self._gated))
            installed = self._remember_shape()
        except LocalError:  # the guard's first check reports it, and keeps reporting
            # nothing is known to be installed: whatever the table holds now
            # differs from "", so the guard's first check repairs it (a shape
            # kept from before would have passed a gate without these services)
            self._shape = ""
            installed = {}
        if self._hold_wanted and not _flags_print_safely(installed):
            self.flags_note = (f"libnftables {_version(installed)} prints garbage for the "
                               f"owned table {FAMILY} {names.hold} in JSON listings (nft -j list "
                               "ruleset; fixed in 1.0.9); spa never lists it so: if a tool of "
                               "yours does, set hold_table = \"off\"")
        if self._hold_wanted:
            self._install_hold(parse_held(installed, self._services, now, names=names), now)
        self._started = True

    def _inet_tables(self) -> list[str]:
        """The names of the inet tables now ([] when they cannot be listed:
        the start then says why, and the guard reports it)."""
        try:
            text = self.runner.list_text("list tables")
        except LocalError:
            return []
        return [words[2] for words in map(str.split, text.splitlines())
                if len(words) >= 3 and words[0] == "table" and words[1] == FAMILY]

    def _wait_for_hold_to_go(self) -> list[str]:
        """Our hold table exists before we made it: another live process
        owns it (the kernel removes an owned table with its owner), i.e.
        another spa-server of this instance, or the gate keeper of the one
        this start replaces, on its way out (given HOLD_GONE seconds).
        Returns the tables then.  Raises LocalError: two daemons on one table
        would each undo the other's gate."""
        deadline = time.monotonic() + HOLD_GONE
        while True:
            tables = self._inet_tables()
            if self.names.hold not in tables:
                return tables
            if time.monotonic() >= deadline:
                instance = self.names.instance
                raise LocalError(
                    f"another spa-server of instance {instance!r} runs (it owns table "
                    f"{FAMILY} {self.names.hold}): give this one its own [server] instance "
                    "(docs/install.md, \"Several instances on one host\")")
            time.sleep(0.1)

    def _refuse_shared_ports(self, services: Mapping[str, Service], tables: list[str]) -> None:
        """Another spa instance's table on this host that gates a port ours
        would gate: refused in one line, nothing installed.  A packet must
        pass both tables, and each drops what it did not grant, so each
        instance would drop the other's grants.  Raises LocalError (also
        when the ruleset cannot be read: then nothing could be installed)."""
        ours = {(s.protocol, s.port): s.name for s in local_services(services).values()}
        for name in self._other_gates(tables):
            try:
                listing = self.runner.run({"nftables": [{"list": {"table": {
                    "family": FAMILY, "name": name}}}]}, terse=True)
            except LocalError:
                continue  # gone meanwhile
            shared = sorted(parse_gated_ports(listing, name) & ours.keys())
            if shared:
                protocol, port = shared[0]
                raise LocalError(
                    f"port {protocol}/{port} ({ours[(protocol, port)]}) is gated by another "
                    f"spa instance too (table {FAMILY} {name}): each would drop the other's "
                    f"grants; give each instance its own ports, or if that instance is gone "
                    f"for good: nft delete table {FAMILY} {name}")

    def _other_gates(self, tables: list[str]) -> list[str]:
        """The gate tables of the other spa instances among `tables` (never
        a hold table, nor one with flags: neither is safe to list in JSON)."""
        found = []
        for name in tables:
            if (name != self.names.table and instance_of_table(name) is not None
                    and not is_hold_table(name)):
                try:
                    if self._flags(name) == frozenset():
                        found.append(name)
                except LocalError:
                    continue  # not ours to read: no instance of ours made it so
        return found

    def _flags(self, table: str | None = None) -> frozenset[str] | None:
        """Our table's flags, from nft's terse text listing; None: no table.
        Read before any JSON listing of it: libnftables before 1.0.9 prints a
        table with one flag from freed memory (an attacker's `flags dormant`
        or `flags owner` would have our own listings corrupt our heap)."""
        try:
            text = self.runner.list_text(f"list table {FAMILY} {table or self.names.table}")
        except LocalError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        for line in text.splitlines()[1:]:
            word = line.strip()
            if word.startswith("flags "):
                return frozenset(flag.strip() for flag in word[6:].split(","))
            if word and not word.startswith("comment "):
                break  # past the table's own lines: sets, chains
        return frozenset()

    def _install_hold(self, held: Held, now: float) -> None:
        """The hold table: made `flags owner` by this process, so no other
        program may change or delete it and `nft flush ruleset` passes it by;
        the kernel removes it when this process ends (our table stays)."""
        try:
            if not self._hold:
                self.runner.run_text(f"add table {FAMILY} {self.names.hold} {{ flags owner; }}")
            self.runner.run(render_hold(self._services, held, now, names=self.names,
                                        destinations=self._dest, gated=self._gated))
        except LocalError as exc:
            self._hold = False
            self.hold_note = (f"no hold table ({exc}); a flush of the ruleset opens the "
                              "protected ports until spa puts its table back")
            return
        self._hold = True
        self.hold_note = ""

    def _listing(self) -> Document | None:
        """`list table inet spa`, or None when the table does not exist.
        Raises LocalError for any other failure, and when another program
        gave the table flags (it is then not safe to list in JSON)."""
        flags = self._flags()
        if flags is None:
            return None
        if flags:
            raise LocalError(f"table {FAMILY} {self.names.table} was given flags "
                             f"{', '.join(sorted(flags))} "
                             "by another program")
        return self._json_listing()

    def _json_listing(self, *, terse: bool = False) -> Document | None:
        """`_listing` once its flags are known to be none (`terse`: without
        set elements)."""
        try:
            return self.runner.run({"nftables": [{"list": {"table": {
                "family": FAMILY, "name": self.names.table}}}]},
                                   terse=terse)
        except LocalError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise

    def _remember_shape(self) -> Document:
        listing = self._listing() or {}
        self._shape = shape(listing, names=self.names)
        return listing

    def repair(self, wanted: Held, *, now: float, grants: bool = True) -> str | None:
        """If another program removed or altered our table (its flags
        included), put it back in one transaction with exactly `wanted` and
        say what was wrong; else None.  `grants` False: the structure only,
        from a listing without the set elements (cheap whatever the number of
        grants: the guard's backstop, when notifications already report every
        change of an element).  Raises LocalError when nftables refuses even
        the whole replacement (another process owns the name)."""
        names = self.names
        flags = self._flags()
        listing = None if flags is None or flags else self._json_listing(terse=not grants)
        if flags:
            problem: str | None = (f"table {FAMILY} {names.table} was given flags "
                                   f"{', '.join(sorted(flags))} by another program")
        else:
            problem = diagnose(listing, self._shape, self._services,
                               wanted if grants else None, now, names=names)
        if not problem:
            return None
        dest = self._dest
        replace = render_replace(self._services, wanted, now, names=names, destinations=dest,
                                 gated=self._gated)
        if flags:  # not safe to list, nor to take apart: start afresh
            self.runner.run(replace)
        else:
            try:
                self.runner.run(render_repair(listing, self._services, wanted, now,
                                              names=names, destinations=dest, gated=self._gated))
            except LocalError:  # something in the way (a jump into a chain): start afresh
                self.runner.run(replace)
        self._present = set(wanted)
        self._remember_shape()
        return problem

    @property
    def holds(self) -> bool:
        """Whether the owned hold table backs the gate."""
        return self._hold

    def watch(self) -> NftWatch | None:
        """A listener for nftables' change notifications, or None (no
        permission: then only the polls see a change)."""
        try:
            return NftWatch()
        except OSError:
            return None

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        """(A named service's lease comes `for_destination` its address.)"""
        destination = self._destination_of(address, service)
        if service.named and destination is None:
            return  # no address to open it to: closed
        self.runner.run(render_allow(address, service.name, timeout_seconds(until, now),
                                     hold=self._hold, names=self.names,
                                     destination=destination,
                                     published=published_named(service)))
        self._present.add((address, service.name))
        if destination is not None:
            self._dest[(address, service.name)] = destination

    def remove(self, address: IPAddress, service: Service) -> None:
        destination = self._destination_of(address, service)
        if service.named and destination is None:
            return  # never opened
        self.runner.run(render_remove(address, service.name, hold=self._hold,
                                      names=self.names, destination=destination,
                                      published=published_named(service)))
        self._present.discard((address, service.name))
        self._dest.pop((address, service.name), None)

    def gate_addresses(self, addresses: Mapping[str, Sequence[IPAddress]]) -> None:
        """Drop a named gateway service's port on these addresses from now on,
        before any lease (its host's name at start and reload); kept for
        every repair while this process runs."""
        for name, found in addresses.items():
            self._gated.setdefault(name, set()).update(found)
        commands = [c for table in _gate_tables(self) for c in
                    gated_elements(addresses, self._services, table)]
        if commands:
            self.runner.run({"nftables": commands})

    def _destination_of(self, address: IPAddress, service: Service) -> IPAddress | None:
        """A named service's lease's destination: the service's (as handed
        over for one lease), else the one the backend knows; None otherwise."""
        if not service.named:
            return None
        return service.host or self._dest.get((address, service.name))

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        if not changes:
            return
        present = self._present
        try:
            self.runner.run(render_changes(
                changes, now, lambda address, name: (address, name) not in present,
                hold=self._hold, names=self.names))
        except LocalError:
            # An element we thought absent exists (or something else broke):
            # the form that works either way; its error is the one to report.
            self.runner.run(render_changes(changes, now, hold=self._hold, names=self.names))
        for action, service in changes:
            pair = (action.address, service.name)
            if isinstance(action, Allow):
                present.add(pair)
                if service.named and action.destination is not None:
                    self._dest[pair] = action.destination
            else:
                present.discard(pair)
                self._dest.pop(pair, None)

    def drops(self) -> dict[tuple[str, int], int]:
        """Dropped attempts on protected ports: (source, port) -> packets so far.
        Only the two drop sets are listed, never the grants (tens of thousands
        under load, every 5 s); a set listing prints no table, so it is safe
        whatever flags the table has."""
        found: dict[tuple[str, int], int] = {}
        for version in (4, 6):
            found.update(parse_drops(self.runner.run({"nftables": [{"list": {"set": {
                "family": FAMILY, "table": self.names.table, "name": f"drops_v{version}"}}}]}),
                names=self.names))
        return found

    def held(self, *, now: float) -> Held:
        held = parse_held(self._listing() or {}, self._services, now, names=self.names,
                          destinations=self._dest)
        self._present = set(held)
        return held

    def stop(self) -> None:
        if self.flush_on_stop and self._services:
            self.runner.run(render_flush(self._services, hold=self._hold, names=self.names))


def _gate_tables(backend: NftablesBackend) -> tuple[str, ...]:
    names = backend.names
    return (names.table, names.hold) if backend.holds else (names.table,)


def safe_ruleset(runner: NftRunner) -> Document:
    """Every table but the hold tables (every instance's), each listed in
    JSON, in one document (a table that goes between the two steps is left
    out).  Raises LocalError."""
    tables = [line.split()[1:3] for line in runner.list_text("list tables").splitlines()
              if line.startswith("table ") and len(line.split()) >= 3]
    items: list[object] = []
    for family, name in tables:
        if family == FAMILY and is_hold_table(name):
            items.append({"table": {"family": family, "name": name}})
            continue
        try:
            listing = runner.run({"nftables": [{"list": {"table": {"family": family,
                                                                    "name": name}}}]})
        except LocalError:
            continue
        items += [item for item in listing.get("nftables", [])
                  if not (isinstance(item, dict) and "metainfo" in item)]
    return {"nftables": items}


HOLD_GONE = 3.0  # seconds a start waits for the hold table of the daemon it replaces to go
SAFE_FLAGS_VERSION = (1, 0, 9)  # nftables' "json: fix use after free in table_flags_json()"


def _version(listing: Document) -> str:
    for item in listing.get("nftables", []):
        if isinstance(item, dict) and isinstance(item.get("metainfo"), dict):
            return str(item["metainfo"].get("version", "unknown"))
    return "unknown"


def _flags_print_safely(listing: Document) -> bool:
    """Whether this libnftables prints a table with one flag without harm."""
    try:
        found = tuple(int(part) for part in _version(listing).split(".")[:3])
    except ValueError:
        return False
    return found >= SAFE_FLAGS_VERSION
