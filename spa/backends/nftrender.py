"""nftables documents for our table, and what its listings say.  Pure: the
JSON the backend sends and parses, tested without root (STYLE principle 6).

The invariants of what these documents install are the backend's
(spa/backends/nftables.py); here every command is data, never shell text.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from spa.backends.base import Change, Destinations, Held
from spa.backends.libnft import Document
from spa.backends.names import DEFAULT_NAMES, FAMILY, Names
from spa.backends.nftgateway import (
    dst_set_name,
    element,
    forward_rules,
    gated_elements,
    grant_sets,
    local_services,
    nat_commands,
    pub_map_name,
    published_named,
)
from spa.core.leases import Allow
from spa.core.policy import Service
from spa.core.wire import IPAddress

Gated = Mapping[str, Iterable[IPAddress]]  # named service -> addresses gated before any lease

# The tables are an instance's (spa/backends/names.py): `inet spa` and the
# same gate in a table the daemon owns, `inet spa_hold` (see the backend).
CHAIN = "input"
FORWARD = "forward"  # gates connections DNATed from a protected port (Docker's -p PORT:...)
PRIORITY = -10  # before the conventional filter chains at priority 0
HOLD_PRIORITY = -9  # right after ours: spa counts the drops, the hold only backs it up
GATE_MARK = 0x10000000  # set on what our table accepts: a host table can accept on it
DROPS_TIMEOUT = 600  # seconds an idle (source, port) drop counter is kept
DROPS_SIZE = 8192  # drop counters per address family at most (each reading lists them
# all: 65,536 took the gate keeper 1.1 s, a stall of every grant behind it; when full
# the kernel stops adding, and the packet is dropped all the same)


def set_name(service: str, version: int) -> str:
    return f"svc_{service}_v{version}"


def _where(table: str, **fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": table, **fields}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def timeout_seconds(until: float, now: float) -> int:
    """The element timeout for a grant: whole seconds, rounded up, >= 1."""
    return max(1, math.ceil(until - now - 1e-6))


def render_start(services: Mapping[str, Service], *, drop_sets: bool = True,
                 names: Names = DEFAULT_NAMES) -> Document:
    """The transaction that installs (or updates) our table (`names.table`).  drop_sets=False
    when they exist already: the kernel marks a set that rules update as
    dynamic, and adding it again without that flag (which nft's JSON does not
    take) is refused."""
    table = names.table
    commands: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": table}}}]
    commands += grant_sets(services, table)
    for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")) if drop_sets else ():
        commands.append({"add": {"set": _where(
            table, name=f"drops_v{version}", type=[kind, "inet_service"], flags=["timeout"],
            timeout=DROPS_TIMEOUT, size=DROPS_SIZE)}})
    commands += _input_commands(services, table, PRIORITY, mark=True, count=True)
    commands += _forward_commands(services, table, PRIORITY, mark=True)
    commands += nat_commands(services, table)
    return {"nftables": commands}


def _input_commands(services: Mapping[str, Service], table: str, priority: int, *,
                    mark: bool, count: bool) -> list[dict[str, Any]]:
    """Hook input: per protected port, new connections from the service's
    sets accepted (marked, in our table), the rest dropped (counted per
    source and port, in our table).  Not a gateway service's port: that is
    the internal host's, gated on hook forward."""
    commands = _fresh_chain(table, CHAIN, "input", priority)
    for service in local_services(services).values():
        port = _match({"payload": {"protocol": service.protocol, "field": "dport"}},
                      service.port)
        for version, proto in ((4, "ip"), (6, "ip6")):
            commands.append({"add": {"rule": _where(table, chain=CHAIN, expr=[
                port,
                _match({"payload": {"protocol": proto, "field": "saddr"}},
                       f"@{set_name(service.name, version)}"),
                *([_SET_MARK] if mark else []),
                {"accept": None},
            ])}})
        for version, proto, family in ((4, "ip", "ipv4"), (6, "ip6", "ipv6")) if count else ():
            commands.append({"add": {"rule": _where(table, chain=CHAIN, expr=[
                port,
                _match({"meta": {"key": "nfproto"}}, family),
                {"set": {"op": "update", "set": f"@drops_v{version}", "stmt": [{"counter": None}],
                         "elem": {"concat": [
                             {"payload": {"protocol": proto, "field": "saddr"}},
                             {"payload": {"protocol": service.protocol, "field": "dport"}}]}}},
                {"drop": None},
            ])}})
        commands.append({"add": {"rule": _where(table, chain=CHAIN, expr=[port,
                                                                          {"drop": None}])}})
    return commands


def _fresh_chain(table: str, name: str, hook: str, priority: int) -> list[dict[str, Any]]:
    """A base chain, emptied, whose first rules accept established and
    related traffic (a session survives its lease), but never a TCP SYN
    without ACK: that opens a new connection, whatever conntrack says.  A
    SYN whose addresses and ports match an entry conntrack still holds as
    established (both ends gone without its hearing) is "ignored" by
    conntrack and passes as established; accepted here, it reached the
    service's listener (docs/threat-model.md, "kill -9 or restart")."""
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    return [{"add": {"chain": _where(table, name=name, type="filter", hook=hook,
                                     prio=priority, policy="accept")}},
            {"flush": {"chain": _where(table, name=name)}},
            {"add": {"rule": _where(table, chain=name, expr=[
                _match({"meta": {"key": "l4proto"}}, "tcp", "!="), established,
                {"accept": None}])}},
            {"add": {"rule": _where(table, chain=name, expr=[
                _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                              ["syn", "ack"]]}, "syn", "!="), established,
                {"accept": None}])}}]


def _forward_commands(services: Mapping[str, Service], table: str, priority: int, *,
                      mark: bool) -> list[dict[str, Any]]:
    """Hook forward: a connection DNATed from a protected port of this host
    (a port a container publishes) is a connection to that port: let in only
    its grants, as on hook input.  And a gateway service's host:port
    (spa/backends/nftgateway.py)."""
    commands = _fresh_chain(table, FORWARD, "forward", priority)
    for service in local_services(services).values():
        published = [_match({"meta": {"key": "l4proto"}}, service.protocol),
                     _match({"ct": {"key": "status"}}, "dnat", "in"),
                     _match({"ct": {"key": "proto-dst", "dir": "original"}}, service.port)]
        for version, proto in ((4, "ip"), (6, "ip6")):
            commands.append({"add": {"rule": _where(table, chain=FORWARD, expr=[
                *published, _match({"payload": {"protocol": proto, "field": "saddr"}},
                                   f"@{set_name(service.name, version)}"),
                *([_SET_MARK] if mark else []), {"accept": None}])}})
        commands.append({"add": {"rule": _where(table, chain=FORWARD,
                                                expr=[*published, {"drop": None}])}})
    return commands + forward_rules(services, table, FORWARD, set_name,
                                    [_SET_MARK] if mark else [])


_SET_MARK = {"mangle": {"key": {"meta": {"key": "mark"}},
                        "value": {"|": [{"meta": {"key": "mark"}}, GATE_MARK]}}}


def render_hold(services: Mapping[str, Service], held: Held, now: float, *,
                names: Names = DEFAULT_NAMES, destinations: Destinations | None = None,
                gated: Gated | None = None) -> Document:
    """The hold table's content (the table itself is made `flags owner` by a
    text command: nft's JSON drops table flags): per service the grant sets,
    set to exactly `held`, and one chain that drops a protected port unless
    the source is in its set.  No counting: our table counts."""
    hold = names.hold
    commands = grant_sets(services, hold)
    for command in list(commands):
        commands.append({"flush": {"set": _where(hold, name=command["add"]["set"]["name"])}})
    commands += _input_commands(services, hold, HOLD_PRIORITY, mark=False, count=False)
    commands += _forward_commands(services, hold, HOLD_PRIORITY, mark=False)
    return {"nftables": commands + render_elements(held, services, now, hold, destinations,
                                                   gated, nat=False)}


def render_elements(wanted: Held, services: Mapping[str, Service], now: float,
                    table: str, destinations: Destinations | None = None,
                    gated: Gated | None = None, *, nat: bool = True) -> list[dict[str, Any]]:
    """The commands that add every live grant of `wanted` at its remaining
    time.  A named service's grant needs its destination (`destinations`):
    one without is left out (closed, never opened to another address).  And
    the `gated` addresses of named services (`gated_elements`).  `nat`: the
    table has the published ports' maps (ours; not the hold table)."""
    commands = gated_elements(gated or {}, services, table)
    for (address, name), until in sorted(wanted.items(), key=str):
        service = services.get(name)
        if service is None or not until > now:
            continue
        destination = (destinations or {}).get((address, name)) if service.named else None
        if service.named and (destination is None or destination.version != address.version):
            continue
        commands += _add_commands(address, name, timeout_seconds(until, now), table,
                                  destination, nat=nat and published_named(service))
    return commands


def _add_commands(address: IPAddress, service: str, timeout: int, table: str,
                  destination: IPAddress | None, verb: str = "add", *, nat: bool = False
                  ) -> list[dict[str, Any]]:
    """Add (or `create`) one grant's element; a named service's lease adds
    its destination to the service's destination set too, and with `nat`
    (it publishes a port, in our table) its twin in the DNAT map: source ->
    destination, with the same timeout."""
    where = _where(table, name=set_name(service, address.version))
    commands: list[dict[str, Any]] = [{verb: {"element": {**where, "elem": [{"elem": {
        "val": element(address, destination), "timeout": timeout}}]}}}]
    if nat and destination is not None:
        commands.append({verb: {"element": {
            **_where(table, name=pub_map_name(service, address.version)),
            "elem": [[{"elem": {"val": str(address), "timeout": timeout}},
                      str(destination)]]}}})
    if destination is not None:
        commands.insert(0, {"add": {"element": {
            **_where(table, name=dst_set_name(service, destination.version)),
            "elem": [str(destination)]}}})
    return commands


def render_allow(address: IPAddress, service: str, timeout: int, *,
                 hold: bool = False, names: Names = DEFAULT_NAMES,
                 destination: IPAddress | None = None, published: bool = False
                 ) -> Document:
    """Add or replace one element's timeout, atomically: add (no-op if it
    exists), delete, add with the new timeout (in the hold table too).
    `published`: a named service's published port (its map element too)."""
    return {"nftables": [command for table in _tables(hold, names)
                         for command in _allow_commands(
                             address, service, timeout, table, destination,
                             nat=published and table == names.table)]}


def render_remove(address: IPAddress, service: str, *, hold: bool = False,
                  names: Names = DEFAULT_NAMES,
                  destination: IPAddress | None = None, published: bool = False
                  ) -> Document:
    """Remove one element; the leading add makes the delete safe when the
    kernel already expired it."""
    return {"nftables": [command for table in _tables(hold, names)
                         for command in _remove_commands(
                             address, service, table, destination,
                             nat=published and table == names.table)]}


def _tables(hold: bool, names: Names) -> tuple[str, ...]:
    return (names.table, names.hold) if hold else (names.table,)


def render_changes(changes: Sequence[Change], now: float,
                   absent: Callable[[IPAddress, str], bool] = lambda address, service: False,
                   *, hold: bool = False, names: Names = DEFAULT_NAMES) -> Document:
    """Several grants and removals as one transaction (all or nothing), in
    our table and, with `hold`, the hold table.  Grants for which
    `absent(address, service)` holds are a single `create` in each (the two
    hold the same elements: every change reaches both in one transaction).
    A named service's change without its destination (or of another IP
    version than its address) is left out: closed, never opened elsewhere."""
    commands: list[dict[str, Any]] = []
    tables = _tables(hold, names)
    for action, service in changes:
        destination = action.destination if service.named else None
        if service.named and (destination is None
                              or destination.version != action.address.version):
            continue
        if isinstance(action, Allow):
            timeout = timeout_seconds(action.until, now)
            for table in tables:  # the hold table holds what ours holds (but the maps)
                nat = published_named(service) and table == names.table
                if absent(action.address, service.name):
                    commands += _add_commands(action.address, service.name, timeout, table,
                                              destination, "create", nat=nat)
                else:
                    commands += _allow_commands(action.address, service.name, timeout, table,
                                                destination, nat=nat)
        else:
            for table in tables:
                commands += _remove_commands(action.address, service.name, table, destination,
                                             nat=published_named(service)
                                             and table == names.table)
    return {"nftables": commands}


def _allow_commands(address: IPAddress, service: str, timeout: int,
                    table: str, destination: IPAddress | None = None, *, nat: bool = False
                    ) -> list[dict[str, Any]]:
    """Remove (whether or not it exists), then add with the new timeout."""
    return [*_remove_commands(address, service, table, destination, nat=nat),
            *_add_commands(address, service, timeout, table, destination, nat=nat)]


def _remove_commands(address: IPAddress, service: str, table: str,
                     destination: IPAddress | None = None, *, nat: bool = False
                     ) -> list[dict[str, Any]]:
    where = _where(table, name=set_name(service, address.version))
    value = element(address, destination)
    commands: list[dict[str, Any]] = [
        {"add": {"element": {**where, "elem": [{"elem": {"val": value, "timeout": 1}}]}}},
        {"delete": {"element": {**where, "elem": [value]}}},
    ]
    if nat and destination is not None:
        pub = _where(table, name=pub_map_name(service, address.version))
        commands += [
            {"add": {"element": {**pub, "elem": [[{"elem": {"val": str(address), "timeout": 1}},
                                                  str(destination)]]}}},
            {"delete": {"element": {**pub, "elem": [str(address)]}}},
        ]
    return commands


def render_flush(services: Mapping[str, Service], *, hold: bool = False,
                 names: Names = DEFAULT_NAMES) -> Document:
    return {"nftables": [
        {"flush": {"set": _where(table, name=set_name(service.name, version))}}
        for table in _tables(hold, names) for service in services.values() for version in (4, 6)
    ] + [
        {"flush": {"map": _where(names.table, name=pub_map_name(service.name, version))}}
        for service in services.values() if published_named(service) for version in (4, 6)
    ]}


def parse_held(listing: Document, services: Mapping[str, Service], now: float, *,
               names: Names = DEFAULT_NAMES, destinations: Destinations | None = None
               ) -> Held:
    """(address, service) -> until, from `list table inet spa` output; a
    named service's (address . destination) elements also fill
    `destinations`, when given."""
    by_set = {set_name(s.name, v): s.name for s in services.values() for v in (4, 6)}
    held: Held = {}
    for item in listing.get("nftables", []):
        spec = item.get("set") if isinstance(item, dict) else None
        if not spec or spec.get("table") != names.table or spec.get("name") not in by_set:
            continue
        for elem in spec.get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                value, expires = elem["elem"]["val"], elem["elem"].get("expires", 0)
            else:
                value, expires = elem, 0  # no timeout: not ours to keep
            destination = None
            if isinstance(value, dict):  # {"concat": [address, destination]}
                value, destination = value["concat"]
            pair = (ipaddress.ip_address(value), by_set[spec["name"]])
            held[pair] = now + float(expires)
            if destination is not None and destinations is not None:
                destinations[pair] = ipaddress.ip_address(destination)
    return held


def parse_published(listing: Document, services: Mapping[str, Service], now: float, *,
                    names: Names = DEFAULT_NAMES
                    ) -> dict[tuple[IPAddress, str], tuple[IPAddress, float]]:
    """(address, service) -> (destination, until), from the DNAT maps of the
    named services that publish a port (pub_NAME_v4/v6) in a listing."""
    by_map = {pub_map_name(s.name, v): s.name for s in services.values()
              if published_named(s) for v in (4, 6)}
    found: dict[tuple[IPAddress, str], tuple[IPAddress, float]] = {}
    for item in listing.get("nftables", []):
        spec = item.get("map") if isinstance(item, dict) else None
        if not spec or spec.get("table") != names.table or spec.get("name") not in by_map:
            continue
        for elem in spec.get("elem", []):
            if not isinstance(elem, list) or len(elem) != 2:
                continue
            key, destination = elem
            if isinstance(key, dict) and "elem" in key:
                value, expires = key["elem"]["val"], key["elem"].get("expires", 0)
            else:
                value, expires = key, 0
            found[(ipaddress.ip_address(value), by_map[spec["name"]])] = (
                ipaddress.ip_address(destination), now + float(expires))
    return found


def parse_drops(listing: Document, *, names: Names = DEFAULT_NAMES
                ) -> dict[tuple[str, int], int]:
    """(source, port) -> dropped packets, from `list set` output of drops_v4/v6."""
    found: dict[tuple[str, int], int] = {}
    for item in listing.get("nftables", []):
        spec = item.get("set") if isinstance(item, dict) else None
        if not spec or spec.get("table") != names.table or not str(spec.get("name")).startswith(
                "drops_v"):
            continue
        for elem in spec.get("elem", []):
            inner = elem.get("elem", {}) if isinstance(elem, dict) else {}
            value = inner.get("val", {}).get("concat") if isinstance(inner.get("val"), dict) \
                else None
            counter = inner.get("counter", {})
            if isinstance(value, list) and len(value) == 2 and isinstance(counter, dict):
                found[(str(value[0]), int(value[1]))] = int(counter.get("packets", 0))
    return found


def parse_gated_ports(listing: Document, table: str) -> set[tuple[str, int]]:
    """(protocol, port) pairs the input chain of `table` drops (a gate's
    protected ports), from `list table` output of another instance's table."""
    found: set[tuple[str, int]] = set()
    for item in listing.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or rule.get("table") != table or rule.get("chain") != CHAIN:
            continue
        expr = rule.get("expr")
        if not isinstance(expr, list) or not expr or expr[-1] != {"drop": None}:
            continue
        for statement in expr:
            match = statement.get("match") if isinstance(statement, dict) else None
            if not isinstance(match, dict):
                continue
            left, right = match.get("left"), match.get("right")
            payload = left.get("payload") if isinstance(left, dict) else None
            if (isinstance(payload, dict) and payload.get("field") == "dport"
                    and match.get("op") == "==" and isinstance(right, int)):
                found.add((str(payload.get("protocol")), right))
    return found
