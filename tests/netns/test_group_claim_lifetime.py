"""A knock's claims over their whole lifetime, in real time, on the real
3-member etcd cluster (tests/etcd_world.py: TLS, RBAC) with three in-process
members of group `a` (tests/group_world.py) whose clocks run at the real
clock's speed (RunningClock for the packets' time, time.monotonic for the
shared etcd leases, as in the daemon).

The project's rule: anything that moves with the clock gets a real-time test
that waits longer than the longest step before it acts.  A nonce claim must
hold until its packet's timestamp + window + MEMBER_SKEW
(records.claim_until), on a shared etcd lease of its end's second
(spa.group.leasepool), which outlives that end by less than
leasepool.OUTLIVES_BY; an authenticator code's step claim until the end of
the code's drift + MEMBER_SKEW (otpclaim.otp_claim_until), on a lease of its
own; etcd then revokes an expired lease within ETCD_REVOKES.  The test
knocks at member A (alice; bob with the code of the step before, so that
both claims end about 35 s later), lets the cluster be silent past all of
that, and then:
- while a member still accepts them, a new packet with bob's code and a
  replay of alice's packet (2 s before the window closes) are refused at
  member C (`otp_reused`, `replay`); each claim is still held 0.3 s before
  its end, and gone after it within the lease's rounding and etcd's revocation;
- (a) at member B, which never saw them, alice's packet is refused `stale`
  and bob's code `otp_invalid`: by the clock alone, without a round trip to
  etcd;
- (b) fresh knocks at A and at B are granted, their nonce claims on leases
  etcd holds alive for at least as long as the claims must hold (no lease
  the pool had before the silence: etcd has expired those), and a replay of
  the fresh one across members is refused `replay`;
- (c) the claims' keys and the shared lease record are gone from etcd.
About 40 s of waiting; one test, so it costs one lifetime.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyotp
import pytest

from spa.core.knock import STEP_SECONDS
from spa.core.otp import STEP
from spa.group import layout
from spa.group.leasepool import OUTLIVES_BY
from spa.group.otpclaim import otp_claim_until
from spa.group.records import claim_until
from tests.etcd_world import EtcdCluster
from tests.group_world import SOURCE, Group
from tests.server_world import START, RunningClock

GROUP = "a"  # the group whose role tests/etcd_world.py made
# seconds after a lease's expiry before etcd has deleted its keys: etcd's
# lessor looks for expired leases every 500 ms, then revokes them through raft
ETCD_REVOKES = 1.0
WAIT = 15.0  # seconds more a watch event or a revocation may take on a loaded machine
TIMEOUT = 1.0  # seconds a member's call waits for one endpoint
DURATION = 10  # seconds the first knock's lease lasts: its shared record ends within the wait


@pytest.fixture
def group(etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[Group]:
    """Group `a`, emptied first, on a clock that runs at the real one's
    speed; every thread inside the cluster's client namespace."""
    with etcd_cluster.inside():
        etcd_cluster.ctl("del", "--prefix", layout.group_prefix(GROUP))
        made = Group(tmp_path, etcd_cluster.store(GROUP), RunningClock(START),
                     group=GROUP, monotonic=time.monotonic,
                     stores={name: etcd_cluster.store(GROUP, timeout=TIMEOUT)
                             for name in ("m1", "m2", "m3")})
        try:
            yield made
        finally:
            made.close()


def _until(condition: Callable[[], bool], seconds: float = WAIT) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _sleep_until(clock: RunningClock, moment: float) -> None:
    time.sleep(max(0.0, moment - clock.now))


def _keys(group: Group, prefix: str) -> dict[bytes, int]:
    """The keys under `prefix` in etcd now, with their leases."""
    items, _ = group.kv.get_prefix(prefix.encode())
    return {item.key: item.lease for item in items}


def _otp_keys(group: Group, client: str) -> set[bytes]:
    """The client's authenticator-code step claims in etcd now."""
    return {key for key in _keys(group, layout.client_claims_prefix(GROUP, client))
            if b"/otp-" in key}


def _live_leases(cluster: EtcdCluster) -> set[int]:
    """Every lease etcd holds now (root's etcdctl)."""
    listed = cluster.ctl("lease", "list")
    return {int(word, 16) for word in re.findall(r"^([0-9a-f]+)$", listed, re.M)}


def _remaining(cluster: EtcdCluster, lease: int) -> int:
    """The seconds etcd says the lease has left (-1: it has expired)."""
    said = cluster.ctl("lease", "timetolive", format(lease, "x"))
    found = re.search(r"remaining\((-?\d+)s\)", said)
    return int(found.group(1)) if found else -1


def test_a_claim_holds_its_window_then_goes_and_knocks_after_the_silence_get_fresh_leases(
        group: Group, etcd_cluster: EtcdCluster) -> None:
    a, b, c = group.member("m1"), group.member("m2"), group.member("m3")
    group.enroll("alice")
    group.enroll("bob", otp=True)
    assert _until(lambda: all(link.member.clients == {"alice", "bob"}
                              for link in group.links.values()))
    group.settle()
    clock = group.clock
    assert isinstance(clock, RunningClock)
    window = a.config.window
    claims, leases = (layout.client_claims_prefix(GROUP, "alice"),
                      layout.client_leases_prefix(GROUP, "alice"))
    otp = pyotp.TOTP(group.otp_secrets["bob"])

    # 0.5 s into the next step (of tags and codes: both 30 s from the epoch), as if
    # the set-up had lasted until then: the packet keeps its knock tag for the whole
    # wait (its step, the next one and the window), and a code of the step before
    # is accepted for most of a step
    clock.now = (int(clock.now // STEP) + 1) * STEP + 0.5
    sent = clock.now
    step = int(sent // STEP)
    packet = group.packet("alice", duration=DURATION, sent=sent)
    end = claim_until(int(sent * 1000) / 1000, window)  # the claim must hold until then
    tag_dies = (int(sent // STEP_SECONDS) + 2) * STEP_SECONDS + window  # its tag, at B
    code = otp.at((step - 1) * STEP)  # the step before: accepted while step lasts (DRIFT 1)
    otp_end = otp_claim_until(step - 1)  # and its claim must hold until then
    unrelated = _live_leases(etcd_cluster)  # the members' presence leases, ...
    a.handle(packet, SOURCE)
    a.handle(group.packet("bob", otp=code), SOURCE)
    assert group.grants("m1") == {(SOURCE, "ssh")}
    assert group.refusals("m1") == []
    first = _keys(group, claims)
    assert len(first) == 1, first
    otp_keys = _otp_keys(group, "bob")
    assert layout.otp_claim_key(GROUP, "bob", step - 1).encode() in otp_keys
    attached = set(first.values()) | set(_keys(group, leases).values())  # claim, record
    assert len(attached) == 2, attached
    before = _live_leases(etcd_cluster) - unrelated  # the knocks': those, the next seconds'
    assert attached <= before
    (claim_lease,) = first.values()
    assert _remaining(etcd_cluster, claim_lease) >= int(end - clock.now)
    granted_before = group.links["m1"].claimer.pool.granted

    # while a member still accepts bob's code, a new packet with it is refused at C
    _sleep_until(clock, (step + 1) * STEP - 0.5)
    c.handle(group.packet("bob", "https", otp=code), SOURCE)
    # and alice's packet, 2 s before the window closes
    _sleep_until(clock, sent + window - 2)
    c.handle(packet, SOURCE)
    assert group.refusals("m3") == [("otp_reused", "bob"), ("replay", "alice")]
    _sleep_until(clock, otp_end - 0.3)  # the code's claim's last moment: still held
    assert _otp_keys(group, "bob") == otp_keys
    assert _until(lambda: not _otp_keys(group, "bob"), OUTLIVES_BY + ETCD_REVOKES + WAIT)
    _sleep_until(clock, end - 0.3)  # the nonce claim's last moment: still held
    assert _keys(group, claims) == first
    # then gone, within the lease's rounding and etcd's revocation
    assert _until(lambda: not _keys(group, claims), OUTLIVES_BY + ETCD_REVOKES + WAIT)
    print(f"claim keys gone {clock.now - end:.2f} s after the claim's end (the lease's "
          f"rounding: < {OUTLIVES_BY} s, etcd's revocation: ~{ETCD_REVOKES} s)", file=sys.stderr)
    _sleep_until(clock, end + OUTLIVES_BY)  # past the whole lifetime, the cluster silent
    assert not _keys(group, leases)  # the shared record ended before (DURATION)
    assert not attached & _live_leases(etcd_cluster)  # etcd has expired them

    # (a) at B, which never saw them: the window refuses alice's packet, the code's
    # time bob's, and etcd is not asked
    assert clock.now < tag_dies, "the set-up took so long that the packet's tag is gone"
    b.handle(packet, SOURCE)
    b.handle(group.packet("bob", otp=code), SOURCE)
    assert group.refusals("m2") == [("stale", "alice"), ("otp_invalid", "bob")]
    assert group.links["m2"].claimer.batches == 0
    assert not _keys(group, claims)

    # (b) fresh knocks after the silence, at A and at B: granted, on live leases
    fresh_a, fresh_b = group.packet("alice"), group.packet("alice", "https")
    a.handle(fresh_a, SOURCE)
    b.handle(fresh_b, SOURCE)
    fresh_step = int(clock.now // STEP)
    b.handle(group.packet("bob", "ssh", otp=otp.at(fresh_step * STEP)), SOURCE)
    assert (SOURCE, "ssh") in group.grants("m1")
    assert {(SOURCE, "https"), (SOURCE, "ssh")} <= group.grants("m2")
    assert [link.claimer.counts["claimed"] for link in group.links.values()] == [3, 2, 0]
    assert group.links["m1"].claimer.pool.granted > granted_before
    fresh = _keys(group, claims)
    assert len(fresh) == 2, fresh
    must_hold = claim_until(clock.now, window) - clock.now
    for lease in fresh.values():
        assert lease not in before
        assert _remaining(etcd_cluster, lease) >= int(must_hold) - 1, must_hold
    time.sleep(ETCD_REVOKES)  # an expired lease's keys would be gone by now
    assert _keys(group, claims) == fresh
    assert layout.otp_claim_key(GROUP, "bob", fresh_step).encode() in _otp_keys(group, "bob")
    b.handle(fresh_a, SOURCE)  # and the fresh claim is shared as the first one was
    assert group.refusals("m2")[-1] == ("replay", "alice")
