"""A gateway service's destination: which addresses a gateway may reach,
which DNS names a config may give, and what a name's answer means for one
lease.  Pure: addresses, names and the time in; values out.

Invariants (docs/install.md, section 11; docs/threat-model.md, "Gateway
mode"):
- `gateway_host_problem` refuses, for a literal `host` at load and for every
  address a name resolves to, what the forward gate cannot hold: a mapped,
  zoned, unspecified, multicast, broadcast, loopback or link-local address.
- `host_name_problem` takes a name only in the DNS host name syntax (letters,
  digits and '-' in labels of 1-63, at most 253 in all, a trailing dot
  allowed, a last label that is not all digits): nothing a resolver could
  read as an address, a path or an option.
- `choose` picks the first answer of the client's IP version (the resolver's
  order), fail closed: no answer of that version is `host_unresolved`, a
  first answer the gate cannot hold is `host_not_allowed` (the next one is
  never tried in its place).
- `destination_problem` holds a lease's destination, where the gate keeper
  receives it, to what `choose` could have given.
- `NameCache` keeps an answer at most CACHE_SECONDS (the system resolver
  gives no TTL) and at most CACHE_SIZE names; a failure is never kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from spa.core.errors import Reason
from spa.core.leases import Allow, Remove
from spa.core.policy import Service
from spa.core.wire import IPAddress

MAX_NAME = 253  # characters of a DNS name (RFC 1035 section 2.3.4, without the trailing dot)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")  # RFC 1123 2.1
CACHE_SECONDS = 30.0  # the longest an answer is reused: a lease starting later asks again
CACHE_SIZE = 1024  # names x IP versions kept at most (the oldest answer goes first)


def gateway_host_problem(address: IPAddress) -> str:
    """Why `address` cannot be a gateway service's host, or "" when it can.
    It refuses what spa/server/gatemsg.py `parse_address` refuses for a
    client (a mapped or zoned IPv6 address, unspecified, multicast,
    broadcast) and loopback and link-local: the forward gate matches one
    routed address of one IP version, so a mapped ::ffff:a.b.c.d would gate
    nothing of the real IPv4 host, and a zone fails in nftables later."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (f"is an IPv4-mapped IPv6 address, which would leave the IPv4 host ungated; "
                f"write {address.ipv4_mapped}")
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return "has a zone (%...); write a routed address of the internal host"
    if (address.is_unspecified or address.is_multicast
            or address == ipaddress.IPv4Address("255.255.255.255")):
        return "is not a host address; write the internal host's own address"
    if address.is_loopback:
        return ("is a loopback address; a gateway service's host is another machine (for "
                "this host's own port, leave host out)")
    if address.is_link_local:
        return "is link-local; a gateway service needs a routed address of the internal host"
    return ""


def host_name_problem(name: str) -> str:
    """Why `name` is not a DNS host name a gateway may be given, or ""."""
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > MAX_NAME:
        return f"is not a DNS host name (1-{MAX_NAME} characters)"
    labels = bare.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return ("is neither an IP address nor a DNS host name (labels of letters, digits "
                "and '-', 1-63 characters, dot-separated)")
    if labels[-1].isdigit():
        return "is neither an IP address nor a DNS host name (its last label is all digits)"
    return ""


def choose(answers: Iterable[IPAddress], version: int) -> IPAddress | Reason:
    """The destination for a client of IP `version`: the resolver's first
    answer of that version, or why there is none to use."""
    for address in answers:
        if address.version != version:
            continue
        if gateway_host_problem(address):
            return Reason.HOST_NOT_ALLOWED
        return address
    return Reason.HOST_UNRESOLVED


@dataclass(frozen=True, slots=True)
class _Answer:
    address: IPAddress
    until: float


class NameCache:
    """(name, IP version) -> the address chosen, for CACHE_SECONDS at most."""

    def __init__(self, seconds: float = CACHE_SECONDS, size: int = CACHE_SIZE) -> None:
        self.seconds, self.size = seconds, size
        self._answers: dict[tuple[str, int], _Answer] = {}

    def get(self, name: str, version: int, now: float) -> IPAddress | None:
        key = (name.lower(), version)
        answer = self._answers.get(key)
        if answer is None:
            return None
        if not now < answer.until:
            del self._answers[key]
            return None
        return answer.address

    def put(self, name: str, version: int, address: IPAddress, now: float) -> None:
        key = (name.lower(), version)
        self._answers.pop(key, None)
        while len(self._answers) >= self.size:
            del self._answers[next(iter(self._answers))]  # the oldest put
        self._answers[key] = _Answer(address, now + self.seconds)

    def __len__(self) -> int:
        return len(self._answers)


def destination_problem(service: Service, change: Allow | Remove) -> str:
    """Why a change's destination does not fit its service, or "": a named
    gateway service's change names an address of its client's IP version
    that a gateway may reach (spa/core/gwhost.py); any other names none.
    The daemon resolved it; the gate keeper (spa/server/monitor.py) holds
    it to what any answer could be, so a daemon taken over opens no
    loopback or other-version way."""
    destination = change.destination
    if not service.named:
        return "" if destination is None else "a destination for a service that names none"
    if destination is None:  # a removal: the backend knows what it opened
        return "" if isinstance(change, Remove) else \
            "a named gateway service's grant needs its destination"
    if destination.version != change.address.version:
        return "the destination is of another IP version than the address"
    problem = gateway_host_problem(destination)
    return f"destination {destination} {problem}" if problem else ""
