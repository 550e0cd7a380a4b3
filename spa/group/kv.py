"""The key-value store a group needs, as an interface: exactly the etcd v3
operations the group uses, and nothing of any client library.

Invariants:
- Keys and values are bytes; revisions and lease ids are ints as etcd gives
  them.  `create` is etcd's create-if-absent transaction: of any number of
  callers racing on one key, exactly one is told it claimed it.
  `create_many` is the same for a batch, in one transaction: either every
  key was absent and all of them (and the writes that go with them) are set,
  or nothing changes and the caller learns which keys were there; of callers
  racing on overlapping batches, each key is claimed by exactly one.
- Every failure is a StoreError.  StoreUnavailableError means the store could not
  answer in time (no endpoint reachable, or no quorum behind it): the caller
  may retry later and must not take it as an answer.  StorePermissionError
  means the store answered no (etcd's RBAC: a member reads only its group's
  prefix).  Messages never contain a credential.
- A watch delivers each change under its prefix once, in revision order, from
  the revision it was started at, across reconnections, until cancelled; or
  it ends by itself (ended() says why: WatchLostError) when that revision has
  been compacted away or its callback raised, never skipping an event.

Implementations: memory.MemoryStore (the fake, a clock argument for lease
TTLs) and etcd.EtcdStore (etcd's JSON gateway through etcd3gw).  One contract
suite, tests/unit/test_group_kv_contract.py, runs against both.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# etcd's --max-txn-ops (default 128): the most compares, and the most
# operations in either branch, one transaction may hold (each counted apart)
MAX_TXN_OPS = 128


class StoreError(Exception):
    """The store refused or failed an operation."""


class StoreUnavailableError(StoreError):
    """No answer in time: no endpoint reachable, or no quorum behind it."""


class StorePermissionError(StoreError):
    """The store's access control refused this member the key or prefix."""


class LeaseExpiredError(StoreError):
    """The lease is gone (expired or revoked); keys attached to it are too."""


class WatchLostError(StoreError):
    """A watch ended by itself: the revision it needed was compacted away,
    or its callback raised.  Read the prefix again and watch anew."""


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Item:
    """A key as stored: its value, the revision that last changed it, and
    its lease (0: none)."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch (value is b"" for a delete)."""

    kind: EventKind
    key: bytes
    value: bytes
    mod_revision: int


PageCallback = Callable[[list[Item]], None]


@dataclass(frozen=True, slots=True)
class Put:
    """Set key to value (attached to lease if not 0), inside a transaction."""

    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove key (if there), inside a transaction."""

    key: bytes


def check_batch(creates: Sequence[Put], writes: Sequence[Put | Delete]) -> None:
    """What every store refuses in create_many, as etcd would: more than
    MAX_TXN_OPS compares or operations, a key written twice.  Raises ValueError."""
    if not creates:
        raise ValueError("create_many needs at least one key to create")
    if len(creates) + len(writes) > MAX_TXN_OPS:
        raise ValueError(f"a transaction holds at most {MAX_TXN_OPS} operations "
                         f"(etcd's --max-txn-ops), not {len(creates) + len(writes)}")
    keys = [op.key for op in creates] + [op.key for op in writes]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is written twice in one transaction (etcd refuses it)")


def check_prefixes(prefixes: Sequence[bytes]) -> None:
    """Raise ValueError unless `prefixes` is at least one prefix and none is
    under another (get_prefixes would give such a key twice)."""
    if not prefixes:
        raise ValueError("get_prefixes needs at least one prefix")
    for a in prefixes:
        for b in prefixes:
            if a is not b and b.startswith(a):
                raise ValueError(f"prefix {b[:40]!r} is under {a[:40]!r}")


class Watch(Protocol):
    def cancel(self) -> None:
        """Stop delivering; returns once no callback runs any more."""

    def ended(self) -> WatchLostError | None:
        """Why the watch stopped by itself; None while it runs (or once
        cancelled)."""


class KV(Protocol):
    """What a group member asks of its store.  Every method raises
    StoreUnavailableError or StorePermissionError (both StoreError)."""

    def get(self, key: bytes) -> Item | None:
        """The key, or None if absent."""

    def get_prefix(self, prefix: bytes, on_page: PageCallback | None = None
                   ) -> tuple[list[Item], int]:
        """Every key under prefix, in key order, and the store's revision at
        the read (watch from revision + 1 to miss nothing).  `on_page`, if
        given, is called on the caller's thread with each part of the items
        as it arrives, while the store fetches the next (the member decodes
        there); a read started again after a compaction gives its parts again,
        so what on_page made of an item is for that key at that mod_revision,
        and the returned list is the snapshot."""

    def get_prefixes(self, prefixes: Sequence[bytes], on_page: PageCallback | None = None
                     ) -> tuple[list[Item], int]:
        """Every key under any of `prefixes` (none a prefix of another), in
        key order, all read at one revision, and that revision (watch from
        revision + 1): get_prefix of each kind a reader needs, one snapshot,
        without the kinds it does not (a member's start skips claims/).
        `on_page` as in get_prefix.  Raises ValueError for no prefix or one
        under another."""

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Set the key (attached to lease if not 0); the new revision.
        Raises LeaseExpiredError if the lease is gone."""

    def delete(self, key: bytes) -> bool:
        """Remove the key; whether it existed."""

    def create(self, key: bytes, value: bytes, lease: int = 0) -> bool:
        """Set the key only if absent, atomically: True if this call claimed
        it.  Raises LeaseExpiredError if the lease is gone."""

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        """One transaction: if no key of `creates` exists, set them all and
        apply `writes` too, and return the empty set; else change nothing and
        return the keys of `creates` that exist.  Raises ValueError (see
        check_batch), LeaseExpiredError if a lease named is gone (nothing
        changed)."""

    def grant(self, ttl: int) -> int:
        """A new lease of ttl seconds; its id."""

    def keep_alive(self, lease: int) -> int:
        """Renew the lease to its full TTL; the TTL.  Raises LeaseExpiredError."""

    def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys (no error if already gone)."""

    def watch_prefix(self, prefix: bytes, start_revision: int,
                     callback: Callable[[Event], None]) -> Watch:
        """Deliver every change under prefix from start_revision on, to
        callback (from another thread in the real store)."""

    def watch_range(self, start: bytes, end: bytes, start_revision: int,
                    callback: Callable[[Event], None]) -> Watch:
        """Deliver every change of a key in [start, end) from start_revision
        on, to callback, as watch_prefix does.  Raises ValueError if end is
        not after start."""


def prefix_end(prefix: bytes) -> bytes:
    """The end that makes [prefix, end) every key under prefix (etcd's
    range_end; b"\\0" for an empty or all-0xff prefix: to the last key)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """Whether key is in [start, end), end b"\\0" meaning no end (etcd's)."""
    return key >= start and (end == b"\0" or key < end)
