"""A member's two watch streams in any order (spa.group.member, "Across the
two streams nothing is ordered"): each stream keeps revision order, nothing
orders one against the other, and the member ends in the state the revision
order gives, whatever the interleaving.

The store is the memory fake; the member's watches are captured rather than
run, and the test hands them the events: the reference member in revision
order, the member under test in an interleaving hypothesis chooses."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spa.core.errors import Reason
from spa.core.keys import ClientKeys
from spa.core.policy import ClientPolicy
from spa.core.verify import Accepted
from spa.core.wire import IPAddress
from spa.group import layout
from spa.group.clients import client_record
from spa.group.delta import ClientDelta
from spa.group.kv import Event, in_range
from spa.group.member import GroupMember, watched
from spa.group.memory import MemoryStore
from spa.group.records import (
    Activation,
    Claim,
    GroupMeta,
    LeaseRecord,
    Revocation,
    encode_activation,
    encode_claim,
    encode_lease,
    encode_meta,
    encode_revocation,
)
from spa.server.config import ClientEntry
from tests.server_world import FakeClock

GROUP = "g1"
ME = "m1"
SERVER_ID = bytes(range(16))
NAMES = ("alice", "bob")
DUE = (1_900_000_000, 1_900_003_600)  # enroll_by values records and activations name
ADDRESS = ipaddress.ip_address("192.0.2.10")


@dataclass
class Daemon:
    """What a server holds after the member's hooks, as the daemon keeps it."""

    keys: dict[str, ClientKeys] = field(default_factory=dict)
    rules: dict[str, ClientPolicy] = field(default_factory=dict)
    otp: dict[str, str] = field(default_factory=dict)
    met: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    closed: list[str] = field(default_factory=list)
    leases: dict[tuple[str, IPAddress, str], LeaseRecord] = field(default_factory=dict)

    def apply_client_delta(self, delta: ClientDelta, origin: str) -> None:
        for key in delta.gone:
            self.keys.pop(key, None)
        self.keys.update(delta.keys)
        for name, rule in delta.rules.items():
            if rule is None:
                self.rules.pop(name, None)
            else:
                self.rules[name] = rule
            self.otp[name] = delta.otp.get(name, "")
        for names, now_in in ((self.met, delta.met), (self.pending, delta.pending)):
            names.difference_update(delta.names)
            names.update(now_in)
        self.closed += delta.closed

    def install_lease(self, lease: LeaseRecord) -> None:
        self.leases[(lease.client, lease.address, lease.service)] = lease

    def remove_lease(self, client: str, address: IPAddress, service: str) -> None:
        self.leases.pop((client, address, service), None)

    def confirm_restored(self, live: Collection[tuple[str, IPAddress, str]]) -> None:
        pass

    def grant_claimed(self, results: list[Accepted], now: float) -> None:
        raise AssertionError("no packets here")

    def refuse_claimed(self, result: Accepted, reason: Reason, now: float) -> None:
        raise AssertionError("no packets here")


class Captured:
    """The store as a member sees it, but its watches are kept, not run:
    the test delivers their events."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.watches: list[tuple[bytes, bytes, int, Callable[[Event], None]]] = []

    def get_prefix(self, prefix: bytes, on_page: Any = None) -> Any:
        return self.store.get_prefix(prefix, on_page)

    def get_prefixes(self, prefixes: Any, on_page: Any = None) -> Any:
        return self.store.get_prefixes(prefixes, on_page)

    def watch_range(self, start: bytes, end: bytes, start_revision: int,
                    callback: Callable[[Event], None]) -> Any:
        self.watches.append((start, end, start_revision, callback))
        return _Idle()


class _Idle:
    def cancel(self) -> None:
        pass

    def ended(self) -> None:
        return None


def _member(store: MemoryStore, clock: FakeClock) -> tuple[GroupMember, Daemon, Captured]:
    daemon = Daemon()
    kv = Captured(store)
    member = GroupMember(kv, group=GROUP, member=ME, server_id=SERVER_ID,  # type: ignore[arg-type]
                         hooks=daemon, clock=clock, log=lambda line: None)
    member.load()
    assert [(s, e) for s, e, _, _ in kv.watches] == list(watched(GROUP))
    return member, daemon, kv


def _state(member: GroupMember, daemon: Daemon) -> tuple[object, ...]:
    return (member._records, member._revoked, member._activated, member._remote,
            member._views, member._held, daemon.keys, daemon.rules, daemon.otp, daemon.met,
            daemon.pending, daemon.closed, daemon.leases)


# ---- what an admin and the members write ------------------------------------

_name = st.sampled_from(NAMES)
_ops = st.one_of(
    st.tuples(st.just("enroll"), _name, st.sampled_from((None, *DUE)), st.integers(0, 3)),
    st.tuples(st.just("unenroll"), _name),
    st.tuples(st.just("revoke"), _name, st.booleans()),
    st.tuples(st.just("unrevoke"), _name),
    st.tuples(st.just("activate"), _name, st.sampled_from(DUE)),
    st.tuples(st.just("deactivate"), _name),
    st.tuples(st.just("lease"), _name, st.sampled_from(("m2", ME)), st.integers(1, 3)),
    st.tuples(st.just("unlease"), _name),
    st.tuples(st.just("claim"), _name, st.integers(0, 255)),
)


def _write(store: MemoryStore, op: tuple[Any, ...], now: float) -> None:
    what, name = op[0], op[1]
    if what == "enroll":
        due = "" if op[2] is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(op[2]))
        entry = ClientEntry(name, bytes([op[3]]) * 32, ("ssh",), enroll_by=due)
        store.put(layout.client_key(GROUP, name).encode(), client_record(entry, SERVER_ID))
    elif what == "unenroll":
        store.delete(layout.client_key(GROUP, name).encode())
    elif what == "revoke":
        store.put(layout.revoked_key(GROUP, name).encode(),
                  encode_revocation(Revocation(name, int(now), op[2])))
    elif what == "unrevoke":
        store.delete(layout.revoked_key(GROUP, name).encode())
    elif what == "activate":
        store.put(layout.activated_key(GROUP, name).encode(),
                  encode_activation(Activation(name, op[2])))
    elif what == "deactivate":
        store.delete(layout.activated_key(GROUP, name).encode())
    elif what == "lease":
        record = LeaseRecord(name, ADDRESS, "ssh", "tcp", 22, now + 60 * op[3], op[2])
        store.put(layout.lease_key(GROUP, name, ADDRESS, "ssh").encode(), encode_lease(record))
    elif what == "unlease":
        store.delete(layout.lease_key(GROUP, name, ADDRESS, "ssh").encode())
    else:
        store.create(layout.claim_key(GROUP, name, bytes([op[2]]) * 24).encode(),
                     encode_claim(Claim("m2", now)))


def _interleave(first: list[Event], second: list[Event], schedule: list[bool]) -> list[Event]:
    """Both streams merged, each in its own order, the schedule choosing
    which gives the next event (what is left after it: the rest in order)."""
    a, b, out = iter(first), iter(second), []
    left = [len(first), len(second)]
    for take_first in schedule:
        if take_first and left[0]:
            out.append(next(a))
            left[0] -= 1
        elif left[1]:
            out.append(next(b))
            left[1] -= 1
    return out + list(a) + list(b)


@given(before=st.lists(_ops, max_size=6), after=st.lists(_ops, min_size=1, max_size=30),
       schedule=st.lists(st.booleans(), max_size=60))
def test_any_interleaving_of_the_two_streams_ends_in_the_revision_orders_state(
        before: list[tuple[Any, ...]], after: list[tuple[Any, ...]],
        schedule: list[bool]) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    store.put(layout.meta_key(GROUP).encode(),
              encode_meta(GroupMeta(GROUP, SERVER_ID, int(clock.now))))
    for op in before:  # what both members read at start
        _write(store, op, clock.now)
    reference, ref_daemon, ref_kv = _member(store, clock)
    tested, daemon, kv = _member(store, clock)
    history: list[Event] = []
    store.watch_prefix(layout.group_prefix(GROUP).encode(), store.revision + 1, history.append)
    for op in after:
        _write(store, op, clock.now)
    streams: list[list[Event]] = [[], []]
    for event in history:
        where = [i for i, (s, e, _, _) in enumerate(kv.watches) if in_range(event.key, s, e)]
        assert len(where) <= 1  # the ranges do not overlap
        if where:
            streams[where[0]].append(event)
        else:
            assert b"/claims/" in event.key  # only the claims are left out
    for event in history:  # the reference: every watched event in revision order
        for start, end, _, callback in ref_kv.watches:
            if in_range(event.key, start, end):
                callback(event)
    index = {id(e): i for i, stream in enumerate(streams) for e in stream}
    for event in _interleave(streams[0], streams[1], schedule):
        kv.watches[index[id(event)]][3](event)
    assert _state(tested, daemon) == _state(reference, ref_daemon)
    # and the revision order's state is the one a fresh read gives
    fresh, fresh_daemon, _ = _member(store, clock)
    assert (fresh._records, fresh._revoked, fresh._activated, fresh._remote, fresh._views) == (
        reference._records, reference._revoked, reference._activated, reference._remote,
        reference._views)
    assert fresh_daemon.rules == ref_daemon.rules and fresh_daemon.met == ref_daemon.met


def test_a_stale_activation_arriving_after_a_new_enrollment_does_not_make_it_met() -> None:
    """The case the ordering argument leans on, by hand: the record of a
    new enrollment (second stream) before the old activation's deletion
    (first stream)."""
    clock = FakeClock()
    store = MemoryStore(clock)
    store.put(layout.meta_key(GROUP).encode(),
              encode_meta(GroupMeta(GROUP, SERVER_ID, int(clock.now))))
    _write(store, ("enroll", "alice", DUE[0], 1), clock.now)
    _write(store, ("activate", "alice", DUE[0]), clock.now)
    member, daemon, kv = _member(store, clock)
    assert daemon.met == {"alice"}
    history: list[Event] = []
    store.watch_prefix(layout.group_prefix(GROUP).encode(), store.revision + 1, history.append)
    _write(store, ("deactivate", "alice"), clock.now)  # first stream
    _write(store, ("enroll", "alice", DUE[1], 2), clock.now)  # second stream
    deletion, record = history
    kv.watches[1][3](record)  # the new record first: pending, the old activation not its
    assert daemon.met == set() and daemon.pending == {"alice"}
    kv.watches[0][3](deletion)
    assert daemon.met == set() and daemon.pending == {"alice"}
    assert member._activated == {}
