"""How the dashboard's HTTP connections are held (issue 13, finding 5;
docs/threat-model.md, "Local users and the admin surfaces"): uvicorn's h11
protocol with the bound uvicorn lacks.

uvicorn (0.54, both its h11 and httptools protocols) times a connection out
only after a response, and its keep-alive timer stops at the first byte of a next request;
a request whose headers never end is held forever.  Its limit_concurrency
counts those connections too and answers 503 to every new request once the
limit is reached: 64 half-open connections shut the dashboard for everyone.

Invariants (spa.server.admission, on uvicorn's loop):
- At most MAX_CONNECTIONS connections; a new one sheds the longest-waiting
  connection that has no whole request yet (it is refused only while every
  held connection is being answered, which ends on its own).
- A connection has REQUEST_SECONDS from its opening, or from its last
  answer, to deliver a whole request (headers and body); bytes that trickle
  in do not extend it.  An idle keep-alive closes after IDLE_SECONDS.
- Headers longer than MAX_HEADER_BYTES are refused (400, h11).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from spa.server.surfaces import Admitter

# The browser's tabs through one ssh tunnel open a handful of connections
# each; past this the longest-waiting one is closed.
MAX_CONNECTIONS = 64
# A browser sends a request's headers and its small form at once; through an
# ssh tunnel over a poor link they can lag a few seconds, not ten.
REQUEST_SECONDS = 10
IDLE_SECONDS = 5  # a keep-alive connection with no next request (uvicorn's timer)
# h11's default: browsers send every cookie set for localhost, by any port.
MAX_HEADER_BYTES = 16 * 1024
BACKLOG = 64  # connections the kernel queues before uvicorn accepts them


def bounded_h11(admitter: Admitter) -> type[H11Protocol]:
    """uvicorn's h11 protocol, each connection admitted by `admitter`."""

    class Bounded(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            admitter.opened(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            admitter.lost(self.transport)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def _track(self) -> None:
            """Answering while a whole request is in hand and its answer not
            sent; otherwise waiting (its deadline unchanged if it already was)."""
            whole = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)
            if whole and self.cycle is not None and not self.cycle.response_complete:
                admitter.answering(self.transport)
            else:
                admitter.waiting(self.transport)

    return Bounded
