"""What the spoofed-source check (issue 13, finding 2) adds to the receive
path, per datagram: recvmsg with the arrival interface (IPV6_RECVPKTINFO)
against the plain recvfrom of before, on a dual-stack socket on loopback in
batches of 64; and the route check, asked of the kernel (a new source) and
answered from the cache (a source seen within CACHE_TTL).

    .venv/bin/python benchmarks/bench_routes.py
"""

from __future__ import annotations

import socket
import time

from spa.server.routes import CachedRoutes, KernelRoutes
from spa.server.sources import _INT, BATCH, IN6_PKTINFO_IFINDEX, PKTINFO_SPACE

ROUNDS = 300
PACKET = bytes(161)
LOOKUPS = 20_000


def listener(pktinfo: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if pktinfo:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind(("::", 0))
    return sock


def per_datagram(pktinfo: bool) -> float:
    """Microseconds to take one datagram (and its interface) off the socket."""
    sock, total = listener(pktinfo), 0.0
    port = sock.getsockname()[1]
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(ROUNDS):
            for _ in range(BATCH):
                sender.sendto(PACKET, ("127.0.0.1", port))
            started = time.perf_counter()
            if pktinfo:
                recvmsg, unpack = sock.recvmsg, _INT.unpack_from
                for _ in range(BATCH):
                    _, ancillary, _, _ = recvmsg(2048, PKTINFO_SPACE)
                    unpack(ancillary[0][2], IN6_PKTINFO_IFINDEX)
            else:
                recvfrom = sock.recvfrom
                for _ in range(BATCH):
                    recvfrom(2048)
            total += time.perf_counter() - started
    return total / (ROUNDS * BATCH) * 1e6


def main() -> None:
    for _ in range(3):
        before, after = per_datagram(False), per_datagram(True)
        print(f"recvfrom {before:.2f} us, recvmsg with pktinfo {after:.2f} us "
              f"(+{after - before:.2f} us a datagram)")
    kernel = KernelRoutes()
    started = time.perf_counter()
    for i in range(LOOKUPS):
        kernel.leaves_by(f"127.0.{i >> 8 & 255}.{i & 255}", 1, 0.0)
    asked = (time.perf_counter() - started) / LOOKUPS * 1e6
    cached = CachedRoutes(kernel)
    started = time.perf_counter()
    for _ in range(LOOKUPS):
        cached.leaves_by("127.0.0.1", 1, 0.0)
    hit = (time.perf_counter() - started) / LOOKUPS * 1e6
    print(f"route check: asked of the kernel {asked:.1f} us, from the cache {hit:.2f} us")


if __name__ == "__main__":
    main()
