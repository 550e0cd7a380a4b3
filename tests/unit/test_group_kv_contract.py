"""One contract for kv.KV, run against the in-memory fake and a real etcd
cluster (three members in network namespaces, TLS and RBAC: tests/etcd_world.py),
so the fake cannot drift from etcd."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from spa.group.etcd import READ_ATTEMPTS, EtcdAccess, EtcdStore
from spa.group.kv import (
    KV,
    MAX_TXN_OPS,
    Delete,
    Event,
    EventKind,
    Item,
    LeaseExpiredError,
    Put,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
    WatchLostError,
)
from spa.group.memory import MemoryStore
from tests.etcd_world import EtcdCluster

PAGE = 4  # keys a page of the paged store holds: the tests write more


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    kv: KV  # a member of group a
    prefix: bytes  # fresh, under group a's prefix
    other: bytes  # under group b's prefix: not this member's
    broken: Callable[[], KV]  # a store that cannot reach quorum
    pass_time: Callable[[float], None]
    compact: Callable[[int], None]  # forget the history below a revision
    real: bool
    paged: KV  # the same member, reading a prefix in pages of PAGE keys (etcd)
    another: Callable[[], KV]  # a second member of group a (its own connection)

    def until(self, check: Callable[[], bool], seconds: float = 10) -> bool:
        """check() is true now (the fake), or becomes true within seconds
        (the real store's watch thread, its lessor)."""
        deadline = time.monotonic() + (seconds if self.real else 0)
        while not check():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True


def _fake() -> Harness:
    clock = FakeClock()
    store = MemoryStore(clock)

    def advance(seconds: float) -> None:
        clock.now += seconds

    def broken() -> KV:
        dead = MemoryStore(clock)
        dead.unreachable = True
        return dead
    view = store.restricted(b"/spa/groups/a/")
    return Harness(view, _fresh(b"a"), _fresh(b"b"), broken, advance, store.compact,
                   real=False, paged=view,
                   another=lambda: store.restricted(b"/spa/groups/a/"))


def _real(cluster: EtcdCluster) -> Harness:
    def broken() -> KV:  # members that are not there: nothing listens on 2399
        access = cluster.access("a", timeout=1.0)
        nowhere = tuple(e.replace(":2379", ":2399") for e in access.endpoints)
        return EtcdStore(EtcdAccess(nowhere, access.ca_file, access.cert_file,
                                    access.key_file, access.user, access.password, 1.0))
    def compact(revision: int) -> None:  # root's work: members may not compact
        cluster.ctl("compaction", str(revision))
    return Harness(cluster.store("a"), _fresh(b"a"), _fresh(b"b"), broken, time.sleep,
                   compact, real=True, paged=EtcdStore(cluster.access("a"), page_keys=PAGE),
                   another=lambda: cluster.store("a"))


def _fresh(group: bytes) -> bytes:
    return b"/spa/groups/" + group + b"/t-" + uuid.uuid4().hex[:12].encode() + b"/"


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.netns)])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "memory":
        yield _fake()
        return
    cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
    with cluster.inside():
        yield _real(cluster)


def test_put_then_get_gives_the_value_at_the_new_revision(h: Harness) -> None:
    key = h.prefix + b"k"
    assert h.kv.get(key) is None
    first = h.kv.put(key, b"one")
    second = h.kv.put(key, b"two")
    assert second > first
    item = h.kv.get(key)
    assert item is not None
    assert (item.key, item.value, item.mod_revision, item.lease) == (key, b"two", second, 0)


def test_get_prefix_lists_only_the_prefix_in_key_order(h: Harness) -> None:
    for name in (b"c", b"a", b"b"):
        h.kv.put(h.prefix + name, name * 2)
    last = h.kv.put(h.prefix[:-1] + b"x/sibling", b"not under the prefix")
    items, revision = h.kv.get_prefix(h.prefix)
    assert [(i.key, i.value) for i in items] == [
        (h.prefix + b"a", b"aa"), (h.prefix + b"b", b"bb"), (h.prefix + b"c", b"cc")]
    assert revision >= last


def test_get_prefix_reads_more_keys_than_a_page_all_in_key_order(h: Harness) -> None:
    names = [f"{i:02d}".encode() for i in range(3 * PAGE + 1)]  # 4 pages, the last of one
    for name in reversed(names):
        last = h.kv.put(h.prefix + name, name)
    h.kv.put(h.prefix[:-1] + b"0", b"after the prefix's keys")
    h.kv.put(h.prefix + b"10/deeper", b"x")  # a key after 10 and before 11
    pages: list[list[Item]] = []
    items, revision = h.paged.get_prefix(h.prefix, pages.append)
    expected = sorted([(h.prefix + n, n) for n in names] + [(h.prefix + b"10/deeper", b"x")])
    assert [(i.key, i.value) for i in items] == expected
    assert revision > last
    assert (items, revision) == h.kv.get_prefix(h.prefix)  # one range, the same snapshot
    assert [i for page in pages for i in page] == items  # on_page had every item, in order
    assert len(pages) == (4 if h.real else 1)


def test_delete_says_whether_the_key_was_there(h: Harness) -> None:
    key = h.prefix + b"gone"
    h.kv.put(key, b"v")
    assert h.kv.delete(key) is True
    assert h.kv.get(key) is None
    assert h.kv.delete(key) is False


def test_create_claims_an_absent_key_once(h: Harness) -> None:
    key = h.prefix + b"claim"
    assert h.kv.create(key, b"first") is True
    assert h.kv.create(key, b"second") is False
    item = h.kv.get(key)
    assert item is not None
    assert item.value == b"first"


def test_of_racing_creates_exactly_one_claims(h: Harness) -> None:
    key = h.prefix + b"race"
    results: list[bool] = []
    lock = threading.Lock()

    def claim(n: int) -> None:
        won = h.kv.create(key, b"racer-%d" % n)
        with lock:
            results.append(won)
    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [False] * 7 + [True]


def test_a_revoked_lease_takes_its_keys_and_refuses_more(h: Harness) -> None:
    lease = h.kv.grant(30)
    key = h.prefix + b"leased"
    h.kv.put(key, b"v", lease=lease)
    item = h.kv.get(key)
    assert item is not None
    assert item.lease == lease
    h.kv.revoke(lease)
    assert h.kv.get(key) is None
    with pytest.raises(LeaseExpiredError):
        h.kv.keep_alive(lease)
    with pytest.raises(LeaseExpiredError):
        h.kv.put(key, b"again", lease=lease)
    with pytest.raises(LeaseExpiredError):
        h.kv.create(h.prefix + b"other", b"v", lease=lease)
    h.kv.revoke(lease)  # a second revoke is no error


def test_a_lease_kept_alive_outlives_its_ttl_and_one_left_alone_expires(h: Harness) -> None:
    kept, left = h.kv.grant(3), h.kv.grant(3)
    h.kv.put(h.prefix + b"kept", b"v", lease=kept)
    h.kv.put(h.prefix + b"left", b"v", lease=left)
    h.pass_time(2)
    assert h.kv.keep_alive(kept) == 3
    h.pass_time(2)  # 4 s since the grant: past the TTL, not past the renewal's
    assert h.kv.get(h.prefix + b"kept") is not None
    assert h.until(lambda: h.kv.get(h.prefix + b"left") is None)
    h.kv.revoke(kept)


def test_a_watch_replays_from_its_revision_then_follows(h: Harness) -> None:
    h.kv.put(h.prefix + b"1", b"before")
    start = h.kv.put(h.prefix + b"2", b"from here")
    seen: list[Event] = []
    watch = h.kv.watch_prefix(h.prefix, start, seen.append)
    try:
        h.kv.put(h.prefix[:-1] + b"x/elsewhere", b"not watched")
        h.kv.put(h.prefix + b"3", b"after")
        deleted = h.kv.put(h.prefix + b"2", b"changed") and h.kv.delete(h.prefix + b"2")
        assert deleted
        assert h.until(lambda: len(seen) >= 4)
        assert [(e.kind, e.key, e.value) for e in seen] == [
            (EventKind.PUT, h.prefix + b"2", b"from here"),
            (EventKind.PUT, h.prefix + b"3", b"after"),
            (EventKind.PUT, h.prefix + b"2", b"changed"),
            (EventKind.DELETE, h.prefix + b"2", b""),
        ]
        revisions = [e.mod_revision for e in seen]
        assert revisions == sorted(set(revisions))
        assert revisions[0] == start
        assert watch.ended() is None
    finally:
        watch.cancel()
    h.kv.put(h.prefix + b"4", b"after the cancel")
    h.pass_time(0.3)
    assert len(seen) == 4


def test_a_watch_gives_every_key_a_lease_takes_with_it(h: Harness) -> None:
    """etcd deletes a lease's keys in one revision (so does a transaction
    write its keys): the watch gives each of them, not the first alone."""
    lease = h.kv.grant(60)
    keys = [h.prefix + f"on-lease/{i}".encode() for i in range(5)]
    for key in keys:
        h.kv.put(key, b"v", lease)
    start = h.kv.put(h.prefix + b"marker", b"")
    seen: list[Event] = []
    watch = h.kv.watch_prefix(h.prefix, start + 1, seen.append)
    try:
        h.kv.revoke(lease)
        assert h.until(lambda: len(seen) >= len(keys))
        h.pass_time(0.3)
        assert sorted(e.key for e in seen) == keys
        assert {e.kind for e in seen} == {EventKind.DELETE}
        revisions = [e.mod_revision for e in seen]
        assert revisions == sorted(revisions)
    finally:
        watch.cancel()


def test_a_watch_from_a_compacted_revision_ends_and_says_why(h: Harness) -> None:
    old = h.kv.put(h.prefix + b"k", b"1")
    h.kv.put(h.prefix + b"k", b"2")
    now = h.kv.put(h.prefix + b"k", b"3")
    h.compact(now)
    seen: list[Event] = []
    watch = h.kv.watch_prefix(h.prefix, old, seen.append)
    try:
        assert h.until(lambda: watch.ended() is not None)
        assert isinstance(watch.ended(), WatchLostError)
        assert "compacted" in str(watch.ended())
        assert seen == []
    finally:
        watch.cancel()


def test_a_watch_whose_callback_raises_ends_after_that_event(h: Harness) -> None:
    start = h.kv.put(h.prefix + b"1", b"v")
    h.kv.put(h.prefix + b"2", b"v")
    seen: list[bytes] = []

    def callback(event: Event) -> None:
        seen.append(event.key)
        raise ValueError("the group's handler failed")
    watch = h.kv.watch_prefix(h.prefix, start, callback)
    try:
        assert h.until(lambda: watch.ended() is not None)
        h.kv.put(h.prefix + b"3", b"v")
        h.pass_time(0.3)
        assert seen == [h.prefix + b"1"]
        assert "ValueError" in str(watch.ended())
    finally:
        watch.cancel()


def test_a_range_watch_gives_the_keys_from_its_start_up_to_not_including_its_end(
        h: Harness) -> None:
    h.kv.put(h.prefix + b"b/before", b"before the start revision")
    start = h.kv.put(h.prefix + b"a/1", b"below the range")
    seen: list[Event] = []
    watch = h.kv.watch_range(h.prefix + b"b", h.prefix + b"c/", start, seen.append)
    try:
        h.kv.put(h.prefix + b"b", b"the start itself")
        h.kv.put(h.prefix + b"c/1", b"at and past the end")
        h.kv.put(h.prefix + b"c", b"inside: c sorts before c/")
        h.kv.put(h.prefix + b"b/x", b"inside")
        h.kv.delete(h.prefix + b"b/before")
        h.kv.put(h.prefix + b"d", b"past the end")
        h.kv.put(h.prefix + b"c/", b"the end itself: outside")
        last = h.kv.put(h.prefix + b"b/y", b"inside, the last")
        assert h.until(lambda: len(seen) >= 5)
        h.pass_time(0.3)
        assert [(e.kind, e.key, e.value) for e in seen] == [
            (EventKind.PUT, h.prefix + b"b", b"the start itself"),
            (EventKind.PUT, h.prefix + b"c", b"inside: c sorts before c/"),
            (EventKind.PUT, h.prefix + b"b/x", b"inside"),
            (EventKind.DELETE, h.prefix + b"b/before", b""),
            (EventKind.PUT, h.prefix + b"b/y", b"inside, the last"),
        ]
        assert seen[-1].mod_revision == last
        assert watch.ended() is None
    finally:
        watch.cancel()


def test_two_range_watches_split_a_prefix_and_each_keeps_revision_order(
        h: Harness) -> None:
    start = h.kv.put(h.prefix + b"m", b"")  # split the prefix at m
    low: list[Event] = []
    high: list[Event] = []
    watches = [h.kv.watch_range(h.prefix, h.prefix + b"m", start + 1, low.append),
               h.kv.watch_range(h.prefix + b"m", h.prefix[:-1] + b"0", start + 1,
                                high.append)]
    try:
        written = []
        for i in range(12):
            key = h.prefix + (b"a", b"z", b"m")[i % 3] + str(i).encode()
            written.append((key, h.kv.put(key, str(i).encode())))
        assert h.until(lambda: len(low) + len(high) >= 12)
        assert [(e.key, e.mod_revision) for e in low] == [
            (k, r) for k, r in written if k < h.prefix + b"m"]
        assert [(e.key, e.mod_revision) for e in high] == [
            (k, r) for k, r in written if k >= h.prefix + b"m"]
    finally:
        for watch in watches:
            watch.cancel()


def test_a_range_watch_from_a_compacted_revision_ends_and_says_why(h: Harness) -> None:
    old = h.kv.put(h.prefix + b"k", b"1")
    now = h.kv.put(h.prefix + b"k", b"2")
    h.compact(now)
    watch = h.kv.watch_range(h.prefix, h.prefix + b"z", old, lambda e: None)
    try:
        assert h.until(lambda: watch.ended() is not None)
        assert "compacted" in str(watch.ended())
    finally:
        watch.cancel()


def test_a_range_past_the_groups_prefix_or_empty_is_refused(h: Harness) -> None:
    group = b"/spa/groups/a/"
    with pytest.raises(StorePermissionError):  # reaches into group b's keys
        h.kv.watch_range(h.prefix, b"/spa/groups/c/", 1, lambda e: None)
    with pytest.raises(StorePermissionError):  # starts in another group's
        h.kv.watch_range(h.other, h.other + b"z", 1, lambda e: None)
    with pytest.raises(StorePermissionError):  # no end: every key from the start on
        h.kv.watch_range(h.prefix, b"\0", 1, lambda e: None)
    with pytest.raises(ValueError, match="must end after its start"):
        h.kv.watch_range(h.prefix + b"b", h.prefix + b"a", 1, lambda e: None)
    with pytest.raises(ValueError, match="must end after its start"):
        h.kv.watch_range(h.prefix, h.prefix, 1, lambda e: None)
    now = h.kv.put(h.prefix + b"k", b"v")
    watch = h.kv.watch_range(group, group[:-1] + b"0", now, lambda e: None)  # the whole group
    assert watch.ended() is None
    watch.cancel()


def test_another_groups_prefix_is_refused(h: Harness) -> None:
    key = h.other + b"k"
    with pytest.raises(StorePermissionError):
        h.kv.get(key)
    with pytest.raises(StorePermissionError):
        h.kv.put(key, b"v")
    with pytest.raises(StorePermissionError):
        h.kv.create(key, b"v")
    with pytest.raises(StorePermissionError):
        h.kv.create_many([Put(h.prefix + b"mine", b"v"), Put(key, b"v")])
    with pytest.raises(StorePermissionError):  # a write beside the claims counts too
        h.kv.create_many([Put(h.prefix + b"mine", b"v")], [Delete(key)])
    assert h.kv.get(h.prefix + b"mine") is None
    with pytest.raises(StorePermissionError):
        h.kv.get_prefix(h.other)
    with pytest.raises(StorePermissionError):
        h.kv.watch_prefix(h.other, 1, lambda e: None)


def test_a_store_out_of_reach_raises_unavailable_for_every_call(h: Harness) -> None:
    dead = h.broken()
    key = h.prefix + b"k"
    calls: list[Callable[[], object]] = [
        lambda: dead.get(key), lambda: dead.get_prefix(h.prefix),
        lambda: dead.put(key, b"v"), lambda: dead.delete(key),
        lambda: dead.create(key, b"v"), lambda: dead.create_many([Put(key, b"v")]),
        lambda: dead.grant(5),
        lambda: dead.keep_alive(1), lambda: dead.revoke(1),
        lambda: dead.watch_prefix(h.prefix, 1, lambda e: None),
        lambda: dead.watch_range(h.prefix, h.prefix + b"z", 1, lambda e: None)]
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            call()


# ---- a paged read on etcd: one snapshot while keys change between its pages --

def test_get_prefixes_reads_only_those_prefixes_at_one_revision_in_key_order(
        h: Harness) -> None:
    one, two, skipped = h.prefix + b"one/", h.prefix + b"two/", h.prefix + b"skipped/"
    for i in range(PAGE + 1):  # two pages of `one/` in the paged store
        h.kv.put(one + f"{i:02d}".encode(), b"1")
    h.kv.put(skipped + b"x", b"never read")
    last = h.kv.put(two + b"a", b"2")
    h.kv.put(h.prefix + b"meta", b"m")
    pages: list[list[Item]] = []
    items, revision = h.paged.get_prefixes((two, h.prefix + b"meta", one), pages.append)
    assert [i.key for i in items] == sorted(
        [one + f"{i:02d}".encode() for i in range(PAGE + 1)] + [two + b"a", h.prefix + b"meta"])
    assert revision > last
    assert sorted(i.key for page in pages for i in page) == [i.key for i in items]
    assert (items, revision) == h.kv.get_prefixes((one, two, h.prefix + b"meta"))
    with pytest.raises(StorePermissionError):
        h.kv.get_prefixes((h.prefix, h.other))


class _Between(EtcdStore):
    """A paged store that runs `between(n)` after its n-th page (n from 1)."""

    def __init__(self, cluster: EtcdCluster, between: Callable[[int], None]) -> None:
        super().__init__(cluster.access("a"), page_keys=PAGE)
        self.between = between
        self.pages = 0

    def _range(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = super()._range(body)
        self.pages += 1
        self.between(self.pages)
        return answer


@pytest.mark.netns
def test_a_paged_read_is_one_snapshot_while_keys_change_between_pages(
        etcd_cluster: EtcdCluster) -> None:
    with etcd_cluster.inside():
        writer = etcd_cluster.store("a")
        prefix = _fresh(b"a")
        for i in range(3 * PAGE):
            revision = writer.put(prefix + f"{i:02d}".encode(), b"before")

        def change(page: int) -> None:
            if page == 1:  # past the first page and before it: a change, a delete, a new key
                writer.put(prefix + b"00", b"after")
                writer.delete(prefix + f"{2 * PAGE:02d}".encode())
                writer.put(prefix + b"05x", b"new")
        reader = _Between(etcd_cluster, change)
        items, read_at = reader.get_prefix(prefix)
        assert read_at == revision
        assert reader.pages == 3
        assert [(i.key, i.value) for i in items] == [
            (prefix + f"{i:02d}".encode(), b"before") for i in range(3 * PAGE)]
        assert len(writer.get_prefix(prefix)[0]) == 3 * PAGE  # one gone, one new


@pytest.mark.netns
def test_several_prefixes_are_one_snapshot_while_keys_change_between_them(
        etcd_cluster: EtcdCluster) -> None:
    with etcd_cluster.inside():
        writer = etcd_cluster.store("a")
        prefix = _fresh(b"a")
        first, second = prefix + b"1/", prefix + b"2/"
        for i in range(PAGE):
            writer.put(first + f"{i:02d}".encode(), b"before")
        revision = writer.put(second + b"00", b"before")

        def change(page: int) -> None:
            if page == 1:  # the first prefix read: the second one changes, grows
                writer.put(second + b"00", b"after")
                writer.put(second + b"01", b"new")
                writer.delete(first + b"00")
        reader = _Between(etcd_cluster, change)
        items, read_at = reader.get_prefixes((first, second))
        assert read_at == revision
        assert [(i.key, i.value) for i in items] == [
            *((first + f"{i:02d}".encode(), b"before") for i in range(PAGE)),
            (second + b"00", b"before")]


@pytest.mark.netns
def test_a_paged_read_overtaken_by_a_compaction_starts_again_then_gives_up(
        etcd_cluster: EtcdCluster) -> None:
    with etcd_cluster.inside():
        writer = etcd_cluster.store("a")
        prefix = _fresh(b"a")
        for i in range(2 * PAGE):
            writer.put(prefix + f"{i:02d}".encode(), b"v")

        def compact_once(page: int) -> None:
            if page == 1:  # the first attempt's pinned revision is gone after its first page
                etcd_cluster.ctl("compaction", str(writer.put(prefix + b"00", b"newer")))
        reader = _Between(etcd_cluster, compact_once)
        items, read_at = reader.get_prefix(prefix)
        assert reader.pages == 1 + 2  # the first attempt's one page, then both again
        assert read_at == writer.get(prefix + b"00").mod_revision  # type: ignore[union-attr]
        assert items[0].value == b"newer" and len(items) == 2 * PAGE

        def compact_always(page: int) -> None:  # after every first page
            etcd_cluster.ctl("compaction", str(writer.put(prefix + b"00", b"x")))
        stubborn = _Between(etcd_cluster, compact_always)
        with pytest.raises(StoreError, match="compaction"):
            stubborn.get_prefix(prefix)
        assert stubborn.pages == READ_ATTEMPTS


# ---- create_many: a batch of claims in one transaction ------------------------

def test_create_many_sets_every_absent_key_and_its_writes_at_one_revision(h: Harness) -> None:
    lease = h.kv.grant(30)
    h.kv.put(h.prefix + b"lease/old", b"closed")
    creates = [Put(h.prefix + b"claim/%d" % i, b"c%d" % i, lease) for i in range(3)]
    writes: list[Put | Delete] = [Put(h.prefix + b"lease/new", b"open", lease),
                                  Delete(h.prefix + b"lease/old"),
                                  Delete(h.prefix + b"lease/never-there")]
    assert h.kv.create_many(creates, writes) == frozenset()
    items, _ = h.kv.get_prefix(h.prefix)
    assert {(i.key, i.value, i.lease) for i in items} == {
        *((c.key, c.value, lease) for c in creates), (h.prefix + b"lease/new", b"open", lease)}
    assert len({i.mod_revision for i in items}) == 1  # one transaction, one revision
    h.kv.revoke(lease)
    assert h.kv.get_prefix(h.prefix)[0] == []


def test_create_many_with_a_key_taken_changes_nothing_and_names_the_taken(
        h: Harness) -> None:
    taken = [h.prefix + b"claim/1", h.prefix + b"claim/3"]
    for key in taken:
        assert h.kv.create(key, b"theirs")
    before = h.kv.get_prefix(h.prefix)
    creates = [Put(h.prefix + b"claim/%d" % i, b"mine") for i in range(5)]
    found = h.kv.create_many(creates, [Put(h.prefix + b"lease/x", b"open")])
    assert found == frozenset(taken)
    after = h.kv.get_prefix(h.prefix)
    assert after[0] == before[0]  # nothing written: no claim, no lease record
    # the caller goes again without them: the rest are claimed
    assert h.kv.create_many([c for c in creates if c.key not in found]) == frozenset()
    assert all(h.kv.get(c.key) is not None for c in creates)
    assert [h.kv.get(k).value for k in taken] == [b"theirs", b"theirs"]  # type: ignore[union-attr]


def test_create_many_on_a_lease_gone_raises_and_writes_nothing(h: Harness) -> None:
    alive, gone = h.kv.grant(30), h.kv.grant(30)
    h.kv.revoke(gone)
    with pytest.raises(LeaseExpiredError):
        h.kv.create_many([Put(h.prefix + b"c1", b"v", alive)],
                         [Put(h.prefix + b"l1", b"v", gone)])
    assert h.kv.get_prefix(h.prefix)[0] == []
    h.kv.revoke(alive)


def test_create_many_refuses_what_etcd_would_before_sending_it(h: Harness) -> None:
    key = h.prefix + b"k"
    with pytest.raises(ValueError, match="max-txn-ops"):
        h.kv.create_many([Put(h.prefix + b"%d" % i, b"v") for i in range(MAX_TXN_OPS + 1)])
    with pytest.raises(ValueError, match="max-txn-ops"):
        h.kv.create_many([Put(h.prefix + b"%d" % i, b"v") for i in range(MAX_TXN_OPS // 2)],
                         [Delete(h.prefix + b"d%d" % i) for i in range(MAX_TXN_OPS // 2 + 1)])
    with pytest.raises(ValueError, match="twice"):
        h.kv.create_many([Put(key, b"v")], [Put(key, b"w")])
    with pytest.raises(ValueError, match="at least one"):
        h.kv.create_many([], [Put(key, b"w")])
    assert h.kv.get(key) is None
    full = [Put(h.prefix + b"%d" % i, b"v") for i in range(MAX_TXN_OPS // 2)]
    closes: list[Put | Delete] = [Delete(h.prefix + b"d%d" % i)
                                  for i in range(MAX_TXN_OPS // 2)]
    assert h.kv.create_many(full, closes) == frozenset()  # the most etcd takes: taken


def test_a_watch_sees_every_key_of_one_transaction(h: Harness) -> None:
    start = h.kv.put(h.prefix + b"0", b"before")
    seen: list[Event] = []
    watch = h.kv.watch_prefix(h.prefix, start + 1, seen.append)
    try:
        h.kv.create_many([Put(h.prefix + b"%d" % i, b"v") for i in range(1, 6)],
                         [Delete(h.prefix + b"0")])
        h.kv.put(h.prefix + b"after", b"v")
        assert h.until(lambda: len(seen) >= 7)
        assert sorted(e.key for e in seen[:6]) == sorted(
            [h.prefix + b"%d" % i for i in range(6)])
        assert seen[-1].key == h.prefix + b"after"
    finally:
        watch.cancel()


def test_of_members_racing_on_overlapping_batches_each_key_is_claimed_once(
        h: Harness) -> None:
    keys = [h.prefix + b"n%02d" % i for i in range(40)]
    stores = [h.kv, h.another(), h.another()]
    won: dict[int, list[bytes]] = {n: [] for n in range(len(stores))}

    def claim(n: int) -> None:
        # each its own overlapping slice, in its own order, batches of up to 8,
        # going again without the keys found taken (as the claimer does)
        mine = keys[n * 10:n * 10 + 20][::1 if n % 2 else -1]
        for at in range(0, len(mine), 8):
            batch = [Put(k, b"member-%d" % n) for k in mine[at:at + 8]]
            while batch:
                found = stores[n].create_many(batch)
                if not found:
                    won[n] += [p.key for p in batch]
                    break
                batch = [p for p in batch if p.key not in found]
    threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = [k for n in won for k in won[n]]
    assert sorted(claimed) == sorted(set(claimed))  # no key twice
    assert set(claimed) == set(keys)  # every key claimed (their slices cover 0-39)
    for n, mine in won.items():
        for key in mine:
            item = h.kv.get(key)
            assert item is not None and item.value == b"member-%d" % n
