"""Two in-process servers as members of group `a` on the real 3-member etcd
cluster (tests/etcd_world.py: TLS, RBAC), each with its own connection: a
packet accepted by one is refused `replay` at the other, and the lease the
first granted is installed at the second through etcd's watch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyotp
import pytest

from tests.etcd_world import EtcdCluster
from tests.group_world import SOURCE, Group
from tests.server_world import FakeClock

WAIT = 15.0  # seconds a watch event may take on a loaded machine
TIMEOUT = 1.0  # seconds a member's call waits for one endpoint


@pytest.fixture
def group(etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[Group]:
    """Group `a` (the role its user has), emptied first; every thread the
    test makes (the watches) inside the cluster's client namespace; every
    etcd member running again afterwards."""
    with etcd_cluster.inside():
        etcd_cluster.ctl("del", "--prefix", "/spa/groups/a/")
        made = Group(tmp_path, etcd_cluster.store("a"), FakeClock(), group="a",
                     stores={"m1": etcd_cluster.store("a", timeout=TIMEOUT),
                             "m2": etcd_cluster.store("a", timeout=TIMEOUT)})
        try:
            yield made
        finally:
            made.close()
            for i in range(len(etcd_cluster.members)):
                etcd_cluster.restart(i)
            etcd_cluster.wait_healthy()


def _until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _granted(group: Group, member: str) -> set[tuple[str, str]]:
    """What the member's firewall lets through once its receive thread ran
    what the watch queued for it (installs of other members' leases)."""
    group.settle()
    return group.grants(member)


def test_a_packet_accepted_by_one_member_is_refused_replay_at_another_over_etcd(
        group: Group) -> None:
    m1, m2 = group.member("m1"), group.member("m2")
    group.enroll("alice")
    assert _until(lambda: all(link.member.clients == {"alice"}
                              for link in group.links.values()))
    group.settle()
    packet = group.packet("alice")
    m1.handle(packet, SOURCE)
    assert group.grants("m1") == {(SOURCE, "ssh")}
    m2.handle(packet, SOURCE)
    assert ("replay", "alice") in group.refusals("m2")
    assert group.links["m2"].claimer.counts["replay"] == 1
    assert group.links["m1"].claimer.counts["claimed"] == 1
    # m1's lease reached m2 by the watch, with m1's end: a failover finds it open
    assert _until(lambda: _granted(group, "m2") == {(SOURCE, "ssh")})
    fresh = group.packet("alice", "https")
    m2.handle(fresh, SOURCE)  # a new packet at m2 is its own to claim
    assert (SOURCE, "https") in group.grants("m2")
    assert group.links["m2"].claimer.counts["claimed"] == 1


def test_without_quorum_members_fail_closed_keep_their_table_and_recover_over_etcd(
        group: Group, etcd_cluster: EtcdCluster) -> None:
    m1, m2 = group.member("m1"), group.member("m2")
    group.enroll("alice")
    assert _until(lambda: all(link.member.clients == {"alice"}
                              for link in group.links.values()))
    group.settle()
    m1.handle(group.packet("alice"), SOURCE)
    assert _until(lambda: _granted(group, "m2") == {(SOURCE, "ssh")})
    etcd_cluster.kill(1)
    etcd_cluster.kill(2)  # one of three left: no quorum
    m2.handle(group.packet("alice", "https"), SOURCE)
    assert ("group_unreachable", "alice") in group.refusals("m2")
    assert (SOURCE, "https") not in group.grants("m2")
    assert group.grants("m2") == {(SOURCE, "ssh")}  # the lease it had stays
    assert "alice" in m2.verifier.tags.clients  # and the table it had
    etcd_cluster.restart(1)
    etcd_cluster.restart(2)
    etcd_cluster.wait_healthy()

    def granted_again() -> bool:
        m2.handle(group.packet("alice", "https"), SOURCE)
        return (SOURCE, "https") in group.grants("m2")

    assert _until(granted_again)  # no restart of the member: the next claim is made
    assert any("etcd answers claims again" in line for line in group.worlds["m2"].logs)
    group.revoke("alice", close=True)  # and the watches came back too

    def closed_everywhere() -> bool:
        return not _granted(group, "m1") and not _granted(group, "m2")

    assert _until(closed_everywhere)
    assert "alice" not in m1.verifier.tags.clients | m2.verifier.tags.clients


def test_an_authenticator_code_used_at_one_member_is_refused_at_another_over_etcd(
        group: Group) -> None:
    m1, m2 = group.member("m1"), group.member("m2")
    group.enroll("alice", otp=True)
    assert _until(lambda: all(link.member.clients == {"alice"}
                              for link in group.links.values()))
    group.settle()
    code = pyotp.TOTP(group.otp_secrets["alice"]).at(group.clock.now)
    m1.handle(group.packet("alice", otp=code), SOURCE)
    assert group.grants("m1") == {(SOURCE, "ssh")}
    m2.handle(group.packet("alice", "https", otp=code), SOURCE)  # a new packet, the same code
    assert group.refusals("m2") == [("otp_reused", "alice")]
    assert (SOURCE, "https") not in group.grants("m2")
    # the members' roles write the step's key as they write nonce claims
    assert [link.claimer.counts["claimed"] for link in group.links.values()] == [1, 0]
