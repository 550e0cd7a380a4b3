"""An attacker's probe: try a new TCP connection to HOST PORT every INTERVAL
seconds for DURATION seconds; print one JSON line: how many handshakes
completed, and when (seconds from the start).  Run inside a namespace."""

from __future__ import annotations

import json
import select
import socket
import sys
import time


def probe(host: str, port: int, wait: float) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        sock.connect_ex((host, port))
        _, ready, _ = select.select([], [sock], [], wait)
        return bool(ready) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def main() -> None:
    host, port, interval, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(
        sys.argv[4])
    print("probing", flush=True)
    start = time.monotonic()
    opened: list[float] = []
    sent = 0
    while (now := time.monotonic()) - start < duration:
        sent += 1
        if probe(host, port, interval * 0.8):
            opened.append(round(now - start, 3))
        time.sleep(max(0.0, start + sent * interval - time.monotonic()))
    print(json.dumps({"sent": sent, "opened": opened}), flush=True)


if __name__ == "__main__":
    main()
