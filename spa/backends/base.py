"""The firewall backend interface and the helper that applies lease actions.

Invariants (STYLE principle 6):
- Every backend has the same lifecycle: `start` (install its own table or
  chain, idempotently), `allow` (address may reach service until a time),
  `remove`, `held` (what it holds now), `stop`.  It never touches rules it
  does not own.
- `apply` carries out several changes at once where the backend can (one
  nftables transaction for a whole batch of grants), else one by one.
- A named gateway service's lease (spa/core/leases.py) reaches a backend as
  the service `for_destination` its address (`allow`, `remove`), or as an
  action that carries it (`apply`); `reconcile` is given the destinations.
- `expires_by_itself` says whether a grant closes on time even when the daemon
  is not running (nftables set timeouts: yes; memory and iptables: no).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from spa.core.leases import Allow, FirewallAction, Remove
from spa.core.policy import Service
from spa.core.wire import IPAddress

Held = dict[tuple[IPAddress, str], float]  # (address, service name) -> until
# (address, service name) -> the destination of a named gateway service's
# lease (spa/core/leases.py): the address its grant resolved the name to
Destinations = dict[tuple[IPAddress, str], IPAddress]
Change = tuple[Allow | Remove, Service]  # a lease action and the service it names


class Backend(Protocol):
    name: str
    expires_by_itself: bool

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        """Install what the backend owns (idempotent).  Raises LocalError."""

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        """Let address reach service until `until` (replaces an earlier until)."""

    def remove(self, address: IPAddress, service: Service) -> None:
        """Stop letting address reach service (no error if not held)."""

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        """Carry out changes (at most one per address and service), at once
        where the backend can.  Raises LocalError."""

    def held(self, *, now: float) -> Held:
        """What the backend currently lets through."""

    def stop(self) -> None:
        """Release what the backend holds open that is not a live grant."""


def apply(backend: Backend, actions: Iterable[FirewallAction],
          services: Mapping[str, Service], *, now: float) -> None:
    """Carry out lease-table actions, in one call to the backend.  Each action
    states the whole wanted state of its (address, service) pair, so only the
    last action per pair is sent.  Raises LocalError from the backend."""
    last: dict[tuple[IPAddress, str], FirewallAction] = {}
    for action in actions:
        last[(action.address, action.service)] = action
    changes = [(fitted, services[action.service]) for action in last.values()
               if (fitted := fit(action, services[action.service])) is not None]
    if changes:
        backend.apply(changes, now=now)


def fit(action: FirewallAction, service: Service) -> FirewallAction | None:
    """The action as `service` takes it (a reload may have turned a named
    gateway service into another, or back): a destination only for a named
    service, and a grant of one only with a destination of its address's IP
    version (None: nothing to open, left closed).  A removal without one is
    the backend's to find (it knows what it opened)."""
    destination = action.destination
    if not service.named:
        return action if destination is None else replace(action, destination=None)
    if destination is not None and destination.version != action.address.version:
        return None if isinstance(action, Allow) else replace(action, destination=None)
    if destination is None and isinstance(action, Allow):
        return None
    return action


def reconcile(backend: Backend, wanted: Held, services: Mapping[str, Service], *,
              now: float, destinations: Destinations | None = None) -> None:
    """Make the backend hold exactly `wanted` (after a restart, a repair, at
    boot), changing only the pairs that differ.  A backend that reconciles
    itself (the gate keeper's end: one request) is asked to.  Raises LocalError."""
    own = getattr(backend, "reconcile", None)
    fitting: Held = {}
    dests: Destinations = {}
    for key, until in wanted.items():
        fitted = fit(Allow(*key, until, (destinations or {}).get(key)), services[key[1]]) \
            if key[1] in services else None
        if fitted is not None:  # (a named service's grant: to its own destination)
            fitting[key] = until
            if fitted.destination is not None:
                dests[key] = fitted.destination
    wanted = fitting
    if own is not None:
        own(wanted, now=now, destinations=dests)
        return
    held = backend.held(now=now)
    for (address, name), until in wanted.items():
        if held.get((address, name)) != until:
            backend.allow(address, services[name].for_destination(dests.get((address, name))),
                          until, now=now)
    for address, name in held.keys() - wanted.keys():
        if name in services:
            backend.remove(address, services[name])


def apply_each(backend: Backend, changes: Sequence[Change], *, now: float) -> None:
    """`Backend.apply` for backends without batches: one change at a time."""
    for action, service in changes:
        if isinstance(action, Allow):
            backend.allow(action.address, service.for_destination(action.destination),
                          action.until, now=now)
        else:
            assert isinstance(action, Remove)
            backend.remove(action.address, service.for_destination(action.destination))
