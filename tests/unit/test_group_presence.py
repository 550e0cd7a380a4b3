"""A member announces itself in members/<member> on a lease it renews
(spa/group/presence.py), with a controlled clock over many renewals and over
silences longer than the TTL."""

from __future__ import annotations

import pytest

from spa.group import layout
from spa.group.kv import KV
from spa.group.memory import MemoryStore
from spa.group.presence import PRESENCE_EVERY, PRESENCE_TTL, Presence
from spa.group.records import decode_member
from tests.group_world import GROUP, Group
from tests.server_world import FakeClock


def announced(kv: KV) -> list[str]:
    items, _ = kv.get_prefix(layout.kind_prefix(GROUP, layout.Kind.MEMBER).encode())
    return [decode_member(item.value).member for item in items]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_renewals_keep_a_member_announced_and_silence_ends_it(clock: FakeClock) -> None:
    kv, lines = MemoryStore(clock), list[str]()
    presence = Presence(kv, group=GROUP, member="gw-a", started=clock(), log=lines.append)
    presence.tick()
    for _ in range(100):  # 500 s of renewals: never gone
        clock.advance(PRESENCE_EVERY)
        presence.tick()
        assert announced(kv) == ["gw-a"]
    clock.advance(PRESENCE_TTL + 1)  # a member that stopped renewing (crashed, cut off)
    assert announced(kv) == []
    presence.tick()  # its lease expired: a new one, the key again
    assert announced(kv) == ["gw-a"]
    assert lines == []


def test_an_unreachable_store_is_said_once_and_the_member_comes_back(clock: FakeClock) -> None:
    kv, lines = MemoryStore(clock), list[str]()
    presence = Presence(kv, group=GROUP, member="gw-a", started=clock(), log=lines.append)
    presence.tick()
    kv.unreachable = True
    for _ in range(10):
        clock.advance(PRESENCE_EVERY)
        presence.tick()  # never raises
    assert len(lines) == 1 and "cannot announce this member" in lines[0]
    kv.unreachable = False
    presence.tick()
    assert announced(kv) == ["gw-a"]
    assert lines[1:] == [f"group {GROUP}: this member is announced again"]


def test_a_clean_stop_takes_the_key_at_once(clock: FakeClock) -> None:
    kv = MemoryStore(clock)
    presence = Presence(kv, group=GROUP, member="gw-a", started=clock(), log=print)
    presence.tick()
    presence.close()
    assert announced(kv) == []


def test_a_started_member_is_announced_and_a_closed_one_is_not(group: Group) -> None:
    group.member("a")
    group.member("b")
    assert sorted(announced(group.kv)) == ["a", "b"]
    group.links["a"].close()
    assert announced(group.kv) == ["b"]
