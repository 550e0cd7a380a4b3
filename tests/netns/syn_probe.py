"""An attacker's probe: try a new TCP connection to HOST PORT every INTERVAL
seconds for DURATION seconds; print one JSON line: how many probes were
sent, which handshakes completed and when (seconds from the start; `start`
is the wall clock then, to line them up with a trace of the server), and
how many connects failed at once (by errno name: no SYN left).  Run inside
a namespace.

A probe counts as opened only when its socket has a peer: a connect that
fails at once (ENETUNREACH, EADDRNOTAVAIL, ENOBUFS under load) leaves a
closed socket that select() also calls writable, with SO_ERROR 0, which an
earlier version counted as a completed handshake.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import sys
import time


def probe(host: str, port: int, wait: float) -> tuple[str, int]:
    """("open", local port) when the handshake completed; ("closed", 0)
    when none did within `wait` (dropped, or refused); (errno name, 0) when
    the connect failed at once and sent nothing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            return errno.errorcode.get(code, str(code)), 0
        _, ready, _ = select.select([], [sock], [], wait)
        if not ready or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
            return "closed", 0
        try:
            sock.getpeername()
        except OSError:
            return "unconnected", 0  # writable, no error, and no peer: not a handshake
        return "open", sock.getsockname()[1]


def main() -> None:
    host, port, interval, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(
        sys.argv[4])
    print("probing", flush=True)
    wall = time.time()
    start = time.monotonic()
    opened: list[float] = []
    ports: list[int] = []
    failed: dict[str, list[float]] = {}
    sent = 0
    while (now := time.monotonic()) - start < duration:
        sent += 1
        found, local = probe(host, port, interval * 0.8)
        if found == "open":
            opened.append(round(now - start, 3))
            ports.append(local)
        elif found != "closed":
            failed.setdefault(found, []).append(round(now - start, 3))
        time.sleep(max(0.0, start + sent * interval - time.monotonic()))
    print(json.dumps({"sent": sent, "opened": opened, "ports": ports, "failed": failed,
                      "start": wall}), flush=True)


if __name__ == "__main__":
    main()
