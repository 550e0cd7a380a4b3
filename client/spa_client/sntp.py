"""SNTP (RFC 4330): how far this machine's clock is from a time server's.

For `spa-client doctor`: the server refuses a knock from a clock more than
its window off, without a word, so the doctor measures instead of guessing.

Invariants:
- The packet format and the offset arithmetic are pure (`sntp_request`,
  `parse_reply`, `clock_offset`); only `query_offset` does I/O, and takes its
  socket factory and clock as arguments.
- A reply is used only if it answers our request (its originate timestamp is
  our transmit timestamp) from a synchronized server; anything else is
  ignored, and no usable answer is `None`, never a guess.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

DEFAULT_TIME_SERVER = "pool.ntp.org"
NTP_PORT = 123
NTP_PACKET = 48  # bytes: an (S)NTP message without extension fields (RFC 4330 section 4)
NTP_EPOCH = 2_208_988_800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01 (Unix)
NTP_ERA = 2**32  # seconds in an NTP era (the 32-bit seconds field wraps in 2036)
NTP_CLIENT_REQUEST = 0x23  # first byte: leap 0, version 4, mode 3 (client)
NTP_MODE_SERVER = 4
SNTP_TIMEOUT = 2.0  # seconds to wait for the time server's answer
SNTP_MAX_DATAGRAMS = 8  # datagrams read (stray ones ignored) before giving up


class SntpError(Exception):
    """A datagram that is not a usable answer to our request; one line."""


def to_ntp(unix: float) -> bytes:
    """A Unix time as a 64-bit NTP timestamp (32.32 fixed point)."""
    seconds = unix + NTP_EPOCH
    return struct.pack(">II", int(seconds) % NTP_ERA, int(seconds % 1 * NTP_ERA))


def from_ntp(stamp: bytes) -> float:
    """A 64-bit NTP timestamp as Unix time.  With the top bit clear the time
    is in era 1, 2036-2104 (RFC 4330 section 3)."""
    seconds: int
    fraction: int
    seconds, fraction = struct.unpack(">II", stamp)
    era = 0 if seconds & 0x8000_0000 else NTP_ERA
    return seconds + era - NTP_EPOCH + fraction / NTP_ERA


def sntp_request(t1: float) -> bytes:
    """A client request sent at `t1`: its transmit timestamp is `t1`, which
    the server echoes as the originate timestamp of its reply."""
    return bytes([NTP_CLIENT_REQUEST]) + bytes(39) + to_ntp(t1)


def parse_reply(reply: bytes, request: bytes) -> tuple[float, float]:
    """(t2, t3): when the server received `request` and sent `reply`.
    Raises SntpError for anything but a synchronized server's answer to it."""
    if len(reply) < NTP_PACKET:
        raise SntpError(f"short reply ({len(reply)} bytes)")
    leap, version, mode = reply[0] >> 6, reply[0] >> 3 & 7, reply[0] & 7
    if mode != NTP_MODE_SERVER or version not in (3, 4):
        raise SntpError(f"not a server reply (version {version}, mode {mode})")
    if reply[1] == 0:
        raise SntpError(f"kiss-o'-death {reply[12:16]!r}")
    if leap == 3 or reply[1] > 15:
        raise SntpError("the time server is not synchronized")
    if reply[24:32] != request[40:48]:
        raise SntpError("a reply to another request")
    if reply[40:48] == bytes(8):
        raise SntpError("no transmit timestamp")
    return from_ntp(reply[32:40]), from_ntp(reply[40:48])


def clock_offset(t1: float, t2: float, t3: float, t4: float) -> float:
    """Seconds to add to this clock to match the server's (RFC 4330 section 5):
    t1 request sent, t2 received, t3 reply sent (server's clock), t4 received."""
    return ((t2 - t1) + (t3 - t4)) / 2


def query_offset(server: str, *, port: int = NTP_PORT, timeout: float = SNTP_TIMEOUT,
                 socket_factory: Callable[[int, int], socket.socket] = socket.socket,
                 now: Callable[[], float] = time.time) -> float | None:
    """This clock's offset from `server` by one SNTP exchange, or None when
    no usable answer came within `timeout` (or the name does not resolve)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(server, port, type=socket.SOCK_DGRAM)[0]
        with socket_factory(family, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            t1 = now()
            request = sntp_request(t1)
            sock.send(request)
            for _ in range(SNTP_MAX_DATAGRAMS):
                sock.settimeout(max(0.001, t1 + timeout - now()))
                reply, t4 = sock.recv(512), now()
                try:
                    t2, t3 = parse_reply(reply, request)
                except SntpError:
                    continue
                return clock_offset(t1, t2, t3, t4)
    except OSError:  # no name, no route, refused, timed out
        return None
    return None
