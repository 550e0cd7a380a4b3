"""The nftables backend (the default): sets with timeouts in our own table.

Invariants (docs/threat-model.md, "Firewall"; STYLE principle 6):
- Everything lives in table `inet spa`; no other table, chain or rule is
  touched.  `start` is idempotent: it creates what is missing, rewrites our
  one chain, and keeps the sets' elements (grants that outlived a crash).
- Per protected service, an IPv4 and an IPv6 set with `flags timeout`.  A
  grant is an element whose timeout is the lease's expiry (whole seconds,
  rounded up), so the kernel closes access on time even if the daemon dies.
  A renewal replaces the element's timeout in one atomic transaction.  A
  grant for an address the backend believes absent is a single `create`
  (which fails if the element exists after all); if the kernel refuses the
  transaction, it is sent again with every grant in the add+delete+add form,
  so a wrong belief costs time, never a wrong timeout.
- The chain (hook input, before the usual filter chains): established and
  related traffic accepted (a session survives its lease); new connections
  to a protected port accepted only from that service's sets; everything else
  to a protected port dropped, never rejected (a scanner sees "filtered").
- Every dropped attempt on a protected port is counted in the kernel, per
  (source, port), in the dynamic sets drops_v4 / drops_v6 (elements time
  out after DROPS_TIMEOUT of silence; at most DROPS_SIZE): no packet wakes
  the daemon, which reads the counters now and then (`drops`).
- `stop` leaves live grants to expire by themselves, or with flush=True
  empties the sets; the rules stay, so protected ports stay closed.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spa.backends.base import Change, Held
from spa.backends.libnft import Document, NftRunner
from spa.core.leases import Allow
from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server.errors import LocalError

FAMILY = "inet"
TABLE = "spa"
CHAIN = "input"
PRIORITY = -10  # before the conventional filter chains at priority 0
DROPS_TIMEOUT = 600  # seconds an idle (source, port) drop counter is kept
DROPS_SIZE = 65536  # drop counters per address family at most (the kernel stops adding)


def set_name(service: str, version: int) -> str:
    return f"svc_{service}_v{version}"


def _where(**fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **fields}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def timeout_seconds(until: float, now: float) -> int:
    """The element timeout for a grant: whole seconds, rounded up, >= 1."""
    return max(1, math.ceil(until - now - 1e-6))


def render_start(services: Mapping[str, Service], *, drop_sets: bool = True) -> Document:
    """The transaction that installs (or updates) our table.  drop_sets=False
    when they exist already: the kernel marks a set that rules update as
    dynamic, and adding it again without that flag (which nft's JSON does not
    take) is refused."""
    commands: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for service in services.values():
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            commands.append({"add": {"set": _where(name=set_name(service.name, version),
                                                   type=kind, flags=["timeout"])}})
    for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")) if drop_sets else ():
        commands.append({"add": {"set": _where(
            name=f"drops_v{version}", type=[kind, "inet_service"], flags=["timeout"],
            timeout=DROPS_TIMEOUT, size=DROPS_SIZE)}})
    commands.append({"add": {"chain": _where(name=CHAIN, type="filter", hook="input",
                                             prio=PRIORITY, policy="accept")}})
    commands.append({"flush": {"chain": _where(name=CHAIN)}})
    commands.append({"add": {"rule": _where(chain=CHAIN, expr=[
        _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
        {"accept": None},
    ])}})
    for service in services.values():
        port = _match({"payload": {"protocol": service.protocol, "field": "dport"}},
                      service.port)
        for version, proto in ((4, "ip"), (6, "ip6")):
            commands.append({"add": {"rule": _where(chain=CHAIN, expr=[
                port,
                _match({"payload": {"protocol": proto, "field": "saddr"}},
                       f"@{set_name(service.name, version)}"),
                {"accept": None},
            ])}})
        for version, proto, family in ((4, "ip", "ipv4"), (6, "ip6", "ipv6")):
            commands.append({"add": {"rule": _where(chain=CHAIN, expr=[
                port,
                _match({"meta": {"key": "nfproto"}}, family),
                {"set": {"op": "update", "set": f"@drops_v{version}", "stmt": [{"counter": None}],
                         "elem": {"concat": [
                             {"payload": {"protocol": proto, "field": "saddr"}},
                             {"payload": {"protocol": service.protocol, "field": "dport"}}]}}},
                {"drop": None},
            ])}})
        commands.append({"add": {"rule": _where(chain=CHAIN, expr=[port, {"drop": None}])}})
    return {"nftables": commands}


def render_allow(address: IPAddress, service: str, timeout: int) -> Document:
    """Add or replace one element's timeout, atomically: add (no-op if it
    exists), delete, add with the new timeout."""
    return {"nftables": _allow_commands(address, service, timeout)}


def render_remove(address: IPAddress, service: str) -> Document:
    """Remove one element; the leading add makes the delete safe when the
    kernel already expired it."""
    return {"nftables": _remove_commands(address, service)}


def render_changes(changes: Sequence[Change], now: float,
                   absent: Callable[[IPAddress, str], bool] = lambda address, service: False,
                   ) -> Document:
    """Several grants and removals as one transaction (all or nothing).
    Grants for which `absent(address, service)` holds are a single `create`."""
    commands: list[dict[str, Any]] = []
    for action, service in changes:
        if isinstance(action, Allow):
            timeout = timeout_seconds(action.until, now)
            if absent(action.address, service.name):
                commands.append(_create_command(action.address, service.name, timeout))
            else:
                commands += _allow_commands(action.address, service.name, timeout)
        else:
            commands += _remove_commands(action.address, service.name)
    return {"nftables": commands}


def _create_command(address: IPAddress, service: str, timeout: int) -> dict[str, Any]:
    where = _where(name=set_name(service, address.version))
    return {"create": {"element": {**where, "elem": [{"elem": {"val": str(address),
                                                                "timeout": timeout}}]}}}


def _allow_commands(address: IPAddress, service: str, timeout: int) -> list[dict[str, Any]]:
    where = _where(name=set_name(service, address.version))
    value = str(address)
    return [
        {"add": {"element": {**where, "elem": [{"elem": {"val": value, "timeout": 1}}]}}},
        {"delete": {"element": {**where, "elem": [value]}}},
        {"add": {"element": {**where, "elem": [{"elem": {"val": value,
                                                          "timeout": timeout}}]}}},
    ]


def _remove_commands(address: IPAddress, service: str) -> list[dict[str, Any]]:
    where = _where(name=set_name(service, address.version))
    value = str(address)
    return [
        {"add": {"element": {**where, "elem": [{"elem": {"val": value, "timeout": 1}}]}}},
        {"delete": {"element": {**where, "elem": [value]}}},
    ]


def render_flush(services: Mapping[str, Service]) -> Document:
    return {"nftables": [
        {"flush": {"set": _where(name=set_name(service.name, version))}}
        for service in services.values() for version in (4, 6)
    ]}


def parse_held(listing: Document, services: Mapping[str, Service], now: float) -> Held:
    """(address, service) -> until, from `list table inet spa` output."""
    by_set = {set_name(s.name, v): s.name for s in services.values() for v in (4, 6)}
    held: Held = {}
    for item in listing.get("nftables", []):
        spec = item.get("set") if isinstance(item, dict) else None
        if not spec or spec.get("table") != TABLE or spec.get("name") not in by_set:
            continue
        for elem in spec.get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                value, expires = elem["elem"]["val"], elem["elem"].get("expires", 0)
            else:
                value, expires = elem, 0  # no timeout: not ours to keep
            held[(ipaddress.ip_address(value), by_set[spec["name"]])] = now + float(expires)
    return held


def parse_drops(listing: Document) -> dict[tuple[str, int], int]:
    """(source, port) -> dropped packets, from `list set` output of drops_v4/v6."""
    found: dict[tuple[str, int], int] = {}
    for item in listing.get("nftables", []):
        spec = item.get("set") if isinstance(item, dict) else None
        if not spec or spec.get("table") != TABLE or not str(spec.get("name")).startswith(
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


class NftablesBackend:
    name = "nftables"
    expires_by_itself = True

    def __init__(self, runner: NftRunner, *, flush_on_stop: bool = False) -> None:
        self.runner = runner
        self.flush_on_stop = flush_on_stop
        self._services: dict[str, Service] = {}
        # Elements we believe the kernel holds (a hint for `create`: grants
        # that expired in the kernel linger here until their Remove).
        self._present: set[tuple[IPAddress, str]] = set()

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        self._services = dict(services)
        try:
            listing = self.runner.run({"nftables": [{"list": {"table": {"family": FAMILY,
                                                                         "name": TABLE}}}]})
        except LocalError:
            listing = {}  # no table yet
        present = {item["set"].get("name") for item in listing.get("nftables", [])
                   if isinstance(item, dict) and isinstance(item.get("set"), dict)}
        self.runner.run(render_start(services,
                                     drop_sets=not {"drops_v4", "drops_v6"} <= present))

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        self.runner.run(render_allow(address, service.name, timeout_seconds(until, now)))
        self._present.add((address, service.name))

    def remove(self, address: IPAddress, service: Service) -> None:
        self.runner.run(render_remove(address, service.name))
        self._present.discard((address, service.name))

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        if not changes:
            return
        present = self._present
        try:
            self.runner.run(render_changes(
                changes, now, lambda address, name: (address, name) not in present))
        except LocalError:
            # An element we thought absent exists (or something else broke):
            # the form that works either way; its error is the one to report.
            self.runner.run(render_changes(changes, now))
        for action, service in changes:
            if isinstance(action, Allow):
                present.add((action.address, service.name))
            else:
                present.discard((action.address, service.name))

    def drops(self) -> dict[tuple[str, int], int]:
        """Dropped attempts on protected ports: (source, port) -> packets so far."""
        listing = self.runner.run({"nftables": [{"list": {"table": {"family": FAMILY,
                                                                     "name": TABLE}}}]})
        return parse_drops(listing)

    def held(self, *, now: float) -> Held:
        listing = self.runner.run({"nftables": [{"list": {"table": {"family": FAMILY,
                                                                     "name": TABLE}}}]})
        held = parse_held(listing, self._services, now)
        self._present = set(held)
        return held

    def stop(self) -> None:
        if self.flush_on_stop and self._services:
            self.runner.run(render_flush(self._services))
