"""The gate keeper's tag maps for the daemon (spa.server.gatemsg TagMap,
spa.server.mapgrant, monitor, remote, frames): the request parses or is
refused, the gate keeper makes maps only for its own knock port, each at
least twice the last and at most the most, and hands the descriptors over
the socketpair; the daemon keeps them only as a kit."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa.backends.memory import MemoryBackend
from spa.kernel.tagkit import Kit
from spa.server import frames, gatemsg
from spa.server.errors import LocalError
from spa.server.gatemsg import MAX_TAG_MAP, RefusedError, TagMap
from spa.server.mapgrant import CAP_VARIABLE, MapGrants, most_from
from spa.server.monitor import GateKeeper
from spa.server.remote import RemoteGate, serving_here
from tests.unit.test_privsep import SSH, Clock

PORT = 62201
ROOM = 65536  # the room made before the drop


def tag_map(mode: object = "capture", port: object = PORT, entries: object = 2 * ROOM,
            **extra: object) -> dict[str, Any]:
    return {"kind": "tagmap", "mode": mode, "port": port, "entries": entries, **extra}


class FakeKit:
    """A kit of pipes: four descriptors to hand over, and whether it was closed."""

    def __init__(self, port: int | None, entries: int) -> None:
        self.port, self.entries = port, entries
        ends = [os.pipe() for _ in range(2)]
        self._fds = (*ends[0], *ends[1])
        self.closed = False

    @property
    def fds(self) -> tuple[int, ...]:
        return self._fds

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self.closed = True


class FakeMaker:
    def __init__(self) -> None:
        self.made: list[FakeKit] = []

    def __call__(self, port: int | None, entries: int) -> Kit:
        self.made.append(FakeKit(port, entries))
        return cast(Kit, self.made[-1])


def grants(mode: str = "capture", most: int = MAX_TAG_MAP) -> tuple[MapGrants, FakeMaker]:
    maker = FakeMaker()
    return MapGrants(mode, PORT, ROOM, most=most, make=maker), maker


def keeper(maps: MapGrants | None) -> tuple[GateKeeper, list[str]]:
    lines: list[str] = []
    gate = GateKeeper(MemoryBackend(), config_path=Path("/nonexistent/server.toml"),
                      services={"ssh": SSH}, clock=Clock(), log=lines.append,
                      read_services=lambda path: {"ssh": SSH}, maps=maps)
    return gate, lines


# ---- the request -------------------------------------------------------------------


@pytest.mark.parametrize(("message", "why"), [
    (tag_map(mode="xdp"), "mode is one of capture, udp"),
    (tag_map(mode=["capture"]), "mode is one of"),
    (tag_map(port=0), "port is a whole number from 1 to 65535"),
    (tag_map(port=65536), "port is a whole number"),
    (tag_map(port=True), "port is a whole number"),
    (tag_map(port="62201"), "port is a whole number"),
    (tag_map(entries=0), "entries is a whole number from 1 to 16777216"),
    (tag_map(entries=MAX_TAG_MAP + 1), "entries is a whole number"),
    (tag_map(entries=10 ** 400), "entries is a whole number"),
    (tag_map(entries=2.0 ** 17), "entries is a whole number"),
    (tag_map(program="b3ZlcndyaXRl"), "fields must be"),
    ({"kind": "tagmap", "mode": "udp", "port": PORT}, "fields must be"),
])
def test_a_tag_map_request_out_of_range_is_refused(message: dict[str, Any], why: str) -> None:
    with pytest.raises(RefusedError, match=why):
        gatemsg.parse_request(message)


def test_a_tag_map_request_round_trips() -> None:
    request = TagMap("udp", PORT, 1 << 20)
    assert gatemsg.parse_request(gatemsg.encode_request(request)) == request
    body = gatemsg.frame(gatemsg.encode_request(request))[gatemsg.HEADER:]
    assert gatemsg.parse_request(gatemsg.decode(body)) == request


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@given(st.dictionaries(st.sampled_from(["kind", "mode", "port", "entries", "x"]), JSON),
       JSON, JSON, JSON)
def test_any_tag_map_fields_parse_or_are_refused(extra: dict[str, Any], mode: object,
                                                 port: object, entries: object) -> None:
    for message in (tag_map(mode, port, entries), {**tag_map(mode, port, entries), **extra}):
        try:
            request = gatemsg.parse_request(message)
        except RefusedError:
            continue
        assert isinstance(request, TagMap)
        assert request.mode in gatemsg.MODES and 1 <= request.port <= 65535
        assert 1 <= request.entries <= MAX_TAG_MAP


# ---- the gate keeper's rules ---------------------------------------------------------


def test_the_gate_keeper_makes_tag_maps_only_for_its_port_each_doubling_up_to_the_most(
        ) -> None:
    maps, maker = grants(most=16 * ROOM)
    for request, why in ((TagMap("udp", PORT, 2 * ROOM), "only for capture on port 62201"),
                         (TagMap("capture", 22, 2 * ROOM), "only for capture on port 62201"),
                         (TagMap("capture", PORT, 2 * ROOM - 1), "do not double the room"),
                         (TagMap("capture", PORT, 32 * ROOM), "over the most")):
        with pytest.raises(RefusedError, match=why):
            maps.grant(request)
    assert maker.made == [], "a refusal makes nothing"
    for entries in (2 * ROOM, 5 * ROOM, 16 * ROOM):
        kit = maps.grant(TagMap("capture", PORT, entries))
        assert (cast(FakeKit, kit).port, cast(FakeKit, kit).entries) == (PORT, entries)
        kit.close()
    with pytest.raises(RefusedError, match="do not double"):
        maps.grant(TagMap("capture", PORT, 16 * ROOM))  # the most made: nothing more, ever
    assert maps.made == 3
    udp, made = grants("udp")
    udp.grant(TagMap("udp", PORT, 2 * ROOM)).close()
    assert made.made[0].port is None, "udp mode's program (no port in it)"


def test_the_most_comes_from_whoever_starts_the_server_and_only_lowers() -> None:
    assert most_from({}) == MAX_TAG_MAP
    assert most_from({CAP_VARIABLE: "65536"}) == 65536
    assert most_from({CAP_VARIABLE: str(MAX_TAG_MAP * 4)}) == MAX_TAG_MAP
    with pytest.raises(LocalError, match="not a number"):
        most_from({CAP_VARIABLE: "-1"})


def test_a_gate_keeper_without_maps_refuses_every_tag_map() -> None:
    gate, lines = keeper(None)
    reply = gate.handle(tag_map())
    assert "no eBPF map filter runs here" in reply["refused"]
    assert any("refused a request" in line for line in lines)


def test_a_tag_map_is_answered_with_its_kit_and_handle_closes_it() -> None:
    maps, maker = grants()
    gate, lines = keeper(maps)
    assert gate.handle(tag_map()) == {"ok": {"entries": 2 * ROOM}}
    assert maker.made[0].closed
    reply, kit = gate.answer(tag_map(entries=4 * ROOM))
    assert reply == {"ok": {"entries": 4 * ROOM}} and kit is cast(Kit, maker.made[1])
    maker.made[1].close()
    assert "refused" in gate.handle(tag_map(entries=MAX_TAG_MAP + 1))
    assert any("made a tag map of 131072 entries" in line for line in lines)


# ---- over a real socketpair --------------------------------------------------------


@pytest.fixture
def remote() -> Iterator[tuple[RemoteGate, FakeMaker]]:
    maps, maker = grants()
    with serving_here(keeper(maps)[0]) as gate:
        yield gate, maker


def test_the_descriptors_cross_the_socketpair_and_the_gate_keeper_keeps_none(
        remote: tuple[RemoteGate, FakeMaker]) -> None:
    gate, maker = remote
    value, fds = gate._exchange(TagMap("capture", PORT, 2 * ROOM), 4)
    try:
        assert value == {"entries": 2 * ROOM} and len(fds) == 4
        assert all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds)
        assert all(os.get_inheritable(fd) is False for fd in fds), "close-on-exec"
        assert maker.made[0].closed, "the gate keeper closed its copies once sent"
    finally:
        frames.close_all(fds)


def test_the_daemon_keeps_handed_descriptors_only_as_a_kit(
        remote: tuple[RemoteGate, FakeMaker]) -> None:
    gate, _ = remote
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LocalError, match="tag map is not usable"):
        gate.tag_map("capture", PORT, 2 * ROOM)  # pipes, not maps: closed, never kept
    with pytest.raises(LocalError, match="refused a request: tagmap: entries is a whole number"):
        gate.tag_map("capture", PORT, MAX_TAG_MAP + 1)
    with pytest.raises(LocalError, match="refused a request: tagmap: only for capture"):
        gate.tag_map("capture", 22, 8 * ROOM)
    assert len(os.listdir("/proc/self/fd")) == before
    assert gate.held(now=0.0) == {}, "the gate keeper serves on"


def test_more_descriptors_than_asked_are_none_kept() -> None:
    ours, theirs = socket.socketpair()
    ends = [os.pipe() for _ in range(3)]
    extra = [fd for pair in ends for fd in pair][:5]
    try:
        frames.send(theirs, {"ok": 1}, extra)
        reply, fds = frames.receive_with_fds(ours, 4)
        assert reply == {"ok": 1} and fds == []
    finally:
        frames.close_all([fd for pair in ends for fd in pair])
        ours.close()
        theirs.close()


def test_descriptors_a_daemon_attaches_to_a_request_are_never_installed(
        remote: tuple[RemoteGate, FakeMaker]) -> None:
    """The gate keeper reads requests with plain recv: a descriptor sent with
    one (SCM_RIGHTS) is closed by the kernel, never in its table (the keeper
    serves in this process here, so its table is this one's)."""
    gate, _ = remote
    read, write = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    frames.send(gate._sock, {"kind": "held"}, [read, write])
    assert frames.receive(gate._sock) == {"ok": []}
    assert len(os.listdir("/proc/self/fd")) == before
    frames.close_all([read, write])
