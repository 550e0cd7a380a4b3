"""Knocking: resolve the server, send the packet, wait for the port to open.

The client's edge: it reads the clock and the CSPRNG and hands them to the
core's `build_packet`.  A fresh nonce for every packet, re-sends included.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from spa.core.keys import derive_keys
from spa.core.uri import Enrollment, ServiceRef
from spa.core.wire import NONCE_SIZE, Action, IPAddress, Request, build_packet

RESEND_AFTER = 1.0  # seconds without the port opening before a fresh packet
FIRST_PROBE = 0.002  # seconds after the knock before the first connection attempt
PROBE_GAP_MAX = 0.2  # the gap between new connection attempts doubles up to this
MAX_PROBES = 8  # connection attempts kept open at once (the oldest is dropped)


class KnockError(Exception):
    """A local problem (unknown service, unresolvable host); one line."""


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    family: int
    knock_port: int


def resolve(host: str, port: int) -> Target:
    """The server's address (IPv4 or IPv6).  Raises KnockError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise KnockError(f"cannot resolve {host}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return Target(str(sockaddr[0]), family, port)


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


class PortProbe:
    """Overlapping non-blocking TCP connects to one port.

    A SYN that reaches the server before its grant is dropped and never
    answered, so waiting on one connect would cost its whole timeout.  Instead
    a new attempt starts at growing gaps (2 ms after the knock, then doubling
    to 200 ms) while the earlier ones stay open: whichever completes first
    wins, one round trip after the first SYN that found the port open.
    """

    def __init__(self, address: str, family: int, port: int) -> None:
        self.address, self.family, self.port = address, family, port
        self._selector = selectors.DefaultSelector()
        self._pending: list[socket.socket] = []

    def start(self) -> None:
        """Send one more SYN (a new connection attempt)."""
        if len(self._pending) >= MAX_PROBES:
            self._drop(self._pending[0])
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex((self.address, self.port)) not in (0, errno.EINPROGRESS):
            sock.close()
            return
        self._pending.append(sock)
        self._selector.register(sock, selectors.EVENT_WRITE)

    def wait(self, timeout: float) -> bool:
        """True once an attempt connects (within `timeout` seconds)."""
        for key, _ in self._selector.select(max(0.0, timeout)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._drop(sock)
            if error == 0:
                return True
        return False

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        self._pending.remove(sock)
        sock.close()

    def close(self) -> None:
        for sock in list(self._pending):
            self._drop(sock)
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
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise KnockError(f"--allow-ip {text!r} is not an IP address") from None


def open_and_wait(enrollment: Enrollment, service: ServiceRef, target: Target, *,
                  duration: int, address: IPAddress | None, timeout: float,
                  progress: Callable[[float, int], None], otp: str = "") -> float | None:
    """Knock, then wait for the TCP port (PortProbe); re-knock with a new
    nonce when it stays shut.  Returns the seconds it took, or None after
    `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    sends = 0
    next_send = started
    next_probe = started + FIRST_PROBE
    gap = FIRST_PROBE
    probe = PortProbe(target.address, target.family, service.port)
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_send:
                send(target, make_packet(enrollment, Action.OPEN, service.name,
                                         duration=duration, address=address, now=time.time(),
                                         nonce=os.urandom(NONCE_SIZE), otp=otp))
                sends += 1
                next_send = now + RESEND_AFTER
                progress(max(0.0, deadline - now), sends)
            if now >= next_probe:
                probe.start()
                gap = min(gap * 2, PROBE_GAP_MAX)
                next_probe = now + gap
            if probe.wait(min(next_probe, next_send, deadline) - time.monotonic()):
                return time.monotonic() - started
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


def keep_open(enrollment: Enrollment, service: ServiceRef, target: Target, *, duration: int,
              show: Callable[[str, float, str | None], None],
              stop: Callable[[], bool],
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep,
              where: Callable[[Target], str | None] = local_address) -> int:
    """Re-knock every third of `duration` (so a grant capped at a third of
    what was asked still never lapses), and at once when the outgoing address
    changes (roaming), until `stop()`.  `show(event, seconds_to_next, address)`
    reports each renewal ('renewed', 'moved') and each tick ('tick').
    Returns how many knocks were sent."""
    every = max(1.0, duration / 3)
    address = where(target)
    sends = 0
    next_knock = clock()
    while not stop():
        now = clock()
        moved = (current := where(target)) != address
        if moved or now >= next_knock:
            send(target, make_packet(enrollment, Action.OPEN, service.name, duration=duration,
                                     address=None, now=time.time(),
                                     nonce=os.urandom(NONCE_SIZE)))
            sends += 1
            address, next_knock = current, now + every
            show("moved" if moved else "renewed", every, address)
        else:
            show("tick", next_knock - now, address)
        sleep(min(TICK, max(0.0, next_knock - clock())))
    return sends
