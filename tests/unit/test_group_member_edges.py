"""Loose ends of a member (issue 18), on the memory fake and a fake clock:
another member's lease of a service this member cannot install, a rotation
racing the members' grants, a restart while etcd is down, an authenticator
code used at one member and sent to another (docs/groups.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.group import layout
from spa.group.memory import MemoryStore
from spa.group.records import LeaseRecord, encode_lease
from tests.group_world import ADDRESS, SOURCE, Group
from tests.server_world import FakeClock

NAMED = ('\n[services.db]\nport = 22\ndefault_duration = 60\nmax_duration = 300\n'
         'host = "db.internal"\n')


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    clock = FakeClock()
    made = Group(tmp_path, MemoryStore(clock), clock)
    yield made
    made.close()


def _share(group: Group, record: LeaseRecord) -> None:
    """Write a lease as the member that granted it does (claims.Claimer.share)."""
    key = layout.lease_key(group.group, record.client, record.address, record.service)
    group.kv.put(key.encode(), encode_lease(record), group.kv.grant(record.ttl(group.clock.now)))


def test_another_members_lease_of_a_named_gateway_service_is_logged_not_installed(
        group: Group) -> None:
    group.member("b", config=NAMED)
    group.enroll("alice", "ssh", "db")
    group.settle()
    until = group.clock.now + 60
    _share(group, LeaseRecord("alice", ADDRESS, "db", "tcp", 22, until, "a"))
    group.settle()
    assert group.grants("b") == set()  # no destination to guess: nothing installed
    assert any("lease of client=alice for service db is not installed here: its host is "
               "a name" in line for line in group.worlds["b"].logs)
    # the same member installs a lease of a service of its own at once (the control)
    _share(group, LeaseRecord("alice", ADDRESS, "ssh", "tcp", 22, until, "a"))
    group.settle()
    assert group.grants("b") == {(SOURCE, "ssh")}
    assert group.worlds["b"].backend.grants[(ADDRESS, "ssh")] == pytest.approx(until)
