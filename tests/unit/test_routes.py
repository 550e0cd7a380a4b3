"""The reverse-path check (issue 13, finding 2): its cache on a controlled
clock, the kernel's answers parsed without root, and the daemon's use of it
with a fake (a knock whose route back leaves by another interface is refused
`spoofed_source`)."""

from __future__ import annotations

import itertools
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from spa.core.errors import Reason
from spa.core.verify import Accepted, Refused
from spa.server import admin
from spa.server import config as config_mod
from spa.server.routes import (
    _NLMSGHDR,
    _RTMSG,
    CACHE_SIZE,
    CACHE_TTL,
    RTA_MULTIPATH,
    RTA_OIF,
    RTM_NEWROUTE,
    RTN_LOCAL,
    RTN_UNICAST,
    CachedRoutes,
    FakeRoutes,
    _attr,
    _messages,
    _parse_route,
)
from tests.server_world import World

A = "192.0.2.10"  # alice's address: its route leaves by interface 2
X = "198.51.100.7"  # another address: its route leaves by interface 3
ON_A, ON_X = 2, 3


def test_answers_are_reused_for_the_ttl_only_and_the_cache_stays_bounded() -> None:
    """Every 0.25 s for 10 minutes: the kernel is asked once per TTL for a
    source, a route change counts within CACHE_TTL, a clock set back asks
    again, and a stream of new sources never holds more than CACHE_SIZE."""
    inner = FakeRoutes({A: ON_A})
    routes = CachedRoutes(inner)
    now, changed_at = 1_800_000_000.0, None
    for tick in range(10 * 60 * 4):
        now += 0.25
        if tick == 1000:  # the route to A moves to interface 3
            inner.routes[A] = frozenset({ON_X})
            changed_at = now
        answer = routes.leaves_by(A, ON_A, now)
        if changed_at is None:
            assert answer
        elif now - changed_at >= CACHE_TTL:
            assert not answer, f"the change still unseen {now - changed_at} s later"
    asked = [when for source, _, when in inner.asked if source == A]
    assert len(asked) == pytest.approx(10 * 60 / CACHE_TTL, abs=2)
    assert all(b - a >= CACHE_TTL for a, b in itertools.pairwise(asked))
    before = len(inner.asked)
    routes.leaves_by(A, ON_A, now - 3600)  # the clock set back: no answer from the future
    assert len(inner.asked) == before + 1
    for i in range(3 * CACHE_SIZE):
        routes.leaves_by(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", ON_A, now)
        assert len(routes) <= CACHE_SIZE


def _route(kind: int, *attrs: bytes) -> bytes:
    body = _RTMSG.pack(2, 32, 0, 0, 254, 0, 0, kind, 0) + b"".join(attrs)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWROUTE, 0, 7, 0) + body


def test_the_kernels_answer_gives_the_routes_interface_or_every_nexthop() -> None:
    single = _route(RTN_UNICAST, _attr(1, bytes(4)), _attr(RTA_OIF, struct.pack("=I", 5)))
    [(kind, seq, payload)] = list(_messages(single))
    assert (kind, seq) == (RTM_NEWROUTE, 7)
    assert _parse_route(payload) == (RTN_UNICAST, frozenset({5}))
    hops = b"".join(struct.pack("=HBBi", 8, 0, 0, index) for index in (2, 9))
    [(_, _, payload)] = list(_messages(_route(RTN_UNICAST, _attr(RTA_MULTIPATH, hops))))
    assert _parse_route(payload) == (RTN_UNICAST, frozenset({2, 9}))
    [(_, _, payload)] = list(_messages(_route(RTN_LOCAL, _attr(RTA_OIF, struct.pack("=I", 4)))))
    assert _parse_route(payload) == (RTN_LOCAL, frozenset({4}))
    assert _parse_route(b"\x02") is None


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.init()
    w.enroll("alice")
    w.enroll("carol")
    with admin.open_store(config_mod.load(w.config_path), now=0.0) as store:
        carol = store.get("carol")
        assert carol is not None
        store.put(replace(carol, allow_other_address=True), at=0.0)
    return w


def test_a_knock_whose_route_back_leaves_elsewhere_is_refused_spoofed_source(
        world: World) -> None:
    routes = FakeRoutes({A: ON_A, X: ON_X})
    server = world.start(routes=routes)
    forged = world.packet("alice", duration=60)
    assert server.handle(forged, X, ON_A) == Refused(Reason.SPOOFED_SOURCE, "alice")
    assert world.backend.grants == {}, "no lease for X"
    assert X not in server._knocked, "a forged source is not spared from scan detection"
    # its nonce is burned: the same packet from anywhere is a replay
    assert server.handle(forged, X, ON_X) == Refused(Reason.REPLAY, "alice")
    # the honest knock, from alice's address on its own interface
    assert isinstance(server.handle(world.packet("alice", duration=60), A, ON_A), Accepted)
    assert [str(a) for a, _ in world.backend.grants] == [A]
    refused = [e for e in world.events() if e.outcome == "refused"]
    assert [(e.reason, e.client, e.source) for e in refused] == [
        ("spoofed_source", "alice", X), ("replay", "alice", X)]
    assert "refused reason=spoofed_source client=alice src=198.51.100.7" in world.logs


def test_only_accepted_knocks_of_clients_without_the_permission_are_checked(
        world: World) -> None:
    routes = FakeRoutes({A: ON_A})
    server = world.start(routes=routes)
    packet = world.packet("alice", duration=60)
    bad = bytearray(packet)
    bad[-1] ^= 1
    server.handle(b"\x01" + bytes(160), X, ON_A)  # unknown tag
    server.handle(bytes(bad), X, ON_A)  # bad mac
    server.handle(world.packet("alice", at=world.clock.now - 100), X, ON_A)  # stale
    server.handle(world.packet("alice", "nope"), X, ON_A)  # service_not_allowed
    assert routes.asked == [], "the check runs only for a knock that was accepted"
    # carol may name any address: a forged source is no more than that, unchecked
    assert isinstance(server.handle(world.packet("carol", duration=60), X, ON_A), Accepted)
    assert routes.asked == []
    assert isinstance(server.handle(packet, A, ON_A), Accepted)
    assert routes.asked == [(A, ON_A, world.clock.now)]
