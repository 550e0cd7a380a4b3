"""The services an fwknopd import maps stanzas onto: the config's, then the
ones it adds (spa.server.fwknop_import).

Invariants (docs/operations.md, "Moving off fwknopd"):
- A plain port maps onto this host's service with that protocol and port
  (the last wins), as the compat listener maps a plain knock; a port no
  service has gets a new one, `tcp-2222`.  A port a gateway service
  publishes is no port of this host: refused with a reason.
- A FORCE_NAT target maps onto the gateway service that is exactly it
  (protocol, host, port, published port), or a new one, `nat-10-20-0-5-22`;
  never a second service for a destination one already gates (the forward
  gate of the first would drop the second's grants), nor a published port
  another service is on (its DNAT takes that port from every source).
- Pure: nothing is written here; a plan says what to add.
"""

from __future__ import annotations

from collections.abc import Mapping

from spa.core.policy import Service
from spa.server.fwknop_nat import NatTarget

Port = tuple[str, int]


class Services:
    """Ports and FORCE_NAT targets onto services."""

    def __init__(self, services: Mapping[str, Service]) -> None:
        self.all = dict(services)
        self.by_port = {(s.protocol, s.port): s for s in services.values() if not s.gateway}
        self.names = set(services)
        self.added: list[Service] = []

    def find(self, port: Port) -> Service | None:
        return self.by_port.get(port)

    def find_target(self, target: NatTarget) -> Service | None:
        """The gateway service that is exactly `target`."""
        return next((s for s in self.all.values() if s.gateway and (
            s.protocol, s.host, s.port, s.listen_port) == (
            target.protocol, target.host, target.port, target.listen_port)), None)

    def blocked(self, ports: tuple[Port, ...], target: NatTarget | None) -> str:
        """Why these ports (or this target) cannot map onto a service here, or ""."""
        if target is not None:
            return "" if self.find_target(target) is not None else self._in_the_way(target)
        for port in ports:
            published = next((s for s in self.all.values() if s.gateway and s.listen_port
                              and (s.protocol, s.listen_port) == port), None)
            if published is not None:
                return (f"{port[0]}/{port[1]} of this host is published to {published.host}:"
                        f"{published.port} ([services.{published.name}]): every connection "
                        "to it goes there, so no service of this host can be on it; have "
                        "this client knock for another port, then run again")
        return ""

    def _in_the_way(self, target: NatTarget) -> str:
        for other in self.all.values():
            if other.gateway and (other.protocol, other.host, other.port) == (
                    target.protocol, target.host, target.port):
                return (f"[services.{other.name}] is {other.protocol}/{other.port} of "
                        f"{other.host} already, reached on {other.client_port}: one service "
                        "a destination (a second one's grants would meet the first's gate): "
                        f"have this client knock for {other.protocol}/{other.client_port} "
                        "(OPEN_PORTS here, -A in the client), then run again")
            if target.listen_port and (other.protocol, other.client_port) == (
                    target.protocol, target.listen_port):
                what = (f"published to {other.host}:{other.port}" if other.gateway
                        else "a service of this host")
                return (f"{target.protocol}/{target.listen_port} of this host is [services."
                        f"{other.name}] ({what}): a published port is DNATed for every "
                        "source here, so it cannot be both; have this client knock for "
                        f"another port (OPEN_PORTS {target.protocol}/N here, -A "
                        f"{target.protocol}/N in the client, then connect to N), then run "
                        "again")
        return ""

    def _name(self, base: str) -> str:
        name, count = base, 1
        while name in self.names:
            count += 1
            name = f"{base}-{count}"
        self.names.add(name)
        return name

    def _add(self, service: Service) -> Service:
        self.all[service.name] = service
        self.added.append(service)
        return service

    def get(self, port: Port, timeouts: tuple[int, int]) -> tuple[Service, bool]:
        """The service for a port, made if none has it (True: made now)."""
        found = self.by_port.get(port)
        if found is not None:
            return found, False
        made = self._add(Service(self._name(f"{port[0]}-{port[1]}"), port[0], port[1],
                                 *timeouts))
        self.by_port[port] = made
        return made, True

    def gateway(self, target: NatTarget, timeouts: tuple[int, int]
                ) -> tuple[Service, bool] | str:
        """The gateway service for a FORCE_NAT target, made if none is it
        (True: made now); the reason when another service is in the way."""
        found = self.find_target(target)
        if found is not None:
            return found, False
        reason = self._in_the_way(target)
        if reason:
            return reason
        base = f"nat-{str(target.host).replace('.', '-')}-{target.port}"
        return self._add(Service(self._name(base), target.protocol, target.port, *timeouts,
                                 target.host, target.listen_port)), True
