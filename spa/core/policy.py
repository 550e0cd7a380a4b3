"""Services, duration caps and per-client permissions.

Invariants (docs/protocol.md, "Policy"; docs/threat-model.md, "insider"):
- A request is granted only for a service that exists and that the client is
  allowed; a revoked client gets nothing.
- A requested duration is capped by the service's maximum (capped, never
  refused); 0 asks for the service's default.
- An address other than the packet's source is allowed only for a client
  with `allow_other_address`.
- A client with source networks (`enroll --from`) is refused
  `source_not_allowed` for a packet whose *source* lies outside them, whatever
  address it asks for (spa/core/sources.py); none means anywhere.  The check
  runs after authentication, like every rule here, so a stranger learns
  nothing from it; and before the authenticator code is checked, so a knock
  from elsewhere cannot spend one.
- A pending enrollment (`enroll_by`) is refused `enrollment_expired` when the
  packet's own authenticated timestamp is past it, unless the client has
  knocked in time before (`activated`); the server keeps that record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from spa.core.errors import Reason
from spa.core.sources import SourceNetwork, allows
from spa.core.wire import PROTOCOLS, Action, IPAddress, Request, is_valid_service_name


@dataclass(frozen=True, slots=True)
class Service:
    """A protected service: what a grant opens, and for how long at most."""

    name: str
    protocol: str
    port: int
    default_duration: int  # seconds granted when the request asks for 0
    max_duration: int  # seconds; longer requests are capped to this
    # A gateway service (docs/install.md, "Gateway"): a grant lets its client
    # through this host to host:port (hook forward) instead of to this host's
    # own port; None: a service of this host.  A literal address, or (in
    # `host_name`) a DNS name resolved when a lease starts: then `host` is
    # None, except in the service a backend is handed for one lease, which
    # carries that lease's address (`for_destination`).
    host: IPAddress | None = None
    # a port of this host DNATed to host:port (0: none, reach host directly)
    listen_port: int = 0
    host_name: str = ""  # a DNS name (spa/server/gwresolve.py); "" for an address

    def __post_init__(self) -> None:
        if not is_valid_service_name(self.name):
            raise ValueError(f"service name {self.name!r}: use a-z, 0-9, '-', '_' (max 32)")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"service {self.name}: protocol must be tcp or udp")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"service {self.name}: port must be 1-65535")
        if not 1 <= self.default_duration <= self.max_duration:
            raise ValueError(f"service {self.name}: need 1 <= default duration <= max duration")
        if self.listen_port and ((self.host is None and not self.host_name)
                                 or not 1 <= self.listen_port <= 65535):
            raise ValueError(f"service {self.name}: listen_port must be 1-65535 and needs "
                             "host (an address or a name)")

    @property
    def client_port(self) -> int:
        """The port a client tries after its knock (its enrollment URI names
        it): a gateway's published port on this host, else the port."""
        return self.listen_port or self.port

    @property
    def gateway(self) -> bool:
        """Whether a grant opens a way through this host (host = ...)."""
        return self.host is not None or bool(self.host_name)

    @property
    def named(self) -> bool:
        """Whether the destination is a DNS name: each lease has its own."""
        return bool(self.host_name)

    def for_destination(self, destination: IPAddress | None) -> Service:
        """The service as one lease of a named service reaches it (`host` =
        the lease's address); itself otherwise."""
        if not self.host_name or destination is None:
            return self
        return replace(self, host=destination)

    def cap(self, requested: int) -> int:
        """The duration actually granted for a request."""
        if requested <= 0:
            return self.default_duration
        return min(requested, self.max_duration)


def max_durations(services: Mapping[str, Service]) -> dict[str, int]:
    """Service name -> its longest lease in seconds."""
    return {name: service.max_duration for name, service in services.items()}


def named_services(services: Mapping[str, Service]) -> frozenset[str]:
    """The names of the gateway services whose host is a DNS name."""
    return frozenset(name for name, service in services.items() if service.named)


def local_port_names(services: Mapping[str, Service]) -> dict[int, str]:
    """Port -> service name for this host's own services: the ports hook
    input drops and counts (a gateway service's port is another host's)."""
    return {s.port: s.name for s in services.values() if not s.gateway}


DEFAULT_SERVICES: Mapping[str, Service] = {
    "ssh": Service("ssh", "tcp", 22, default_duration=30, max_duration=300),
    "https": Service("https", "tcp", 443, default_duration=30 * 60, max_duration=4 * 3600),
}


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    name: str
    services: frozenset[str]
    allow_other_address: bool = False
    revoked: bool = False
    # Unix time by which a pending enrollment must be used (None: no limit).
    # Once the client has knocked (it is in Policy.activated) it no longer applies.
    enroll_by: float | None = None
    # where its knocks may come from (empty: anywhere); one tuple per distinct
    # list, shared (spa.server.config.network_set)
    sources: tuple[SourceNetwork, ...] = ()


class Decision(NamedTuple):
    """What policy grants: the effective address, service and duration.
    (A NamedTuple for the receive path's sake; see wire.Request.)"""

    address: IPAddress
    service: Service
    duration: int  # seconds, already capped; 0 for a close


@dataclass(frozen=True, slots=True)
class Policy:
    services: Mapping[str, Service] = field(default_factory=lambda: dict(DEFAULT_SERVICES))
    clients: Mapping[str, ClientPolicy] = field(default_factory=dict)
    # pending clients that have knocked in time (the server's own set: it adds
    # to it in place on its receive thread, the thread that reads it)
    activated: AbstractSet[str] = frozenset()

    @classmethod
    def build(cls, services: Iterable[Service], clients: Iterable[ClientPolicy]) -> Policy:
        return cls({s.name: s for s in services}, {c.name: c for c in clients})

    def decide(self, client: str, request: Request, source: IPAddress) -> Decision | Reason:
        """Apply the rules in order; return a Decision or the refusal reason."""
        rules = self.clients.get(client)
        if rules is None or rules.revoked:
            return Reason.REVOKED
        if (rules.enroll_by is not None and client not in self.activated
                and request.timestamp_ms > rules.enroll_by * 1000):
            return Reason.ENROLLMENT_EXPIRED
        service = self.services.get(request.service)
        if service is None or request.service not in rules.services:
            return Reason.SERVICE_NOT_ALLOWED
        address = source if request.address is None else request.address
        if address != source and not rules.allow_other_address:
            return Reason.ADDRESS_NOT_ALLOWED
        if rules.sources:  # the only O(networks) rule
            if not allows(rules.sources, source):
                return Reason.SOURCE_NOT_ALLOWED
            if address != source and not allows(rules.sources, address):
                # a grant goes inside the networks too, whoever may name one: a
                # thief forging an inside source opens nothing for his own
                return Reason.ADDRESS_NOT_ALLOWED
        duration = service.cap(request.duration) if request.action is Action.OPEN else 0
        return Decision(address, service, duration)
