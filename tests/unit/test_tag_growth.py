"""The eBPF tag map grows after the privilege drop (spa.kernel.tagkit,
tagmap, mapsource): without CAP_BPF a growth asks `hand` (the gate keeper;
here a fake) for a kit of at least twice the room and moves the tags in; a
refusal falls back to the classic filter, as before, and is not asked again.

As root (real maps, a real socket); "no CAP_BPF" is the local maker
refusing with EPERM, as the kernel does for the dropped daemon."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from spa.backends.memory import MemoryBackend
from spa.kernel import tagkit, tagmap
from spa.kernel.bpf import BpfError
from spa.kernel.tagkit import Kit
from spa.kernel.tagmap import NotHandedError, TagMapFilter
from spa.server.errors import LocalError
from spa.server.mapgrant import MapGrants
from spa.server.monitor import GateKeeper
from spa.server.remote import serving_here
from spa.server.sources import UdpSource

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real maps need root (CAP_BPF)")
ROOM = 64  # MIN_ENTRIES here: small maps


class FakeKeeper:
    """The gate keeper's side as a callable: makes the kit itself (it holds
    CAP_BPF), or refuses as a RemoteGate does (LocalError)."""

    def __init__(self, refuse: str = "") -> None:
        self.asked: list[int] = []
        self.refuse = refuse

    def __call__(self, entries: int) -> Kit:
        self.asked.append(entries)
        if self.refuse:
            raise LocalError(f"the gate keeper refused a request: {self.refuse}")
        return tagkit.make(None, entries)


@pytest.fixture
def drop(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Small maps; drop() and from then on this process makes no map (the
    kernel's EPERM after the drop); the fake keeper still does."""
    monkeypatch.setattr(tagmap, "MIN_ENTRIES", ROOM)

    def denied(port: int | None, entries: int) -> Kit:
        raise BpfError(errno.EPERM, "bpf map create")

    return lambda: monkeypatch.setattr(tagmap, "make_kit", denied)


def tags(count: int) -> list[bytes]:
    return [os.urandom(8) for _ in range(count)]


def test_a_kit_is_taken_over_only_if_it_is_what_make_makes() -> None:
    kit = tagkit.make(None, 128)
    try:
        taken = tagkit.adopt([os.dup(fd) for fd in kit.fds], 128)
        assert taken.tags.max_entries == 128
        taken.close()
        with pytest.raises(BpfError, match="not"):
            tagkit.adopt([os.dup(fd) for fd in kit.fds], 256)
        swapped = [os.dup(fd) for fd in (kit.nonces.fd, kit.tags.fd, kit.shut.fd, kit.prog)]
        with pytest.raises(BpfError):
            tagkit.adopt(swapped, 128)
        with pytest.raises(BpfError, match="3 descriptors"):
            tagkit.adopt([os.dup(fd) for fd in kit.fds[:3]], 128)
        read, write = os.pipe()
        with pytest.raises(BpfError):
            tagkit.adopt([os.dup(fd) for fd in kit.fds[:3]] + [read], 128)
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(read)  # closed with the others
        os.close(write)
    finally:
        kit.close()


def test_without_cap_bpf_a_growth_asks_for_twice_the_room_and_moves_the_tags_in(
        drop: Callable[[], None]) -> None:
    keeper = FakeKeeper()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        filt = TagMapFilter(sock, None)
        try:
            first = tags(20)
            filt.replace(first, [b"nonce..."], {first[0]: ["192.0.2.7"]})
            assert filt.capacity == ROOM
            drop()
            filt.hand = keeper
            filt.update(tags(10), first[1:6], [b"nonce..."], {first[0]: ["192.0.2.7"]})
            assert keeper.asked == [], "within the room: changed in place, nothing asked"
            more = tags(100)
            filt.update(more, first[6:11], [b"nonce..."], {first[0]: ["192.0.2.7"]})
            assert keeper.asked == [256], "2 x 125 tags at the peak: the room doubled twice"
            assert (filt.capacity, filt.grown, filt.handed) == (256, 1, 1)
            live, nonces, pairs = filt.map_keys()
            assert live == set(filt.tags) and set(more) <= live and first[7] not in live
            assert nonces == {b"nonce..."} and {p[:8] for p in pairs} == {first[0]}
            assert filt.shut_flags()[first[0]] is True
            filt.replace(tags(300))  # past the room in place: a whole kit, handed too
            assert keeper.asked == [256, 1024] and filt.capacity == 1024
            assert len(filt.map_keys()[0]) == 300
        finally:
            filt.close()


def test_a_refused_growth_falls_back_to_the_classic_filter_and_asks_no_more(
        drop: Callable[[], None]) -> None:
    keeper = FakeKeeper(refuse="tag map: over the most")
    source = UdpSource("127.0.0.1", 0)
    try:
        assert source.replace_tags(tags(20)).startswith("eBPF map filter on 20 tags")
        assert source.map_room == ROOM
        drop()
        assert source.hand_maps(keeper)
        note = source.update_tags(tags(100), [])
        assert keeper.asked == [256]
        assert note.startswith("eBPF map filter cannot take the change (no tag map of 256 "
                               "entries from the gate keeper: the gate keeper refused a request: "
                               "tag map: over the most); classic kernel filter on 120 tags"), note
        assert not source.kernel_map and source.filter_kind() == "classic"
        assert source.map_room == 0 and not source.hand_maps(keeper)
        source.replace_tags(tags(200))
        assert keeper.asked == [256], "asked once; classic until the next start"
        assert source.filter_kind() == "classic"
    finally:
        source.close()


def test_a_growth_without_hand_is_refused_as_before(drop: Callable[[], None]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        filt = TagMapFilter(sock, None)
        try:
            filt.replace(tags(10))
            drop()
            with pytest.raises(BpfError) as caught:
                filt.update(tags(60), [])
            assert caught.value.errno == errno.EPERM and not isinstance(caught.value,
                                                                         NotHandedError)
        finally:
            filt.close()


def test_over_the_socketpair_a_growth_gets_the_gate_keepers_kit(
        drop: Callable[[], None]) -> None:
    """The real gate keeper's side (MapGrants making real maps, serve) and
    the daemon's (RemoteGate.tag_map as the source's hand)."""
    source = UdpSource("127.0.0.1", 0)
    keeper = GateKeeper(MemoryBackend(), config_path=Path("/nonexistent"), services={},
                        clock=lambda: 0.0, log=lambda line: None,
                        maps=MapGrants("udp", source.port, ROOM))
    with serving_here(keeper) as gate:
        try:
            source.replace_tags(tags(20))
            drop()
            assert source.hand_maps(lambda entries: gate.tag_map("udp", source.port, entries))
            note = source.update_tags(tags(100), [])
            assert note.endswith("(room for 256; grown, its maps made by the gate keeper)"), note
            assert source.kernel_map and source.map_room == 256
            assert keeper.maps is not None and keeper.maps.room == 256
            with pytest.raises(LocalError, match="do not double the room made"):
                gate.tag_map("udp", source.port, 256)
        finally:
            source.close()


@pytest.mark.parametrize("refuse", ["", "tagmap: over the most"], ids=["made", "refused"])
def test_room_made_ahead_leaves_the_change_nothing_to_grow(drop: Callable[[], None],
                                                          refuse: str) -> None:
    """The daemon makes room outside the receive thread (housekeeping, before
    a store change's delta): the delta then fits; a refusal there leaves the
    map whole, and the delta that does not fit falls back without asking."""
    keeper = FakeKeeper(refuse)
    source = UdpSource("127.0.0.1", 0)
    try:
        source.replace_tags(tags(20))
        drop()
        source.hand_maps(keeper)
        assert source.make_room(10) == "", "it fits: nothing to do"
        note = source.make_room(100)
        assert keeper.asked == [256]
        if not refuse:
            assert note.endswith("(room for 256; grown, its maps made by the gate keeper)")
            source.update_tags(tags(100), [])
            assert keeper.asked == [256] and source.filter_kind() == "ebpf map"
            return
        assert note.startswith("eBPF map filter cannot make room for 100 more tags (no tag "
                               "map of 256 entries from the gate keeper: "), note
        assert source.kernel_map and source.map_room == ROOM, "the map as it was"
        note = source.update_tags(tags(100), [])
        assert "classic kernel filter on 120 tags" in note and keeper.asked == [256]
    finally:
        source.close()
