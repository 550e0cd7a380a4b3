"""The in-memory fake of kv.KV: one process, no I/O, leases timed by a
clock argument (STYLE 2 and 5).

It keeps etcd's semantics where a group can see them: one revision counter
for the whole store (1 when empty, +1 per change), create-if-absent,
leases whose keys vanish when the clock passes their TTL (checked at every
operation, as etcd's lessor would have by then), watches that replay from
a start revision, and a prefix-restricted view standing in for etcd's RBAC.
`unreachable = True` makes every operation raise StoreUnavailableError, as a
store without quorum does.  The contract suite keeps it honest against etcd.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spa.group.kv import (
    Delete,
    Event,
    EventKind,
    Item,
    LeaseExpiredError,
    PageCallback,
    Put,
    StorePermissionError,
    StoreUnavailableError,
    WatchLostError,
    check_batch,
    check_prefixes,
    in_range,
    prefix_end,
)


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[bytes] = field(default_factory=set)


@dataclass(eq=False)
class _Watch:
    store: MemoryStore
    start: bytes
    end: bytes  # [start, end), b"\0": no end
    callback: Callable[[Event], None]
    lost: WatchLostError | None = None

    def covers(self, key: bytes) -> bool:
        return in_range(key, self.start, self.end)

    def cancel(self) -> None:
        with self.store._lock:
            if self in self.store._watches:
                self.store._watches.remove(self)

    def ended(self) -> WatchLostError | None:
        return self.lost

    def _give(self, event: Event) -> None:
        if self.lost is not None:
            return
        try:
            self.callback(event)
        except Exception as e:
            self.cancel()
            self.lost = WatchLostError(f"the watch on {self.start!r} ended: its callback "
                                       f"raised {type(e).__name__}")


class MemoryStore:
    """kv.KV in memory.  `clock` returns seconds (monotonic)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._items: dict[bytes, Item] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(7_000_000_000_000_000_001)
        self._history: list[Event] = []
        self._watches: list[_Watch] = []
        self._delivered = 0  # events of _history already handed to watches
        self._compacted = 0  # revisions below this one are gone from _history
        self.revision = 1
        self.unreachable = False

    # -- the interface -----------------------------------------------------

    def get(self, key: bytes) -> Item | None:
        with self._lock:
            self._check()
            return self._items.get(key)

    def get_prefix(self, prefix: bytes, on_page: PageCallback | None = None
                   ) -> tuple[list[Item], int]:
        return self._snapshot((prefix,), on_page)

    def get_prefixes(self, prefixes: Sequence[bytes], on_page: PageCallback | None = None
                     ) -> tuple[list[Item], int]:
        check_prefixes(prefixes)
        return self._snapshot(tuple(prefixes), on_page)

    def _snapshot(self, starts: tuple[bytes, ...], on_page: PageCallback | None
                  ) -> tuple[list[Item], int]:
        """Every key under any of `starts`, in key order, and the revision."""
        with self._lock:
            self._check()
            found = [self._items[k] for k in sorted(self._items) if k.startswith(starts)]
            revision = self.revision
        if on_page is not None:
            on_page(found)  # one part: the whole snapshot
        return found, revision

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        with self._lock:
            self._check()
            self._set(key, value, lease)
            events = self._drain()
        self._deliver(events)
        return self.revision

    def delete(self, key: bytes) -> bool:
        with self._lock:
            self._check()
            existed = key in self._items
            if existed:
                self._remove(key)
            events = self._drain()
        self._deliver(events)
        return existed

    def create(self, key: bytes, value: bytes, lease: int = 0) -> bool:
        with self._lock:
            self._check()
            if key in self._items:
                return False
            self._set(key, value, lease)
            events = self._drain()
        self._deliver(events)
        return True

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        check_batch(creates, writes)
        with self._lock:
            self._check()
            found = frozenset(op.key for op in creates if op.key in self._items)
            if found:
                return found
            for op in (*creates, *writes):  # etcd checks every lease before it writes
                if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                    raise LeaseExpiredError(f"lease {op.lease:x} has expired or was revoked")
            self.revision += 1  # one revision for the whole transaction, as etcd's
            for op in (*creates, *writes):
                if isinstance(op, Put):
                    self._set(op.key, op.value, op.lease, bump=False)
                elif op.key in self._items:
                    self._remove(op.key, bump=False)
            events = self._drain()
        self._deliver(events)
        return frozenset()

    def grant(self, ttl: int) -> int:
        with self._lock:
            self._check()
            lease = next(self._lease_ids)
            self._leases[lease] = _Lease(ttl, self._clock() + ttl)
            return lease

    def keep_alive(self, lease: int) -> int:
        with self._lock:
            self._check()
            held = self._leases.get(lease)
            if held is None:
                raise LeaseExpiredError(f"lease {lease:x} has expired or was revoked")
            held.expires = self._clock() + held.ttl
            return held.ttl

    def revoke(self, lease: int) -> None:
        with self._lock:
            self._check()
            self._end_lease(lease)
            events = self._drain()
        self._deliver(events)

    def watch_prefix(self, prefix: bytes, start_revision: int,
                     callback: Callable[[Event], None]) -> _Watch:
        return self.watch_range(prefix, prefix_end(prefix), start_revision, callback)

    def watch_range(self, start: bytes, end: bytes, start_revision: int,
                    callback: Callable[[Event], None]) -> _Watch:
        _check_range(start, end)
        with self._lock:
            self._check()
            watch = _Watch(self, start, end, callback)
            if start_revision < self._compacted:
                watch.lost = WatchLostError(f"revision {start_revision} has been compacted "
                                            f"(the oldest kept is {self._compacted})")
                return watch
            past = [e for e in self._history
                    if e.mod_revision >= start_revision and watch.covers(e.key)]
            self._watches.append(watch)
        for event in past:
            watch._give(event)
        return watch

    # -- for tests ---------------------------------------------------------

    def compact(self, revision: int) -> None:
        """Forget the history below revision, as etcd's compaction (by the
        admin or its auto-compaction) does."""
        with self._lock:
            self._compacted = max(self._compacted, revision)

    def restricted(self, prefix: bytes) -> RestrictedView:
        """A view that may touch keys under prefix only, as an etcd user
        whose role grants readwrite on that prefix."""
        return RestrictedView(self, prefix)

    # -- inside ------------------------------------------------------------

    def _check(self) -> None:
        if self.unreachable:
            raise StoreUnavailableError("the store is unreachable (simulated: no quorum)")
        now = self._clock()
        for lease in [k for k, v in self._leases.items() if v.expires <= now]:
            self._end_lease(lease)

    def _set(self, key: bytes, value: bytes, lease: int, *, bump: bool = True) -> None:
        if lease and lease not in self._leases:
            raise LeaseExpiredError(f"lease {lease:x} has expired or was revoked")
        old = self._items.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self.revision += bump
        self._items[key] = Item(key, value, self.revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._history.append(Event(EventKind.PUT, key, value, self.revision))

    def _remove(self, key: bytes, *, bump: bool = True) -> None:
        del self._items[key]
        self.revision += bump
        self._history.append(Event(EventKind.DELETE, key, b"", self.revision))

    def _end_lease(self, lease: int) -> None:
        held = self._leases.pop(lease, None)
        if held is None:
            return
        for key in sorted(held.keys):  # etcd deletes a lease's keys in one revision;
            if key in self._items:     # here one each: a watch sees the same deletes
                self._remove(key)

    def _drain(self) -> list[tuple[_Watch, Event]]:
        fresh = self._history[self._delivered:]
        self._delivered = len(self._history)
        return [(w, e) for e in fresh for w in self._watches if w.covers(e.key)]

    @staticmethod
    def _deliver(events: list[tuple[_Watch, Event]]) -> None:
        for watch, event in events:
            watch._give(event)


class RestrictedView:
    """MemoryStore seen by a member whose role covers one prefix."""

    def __init__(self, store: MemoryStore, prefix: bytes) -> None:
        self._store = store
        self._prefix = prefix

    def _allow(self, key: bytes) -> None:
        if not key.startswith(self._prefix):
            raise StorePermissionError("permission denied: the key is outside this member's "
                                        "group prefix")

    def get(self, key: bytes) -> Item | None:
        self._allow(key)
        return self._store.get(key)

    def get_prefix(self, prefix: bytes, on_page: PageCallback | None = None
                   ) -> tuple[list[Item], int]:
        self._allow(prefix)
        return self._store.get_prefix(prefix, on_page)

    def get_prefixes(self, prefixes: Sequence[bytes], on_page: PageCallback | None = None
                     ) -> tuple[list[Item], int]:
        for prefix in prefixes:
            self._allow(prefix)
        return self._store.get_prefixes(prefixes, on_page)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        self._allow(key)
        return self._store.put(key, value, lease)

    def delete(self, key: bytes) -> bool:
        self._allow(key)
        return self._store.delete(key)

    def create(self, key: bytes, value: bytes, lease: int = 0) -> bool:
        self._allow(key)
        return self._store.create(key, value, lease)

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        for op in (*creates, *writes):
            self._allow(op.key)
        return self._store.create_many(creates, writes)

    def grant(self, ttl: int) -> int:
        return self._store.grant(ttl)

    def keep_alive(self, lease: int) -> int:
        return self._store.keep_alive(lease)

    def revoke(self, lease: int) -> None:
        self._store.revoke(lease)

    def watch_prefix(self, prefix: bytes, start_revision: int,
                     callback: Callable[[Event], None]) -> _Watch:
        self._allow(prefix)
        return self._store.watch_prefix(prefix, start_revision, callback)

    def watch_range(self, start: bytes, end: bytes, start_revision: int,
                    callback: Callable[[Event], None]) -> _Watch:
        _check_range(start, end)
        self._allow(start)
        if end == b"\0" or end > prefix_end(self._prefix):
            raise StorePermissionError("permission denied: the range reaches past this "
                                        "member's group prefix")
        return self._store.watch_range(start, end, start_revision, callback)


def _check_range(start: bytes, end: bytes) -> None:
    if end != b"\0" and end <= start:
        raise ValueError("a watch's range must end after its start")
