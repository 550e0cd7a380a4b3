"""etcd leases shared by the keys that must live about as long: one lease per
second of expiry, granted on first use, reused by every claim and lease
record that needs an end within that second (docs/groups.md, "Claims").

Invariants:
- A key attached to the lease `lease(end, now, grant)` gives never expires
  before `end`, and outlives it by less than 2 s: the lease is its second's,
  ceil(end) (`end` may lie up to 1 s before it), granted for
  ceil(ceil(end) - now) whole seconds, so it expires in [ceil(end),
  ceil(end) + 1).  (More only where etcd raises a short TTL to its minimum,
  which is harmless.)  Expiries are counted from the `now` read before the
  grant was asked, so etcd's own count, which starts when it grants, only
  ever ends later.
- One grant per second of ends, however many keys: while claims arrive, their
  ends sweep through each second once.
- `now` is a monotonic clock's: a step of the wall clock cannot make a key
  expire early.  Buckets whose second has passed are forgotten at each call.
- A lease etcd says is gone (LeaseExpiredError on a write) is dropped by the
  caller (`drop`), and the next call for its second grants a fresh one.
- No I/O of its own: the grant is the caller's function, called outside the
  pool's lock, so a slow etcd holds up no other thread's lookups.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from spa.group.records import MAX_TTL

# seconds: a key outlives the end it was attached for by less than this (the
# lease is its end's second's, ceil(end), granted for whole seconds): the
# invariant above, for the tests that wait a key's whole lifetime out
OUTLIVES_BY = 2


class LeasePool:
    """Leases by the second they serve (the caller's monotonic clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[int, int] = {}  # second (ceil of the ends it serves) -> lease
        self.granted = 0  # leases granted so far (for figures and tests)

    def __len__(self) -> int:
        return len(self._buckets)

    def lease(self, end: float, now: float, grant: Callable[[int], int]) -> int:
        """The lease of the second `end` falls in (ceil(end)), granted now for
        ceil(ceil(end) - now) seconds (at least 1) by grant(ttl) if the pool
        holds none.  Raises what grant raises; ValueError for a time that is
        not finite or an end past etcd's longest lease."""
        if not (math.isfinite(end) and math.isfinite(now)):
            raise ValueError("a lease needs finite times")
        bucket = math.ceil(max(end, now))  # an end already past: the current second's
        with self._lock:
            self._forget(now)
            found = self._buckets.get(bucket)
        if found is not None:
            return found
        ttl = max(1, math.ceil(bucket - now))
        if ttl > MAX_TTL:
            raise ValueError(f"a TTL is at most {MAX_TTL} seconds (etcd's longest lease)")
        lease = grant(ttl)
        with self._lock:
            self.granted += 1
            # two threads that granted for one second at once: the later one's
            # is kept, the other's keys still end on time with their own lease
            self._buckets[bucket] = lease
        return lease

    def drop(self, lease: int) -> None:
        """Forget a lease (etcd says it is gone): its second grants anew."""
        with self._lock:
            for bucket in [b for b, held in self._buckets.items() if held == lease]:
                del self._buckets[bucket]

    def _forget(self, now: float) -> None:
        if self._buckets and min(self._buckets) <= now:
            for bucket in [b for b in self._buckets if b <= now]:
                del self._buckets[bucket]
