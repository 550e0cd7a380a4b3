"""Reverse-path checks: does the route back to a knock's source leave by the
interface the knock came in on?  (docs/threat-model.md, "Forged sources".)

Invariants:
- `leaves_by(source, ifindex, now)` is True only when the kernel's route to
  `source` leaves by interface `ifindex` (that route's interface, or one of
  its nexthops when it is multipath).  A local source (loopback, or one of
  this host's own addresses) is True only when it arrived on loopback, where
  the kernel delivers what the host sends itself.  No route, an unreachable,
  blackhole or prohibit route, interface 0 (unknown) or a failed lookup:
  False (fail closed).
- An IPv6 link-local source (fe80::/10) is looked up on its arrival interface
  (no other route can say where it lives): True where that link has one.
- The daemon asks only about authenticated knocks of clients without
  `allow_other_address`, so the cache holds enrolled clients' addresses, not
  a flood's; it is bounded (CACHE_SIZE) and reuses an answer for CACHE_TTL
  seconds at most, so a route change counts within that time.
- Time is an argument; `FakeRoutes` stands in for the kernel in unit tests.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from spa.server.errors import LocalError

CACHE_TTL = 5.0  # seconds an answer is reused: a route change counts within this time
CACHE_SIZE = 4096  # (source, interface) answers kept; only enrolled clients' knocks ask
LOOPBACK_IFINDEX = 1  # the kernel gives loopback index 1 in every namespace
NETLINK_TIMEOUT = 1.0  # seconds to wait for the kernel's answer (it answers at once)

# rtnetlink (linux/netlink.h, linux/rtnetlink.h)
NETLINK_ROUTE = 0
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
RTM_F_FIB_MATCH = 0x2000  # answer with the matching route itself: every nexthop
RTA_DST, RTA_OIF, RTA_MULTIPATH = 1, 4, 9
RTN_UNICAST, RTN_LOCAL = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope,
#                                       type, flags
_RTATTR = struct.Struct("=HH")  # length, type
_RTNEXTHOP = struct.Struct("=HBBi")  # length, flags, hops, ifindex
_U32 = struct.Struct("=I")
RECV_SIZE = 65536


class RouteCheck(Protocol):
    def leaves_by(self, source: str, ifindex: int, now: float) -> bool:
        """Whether the route back to `source` leaves by interface `ifindex`."""
        ...


class KernelRoutes:
    """Asks the kernel over rtnetlink (RTM_GETROUTE for the source as the
    destination), one request per question; see CachedRoutes."""

    def __init__(self) -> None:
        """Raises LocalError if no rtnetlink socket can be opened."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.bind((0, 0))
        except OSError as exc:
            raise LocalError(f"cannot ask the kernel for routes (rtnetlink: {exc.strerror}); "
                             "the check of knocks' source addresses needs it") from None
        sock.settimeout(NETLINK_TIMEOUT)
        self._sock = sock
        self._sequence = itertools.count(1)

    def leaves_by(self, source: str, ifindex: int, now: float) -> bool:
        if ifindex <= 0:
            return False
        try:
            address = ipaddress.ip_address(source.partition("%")[0])
        except ValueError:
            return False
        link_local = isinstance(address, ipaddress.IPv6Address) and address.is_link_local
        try:
            route = self._route(address, ifindex if link_local else 0)
        except OSError:
            return False  # no route (ENETUNREACH, EHOSTUNREACH), or no answer: fail closed
        if route is None:
            return False
        kind, interfaces = route
        if kind == RTN_LOCAL:
            return ifindex == LOOPBACK_IFINDEX
        return kind == RTN_UNICAST and ifindex in interfaces

    def route(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> tuple[int, frozenset[int]] | None:
        """(route type, its interfaces) of the kernel's route to `address`
        (spa/server/gwroute.py).  Raises OSError when there is none."""
        return self._route(address, 0)

    def _route(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, oif: int
               ) -> tuple[int, frozenset[int]] | None:
        """(route type, its interfaces) of the kernel's route to `address`.
        Raises OSError for the kernel's refusal (no route) or no answer."""
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        packed = address.packed
        attrs = _attr(RTA_DST, packed) + (_attr(RTA_OIF, _U32.pack(oif)) if oif else b"")
        body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH) + attrs
        sequence = next(self._sequence) & 0xFFFFFFFF
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE,
                                       NLM_F_REQUEST, sequence, 0) + body)
        while True:
            reply = self._sock.recv(RECV_SIZE)
            for kind, seq, payload in _messages(reply):
                if seq != sequence:
                    continue  # an answer to an earlier question that timed out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    raise OSError(code, "route lookup refused")
                if kind == RTM_NEWROUTE:
                    return _parse_route(payload)

    def close(self) -> None:
        self._sock.close()


def _attr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + bytes(-length % 4)


def _attrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind, data[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield kind, seq, data[offset + _NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


def _parse_route(payload: bytes) -> tuple[int, frozenset[int]] | None:
    """(type, interfaces) of an RTM_NEWROUTE: RTA_OIF, or each nexthop of RTA_MULTIPATH."""
    if len(payload) < _RTMSG.size:
        return None
    kind = _RTMSG.unpack_from(payload)[7]
    interfaces: set[int] = set()
    for attr, value in _attrs(payload, _RTMSG.size):
        if attr == RTA_OIF and len(value) >= 4:
            interfaces.add(_U32.unpack_from(value)[0])
        elif attr == RTA_MULTIPATH:
            offset = 0
            while offset + _RTNEXTHOP.size <= len(value):
                length, _flags, _hops, index = _RTNEXTHOP.unpack_from(value, offset)
                if length < _RTNEXTHOP.size:
                    break
                interfaces.add(index)
                offset += (length + 3) & ~3
    return kind, frozenset(interfaces)


class CachedRoutes:
    """Remembers another check's answers for `ttl` seconds, `size` at most."""

    def __init__(self, inner: RouteCheck, *, ttl: float = CACHE_TTL,
                 size: int = CACHE_SIZE) -> None:
        self.inner = inner
        self.ttl = ttl
        self.size = size
        self._answers: dict[tuple[str, int], tuple[bool, float]] = {}  # -> (answer, until)

    def leaves_by(self, source: str, ifindex: int, now: float) -> bool:
        key = (source, ifindex)
        known = self._answers.get(key)
        if known is not None and now < known[1] and now >= known[1] - self.ttl:
            return known[0]  # (a clock set back past the answer asks again)
        answer = self.inner.leaves_by(source, ifindex, now)
        answers = self._answers
        if key not in answers and len(answers) >= self.size:
            for stale in [k for k, (_, until) in answers.items() if until <= now]:
                del answers[stale]
            if len(answers) >= self.size:
                answers.clear()  # all live: start again rather than grow
        answers[key] = (answer, now + self.ttl)
        return answer

    def __len__(self) -> int:
        return len(self._answers)


class FakeRoutes:
    """Routes for unit tests: source -> the interfaces its route leaves by;
    `asked` records every question."""

    def __init__(self, routes: Mapping[str, int | frozenset[int]] | None = None) -> None:
        self.routes: dict[str, frozenset[int]] = {
            source: frozenset({i}) if isinstance(i, int) else i
            for source, i in (routes or {}).items()}
        self.asked: list[tuple[str, int, float]] = []

    def leaves_by(self, source: str, ifindex: int, now: float) -> bool:
        self.asked.append((source, ifindex, now))
        return ifindex in self.routes.get(source, frozenset())


def kernel_routes(factory: Callable[[], RouteCheck] = KernelRoutes) -> CachedRoutes:
    """The daemon's check: the kernel's routes, cached.  Raises LocalError."""
    return CachedRoutes(factory())
