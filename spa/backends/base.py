"""The firewall backend interface and the helper that applies lease actions.

Invariants (STYLE principle 6):
- Every backend has the same lifecycle: `start` (install its own table or
  chain, idempotently), `allow` (address may reach service until a time),
  `remove`, `held` (what it holds now), `stop`.  It never touches rules it
  does not own.
- `expires_by_itself` says whether a grant closes on time even when the daemon
  is not running (nftables set timeouts: yes; memory and iptables: no).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from spa.core.leases import Allow, FirewallAction, Remove
from spa.core.policy import Service
from spa.core.wire import IPAddress

Held = dict[tuple[IPAddress, str], float]  # (address, service name) -> until


class Backend(Protocol):
    name: str
    expires_by_itself: bool

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        """Install what the backend owns (idempotent).  Raises LocalError."""

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        """Let address reach service until `until` (replaces an earlier until)."""

    def remove(self, address: IPAddress, service: Service) -> None:
        """Stop letting address reach service (no error if not held)."""

    def held(self, *, now: float) -> Held:
        """What the backend currently lets through."""

    def stop(self) -> None:
        """Release what the backend holds open that is not a live grant."""


def apply(backend: Backend, actions: Iterable[FirewallAction],
          services: Mapping[str, Service], *, now: float) -> None:
    """Carry out lease-table actions.  Raises LocalError from the backend."""
    for action in actions:
        service = services[action.service]
        if isinstance(action, Allow):
            backend.allow(action.address, service, action.until, now=now)
        else:
            assert isinstance(action, Remove)
            backend.remove(action.address, service)
