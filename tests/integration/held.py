"""What a local user can hold open against an admin surface (issue 13,
finding 5): idle connections, half-open requests whose headers never end,
and a slowloris that trickles header bytes; and how to see, from outside,
which of them the server still holds."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

ESTABLISHED, LISTEN = "01", "0A"  # the st column of /proc/net/tcp
PACE = 16  # connections opened between looks at the server's accept queue (its backlog: 64)


def established(port: int) -> int:
    """Connections the server on 127.0.0.1:`port` holds open (its side of
    each, from the kernel's table: a connection it closed is no longer
    ESTABLISHED on its side, whatever the client does)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, state = line.split()[1], line.split()[3]
            if int(local.rpartition(":")[2], 16) == port and state == ESTABLISHED:
                count += 1
    return count


def unaccepted(port: int) -> int:
    """Connections the kernel made for the listener on 127.0.0.1:`port` that
    its server has not accepted yet (the rx_queue of its LISTEN row)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                return int(fields[4].partition(":")[2], 16)
    return 0


def hold(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """`count` connections that send `first_bytes` (nothing: idle) and stop.

    Opened no faster than the server accepts them: with its backlog full the
    kernel drops the next SYN and the connect sends it again a second later
    (a second per 65 connections, spent for nothing; the server meets the
    same connections either way)."""
    held = []
    for i in range(count):
        if i % PACE == 0:
            deadline = time.monotonic() + 1
            while unaccepted(port) >= PACE and time.monotonic() < deadline:
                time.sleep(0.001)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first_bytes:
            sock.sendall(first_bytes)
        held.append(sock)
    return held


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed this connection (EOF or reset is waiting), now."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except OSError:
        return True
    return False


def still_held(held: list[socket.socket]) -> int:
    return sum(not closed_by_server(sock) for sock in held)


@contextmanager
def slowloris(port: int, count: int, path: bytes = b"/") -> Iterator[list[socket.socket]]:
    """`count` connections that send one more header line every 0.2 s, never
    the blank line that ends them, until the server closes them."""
    held = hold(port, count, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stop = threading.Event()

    def trickle() -> None:
        n = 0
        while not stop.wait(0.2):
            n += 1
            for sock in held:
                with suppress(OSError):
                    sock.send(f"X-{n}: y\r\n".encode())

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join()
        for sock in held:
            sock.close()


def wait_closed(held: list[socket.socket], timeout: float) -> int:
    """How many of `held` the server still holds after at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while still_held(held) and time.monotonic() < deadline:
        time.sleep(0.1)
    return still_held(held)
