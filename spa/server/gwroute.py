"""Where a gateway service's host lives, as this machine's kernel sees it
(docs/threat-model.md, "Gateway mode: spa on the router").

The forward gate (spa/backends/nftgateway.py) holds only for a host this
machine routes to.  Two placements defeat it, and the start, a reload and
`spa-server check` say so:
- `host` is an address of this machine: the published port's DNAT sends the
  packet to hook input, where gateway services are not gated, so it is open
  to everyone.  Refused (LocalError, one line): `refuse_own_hosts`.
- The route to `host` leaves through a bridge, and bridged frames do not
  pass the inet forward hook (br_netfilter not loaded, or
  net.bridge.bridge-nf-call-ip(6)tables = 0): every host on that bridge
  reaches `host` ungated.  One problem line per service: `bridged_lines`.

Invariants:
- The decisions are pure: the kernel's answer comes in as a function
  (`HostRoute` per address, the bridge sysctl per IP version); `FakeRoute`
  in the unit tests, `kernel_route` and `bridge_filtered` otherwise.
- Read only: no route and no sysctl is changed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server.errors import LocalError
from spa.server.routes import RTN_LOCAL, KernelRoutes

BRIDGE_SYSCTL = {4: "net.bridge.bridge-nf-call-iptables",
                 6: "net.bridge.bridge-nf-call-ip6tables"}


@dataclass(frozen=True, slots=True)
class HostRoute:
    """The kernel's route to one address."""

    local: bool  # an address of this machine (a route of type local)
    bridges: tuple[str, ...] = ()  # the bridge devices the route leaves through


RouteOf = Callable[[IPAddress], HostRoute | None]  # None: no route, or no answer


def _gateways(services: Mapping[str, Service]) -> list[tuple[Service, IPAddress]]:
    return [(s, s.host) for s in services.values() if s.host is not None]


def own_host_problem(services: Mapping[str, Service], route: RouteOf) -> str:
    """The line that refuses a gateway service whose host is this machine, or ""."""
    for service, host in _gateways(services):
        found = route(host)
        if found is not None and found.local:
            return (f"[services.{service.name}] host = {host} is an address of this machine: "
                    "a gateway service's DNAT to it reaches hook input, where it is not "
                    "gated, so it would be open to everyone; name the internal host, or "
                    "leave host out to gate this machine's own port")
    return ""


def bridged_lines(services: Mapping[str, Service], route: RouteOf,
                  filtered: Callable[[int], bool]) -> list[str]:
    """One line per gateway service whose host is reached through a bridge
    whose frames skip the forward hook (`filtered(version)` False)."""
    lines = []
    for service, host in _gateways(services):
        found = route(host)
        if found is None or found.local or not found.bridges or filtered(host.version):
            continue
        sysctl = BRIDGE_SYSCTL[host.version]
        lines.append(f"{service.name} ({service.protocol}/{service.port} to {host}): the route "
                     f"leaves through bridge {found.bridges[0]} and {sysctl} is 0 or absent "
                     "(br_netfilter), so bridged frames skip the forward gate and every host "
                     "on that bridge reaches it ungated; a gateway service needs a routed "
                     "host (docs/install.md, section 11)")
    return lines


def refuse_own_hosts(services: Mapping[str, Service], where: object,
                     route: RouteOf | None = None) -> None:
    """Raises LocalError (one line, `where` first) when a gateway service's
    host is an address of this machine."""
    if not _gateways(services):
        return
    problem = own_host_problem(services, route or kernel_route)
    if problem:
        raise LocalError(f"{where}: {problem}")


def kernel_route(address: IPAddress) -> HostRoute | None:
    """The kernel's route to `address` (rtnetlink).  Raises LocalError when
    the kernel cannot be asked."""
    routes = KernelRoutes()
    try:
        found = routes.route(address)
    except OSError:
        return None
    finally:
        routes.close()
    if found is None:
        return None
    kind, indexes = found
    names = []
    for index in sorted(indexes):
        try:
            names.append(socket.if_indextoname(index))
        except OSError:
            continue
    bridges = tuple(n for n in names if Path("/sys/class/net", n, "bridge").is_dir())
    return HostRoute(local=kind == RTN_LOCAL, bridges=bridges)


def bridge_filtered(version: int) -> bool:
    """Whether bridged IPv4 or IPv6 frames pass the IP hooks (the sysctl,
    from /proc/sys; absent when br_netfilter is not loaded: False)."""
    path = Path("/proc/sys", *BRIDGE_SYSCTL[version].split("."))
    try:
        return path.read_text().strip() != "0"
    except OSError:
        return False


class FakeRoute:
    """Routes for unit tests: address -> HostRoute; `asked` records each question."""

    def __init__(self, routes: Mapping[str, HostRoute] | None = None) -> None:
        self.routes = dict(routes or {})
        self.asked: list[IPAddress] = []

    def __call__(self, address: IPAddress) -> HostRoute | None:
        self.asked.append(address)
        return self.routes.get(str(address))
