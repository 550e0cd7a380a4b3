"""Which connections an admin surface (the metrics endpoint, the dashboard)
keeps, and when it closes one (issue 13, finding 5; docs/threat-model.md,
"Local users and the admin surfaces").  No I/O: the server passes the time
in and closes what this returns.

Invariants:
- At most `limit` connections are held.  A new one sheds the connection
  that has waited longest for its request; only when every held connection
  has a whole request in hand (the server is working for it, and that ends on
  its own) is the newcomer refused instead.  Holding connections open cannot
  keep a newcomer out: it only shortens how long each of them may wait.
- A connection waits for a whole request (headers, and body if any) at most
  `request_seconds` from the moment it began waiting (opened, or its last
  response sent).  Bytes that arrive meanwhile do not extend it: a
  slowloris, a half-open request and an idle keep-alive are one case.
- `due(now)` returns each waiting connection past its deadline, oldest first.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Admission(Generic[K]):
    def __init__(self, limit: int, request_seconds: float) -> None:
        if limit < 1 or request_seconds <= 0:
            raise ValueError("limit and request_seconds must be positive")
        self.limit = limit
        self.request_seconds = request_seconds
        # waiting connection -> its deadline, oldest first (insertion order;
        # every deadline is its start plus the same request_seconds)
        self._waiting: dict[K, float] = {}
        self._busy: set[K] = set()

    def __len__(self) -> int:
        return len(self._waiting) + len(self._busy)

    def held(self) -> list[K]:
        return [*self._waiting, *self._busy]

    def open(self, key: K, now: float) -> list[K]:
        """Admit `key`, waiting for its request.  Returns the connections to
        close now: the longest-waiting one if there was no room, or `key`
        itself if every held connection is busy (then it is not admitted)."""
        shed: list[K] = []
        if len(self) >= self.limit:
            if not self._waiting:
                return [key]
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            shed.append(oldest)
        self._waiting[key] = now + self.request_seconds
        return shed

    def busy(self, key: K) -> None:
        """`key` has a whole request: no deadline while the server answers."""
        if self._waiting.pop(key, None) is not None:
            self._busy.add(key)

    def wait(self, key: K, now: float) -> None:
        """`key` waits for a (next) request.  A connection already waiting
        keeps its deadline."""
        if key in self._busy:
            self._busy.discard(key)
            self._waiting[key] = now + self.request_seconds

    def close(self, key: K) -> None:
        """`key` is gone (closed by either side); idempotent."""
        self._waiting.pop(key, None)
        self._busy.discard(key)

    def due(self, now: float) -> list[K]:
        """The waiting connections past their deadline, oldest first; they
        are forgotten here, the caller closes them."""
        late = []
        for key, deadline in self._waiting.items():
            if deadline > now:
                break
            late.append(key)
        for key in late:
            del self._waiting[key]
        return late
