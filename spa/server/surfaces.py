"""The I/O edge of an admin surface's connection bound (issue 13, finding 5):
an Admission (spa.server.admission) driven by an asyncio loop, closing the
transports it sheds or finds late; and the listening socket both surfaces
bind the same way.

Invariants:
- Every transport is admitted when its connection is made and forgotten when
  it is lost; the loop checks deadlines every SWEEP_SECONDS, so a late
  connection is closed at most that long after its deadline.
- Closing is an abort: nothing buffered for a connection that is shed or
  late is worth waiting for (its peer stopped reading or never asked).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from spa.server.admission import Admission

SWEEP_SECONDS = 0.5  # deadline checks: late connections go within this of their deadline


class Admitter:
    """An Admission of transports on the running asyncio loop."""

    def __init__(self, limit: int, request_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admission: Admission[asyncio.Transport] = Admission(limit, request_seconds)
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, transport: asyncio.Transport) -> bool:
        """Admit a new connection, closing whom it sheds.  False: refused
        (every held connection is being answered) and closed."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        shed = self.admission.open(transport, self._clock())
        for other in shed:
            other.abort()
        return transport not in shed

    def answering(self, transport: asyncio.Transport) -> None:
        self.admission.busy(transport)

    def waiting(self, transport: asyncio.Transport) -> None:
        self.admission.wait(transport, self._clock())

    def lost(self, transport: asyncio.Transport) -> None:
        self.admission.close(transport)

    def close_all(self) -> None:
        """Stop checking deadlines and close every held connection."""
        if self._timer is not None:
            self._timer.cancel()
        for transport in self.admission.held():
            transport.abort()

    def _sweep(self) -> None:
        for late in self.admission.due(self._clock()):
            late.abort()
        self._timer = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)


def listen_socket(listen: str, backlog: int) -> socket.socket:
    """A TCP socket listening at HOST:PORT ([v6] in brackets).  Raises OSError."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
