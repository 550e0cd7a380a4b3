"""The claimer's group commit on the memory fake (docs/groups.md, "Claims"):
packets queued while a claim thread is busy go in one transaction with their
lease records, replays inside a batch are refused while the rest are granted,
a lone packet goes at once, the shared leases over seconds of silence, and a
lease-record write etcd refuses never costs the grant."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from spa.core.wire import Action
from spa.group import layout
from spa.group.claims import BATCH_MAX, Claimer
from spa.group.kv import Delete, Put, StorePermissionError
from spa.group.leasepool import OUTLIVES_BY
from spa.group.records import claim_until
from tests.group_world import GROUP, SOURCE, Group


class Deferred:
    """An executor that keeps what it is given until run(): a claim thread
    that is busy while packets queue."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object:
        self.tasks.append((fn, args))
        return None

    def run(self) -> None:
        while self.tasks:
            fn, args = self.tasks.pop(0)
            fn(*args)


class Counting:
    """The store, counting its transactions and what went in each."""

    def __init__(self, kv: Any, refuse: bytes | None = None) -> None:
        self.kv = kv
        self.refuse = refuse  # a prefix writes under which are refused (etcd's RBAC)
        self.txns: list[tuple[int, int]] = []  # (claims, lease writes) per transaction

    def __getattr__(self, name: str) -> object:
        return getattr(self.kv, name)

    def _allow(self, key: bytes) -> None:
        if self.refuse is not None and key.startswith(self.refuse):
            raise StorePermissionError("permission denied (test)")

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        self.txns.append((len(creates), len(writes)))
        for op in (*creates, *writes):
            self._allow(op.key)
        found: frozenset[bytes] = self.kv.create_many(creates, writes)
        return found

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        self._allow(key)
        revision: int = self.kv.put(key, value, lease)
        return revision


def _deferred(group: Group, member: str, refuse: bytes | None = None
              ) -> tuple[Claimer, Deferred, Counting]:
    claimer = group.links[member].claimer
    deferred, counting = Deferred(), Counting(group.kv, refuse)
    claimer.executor, claimer.kv = deferred, counting  # type: ignore[assignment]
    return claimer, deferred, counting


def _keys(group: Group, kind: layout.Kind) -> list[bytes]:
    items, _ = group.kv.get_prefix(layout.kind_prefix(GROUP, kind).encode())
    return [item.key for item in items]


def test_packets_queued_while_the_claim_thread_is_busy_go_in_one_transaction(
        group: Group) -> None:
    a, _ = group.member("a"), group.member("b")
    for name in ("alice", "bob", "carol"):
        group.enroll(name)
    group.settle()
    claimer, deferred, counting = _deferred(group, "a")
    claimer.threads = 1  # (every claim thread busy)
    a.handle(group.packet("alice"), SOURCE)
    a.handle(group.packet("bob", "https"), "192.0.2.20")
    a.handle(group.packet("carol"), "192.0.2.30")
    assert group.grants("a") == set()  # queued, not yet claimed
    assert len(deferred.tasks) == 1
    deferred.run()
    assert counting.txns == [(3, 3)]  # one round trip: three claims, three lease records
    assert group.grants("a") == {(SOURCE, "ssh"), ("192.0.2.20", "https"),
                                 ("192.0.2.30", "ssh")}
    assert len(_keys(group, layout.Kind.CLAIM)) == 3
    assert len(_keys(group, layout.Kind.LEASE)) == 3
    assert claimer.counts["claimed"] == 3 and claimer.counts["leases_shared"] == 3
    group.settle()
    assert group.grants("b") == group.grants("a")  # every record reached the other member
    # one lease for the claims' second, one for the leases', and the next second's of
    # each, ahead (after the grants)
    assert claimer.pool.granted == 4


def test_a_replay_inside_a_batch_is_refused_and_the_rest_granted_in_a_second_round(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.enroll("bob")
    group.settle()
    seen_at_b = group.packet("alice")
    b.handle(seen_at_b, SOURCE)  # b claims it first
    claimer, deferred, counting = _deferred(group, "a")
    a.handle(group.packet("bob", "https"), "192.0.2.20")
    a.handle(seen_at_b, SOURCE)  # the copy at a, between two fresh knocks
    a.handle(group.packet("alice", "https"), SOURCE)
    deferred.run()
    group.settle()  # a's receive thread installs b's lease, brought by the watch
    assert counting.txns == [(3, 3), (2, 2)]  # the taken key named, the others again
    assert ("replay", "alice") in group.refusals("a")
    # the two fresh ones granted here; ssh is b's lease, installed by the watch
    assert group.grants("a") == {("192.0.2.20", "https"), (SOURCE, "https"), (SOURCE, "ssh")}
    assert claimer.counts == {**claimer.counts, "claimed": 2, "replay": 1,
                              "leases_shared": 2}
    # the replay's lease record was never written by a: the ssh lease is b's
    leases = group.kv.get_prefix(layout.kind_prefix(GROUP, layout.Kind.LEASE).encode())[0]
    owners = {item.key.rsplit(b"/", 1)[-1]: item.value for item in leases}
    assert b'"b"' in owners[b"ssh"] and b'"a"' in owners[b"https"]


def test_a_lone_packet_goes_at_once_as_a_batch_of_one(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    claimer = group.links["a"].claimer
    counting = Counting(group.kv)
    claimer.kv = counting  # type: ignore[assignment]
    a.handle(group.packet("alice"), SOURCE)  # the executor runs it now: nothing waits
    assert counting.txns == [(1, 1)]
    assert group.grants("a") == {(SOURCE, "ssh")}


def test_a_full_queue_goes_in_transactions_of_at_most_the_cap(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    claimer, deferred, counting = _deferred(group, "a")
    claimer.batch_max = 2
    for i in range(5):
        a.handle(group.packet("alice"), f"192.0.2.{40 + i}")
    deferred.run()
    assert counting.txns == [(2, 2), (2, 2), (1, 1)]
    assert claimer.counts["claimed"] == 5
    assert len(_keys(group, layout.Kind.CLAIM)) == 5
    with pytest.raises(ValueError, match="batch"):
        Claimer(group.kv, group=GROUP, member="z", window=30, on_store_down=claimer.on_store_down,
                hooks=a, clock=group.clock, log=print, batch_max=BATCH_MAX + 1)


def test_two_knocks_on_one_lease_in_a_batch_write_its_key_once_the_later_one_wins(
        group: Group) -> None:
    a, _ = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    _, deferred, counting = _deferred(group, "a")
    a.handle(group.packet("alice", duration=60), SOURCE)
    deferred.run()
    group.settle()
    assert group.grants("b") == {(SOURCE, "ssh")}
    a.handle(group.packet("alice", duration=90), SOURCE)
    a.handle(group.packet("alice", duration=0, action=Action.CLOSE), SOURCE)
    deferred.run()
    assert counting.txns == [(1, 1), (2, 1)]  # etcd refuses a key written twice in a txn
    assert _keys(group, layout.Kind.LEASE) == []  # the close came last
    assert group.grants("a") == set()
    group.settle()
    assert group.grants("b") == set()


def test_claims_over_many_seconds_share_a_lease_a_second_and_one_after_silence_holds(
        group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    claimer = group.links["a"].claimer
    for i in range(40):  # 40 knocks over 10 s: ten seconds of claim ends
        group.clock.advance(0.25)
        a.handle(group.packet("alice", duration=5), f"192.0.2.{100 + i % 2}")
    assert claimer.counts["claimed"] == 40
    assert claimer.pool.granted <= 2 * 11  # claims' seconds and lease records' seconds
    group.clock.advance(3600)  # an hour of silence: every lease of the pool has ended
    assert _keys(group, layout.Kind.CLAIM) == []
    packet = group.packet("alice")
    a.handle(packet, SOURCE)
    assert (SOURCE, "ssh") in group.grants("a")
    assert len(claimer.pool) == 4  # the old seconds forgotten: two new ones, two ahead
    claim = _keys(group, layout.Kind.CLAIM)
    assert len(claim) == 1
    group.clock.advance(claimer.window + 5 - 0.01)  # the window and the skew: still there
    assert _keys(group, layout.Kind.CLAIM) == claim
    group.clock.advance(2)  # and gone less than 2 s after
    assert _keys(group, layout.Kind.CLAIM) == []


def test_knocks_after_silences_of_many_steps_each_claim_once_on_a_lease_etcd_holds(
        group: Group) -> None:
    """Silences from half a second to an hour, landing on and beside whole
    seconds, tag steps and a claim's lifetime: each knock after one is
    claimed in one transaction (a lease of the pool's that the store had
    expired would cost a refused round and a second one), and the claim
    before it is there until its end and gone within OUTLIVES_BY after."""
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    claimer = group.links["a"].claimer
    life = claim_until(0.0, claimer.window)  # a claim's end, from its packet's time
    silences = (0.5, 1.0, 29.999, 30.0, 30.001, 0.5, life - 0.001, life, life + 0.999,
                life + OUTLIVES_BY, 90.0, 299.5, 3600.0)
    last: set[bytes] = set()  # the claim of the knock before the silence
    for silence in silences:
        group.clock.advance(silence)
        held = set(_keys(group, layout.Kind.CLAIM))
        if silence < life:
            assert last <= held, silence
        elif silence >= life + OUTLIVES_BY:
            assert not held, silence
        batches, claimed = claimer.batches, claimer.counts["claimed"]
        a.handle(group.packet("alice", duration=5), SOURCE)
        assert (claimer.batches, claimer.counts["claimed"]) == (batches + 1, claimed + 1), silence
        last = set(_keys(group, layout.Kind.CLAIM)) - held
        assert len(last) == 1


class Calls:
    """The store, saying which calls the claimer made, in order."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.kv, name)

    def grant(self, ttl: int) -> int:
        self.calls.append("grant")
        lease: int = self.kv.grant(ttl)
        return lease

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        self.calls.append("txn")
        found: frozenset[bytes] = self.kv.create_many(creates, writes)
        return found


def test_the_next_seconds_leases_are_granted_after_a_knock_not_on_the_next_ones_path(
        group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    claimer = group.links["a"].claimer
    calls = Calls(group.kv)
    claimer.kv = calls  # type: ignore[assignment]
    a.handle(group.packet("alice"), SOURCE)
    assert calls.calls == ["grant", "grant", "txn", "grant", "grant"]  # two ahead, after
    for i in range(3):  # a knock a second: its leases are in the pool already
        calls.calls.clear()
        group.clock.advance(1.0)
        a.handle(group.packet("alice"), f"192.0.2.{100 + i}")
        assert calls.calls[0] == "txn"
        assert calls.calls[1:] == ["grant", "grant"]  # the second after, ahead again
    assert claimer.counts["claimed"] == 4
    claimer.ahead = False
    calls.calls.clear()
    group.clock.advance(1.0)
    a.handle(group.packet("alice"), "192.0.2.110")
    assert calls.calls == ["txn"]  # what the last knock asked for ahead
    calls.calls.clear()
    group.clock.advance(1.0)
    a.handle(group.packet("alice"), "192.0.2.111")
    assert calls.calls == ["grant", "grant", "txn"]  # none ahead: on the path


def test_no_lease_is_asked_for_ahead_of_a_claim_found_taken(group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    packet = group.packet("alice")
    a.handle(packet, SOURCE)
    claimer = group.links["b"].claimer
    calls = Calls(group.kv)
    claimer.kv = calls  # type: ignore[assignment]
    b.handle(packet, SOURCE)  # accepted by a: a replay at b, nothing granted
    assert claimer.counts["replay"] == 1 and claimer.counts["claimed"] == 0
    assert calls.calls == ["grant", "grant", "txn"]  # its own leases, none ahead


def test_a_lease_etcd_lost_is_granted_anew_once_and_the_knock_granted(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    claimer = group.links["a"].claimer
    a.handle(group.packet("alice"), SOURCE)
    for lease in list(claimer.pool._buckets.values()):
        group.kv.revoke(lease)  # behind the member's back
    granted = claimer.pool.granted
    a.handle(group.packet("alice", "https"), SOURCE)
    assert (SOURCE, "https") in group.grants("a")
    assert claimer.counts["claimed"] == 2 and claimer.counts["unreachable"] == 0
    assert claimer.pool.granted == granted + 2


def test_a_lease_record_etcd_refuses_costs_the_share_never_the_grant(group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    lease_prefix = layout.kind_prefix(GROUP, layout.Kind.LEASE).encode()
    claimer, deferred, counting = _deferred(group, "a", refuse=lease_prefix)
    a.handle(group.packet("alice"), SOURCE)
    a.handle(group.packet("alice", "https"), SOURCE)
    deferred.run()
    assert counting.txns == [(2, 2), (2, 0)]  # refused with the leases; the claims alone
    assert group.grants("a") == {(SOURCE, "ssh"), (SOURCE, "https")}
    assert claimer.counts == {**claimer.counts, "claimed": 2, "leases_not_shared": 2,
                              "leases_shared": 0}
    assert len(_keys(group, layout.Kind.CLAIM)) == 2
    assert any("not shared" in line for line in group.worlds["a"].logs)


def test_a_batch_s_grants_go_in_one_call_and_one_that_fails_is_said_for_each(
        group: Group) -> None:
    a = group.member("a")
    for name in ("alice", "bob", "carol"):
        group.enroll(name)
    group.settle()
    claimer, deferred, _ = _deferred(group, "a")
    server = claimer.hooks
    calls: list[list[str]] = []

    class Failing:
        fail = True

        def __getattr__(self, name: str) -> object:
            return getattr(server, name)

        def grant_claimed(self, results: list[Any], now: float) -> None:
            calls.append([result.client for result in results])
            if self.fail:
                raise OSError("the firewall helper is gone (test)")
            server.grant_claimed(results, now)
    hooks = Failing()
    claimer.hooks = hooks  # type: ignore[assignment]
    a.handle(group.packet("alice"), SOURCE)
    a.handle(group.packet("bob", "https"), "192.0.2.20")
    deferred.run()
    assert calls == [["alice", "bob"]]  # one call for the batch: one firewall commit
    assert group.grants("a") == set()
    assert {line.split("client=")[1].split()[0] for line in group.worlds["a"].logs
            if "not settled: OSError" in line} == {"alice", "bob"}
    hooks.fail = False  # the claimer goes on with the next batch
    a.handle(group.packet("carol"), "192.0.2.30")
    deferred.run()
    assert calls[-1] == ["carol"]
    assert group.grants("a") == {("192.0.2.30", "ssh")}


def test_a_knock_with_a_code_shares_its_lease_only_once_its_step_is_claimed(
        group: Group) -> None:
    import pyotp

    a, b = group.member("a"), group.member("b")
    group.enroll("alice", otp=True)
    group.enroll("bob")
    group.settle()
    code = pyotp.TOTP(group.otp_secrets["alice"]).at(group.clock.now)
    b.handle(group.packet("alice", otp=code), SOURCE)  # b uses the code first
    assert _keys(group, layout.Kind.LEASE) != []
    group.kv.delete(_keys(group, layout.Kind.LEASE)[0])  # (b's record out of the way)
    claimer, deferred, counting = _deferred(group, "a")
    a.handle(group.packet("alice", "https", otp=code), "192.0.2.50")  # the code again, at a
    a.handle(group.packet("bob"), "192.0.2.20")
    deferred.run()
    assert counting.txns == [(2, 1)]  # bob's record only: alice's waits for her step
    assert ("otp_reused", "alice") in group.refusals("a")
    assert group.grants("a") >= {("192.0.2.20", "ssh")}
    assert ("192.0.2.50", "https") not in group.grants("a")
    leases = group.kv.get_prefix(layout.kind_prefix(GROUP, layout.Kind.LEASE).encode())[0]
    assert [item.key.split(b"/")[-3] for item in leases] == [b"bob"]  # none for alice's
    assert claimer.counts == {**claimer.counts, "claimed": 1, "otp_reused": 1,
                              "leases_shared": 1}
