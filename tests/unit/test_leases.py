"""The lease table: examples of the NAT seed problem and the action stream.
The full invariant is checked by tests/property/test_leases_stateful.py."""

from __future__ import annotations

import ipaddress

import pytest

from spa.core.leases import Allow, Lease, LeaseTable, Remove

NAT = ipaddress.ip_address("203.0.113.5")
V6 = ipaddress.ip_address("2001:db8::5")


def test_first_grant_allows_and_expiry_removes() -> None:
    table = LeaseTable()
    assert table.grant("alice", NAT, "https", now=0, duration=60) == [Allow(NAT, "https", 60)]
    assert table.next_due() == 60
    assert table.expire(59.9) == []
    assert table.expire(60) == [Remove(NAT, "https")]
    assert table.allowed() == {}
    assert len(table) == 0


def test_shared_nat_close_keeps_the_other_users_access() -> None:
    """The seed problem: the first user to sign out closed the port for all."""
    table = LeaseTable()
    table.grant("alice", NAT, "https", now=0, duration=1800)
    assert table.grant("bob", NAT, "https", now=10, duration=600) == []
    assert table.close("alice", NAT, "https", now=20) == [Allow(NAT, "https", 610)]
    assert table.allowed() == {(NAT, "https"): 610}
    assert table.holders(NAT, "https") == {"bob": 610}
    assert table.close("bob", NAT, "https", now=30) == [Remove(NAT, "https")]


def test_shared_nat_expiry_of_one_keeps_the_other() -> None:
    table = LeaseTable()
    table.grant("alice", NAT, "https", now=0, duration=100)
    table.grant("bob", NAT, "https", now=0, duration=500)
    assert table.expire(100) == []  # bob's later expiry already rules the pair
    assert table.allowed() == {(NAT, "https"): 500}


def test_renewal_extends_never_shortens() -> None:
    table = LeaseTable()
    table.grant("alice", NAT, "ssh", now=0, duration=300)
    assert table.grant("alice", NAT, "ssh", now=10, duration=30) == []
    assert table.allowed() == {(NAT, "ssh"): 300}
    assert table.grant("alice", NAT, "ssh", now=200, duration=300) == [Allow(NAT, "ssh", 500)]
    assert table.expire(300) == [], "the superseded expiry does nothing"
    assert table.expire(500) == [Remove(NAT, "ssh")]


def test_close_of_a_lease_not_held_changes_nothing() -> None:
    table = LeaseTable()
    table.grant("alice", NAT, "ssh", now=0, duration=30)
    assert table.close("bob", NAT, "ssh", now=1) == []
    assert table.close("alice", V6, "ssh", now=1) == []
    assert table.allowed() == {(NAT, "ssh"): 30}


def test_calls_expire_what_is_due_first() -> None:
    table = LeaseTable()
    table.grant("alice", NAT, "ssh", now=0, duration=30)
    actions = table.grant("alice", V6, "ssh", now=40, duration=30)
    assert actions == [Remove(NAT, "ssh"), Allow(V6, "ssh", 70)]


def test_close_client_ends_all_its_leases_only() -> None:
    table = LeaseTable()
    table.grant("alice", NAT, "ssh", now=0, duration=30)
    table.grant("alice", V6, "https", now=0, duration=30)
    table.grant("bob", NAT, "ssh", now=0, duration=10)
    actions = table.close_client("alice", now=1)
    assert Remove(V6, "https") in actions
    assert Allow(NAT, "ssh", 10) in actions
    assert [lease.client for lease in table.leases()] == ["bob"]


def test_mixed_families_with_equal_expiry_do_not_break_the_heap() -> None:
    table = LeaseTable()
    table.grant("alice", NAT, "ssh", now=0, duration=30)
    table.grant("alice", V6, "ssh", now=0, duration=30)
    assert table.expire(30) == [Remove(NAT, "ssh"), Remove(V6, "ssh")]


def test_rebuild_from_saved_leases_keeps_live_ones_exactly() -> None:
    saved = [Lease("alice", NAT, "ssh", 100.25), Lease("bob", NAT, "ssh", 50.0),
             Lease("carol", V6, "https", 10.0)]
    table = LeaseTable.from_leases(saved, now=20)
    assert table.allowed() == {(NAT, "ssh"): 100.25}
    assert table.leases() == saved[1::-1]


def test_grant_needs_a_positive_duration() -> None:
    with pytest.raises(ValueError, match="positive"):
        LeaseTable().grant("alice", NAT, "ssh", now=0, duration=0)


@pytest.mark.parametrize("duration", [float("nan"), float("inf"), -1.0])
def test_grant_refuses_non_finite_durations(duration: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        LeaseTable().grant("alice", NAT, "ssh", now=0, duration=duration)
