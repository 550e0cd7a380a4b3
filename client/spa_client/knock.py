"""Knocking: resolve the server, send the packet, wait for the port to open.

The client's edge: it reads the clock and the CSPRNG and hands them to the
core's `build_packet`.  A fresh nonce for every packet, re-sends included.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from spa.core.keys import derive_keys
from spa.core.uri import Enrollment, ServiceRef
from spa.core.wire import NONCE_SIZE, Action, IPAddress, Request, build_packet

RESEND_AFTER = 1.0  # seconds without the port opening before a fresh packet
PROBE_EVERY = 0.1  # seconds between TCP connection attempts
PROBE_TIMEOUT = 0.3  # a dropped SYN shows up as a timeout


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
                address: IPAddress | None, now: float, nonce: bytes) -> bytes:
    keys = derive_keys(enrollment.secret, enrollment.server_id)
    request = Request(int(now * 1000), action, service, duration, address)
    return build_packet(request, keys, enrollment.server_id, nonce=nonce)


def send(target: Target, packet: bytes) -> None:
    """Send one datagram.  Raises KnockError if the network refuses."""
    with socket.socket(target.family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(packet, (target.address, target.knock_port))
        except OSError as exc:
            raise KnockError(f"cannot send to {target.address}: {exc.strerror}") from None


def port_accepts(address: str, family: int, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError:
            return False
    return True


def parse_allow_ip(text: str | None) -> IPAddress | None:
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise KnockError(f"--allow-ip {text!r} is not an IP address") from None


def open_and_wait(enrollment: Enrollment, service: ServiceRef, target: Target, *,
                  duration: int, address: IPAddress | None, timeout: float,
                  progress: Callable[[float, int], None]) -> float | None:
    """Knock, then wait for the TCP port; re-knock with a new nonce when it
    stays shut.  Returns the seconds it took, or None after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    sends = 0
    next_send = started
    while True:
        now = time.monotonic()
        if now >= next_send:
            send(target, make_packet(enrollment, Action.OPEN, service.name, duration=duration,
                                     address=address, now=time.time(),
                                     nonce=os.urandom(NONCE_SIZE)))
            sends += 1
            next_send = now + RESEND_AFTER
        left = deadline - time.monotonic()
        progress(max(0.0, left), sends)
        if port_accepts(target.address, target.family, service.port,
                        min(PROBE_TIMEOUT, max(0.05, left))):
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(PROBE_EVERY, max(0.0, deadline - time.monotonic())))
