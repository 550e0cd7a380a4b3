"""nftables rules for gateway services: a grant lets its client through this
host to an internal host:port.  Pure: commands as data (STYLE principle 6).

Invariants (docs/threat-model.md, "Gateway mode"):
- A gateway service (`host = ADDRESS`, spa/core/policy.py) is gated in hook
  forward only: for a new connection to exactly host:port, a source in the
  service's grant set (svc_NAME_v4/v6, the same sets, timeouts and leases as
  a local service) is accepted and marked, any other dropped.  Established
  flows pass (the chain's first rule), so a session outlives its lease.
- Our table forwards nothing else: the chain's policy is accept, so what
  the host forwards otherwise stays the admin's (ip_forward, their own
  forward chains); `spa-server check` says when those would drop a grant.
- A published port (`listen_port`) is one DNAT rule in a nat chain of our
  table (prerouting, dstnat): packets to this host's own address and that
  port go to host:port, whoever sends them; the forward gate above then
  decides, so a stranger's connection is DNATed and dropped.  The hold
  table has the forward gate, not the DNAT: if our table goes, the
  published port goes with it (closed, never open).
- The destination is another machine this host routes to, by one plain
  address: a mapped, zoned, loopback or link-local `host` is refused at load
  (spa/server/config.py), one of this host's own addresses at start, reload
  and check (its DNAT would reach hook input, ungated), and a bridged one is
  a problem line of `check` (spa/server/gwroute.py).
- A named service (`host = NAME`, resolved per lease: spa/server/gwresolve.py)
  keys its grant sets by (source . destination): svc_NAME_v4 holds
  `client . address` pairs, so two leases that resolved the name to two
  addresses each reach only their own.  Its drop covers the addresses its
  leases were given (dst_NAME_v4/v6, no timeout: an address stays gated
  while our table lives, and a repair or restart adds those of the live
  leases back); an address it never resolved to is the admin's forward
  policy's.  Its accepts come before its drops, after every literal
  service's rules.
- A named service's published port DNATs per lease (docs/install.md,
  section 11): its DNAT rule looks the source up in the map pub_NAME_v4/v6
  (client -> the destination its lease resolved), whose elements are the
  grant set's twins: added, renewed, removed and timed out with the same
  pair's grant element in the same transaction, put back with it by a
  repair or restart (spa/backends/nftrender.py).  A source without an
  element is not DNATed: its connection stays addressed to this host's own
  listen_port (hook input: whatever this host does with that port, usually
  nothing listens).  One source has one element per service: the pair's
  one destination (spa/core/leases.py), so two clients behind one NAT
  address both reach the address the pair's first lease resolved.  The
  maps are in our table only: the hold table has no DNAT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from spa.backends.names import FAMILY
from spa.core.policy import Service

NAT_CHAIN = "published"  # our table's prerouting nat chain (only with a published port)
NAT_PRIORITY = -100  # dstnat: where DNAT is done


def local_services(services: Mapping[str, Service]) -> dict[str, Service]:
    """The services of this host itself (gated on hook input)."""
    return {name: service for name, service in services.items() if not service.gateway}


def gateway_services(services: Mapping[str, Service]) -> list[Service]:
    return [service for service in services.values() if service.gateway]


def _where(table: str, **fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": table, **fields}


def _match(left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def dst_set_name(service: str, version: int) -> str:
    """A named service's set of the addresses its leases were given."""
    return f"dst_{service}_v{version}"


def named_services(services: Mapping[str, Service]) -> list[Service]:
    return [service for service in services.values() if service.named]


def pub_map_name(service: str, version: int) -> str:
    """A named service's map of published-port destinations (source -> address)."""
    return f"pub_{service}_v{version}"


def published_named(service: Service) -> bool:
    """Whether a named service publishes a port (its DNAT is per lease)."""
    return service.named and bool(service.listen_port)


def _ip(service: Service) -> tuple[int, str, str]:
    """(version, nft protocol, nfproto) of the service's destination."""
    assert service.host is not None
    return (4, "ip", "ipv4") if service.host.version == 4 else (6, "ip6", "ipv6")


def forward_rules(services: Mapping[str, Service], table: str, chain: str,
                  set_name: Callable[[str, int], str], mark: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Per gateway service: (granted source -> host:port) accepted (with
    `mark`), any other new connection to host:port dropped."""
    commands: list[dict[str, Any]] = []
    for service in gateway_services(services):
        if service.named:
            continue
        version, proto, _ = _ip(service)
        target = [_match({"meta": {"key": "l4proto"}}, service.protocol),
                  _match({"payload": {"protocol": proto, "field": "daddr"}}, str(service.host)),
                  _match({"payload": {"protocol": service.protocol, "field": "dport"}},
                         service.port)]
        commands.append({"add": {"rule": _where(table, chain=chain, expr=[
            *target, _match({"payload": {"protocol": proto, "field": "saddr"}},
                            f"@{set_name(service.name, version)}"),
            *mark, {"accept": None}])}})
        commands.append({"add": {"rule": _where(table, chain=chain,
                                                expr=[*target, {"drop": None}])}})
    return commands + _named_rules(services, table, chain, set_name, mark)


def _named_rules(services: Mapping[str, Service], table: str, chain: str,
                 set_name: Callable[[str, int], str], mark: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Per named service and IP version: (source . destination) in its grant
    set accepted; then, for every named service, a new connection to its
    port on an address its leases were given dropped."""
    accepts: list[dict[str, Any]] = []
    drops: list[dict[str, Any]] = []
    for service in named_services(services):
        port = [_match({"meta": {"key": "l4proto"}}, service.protocol),
                _match({"payload": {"protocol": service.protocol, "field": "dport"}},
                       service.port)]
        for version, proto in ((4, "ip"), (6, "ip6")):
            pair = {"concat": [{"payload": {"protocol": proto, "field": "saddr"}},
                               {"payload": {"protocol": proto, "field": "daddr"}}]}
            accepts.append({"add": {"rule": _where(table, chain=chain, expr=[
                *port, _match(pair, f"@{set_name(service.name, version)}"),
                *mark, {"accept": None}])}})
            drops.append({"add": {"rule": _where(table, chain=chain, expr=[
                *port, _match({"payload": {"protocol": proto, "field": "daddr"}},
                              f"@{dst_set_name(service.name, version)}"),
                {"drop": None}])}})
    return accepts + drops


def grant_sets(services: Mapping[str, Service], table: str) -> list[dict[str, Any]]:
    """The `add set` commands of every service's grant sets (keyed by
    source, or by source . destination for a named service) and of the
    named services' destination sets."""
    commands: list[dict[str, Any]] = []
    for service in services.values():
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            commands.append({"add": {"set": _where(
                table, name=f"svc_{service.name}_v{version}",
                type=[kind, kind] if service.named else kind, flags=["timeout"])}})
    for service in named_services(services):
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            commands.append({"add": {"set": _where(
                table, name=dst_set_name(service.name, version), type=kind)}})
    return commands


def element(address: Any, destination: Any) -> Any:
    """A grant set's element value: the address, or for a named service's
    lease, address . destination."""
    if destination is None:
        return str(address)
    return {"concat": [str(address), str(destination)]}


def nat_commands(services: Mapping[str, Service], table: str) -> list[dict[str, Any]]:
    """The nat chain and its DNAT rules, when a gateway service publishes a
    port (and a named one's maps); nothing otherwise (a table without it has
    the shape it had)."""
    published = [s for s in gateway_services(services) if s.listen_port]
    if not published:
        return []
    commands: list[dict[str, Any]] = []
    for service in published:
        if service.named:
            for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
                commands.append({"add": {"map": _where(
                    table, name=pub_map_name(service.name, version), type=kind, map=kind,
                    flags=["timeout"])}})
    commands += [
        {"add": {"chain": _where(table, name=NAT_CHAIN, type="nat", hook="prerouting",
                                 prio=NAT_PRIORITY, policy="accept")}},
        {"flush": {"chain": _where(table, name=NAT_CHAIN)}}]
    for service in published:
        port = _match({"payload": {"protocol": service.protocol, "field": "dport"}},
                      service.listen_port)
        local = _match({"fib": {"flags": ["daddr"], "result": "type"}}, "local")
        if service.named:
            for version, proto, nfproto in ((4, "ip", "ipv4"), (6, "ip6", "ipv6")):
                address = {"map": {"key": {"payload": {"protocol": proto, "field": "saddr"}},
                                   "data": f"@{pub_map_name(service.name, version)}"}}
                commands.append({"add": {"rule": _where(table, chain=NAT_CHAIN, expr=[
                    _match({"meta": {"key": "nfproto"}}, nfproto), local, port,
                    {"dnat": {"family": proto, "addr": address, "port": service.port}}])}})
            continue
        _, proto, nfproto = _ip(service)
        commands.append({"add": {"rule": _where(table, chain=NAT_CHAIN, expr=[
            _match({"meta": {"key": "nfproto"}}, nfproto), local, port,
            {"dnat": {"family": proto, "addr": str(service.host), "port": service.port}}])}})
    return commands


def gated_elements(gated: Mapping[str, Iterable[Any]], services: Mapping[str, Service],
                   table: str) -> list[dict[str, Any]]:
    """Add the addresses a named service's drop covers before any lease
    (what its host's name gave at start and reload) to its destination sets."""
    commands: list[dict[str, Any]] = []
    for name, addresses in sorted(gated.items()):
        service = services.get(name)
        if service is None or not service.named:
            continue
        for address in sorted(addresses, key=lambda a: (a.version, a.packed)):
            commands.append({"add": {"element": _where(
                table, name=dst_set_name(name, address.version), elem=[str(address)])}})
    return commands
