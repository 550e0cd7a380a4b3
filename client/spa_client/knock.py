"""Knocking: resolve the server, send the packet, wait for the port to open.

The client's edge: it reads the clock and the CSPRNG and hands them to the
core's `build_packet`.  A fresh nonce for every packet, re-sends included.

Dual stack (docs/protocol.md, "Dual stack"): a server name with A and AAAA
records is knocked over both families, one packet each, each sealed anew
(a copy of one packet would be a replay), each asking for the address it
leaves from, so whichever address ssh tries is open.  One family only when
the request names an address (the grant is for that address whatever the
path) or carries an authenticator code (a code opens once).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spa.core.keys import derive_keys
from spa.core.uri import Enrollment, ServiceRef
from spa.core.wire import NONCE_SIZE, Action, IPAddress, Request, build_packet

RESEND_AFTER = 1.0  # seconds without the port opening before a fresh packet
FIRST_PROBE = 0.002  # seconds after the knock before the first connection attempt
PROBE_GAP_MAX = 0.2  # the gap between new connection attempts doubles up to this
MAX_PROBES = 8  # connection attempts kept open at once per address (the oldest is dropped)
# seconds `open` waits for the other families once one opened: a re-knock's
# worth, so a lost packet of the family ssh tries first is sent again
OTHERS_WITHIN = RESEND_AFTER + 0.5
FAMILIES = (socket.AF_INET, socket.AF_INET6)


class KnockError(Exception):
    """A local problem (unknown service, unresolvable host); one line."""


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    family: int
    knock_port: int


Lookup = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's shape


def resolve_all(host: str, port: int, lookup: Lookup = socket.getaddrinfo
                ) -> tuple[Target, ...]:
    """The server's addresses to knock: the first of each family, in the
    resolver's order (the order ssh tries them).  Raises KnockError."""
    try:
        infos = lookup(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid name"
        raise KnockError(f"cannot resolve {host}: {why}") from None
    found: dict[int, Target] = {}
    for family, _, _, _, sockaddr in infos:
        if family in FAMILIES and family not in found and isinstance(sockaddr, tuple):
            found[int(family)] = Target(str(sockaddr[0]), int(family), port)
    if not found:
        raise KnockError(f"cannot resolve {host}: it has no IPv4 or IPv6 address")
    return tuple(found.values())


def targets_for(targets: Sequence[Target], *, address: IPAddress | None, otp: str
                ) -> tuple[Target, ...]:
    """Which of the server's addresses to knock.  Every family's, unless the
    request names an address (one knock, over that address's family when the
    server has one: a client may name its own source) or carries an
    authenticator code (one knock: the server takes a code once, so a second
    family's copy would be refused otp_reused)."""
    if address is not None:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        return (next((t for t in targets if t.family == family), targets[0]),)
    if otp:
        return (targets[0],)
    return tuple(targets)


def shown(targets: Sequence[Target]) -> str:
    """Addresses for a message: 'A', 'A and B'."""
    return " and ".join(t.address for t in targets)


def service_of(enrollment: Enrollment, name: str) -> ServiceRef:
    for service in enrollment.services:
        if service.name == name:
            return service
    known = ", ".join(s.name for s in enrollment.services)
    raise KnockError(f"this enrollment has no service {name!r}; it has: {known}")


def make_packet(enrollment: Enrollment, action: Action, service: str, *, duration: int,
                address: IPAddress | None, now: float, nonce: bytes, otp: str = "") -> bytes:
    keys = derive_keys(enrollment.secret, enrollment.server_id)
    request = Request(int(now * 1000), action, service, duration, address, otp)
    return build_packet(request, keys, enrollment.server_id, nonce=nonce)


def send(target: Target, packet: bytes) -> None:
    """Send one datagram.  Raises KnockError if the network refuses."""
    with socket.socket(target.family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(packet, (target.address, target.knock_port))
        except OSError as exc:
            raise KnockError(f"cannot send to {target.address}: {exc.strerror}") from None


def knock_each(targets: Sequence[Target], seal: Callable[[], bytes]) -> tuple[Target, ...]:
    """Send each target a packet of its own (`seal()` makes one, with a fresh
    nonce).  Returns the targets the network took it for (a family without a
    route fails at once); raises the first KnockError when none did."""
    reached: list[Target] = []
    errors: list[KnockError] = []
    for target in targets:
        try:
            send(target, seal())
        except KnockError as exc:
            errors.append(exc)
        else:
            reached.append(target)
    if not reached:
        raise errors[0] if errors else KnockError("no address to knock")
    return tuple(reached)


class PortProbe:
    """Overlapping non-blocking TCP connects to one port at some addresses.

    A SYN that reaches the server before its grant is dropped and never
    answered, so waiting on one connect would cost its whole timeout.  Instead
    a new attempt starts at growing gaps (2 ms after the knock, then doubling
    to 200 ms) while the earlier ones stay open: whichever completes first
    wins, one round trip after the first SYN that found the port open.  Each
    address has its own attempts (at most MAX_PROBES open); `wait` says which
    address connected, and `stop` ends an address's attempts.
    """

    def __init__(self, targets: Sequence[Target], port: int) -> None:
        self.port = port
        self._selector = selectors.DefaultSelector()
        self._pending: dict[Target, list[socket.socket]] = {t: [] for t in targets}

    def start(self) -> None:
        """Send one more SYN to each address still probed (a new attempt)."""
        for target, attempts in self._pending.items():
            if len(attempts) >= MAX_PROBES:
                self._drop(target, attempts[0])
            sock = socket.socket(target.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            if sock.connect_ex((target.address, self.port)) not in (0, errno.EINPROGRESS):
                sock.close()
                continue
            attempts.append(sock)
            self._selector.register(sock, selectors.EVENT_WRITE, target)

    def wait(self, timeout: float) -> Target | None:
        """The address an attempt connected to within `timeout` seconds, if any."""
        for key, _ in self._selector.select(max(0.0, timeout)):
            sock, target = key.fileobj, key.data
            assert isinstance(sock, socket.socket)
            assert isinstance(target, Target)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._drop(target, sock)
            if error == 0:
                return target
        return None

    def stop(self, target: Target) -> None:
        """Probe `target` no more."""
        for sock in list(self._pending.pop(target, [])):
            self._selector.unregister(sock)
            sock.close()

    def attempts(self) -> int:
        """Connection attempts open now, over all addresses."""
        return sum(len(attempts) for attempts in self._pending.values())

    def _drop(self, target: Target, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        self._pending[target].remove(sock)
        sock.close()

    def close(self) -> None:
        for target in list(self._pending):
            self.stop(target)
        self._selector.close()


def check_otp(code: str) -> str:
    """An authenticator code as typed (spaces allowed).  Raises KnockError."""
    digits = code.replace(" ", "")
    if not (digits.isascii() and digits.isdigit() and 6 <= len(digits) <= 10):
        raise KnockError("the authenticator code is 6 digits, e.g. 123456 (from the app, now)")
    return digits


def parse_allow_ip(text: str | None) -> IPAddress | None:
    if text is None:
        return None
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise KnockError(f"--allow-ip {text!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise KnockError(f"--allow-ip {text!r}: a zone (%...) is not sent; give the address "
                         "alone")
    return address


@dataclass(frozen=True, slots=True)
class Opened:
    """What a knock opened: the addresses whose port accepted a connection, in
    the order they opened, and those knocked that did not open in time."""

    targets: tuple[Target, ...]
    took: float  # seconds from the first knock to the first open port
    shut: tuple[Target, ...] = ()


def open_and_wait(enrollment: Enrollment, service: ServiceRef, targets: Sequence[Target], *,
                  duration: int, address: IPAddress | None, timeout: float,
                  progress: Callable[[float, int], None], otp: str = "",
                  others_within: float = 0.0) -> Opened | None:
    """Knock the addresses `targets_for` picks, then wait for the TCP port at
    each (PortProbe); re-knock those still shut with new nonces.  Returns
    once all are open, or `others_within` seconds after the first one opened;
    None when none opened within `timeout`.  An address the network refuses
    to send to at the first knock (no route) is left out.  Raises KnockError
    when no packet could be sent."""
    started = time.monotonic()
    deadline = started + timeout
    shut = list(targets_for(targets, address=address, otp=otp))
    opened: list[Target] = []
    took = 0.0
    until = deadline  # when to stop waiting for the others, once one opened
    sends = 0
    next_send = started
    next_probe = started + FIRST_PROBE
    gap = FIRST_PROBE
    probe = PortProbe(shut, service.port)

    def seal() -> bytes:
        return make_packet(enrollment, Action.OPEN, service.name, duration=duration,
                           address=address, now=time.time(), nonce=os.urandom(NONCE_SIZE),
                           otp=otp)

    try:
        while True:
            now = time.monotonic()
            if opened and (not shut or now >= until):
                return Opened(tuple(opened), took, tuple(shut))
            if now >= deadline:
                return Opened(tuple(opened), took, tuple(shut)) if opened else None
            if now >= next_send:
                reached = knock_each(shut, seal)
                if not sends:  # the first knock: leave out what has no route
                    for lost in [t for t in shut if t not in reached]:
                        shut.remove(lost)
                        probe.stop(lost)
                sends += len(reached)
                next_send = now + RESEND_AFTER
                progress(max(0.0, deadline - now), sends)
            if now >= next_probe:
                probe.start()
                gap = min(gap * 2, PROBE_GAP_MAX)
                next_probe = now + gap
            found = probe.wait(min(next_probe, next_send, deadline, until) - time.monotonic())
            if found is not None:
                if not opened:
                    took = time.monotonic() - started
                    until = min(deadline, time.monotonic() + others_within)
                opened.append(found)
                shut.remove(found)
                probe.stop(found)
            progress(max(0.0, deadline - time.monotonic()), sends)
    finally:
        probe.close()


KEEP_DEFAULT = 60  # seconds asked for by --keep when --duration is not given
TICK = 1.0  # seconds between countdown updates and address checks


def local_address(target: Target) -> str | None:
    """The address this machine would send from to reach the server (no
    packet is sent: a UDP connect only picks the route)."""
    try:
        with socket.socket(target.family, socket.SOCK_DGRAM) as sock:
            sock.connect((target.address, target.knock_port))
            return str(sock.getsockname()[0])
    except OSError:
        return None


def keep_open(enrollment: Enrollment, service: ServiceRef, targets: Sequence[Target], *,
              duration: int, show: Callable[[str, float, str | None], None],
              stop: Callable[[], bool],
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep,
              where: Callable[[Target], str | None] = local_address) -> int:
    """Re-knock every third of `duration` (so a grant capped at a third of
    what was asked still never lapses), and at once when an outgoing address
    changes (roaming), until `stop()`; each time every target (each family)
    gets a packet of its own.  `show(event, seconds_to_next, addresses)`
    reports each renewal ('renewed', 'moved') and each tick ('tick').
    Returns how many knocks were sent."""
    every = max(1.0, duration / 3)

    def seal() -> bytes:
        return make_packet(enrollment, Action.OPEN, service.name, duration=duration,
                           address=None, now=time.time(), nonce=os.urandom(NONCE_SIZE))

    def sources() -> tuple[str | None, ...]:
        return tuple(where(target) for target in targets)

    def text(found: tuple[str | None, ...]) -> str | None:
        return ", ".join(a for a in found if a) or None

    addresses = sources()
    sends = 0
    next_knock = clock()
    while not stop():
        now = clock()
        moved = (current := sources()) != addresses
        if moved or now >= next_knock:
            sends += len(knock_each(targets, seal))
            addresses, next_knock = current, now + every
            show("moved" if moved else "renewed", every, text(addresses))
        else:
            show("tick", next_knock - now, text(addresses))
        sleep(min(TICK, max(0.0, next_knock - clock())))
    return sends
