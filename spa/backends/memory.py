"""The in-memory backend: a dict that stands in for a firewall.

Used by unit tests and by `--backend memory` (the demo and loopback tests).
It keeps no real port closed: it records what a real firewall would hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from spa.backends.base import Change, Destinations, Held, apply_each
from spa.core.policy import Service
from spa.core.wire import IPAddress


class MemoryBackend:
    name = "memory"
    expires_by_itself = False

    def __init__(self) -> None:
        self.grants: Held = {}
        self.destinations: Destinations = {}  # a named gateway service's grants' addresses
        self.gated: dict[str, set[IPAddress]] = {}  # `gate_addresses`: before any lease
        self.services: dict[str, Service] = {}
        self.started = False
        self.removed = False  # `wipe` was called: another program took the gate away
        self.log: list[tuple[str, ...]] = []  # every call, for tests

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        self.services = dict(services)
        self.started = True
        self.log.append(("start",))

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        self.grants[(address, service.name)] = until
        self.log.append(("allow", str(address), service.name, f"{until:.3f}"))
        if service.named and service.host is not None:
            self.destinations[(address, service.name)] = service.host

    def remove(self, address: IPAddress, service: Service) -> None:
        self.grants.pop((address, service.name), None)
        self.destinations.pop((address, service.name), None)
        self.log.append(("remove", str(address), service.name))

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        self.log.append(("apply", str(len(changes))))
        apply_each(self, changes, now=now)

    def gate_addresses(self, addresses: Mapping[str, Sequence[IPAddress]]) -> None:
        for name, found in addresses.items():
            self.gated.setdefault(name, set()).update(found)

    def held(self, *, now: float) -> Held:
        return dict(self.grants)

    def wipe(self) -> None:
        """For tests: what `nft flush ruleset` does to a real gate."""
        self.grants.clear()
        self.removed = True

    def repair(self, wanted: Held, *, now: float, grants: bool = True) -> str | None:
        """Put back exactly `wanted` if the gate was wiped or its grants changed
        (every check is whole: `grants` is not used)."""
        if not self.removed and self.grants == dict(wanted):
            return None
        problem = ("the memory gate was removed by another program" if self.removed
                   else "the memory gate's grants were changed by another program")
        self.removed = False
        self.grants = {key: until for key, until in wanted.items() if until > now}
        self.log.append(("repair",))
        return problem

    def stop(self) -> None:
        self.started = False
        self.log.append(("stop",))
