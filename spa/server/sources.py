"""Packet sources: where the receive loop gets datagrams from.

Every source has `receive(timeout) -> [(bytes, source address, interface
index), ...]` and `close()`; the index is the interface the datagram came in
on (0: unknown), which the reverse-path check of spa.server.routes needs.
`receive` returns what is queued (at most BATCH datagrams) at once, waits up
to `timeout` only when nothing is, and returns [] if nothing came: under load
one wake-up serves a batch.  `UdpSource` binds a UDP socket
(udp mode); `spa.server.capture.CaptureSource` reads an AF_PACKET socket
(capture mode).  `FakeSource` feeds unit tests; `FakeFilteredSource` adds a
model of the kernel filter (live tags, replayed nonces, shut tags).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Protocol

from spa.core.knock import TAG_SIZE
from spa.core.wire import NONCE_OFFSET, PACKET_SIZE
from spa.kernel.mapsource import MapFiltered
from spa.server.errors import LocalError

RECV_SIZE = 2048  # larger than any packet we accept, so oversize is visible
RECV_BUFFER = 4 * 1024 * 1024  # kernel socket buffer: absorbs bursts
SO_DETACH_FILTER = 27
BATCH = 64  # datagrams taken per wake-up at most (the receive thread's turn)
NONCE_PREFIX = 8  # bytes of the nonce the kernel filter compares (replays being flooded)
IP_PKTINFO = 8  # linux/in.h (the socket module lacks it): struct in_pktinfo, ifindex first
IN6_PKTINFO_IFINDEX = 16  # struct in6_pktinfo: the address, then the interface index
PKTINFO_SPACE = socket.CMSG_SPACE(20)  # room for either struct
# One copy in this many of a shut tag from elsewhere still reaches Python (a power of two),
# so the limiter goes on seeing the flood: a flood of 200 (its per-tag limit) x 256 =
# 51 kpps or more stays shut throughout, and at 200 kpps costs 780 refusals a second.
SHUT_SAMPLE = 256
MAX_SHUT_SOURCES = 16  # sources a shut tag passes from, at most (its client's most recent)

Datagram = tuple[bytes, str, int]  # (payload, source address, arrival interface index)
_INT = struct.Struct("=i")


class PacketSource(Protocol):
    def receive(self, timeout: float) -> list[Datagram]: ...

    def close(self) -> None: ...


class Waiter:
    """A socket's wait for datagrams that another thread may cut short:
    `wake()` (any thread) ends the receive thread's current or next wait
    at once, so a change queued for it (a revocation a group's watch
    delivered) is applied now, not at the end of RECEIVE_TIMEOUT.  An
    eventfd beside the socket in one poll; wakes before a wait add up to
    one."""

    def __init__(self, sock: socket.socket) -> None:
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing = threading.Lock()  # a wake never writes to a closed (reused) fd
        self._closed = False
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._poll.register(self._wake_fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the socket or a wake; whether
        the socket may have datagrams."""
        ready = self._poll.poll(timeout * 1000)
        woken = False
        for fd, _ in ready:
            if fd == self._wake_fd:
                woken = True
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
        return len(ready) > int(woken)

    def wake(self) -> None:
        """End the wait (from any thread; never blocks)."""
        with self._closing, contextlib.suppress(OSError):  # counter full: one is pending
            if not self._closed:
                os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        with self._closing:
            if not self._closed:
                self._closed = True
                os.close(self._wake_fd)


class UdpSource(MapFiltered):
    """A bound UDP socket; `::` listens on IPv6 and IPv4 (dual stack).
    `replace_tags`/`update_tags` (spa.kernel.mapsource) run the eBPF map
    filter, `set_tags` the classic one."""

    def __init__(self, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            # the arrival interface of each datagram (IPv4 through the
            # dual-stack socket gets an in6_pktinfo too)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LocalError(f"UDP port {port} is already in use on {address}; stop the "
                                 "other program or pick another port (listen_port)") from None
            if exc.errno == errno.EACCES:
                raise LocalError(f"no permission to bind UDP port {port} (run as root or pick "
                                 "a port above 1023)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LocalError(f"listen_address {address} is not an address of this "
                                 "machine") from None
            raise LocalError(f"cannot listen on {address} port {port}: {exc.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        self._ifindex_at = IN6_PKTINFO_IFINDEX if family == socket.AF_INET6 else 0
        self._waiter = Waiter(sock)
        self.wake = self._waiter.wake
        self.port = sock.getsockname()[1]
        self._map_port = None  # the eBPF map filter: udp mode's program

    def set_tags(self, tags: list[bytes] | None, nonces: Sequence[bytes] = (),
                 shut: Shut | None = None) -> str:
        """Drop datagrams without a live knock tag in the kernel (a socket
        filter), those carrying one of `nonces` (replays being flooded), and
        those carrying a `shut` tag from a source not listed for it (but one
        in SHUT_SAMPLE); None removes the filter.  Returns a line for the log."""
        from spa.server.capture import attach_tags, fit, fit_shut, udp_payload_filter

        self._drop_map()
        if tags is None:
            self._detach()
            return self._classic("no kernel filter")
        fitted = fit(tags, nonces)
        if fitted is None:
            self._detach()
            return self._classic("no kernel filter (too many tags)")
        try:
            gated = attach_tags(self._sock, lambda gate: udp_payload_filter(tags, fitted, gate),
                                fit_shut(tags, fitted, shut or {}))
        except (OSError, ValueError) as exc:
            self._detach()  # never leave an older tag list in place: it would drop knocks
            return self._classic(f"kernel filter not attached ({exc}); no kernel filter")
        return self._classic(filter_note(tags, fitted, gated))

    def queue_drops(self) -> int | None:
        """Datagrams the kernel dropped on this socket (a full queue, or the
        tag filter), from /proc/net/udp{,6}; None if not found."""
        inode = os.fstat(self._sock.fileno()).st_ino
        for name in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                lines = Path(name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 12 and fields[9] == str(inode):
                    return int(fields[-1])
        return None

    def _detach(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)

    def receive(self, timeout: float) -> list[Datagram]:
        items = self._drain()
        if not items and self._waiter.wait(timeout):
            items = self._drain()
        return items

    def _drain(self) -> list[Datagram]:
        items: list[Datagram] = []
        recvmsg, at, unpack = self._sock.recvmsg, self._ifindex_at, _INT.unpack_from
        try:
            for _ in range(BATCH):
                data, ancillary, _, peer = recvmsg(RECV_SIZE, PKTINFO_SPACE)
                host = peer[0]
                if host.startswith("::ffff:") and "." in host:
                    host = host[7:]  # IPv4 through the dual-stack socket: say it as IPv4
                # the one control message asked for: the pktinfo (none: 0, unknown)
                ifindex = unpack(ancillary[0][2], at)[0] if ancillary else 0
                items.append((data, host, ifindex))
        except (BlockingIOError, InterruptedError):
            pass
        return items

    def close(self) -> None:
        self._drop_map()
        self._sock.close()
        self._waiter.close()


Shut = Mapping[bytes, Sequence[str]]  # a shut tag -> the sources it still passes from


def filter_note(tags: Sized, nonces: Sized, shut: Shut | None = None) -> str:
    """The log line for a filter of `tags` and `nonces` (counted, never copied)."""
    note = f"kernel filter on {len(tags)} tags"
    note += f", dropping {len(nonces)} replayed nonces" if nonces else ""
    if shut:
        known = len({source for sources in shut.values() for source in sources})
        note += f", {len(shut)} flooded tags shut but from {known} known sources"
    return note


class FakeSource:
    """Hands out queued datagrams; `receive` returns None when empty."""

    def __init__(self) -> None:
        self.queue: deque[Datagram] = deque()
        self.closed = False

    def push(self, data: bytes, source: str, ifindex: int = 0) -> None:
        self.queue.append((data, source, ifindex))

    def receive(self, timeout: float) -> list[Datagram]:
        queue = self.queue
        return [queue.popleft() for _ in range(min(BATCH, len(queue)))]

    def close(self) -> None:
        self.closed = True


class FakeFilteredSource(FakeSource):
    """A FakeSource with a kernel filter: `set_tags` (the classic program)
    and `replace_tags`/`update_tags` (the eBPF map filter) record what the
    kernel would let through, and `receive` hands out only datagrams it
    would pass (those with a live tag and no blocked nonce, and a shut tag
    only from its sources or when `draw()` is 0 modulo SHUT_SAMPLE, the
    kernel's random number), as the capture and udp sources' filters do.
    With `ebpf=False` (no CAP_BPF, an old kernel) `replace_tags` falls back
    to `set_tags`, which past `classic_limit` tags is port-only."""

    def __init__(self, draw: Callable[[], int] | None = None, *, ebpf: bool = True,
                 classic_limit: int = 811) -> None:
        super().__init__()
        self.tags: frozenset[bytes] | None = None  # None: no filter (everything passes)
        self.nonces: tuple[bytes, ...] = ()
        self.shut: dict[bytes, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        self.draw = draw if draw is not None else _seeded_draw()
        self.ebpf, self.classic_limit = ebpf, classic_limit
        self.kernel_map = False
        self.calls: list[str] = []  # "set", "replace", "update": the daemon's use of it

    def filter_kind(self) -> str:
        if self.kernel_map:
            return "ebpf map"
        return "port-only" if self.tags is None else "classic"

    def set_tags(self, tags: list[bytes] | None, nonces: Sequence[bytes] = (),
                 shut: Shut | None = None) -> str:
        self.calls.append("set")
        self.kernel_map = False
        if tags is not None and len(tags) > self.classic_limit:
            tags = None  # too many for one classic program: port only
        return self._record(tags, nonces, shut)

    def replace_tags(self, tags: Sequence[bytes], nonces: Sequence[bytes] = (),
                     shut: Shut | None = None) -> str:
        if not self.ebpf:
            return "eBPF map filter not loaded (fake); " + self.set_tags(list(tags), nonces, shut)
        self.calls.append("replace")
        self.kernel_map = True
        return self._record(list(tags), nonces, shut).replace("kernel", "eBPF map", 1)

    def update_tags(self, added: Sequence[bytes], removed: Sequence[bytes],
                    nonces: Sequence[bytes] = (), shut: Shut | None = None) -> str:
        """Raises LocalError without the map filter (as the real sources)."""
        if not self.kernel_map or self.tags is None:
            raise LocalError("update_tags without the eBPF map filter")
        self.calls.append("update")
        tags = (self.tags - frozenset(removed)) | frozenset(added)
        return self._record(list(tags), nonces, shut).replace("kernel", "eBPF map", 1)

    def _record(self, tags: list[bytes] | None, nonces: Sequence[bytes],
                shut: Shut | None) -> str:
        self.tags = None if tags is None else frozenset(tags)
        self.nonces = tuple(nonces)
        live = self.tags or frozenset()
        self.shut = {tag: frozenset(ipaddress.ip_address(s) for s in sources)
                     for tag, sources in (shut or {}).items() if tag in live}
        if tags is None:
            return "port-only filter"
        return filter_note(tags, nonces,
                           {tag: [str(a) for a in known] for tag, known in self.shut.items()})

    def passes(self, data: bytes, source: str = "") -> bool:
        """Whether the kernel filter would hand this datagram to Python."""
        if self.tags is None:
            return True
        nonce = data[NONCE_OFFSET:NONCE_OFFSET + NONCE_PREFIX]
        tag = data[1:1 + TAG_SIZE]
        if tag not in self.tags or nonce in self.nonces:
            return False
        known = self.shut.get(tag)
        if known is None or ipaddress.ip_address(source) in known:
            return True
        return self.draw() % SHUT_SAMPLE == 0

    def receive(self, timeout: float) -> list[Datagram]:
        return [item for item in super().receive(timeout) if self.passes(item[0], item[1])]


def _seeded_draw() -> Callable[[], int]:
    rng = random.Random(0)  # noqa: S311 (a fake's sample, fixed: a test runs the same)
    return lambda: rng.getrandbits(32)


assert PACKET_SIZE < RECV_SIZE
