"""Servers as members of one group on the memory fake (docs/groups.md,
"Members"): claims, replay across members, etcd down, the watch and its
resync, revocation, shared leases."""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from spa.core.wire import Action
from spa.group import layout
from spa.group.kv import Delete, Event, Item, PageCallback, Put, WatchLostError
from spa.group.memory import MemoryStore
from spa.group.policy import OnStoreDown
from spa.server.metrics import Metrics
from tests.group_world import GROUP, SOURCE, Group
from tests.server_world import FakeClock


def _claims(group: Group) -> list[bytes]:
    items, _ = group.kv.get_prefix(layout.kind_prefix(GROUP, layout.Kind.CLAIM).encode())
    return [item.key for item in items]


def test_a_member_claims_the_nonce_of_a_packet_it_accepts_and_grants(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    assert group.grants("a") == {(SOURCE, "ssh")}
    assert len(_claims(group)) == 1
    assert group.links["a"].claimer.counts["claimed"] == 1


def test_a_packet_accepted_by_one_member_is_refused_replay_at_another(group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    packet = group.packet("alice")
    a.handle(packet, SOURCE)
    b.handle(packet, SOURCE)  # b's own replay cache has never seen it
    assert ("replay", "alice") in group.refusals("b")
    assert ("replay", "alice") not in group.refusals("a")
    assert group.links["b"].claimer.counts == {**group.links["b"].claimer.counts,
                                               "replay": 1, "claimed": 0}
    assert [e.outcome for e in group.worlds["b"].events()].count("accepted") == 0


def test_junk_and_unknown_tags_never_reach_the_store(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    revision = group.kv.get_prefix(b"/")[1]
    packet = bytearray(group.packet("alice"))
    packet[-1] ^= 1  # a bad MAC
    a.handle(bytes(packet), SOURCE)
    a.handle(b"\x01" * len(packet), SOURCE)
    a.handle(b"junk", SOURCE)
    assert group.kv.get_prefix(b"/")[1] == revision
    assert not _claims(group)
    assert {reason for reason, _ in group.refusals("a")} == {
        "bad_mac", "unknown_tag", "bad_length"}


def test_with_the_store_down_a_member_fails_closed_by_default(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    group.kv.unreachable = True  # type: ignore[attr-defined]
    a.handle(group.packet("alice"), SOURCE)
    assert group.grants("a") == set()
    assert ("group_unreachable", "alice") in group.refusals("a")
    assert group.links["a"].claimer.counts["unreachable"] == 1
    assert any("etcd unreachable for claims" in line and "refused" in line
               for line in group.worlds["a"].logs)
    group.kv.unreachable = False  # type: ignore[attr-defined]  # recovery needs no restart
    a.handle(group.packet("alice"), SOURCE)
    assert group.grants("a") == {(SOURCE, "ssh")}
    assert any("etcd answers claims again" in line for line in group.worlds["a"].logs)


def test_local_only_grants_with_the_store_down_and_counts_each(group: Group) -> None:
    a = group.member("a", OnStoreDown.LOCAL_ONLY)
    group.enroll("alice")
    group.settle()
    group.kv.unreachable = True  # type: ignore[attr-defined]
    packet = group.packet("alice")
    a.handle(packet, SOURCE)
    assert group.grants("a") == {(SOURCE, "ssh")}
    assert group.links["a"].claimer.counts["unclaimed_grants"] == 1
    assert any("without a claim" in line for line in group.worlds["a"].logs)
    a.handle(packet, SOURCE)  # the local replay cache still refuses a copy here
    assert ("replay", "alice") in group.refusals("a")
    assert group.links["a"].claimer.counts["unclaimed_grants"] == 1
    a.metrics = Metrics()  # (not served: the counters alone)
    for _ in range(2):  # each round advances by what is new, never twice
        a.housekeeping()
    sample = a.metrics.registry.get_sample_value
    assert sample("spa_group_claims_total", {"result": "unclaimed_grants"}) == 1


def test_the_members_take_a_client_enrolled_later_and_forget_a_removed_one(
        group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    assert group.links["a"].member.clients == {"alice"}
    packet_before = group.packet("alice")
    group.kv.delete(layout.client_key(GROUP, "alice").encode())
    group.settle()
    a.handle(packet_before, SOURCE)
    assert ("unknown_tag", None) in group.refusals("a")
    assert "alice" not in a.verifier.tags.clients


@pytest.mark.parametrize("lost", [0, 1], ids=["before-claims", "after-claims"])
def test_a_member_reads_the_group_again_after_either_watch_is_lost(
        group: Group, lost: int) -> None:
    a = group.member("a")
    link = group.links["a"]
    store = group.kv
    assert isinstance(store, MemoryStore)
    old = list(link.member._watches)
    assert len(old) == 2
    watch = old[lost]
    watch.cancel()  # as a compacted revision ends it: nothing more is delivered
    watch.lost = WatchLostError("revision 2 has been compacted")  # type: ignore[attr-defined]
    group.enroll("alice")  # clients/: missed if the stream after claims/ was lost
    group.settle()
    assert ("alice" in a.verifier.tags.clients) is (lost == 0)
    link.member.tick()
    group.settle()
    assert link.member.resyncs == 1
    assert "alice" in a.verifier.tags.clients
    assert not set(old) & set(store._watches)  # the other stream is cancelled too
    assert len(link.member._watches) == 2
    a.handle(group.packet("alice"), SOURCE)
    assert group.grants("a") == {(SOURCE, "ssh")}
    group.enroll("bob")  # and the new watches deliver again
    group.settle()
    assert "bob" in a.verifier.tags.clients


def test_a_member_does_not_watch_the_claims_and_its_close_ends_both_watches(
        group: Group) -> None:
    a = group.member("a")
    group.member("b")
    group.enroll("alice")
    group.settle()
    store = group.kv
    assert isinstance(store, MemoryStore)
    seen: list[bytes] = []
    member = group.links["b"].member
    taken = member._on_event

    def counted(event: Event) -> None:
        seen.append(event.key)
        taken(event)
    member._on_event = counted  # type: ignore[method-assign]
    member.close()  # the watches call the bound method they were given: watch anew
    assert not set(store._watches) & set(member._watches)
    member.load()
    a.handle(group.packet("alice"), SOURCE)  # a claim and a lease, written by a
    group.settle()
    assert [key for key in seen if b"/claims/" in key] == []
    assert any(b"/leases/alice/" in key for key in seen)
    assert group.grants("b") == {(SOURCE, "ssh")}  # a's lease, installed at b
    watches = list(member._watches)
    member.close()
    assert member._watches == [] and not set(watches) & set(store._watches)
    assert _claims(group)  # the claim was written; b only did not hear of it


def test_a_member_started_with_the_store_down_reads_the_group_when_it_returns(
        group: Group) -> None:
    group.member("first")  # makes the group
    group.enroll("alice")
    group.kv.unreachable = True  # type: ignore[attr-defined]
    b = group.member("b")
    assert "alice" not in b.verifier.tags.clients
    for _ in range(20):  # still down: keeps what it has, says so once, backs off
        group.links["b"].member.tick()
        group.clock.advance(0.5)
    logs = group.worlds["b"].logs
    assert sum("error group g1" in line for line in logs) == 1  # the start's, alone
    group.kv.unreachable = False  # type: ignore[attr-defined]
    group.clock.advance(5)
    group.links["b"].member.tick()
    group.settle()
    assert "alice" in b.verifier.tags.clients
    assert any("group g1: read at revision" in line for line in logs)


def test_a_revocation_with_close_removes_tags_and_leases_at_every_member(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.enroll("bob")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    b.handle(group.packet("bob", "https"), "192.0.2.20")
    group.settle()
    assert group.grants("a") == group.grants("b") == {(SOURCE, "ssh"), ("192.0.2.20", "https")}
    group.revoke("alice", close=True)
    group.settle()
    for name, server in (("a", a), ("b", b)):
        assert group.grants(name) == {("192.0.2.20", "https")}
        assert "alice" not in server.verifier.tags.clients
        assert "bob" in server.verifier.tags.clients
    b.handle(group.packet("alice"), SOURCE)
    assert ("unknown_tag", None) in group.refusals("b")


def test_a_revocation_without_close_leaves_leases_to_run_out(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    group.revoke("alice", close=False)
    group.settle()
    assert group.grants("a") == {(SOURCE, "ssh")}
    assert "alice" not in a.verifier.tags.clients
    group.clock.advance(61)
    a.housekeeping()
    assert group.grants("a") == set()


def test_a_lease_granted_by_one_member_is_installed_at_another_with_its_end(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice", duration=60), SOURCE)
    group.settle()  # b's receive thread installs what its watch brought
    assert group.grants("b") == {(SOURCE, "ssh")}
    ends = [list(group.worlds[name].backend.grants.values()) for name in ("a", "b")]
    assert ends == [[group.clock.now + 60]] * 2
    record = group.links["b"].member.remote_leases
    assert [lease.member for lease in record.values()] == ["a"]
    group.clock.advance(61)  # and it ends there on time, etcd or not
    group.kv.unreachable = True  # type: ignore[attr-defined]
    b.housekeeping()
    assert group.grants("b") == set()


def test_a_close_at_one_member_removes_the_shared_lease_at_the_others(group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    group.settle()  # b's receive thread installs what its watch brought
    assert group.grants("b") == {(SOURCE, "ssh")}
    b.handle(group.packet("alice", action=Action.CLOSE, duration=0), SOURCE)
    group.settle()
    assert group.grants("a") == group.grants("b") == set()


def test_a_member_joining_later_installs_the_live_leases_of_the_group(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    group.member("c")  # a failover target started after the grant
    assert group.grants("c") == {(SOURCE, "ssh")}


def test_a_group_of_another_server_id_is_refused_in_one_line(group: Group) -> None:
    group.member("a")
    from spa.group.records import GroupMeta, encode_meta

    group.kv.put(layout.meta_key(GROUP).encode(),
                 encode_meta(GroupMeta(GROUP, bytes(16), 1)))
    from spa.server.errors import LocalError

    with pytest.raises(LocalError, match="server id is not this server's"):
        group.member("b")


def test_a_pending_client_s_first_knock_activates_it_at_every_member(group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice", enroll_by=group.clock.now + 60)
    group.settle()
    assert group.links["b"].member.pending("alice") is not None
    a.handle(group.packet("alice"), SOURCE)
    group.settle()
    assert group.kv.get(layout.activated_key(GROUP, "alice").encode()) is not None
    assert group.links["b"].member.pending("alice") is None
    group.clock.advance(120)  # past its enroll_by: enrolled for good at b too
    b.handle(group.packet("alice"), SOURCE)
    assert ("enrollment_expired", "alice") not in group.refusals("b")
    assert group.grants("b") == {(SOURCE, "ssh")}


def test_a_pending_client_that_never_knocked_is_refused_after_its_enroll_by(
        group: Group) -> None:
    b = group.member("b")
    group.enroll("alice", enroll_by=group.clock.now + 60)
    group.settle()
    group.clock.advance(120)
    b.handle(group.packet("alice"), SOURCE)
    assert ("enrollment_expired", "alice") in group.refusals("b")


def test_the_runner_opens_the_group_s_store_only_with_a_private_password_file(
        tmp_path: Path) -> None:
    import types

    from spa.server import runner
    from spa.server.errors import LocalError
    from tests.group_world import settings

    password = tmp_path / "etcd-password"
    chosen = replace(settings("a"), password_file=password, ca_file=tmp_path / "ca.crt",
                     cert_file=tmp_path / "m.crt", key_file=tmp_path / "m.key")
    config = types.SimpleNamespace(group=chosen, path=tmp_path / "server.toml")
    with pytest.raises(LocalError, match=r"etcd CA file .* does not exist"):
        runner._group_store(config)  # type: ignore[arg-type]
    for name in ("ca.crt", "m.crt", "m.key"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
        (tmp_path / name).chmod(0o600)
    with pytest.raises(LocalError, match=r"etcd password file .* does not exist"):
        runner._group_store(config)  # type: ignore[arg-type]
    password.write_text("s3cret-not-in-messages\n")
    password.chmod(0o644)
    with pytest.raises(LocalError) as refused:
        runner._group_store(config)  # type: ignore[arg-type]
    assert "s3cret" not in str(refused.value) and "\n" not in str(refused.value)
    password.chmod(0o600)
    opened = runner._group_store(config)  # type: ignore[arg-type]
    assert opened is not None and opened[0] is chosen
    assert "s3cret" not in repr(opened[1].__dict__.get("_access"))
    assert runner._group_store(types.SimpleNamespace(group=None, path=config.path)) is None  # type: ignore[arg-type]


class _HeldStore:
    """The fake whose claims (create_many) wait until `opened` is set: an
    etcd that answers slowly.  Everything else goes straight through."""

    def __init__(self, kv: MemoryStore) -> None:
        self.kv = kv
        self.opened = threading.Event()
        self.waiting = threading.Semaphore(0)

    def __getattr__(self, name: str) -> object:
        return getattr(self.kv, name)

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        self.waiting.release()
        assert self.opened.wait(30)
        return self.kv.create_many(creates, writes)


def test_a_slow_claim_never_holds_up_the_receive_loop(group: Group) -> None:
    from concurrent.futures import ThreadPoolExecutor

    a = group.member("a")
    group.enroll("alice")
    group.enroll("bob")
    group.settle()
    claimer = group.links["a"].claimer
    held = _HeldStore(group.kv)  # type: ignore[arg-type]
    claimer.kv = held  # type: ignore[assignment]
    claimer.executor = pool = ThreadPoolExecutor(2)
    a.handle(group.packet("alice"), SOURCE)  # returns with alice's claim still waiting
    assert held.waiting.acquire(timeout=30)
    a.handle(group.packet("bob", "https"), "192.0.2.20")  # and bob's knock is not behind it
    assert held.waiting.acquire(timeout=30)
    assert group.grants("a") == set()
    held.opened.set()
    pool.shutdown(wait=True)
    assert group.grants("a") == {(SOURCE, "ssh"), ("192.0.2.20", "https")}


def test_the_server_s_own_clients_are_granted_without_a_claim_etcd_or_not(
        group: Group) -> None:
    a = group.member("a")
    world = group.worlds["a"]
    world.enroll("local", "ssh")  # this server's own client store, not the group's
    a.housekeeping()
    a.run_commands()
    group.kv.unreachable = True  # type: ignore[attr-defined]
    a.handle(world.packet("local"), SOURCE)
    assert group.grants("a") == {(SOURCE, "ssh")}
    assert group.links["a"].claimer.counts["unreachable"] == 0
    assert not group.links["a"].member.covers("local")


def test_a_member_s_own_grant_of_a_shared_lease_makes_the_key_its_own(group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice", duration=60), SOURCE)
    assert len(group.links["b"].member.remote_leases) == 1
    group.clock.advance(10)
    b.handle(group.packet("alice", duration=120), SOURCE)  # b extends it: the key is b's
    assert group.links["b"].member.remote_leases == {}
    assert [lease.member for lease in group.links["a"].member.remote_leases.values()] == ["b"]
    group.settle()
    assert list(group.worlds["a"].backend.grants.values()) == [group.clock.now + 120]


def test_a_claim_etcd_refuses_is_never_a_grant_even_local_only(group: Group) -> None:
    a = group.member("a", OnStoreDown.LOCAL_ONLY)
    group.enroll("alice")
    group.settle()
    claimer = group.links["a"].claimer
    claimer.kv = group.kv.restricted(  # type: ignore[attr-defined]
        layout.kind_prefix(GROUP, layout.Kind.LEASE).encode())  # no right to claims/
    a.handle(group.packet("alice"), SOURCE)
    assert group.grants("a") == set()
    assert ("group_unreachable", "alice") in group.refusals("a")
    assert claimer.counts["unclaimed_grants"] == 0
    assert any("etcd refused for claims" in line for line in group.worlds["a"].logs)


def test_the_member_thread_reads_the_group_again_by_itself(group: Group) -> None:
    a = group.member("a")
    link = group.links["a"]
    watch = link.member._watches[1]
    watch.cancel()
    watch.lost = WatchLostError("revision 2 has been compacted")  # type: ignore[attr-defined]
    group.enroll("alice")
    stop = threading.Event()
    link.serve(stop)  # the daemon's serve starts it so
    try:
        for _ in range(300):
            if link.member.resyncs:
                break
            stop.wait(0.05)
    finally:
        stop.set()
    assert link.member.resyncs == 1
    group.settle()
    assert "alice" in a.verifier.tags.clients


class _Recording(MemoryStore):
    """The fake, noting every key a read of prefixes handed back."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.read: list[bytes] = []

    def get_prefix(self, prefix: bytes, on_page: PageCallback | None = None
                   ) -> tuple[list[Item], int]:
        items, revision = super().get_prefix(prefix, on_page)
        self.read += [item.key for item in items]
        return items, revision

    def get_prefixes(self, prefixes: Sequence[bytes], on_page: PageCallback | None = None
                     ) -> tuple[list[Item], int]:
        items, revision = super().get_prefixes(prefixes, on_page)
        self.read += [item.key for item in items]
        return items, revision


def test_a_members_read_takes_the_kinds_it_applies_and_never_the_claims(
        tmp_path: Path) -> None:
    clock = FakeClock()
    store = _Recording(clock)
    group = Group(tmp_path, store, clock)
    try:
        a = group.member("a")
        group.enroll("alice")
        group.settle()
        a.handle(group.packet("alice"), SOURCE)  # a claim, a lease
        group.revoke("carol-was-never-enrolled", close=False)
        assert _claims(group)
        store.read.clear()
        group.member("b")
        kinds = {layout.parse_key(GROUP, key.decode()).kind for key in store.read}
        assert kinds == {layout.Kind.META, layout.Kind.CLIENT, layout.Kind.REVOKED,
                         layout.Kind.LEASE}
        assert group.links["b"].member.covers("alice")
        assert group.grants("b") == {(SOURCE, "ssh")}  # a's lease, read with the rest
    finally:
        group.close()


@pytest.mark.parametrize("reader", ["a", "b"], ids=["watched", "read"])
def test_a_record_filed_under_another_clients_name_is_skipped(group: Group, reader: str
                                                               ) -> None:
    """clients/<name> must hold <name>'s record: one copied under another
    name (its keys would go into the verifier under the record's own name
    while the key's name decides revocations and leases) is logged and
    skipped, whether the watch (member a, running) or a first read (member
    b, started after) brings it."""
    group.member("a")
    group.enroll("alice")
    record = group.kv.get(layout.client_key(GROUP, "alice").encode())
    assert record is not None
    group.kv.put(layout.client_key(GROUP, "mallory").encode(), record.value)
    server = group.member("b") if reader == "b" else group.worlds["a"].server
    assert server is not None
    group.settle()
    assert group.links[reader].member.clients == {"alice"}
    logs = group.worlds[reader].logs
    assert any("clients/mallory" in line and "names client alice" in line for line in logs), logs
    assert "mallory" not in server.verifier.tags.clients


def test_a_burst_of_another_members_leases_goes_in_with_one_commit_in_order(
        group: Group) -> None:
    """The watch hands b each lease a grants; b's receive thread installs
    every one queued meanwhile in one firewall commit, and a close that came
    after an install is made after it (the lease ends, never the reverse)."""
    a = group.member("a")
    group.member("b")
    names = [f"c{i}" for i in range(5)]
    for name in names:
        group.enroll(name)
    group.settle()
    backend = group.worlds["b"].backend
    before = len(backend.log)
    for i, name in enumerate(names):
        a.handle(group.packet(name), f"192.0.2.{20 + i}")
    a.handle(group.packet("c0", action=Action.CLOSE, duration=0), "192.0.2.20")
    assert group.grants("b") == set()  # queued for b's receive thread, not made yet
    group.settle()
    commits = [entry for entry in backend.log[before:] if entry[0] == "apply"]
    assert len(commits) == 1, backend.log[before:]  # five grants and the close: one commit
    assert group.grants("b") == {(f"192.0.2.{20 + i}", "ssh") for i in range(1, 5)}


def test_a_read_leaves_what_it_made_to_the_collectors_oldest_generation(group: Group) -> None:
    """The records a read makes (the collector paused meanwhile) go to the
    oldest generation at its end, unscanned, and the collector runs again:
    the first collection after a start of 10^5 clients walked them all."""
    group.member("a")
    for i in range(20):
        group.enroll(f"c{i}")
    enabled = gc.isenabled()
    gc.enable()
    try:
        member = group.links["a"].member
        member.load()  # (a read again: as the first)
        assert gc.isenabled()
        records = list(member._records.values())
        assert len(records) == 20
        oldest = {id(obj) for obj in gc.get_objects(generation=2)}
        assert all(id(record) in oldest for record in records)
    finally:
        if not enabled:
            gc.disable()
