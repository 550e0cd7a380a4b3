"""The lease table: grants, closes and time -> firewall actions (NAT-safe).

Invariants (docs/protocol.md, "Leases"; docs/threat-model.md, "shared NAT"):
- A lease is (client, address, service) -> expiry.  Many clients may hold
  leases on the same (address, service) pair, e.g. users behind one NAT.
- After every call, the firewall state that the emitted actions build is
  exactly {pair: latest expiry of its live leases}: `Allow(pair, until)` when
  that latest expiry changes, `Remove(pair)` only when the pair's last lease
  ends.  A close ends only the closing client's own lease; a renewed grant
  extends, never shortens.
- A lease is live while `now < expires`.  Every call that takes `now` first
  expires what is due, so results do not depend on when `expire` last ran.
- A pair of a named gateway service (docs/install.md, section 11) has one
  destination, the address its first lease's grant resolved: later leases
  on the open pair keep it (a renewal resolves nothing), every action on the
  pair carries it, and it goes with the pair's last lease.  A saved lease
  brings its destination back (`from_leases`), never a fresh resolution.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass

from spa.core.wire import IPAddress

Pair = tuple[IPAddress, str]  # (address, service name)
LeaseKey = tuple[str, IPAddress, str]  # (client, address, service name)


@dataclass(frozen=True, slots=True)
class Allow:
    """Let `address` reach `service` until `until` (Unix seconds)."""

    address: IPAddress
    service: str
    until: float
    destination: IPAddress | None = None  # a named gateway service's address for the pair


@dataclass(frozen=True, slots=True)
class Remove:
    """Stop letting `address` reach `service`."""

    address: IPAddress
    service: str
    destination: IPAddress | None = None


FirewallAction = Allow | Remove


@dataclass(frozen=True, slots=True)
class Lease:
    client: str
    address: IPAddress
    service: str
    expires: float
    destination: IPAddress | None = None  # a named gateway service's resolved address


class LeaseTable:
    __slots__ = ("_by_pair", "_dest", "_heap", "_leases", "_pair_until", "_seq")

    def __init__(self) -> None:
        self._leases: dict[LeaseKey, float] = {}
        self._by_pair: dict[Pair, dict[str, float]] = {}
        self._pair_until: dict[Pair, float] = {}
        self._dest: dict[Pair, IPAddress] = {}  # named gateway services' pairs only
        # (expires, sequence, client, address, service); the sequence keeps
        # the heap from ever comparing an IPv4 with an IPv6 address.
        self._heap: list[tuple[float, int, str, IPAddress, str]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._leases)

    def grant(
        self, client: str, address: IPAddress, service: str, *, now: float, duration: float,
        destination: IPAddress | None = None,
    ) -> list[FirewallAction]:
        """Start or extend a client's lease.  `destination`: a named gateway
        service's address, used only when the pair is not open (an open
        pair keeps its own: `destination`).

        Raises ValueError unless duration is finite and positive and now finite.
        """
        if not (math.isfinite(duration) and duration > 0 and math.isfinite(now)):
            raise ValueError("a grant needs a finite positive duration at a finite time")
        actions = self.expire(now)
        if destination is not None and (address, service) not in self._by_pair:
            self._dest[(address, service)] = destination
        self._extend(client, address, service, now + duration)
        return actions + self._settle((address, service))

    def close(
        self, client: str, address: IPAddress, service: str, *, now: float
    ) -> list[FirewallAction]:
        """End one client's own lease (a no-op if it holds none)."""
        actions = self.expire(now)
        if self._leases.pop((client, address, service), None) is None:
            return actions
        self._drop_from_pair((address, service), client)
        return actions + self._settle((address, service))

    def close_client(self, client: str, *, now: float) -> list[FirewallAction]:
        """End every lease a client holds (used by revoke with --close)."""
        actions = self.expire(now)
        for owner, address, service in [k for k in self._leases if k[0] == client]:
            actions += self.close(owner, address, service, now=now)
        return actions

    def expire(self, now: float) -> list[FirewallAction]:
        """Drop leases whose time has come; say what the firewall must change."""
        touched: set[Pair] = set()
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires, _, client, address, service = heapq.heappop(heap)
            key = (client, address, service)
            if self._leases.get(key) == expires:  # else superseded or closed
                del self._leases[key]
                self._drop_from_pair((address, service), client)
                touched.add((address, service))
        actions: list[FirewallAction] = []
        for pair in sorted(touched, key=_pair_order):
            actions += self._settle(pair)
        return actions

    def next_due(self) -> float | None:
        """When `expire` next has something to do (a hint; may be early)."""
        return self._heap[0][0] if self._heap else None

    def allowed(self) -> dict[Pair, float]:
        """The firewall state the table wants: pair -> until."""
        return dict(self._pair_until)

    def destination(self, address: IPAddress, service: str) -> IPAddress | None:
        """The open pair's destination (a named gateway service's), or None."""
        return self._dest.get((address, service))

    def destinations(self) -> dict[Pair, IPAddress]:
        """pair -> destination, for the open pairs of named gateway services."""
        return dict(self._dest)

    def leases(self) -> list[Lease]:
        return [
            Lease(client, address, service, expires, self._dest.get((address, service)))
            for (client, address, service), expires in sorted(
                self._leases.items(), key=lambda item: (item[1], item[0][0])
            )
        ]

    def holders(self, address: IPAddress, service: str) -> dict[str, float]:
        """client -> expiry for one pair."""
        return dict(self._by_pair.get((address, service), {}))

    @classmethod
    def from_leases(cls, leases: list[Lease], *, now: float) -> LeaseTable:
        """Rebuild a table (after a restart), keeping only live leases."""
        table = cls()
        for lease in leases:
            if lease.expires > now:
                pair = (lease.address, lease.service)
                if lease.destination is not None and pair not in table._by_pair:
                    table._dest[pair] = lease.destination
                table._extend(lease.client, lease.address, lease.service, lease.expires)
                table._settle((lease.address, lease.service))
        return table

    def _extend(self, client: str, address: IPAddress, service: str, expires: float) -> None:
        key = (client, address, service)
        old = self._leases.get(key)
        if old is not None and old >= expires:
            return
        self._leases[key] = expires
        self._by_pair.setdefault((address, service), {})[client] = expires
        heapq.heappush(self._heap, (expires, next(self._seq), client, address, service))

    def _drop_from_pair(self, pair: Pair, client: str) -> None:
        holders = self._by_pair[pair]
        del holders[client]
        if not holders:
            del self._by_pair[pair]

    def _settle(self, pair: Pair) -> list[FirewallAction]:
        holders = self._by_pair.get(pair)
        current = self._pair_until.get(pair)
        if not holders:
            destination = self._dest.pop(pair, None)
            if current is None:
                return []
            del self._pair_until[pair]
            return [Remove(pair[0], pair[1], destination)]
        until = max(holders.values())
        if until == current:
            return []
        self._pair_until[pair] = until
        return [Allow(pair[0], pair[1], until, self._dest.get(pair))]


def _pair_order(pair: Pair) -> tuple[int, bytes, str]:
    return (pair[0].version, pair[0].packed, pair[1])


@dataclass(frozen=True, slots=True)
class Restored:
    """Saved leases as a restart may trust them (`restore_saved`)."""

    kept: list[Lease]
    dropped: int  # of a client or a service the server does not know
    capped: int  # ending later than now + their service's longest lease

    def note(self) -> str:
        """One log line on what was not kept as saved ("" if all was)."""
        if not (self.dropped or self.capped):
            return ""
        return (f"saved leases: dropped {self.dropped} of an unknown client or service, "
                f"cut {self.capped} to their service's max_duration from now")


def restore_saved(saved: list[Lease], *, clients: Container[str],
                  max_durations: Mapping[str, int], now: float,
                  named: Container[str] = frozenset()) -> Restored:
    """The saved leases (leases.json) a restart may open again: those of a
    known client on a known service, each ending at most now + that
    service's max_duration (a lease can never be longer: the file is not
    trusted to say otherwise).  Expired ones are kept (the table drops them).
    A lease of a `named` service (a gateway to a DNS name) is kept only with
    a destination of its address's IP version, and a lease of any other
    service only without one: a restart never resolves a name again."""
    kept: list[Lease] = []
    dropped = capped = 0
    for lease in saved:
        longest = max_durations.get(lease.service)
        if (longest is None or lease.client not in clients or math.isnan(lease.expires)
                or not _destination_fits(lease, lease.service in named)):
            dropped += 1
            continue
        if not lease.expires <= now + longest:  # (NaN too)
            lease = Lease(lease.client, lease.address, lease.service, now + longest,
                          lease.destination)
            capped += 1
        kept.append(lease)
    return Restored(kept, dropped, capped)


def _destination_fits(lease: Lease, named: bool) -> bool:
    if lease.destination is None:
        return not named
    return named and lease.destination.version == lease.address.version
