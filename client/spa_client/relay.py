"""`spa-client connect`: relay standard input and output to a TCP connection,
so that ssh can use the client as its ProxyCommand.

Invariants:
- Bytes pass unchanged in both directions; standard output carries nothing
  else (every message of ours goes to standard error).
- End of input half-closes the connection (shutdown for writing) and keeps
  reading until the server closes; the server closing ends the relay.
"""

from __future__ import annotations

import os
import selectors
import socket

CHUNK = 65536


def relay(sock: socket.socket, stdin_fd: int, stdout_fd: int) -> None:
    """Copy stdin -> sock and sock -> stdout until the server closes."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin_fd, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    _write_all(stdout_fd, data)
                else:
                    data = os.read(stdin_fd, CHUNK)
                    if data:
                        sock.sendall(data)
                    else:
                        selector.unregister(stdin_fd)
                        sock.shutdown(socket.SHUT_WR)
    finally:
        selector.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
