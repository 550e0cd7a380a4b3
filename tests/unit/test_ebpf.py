"""The eBPF tag-map filters (spa.kernel): the assembler, the programs run
by tests/ebpf_vm.py against the classic programs on the same frames (the
same decision on every one), the map model, the fake's API; and, as root,
the real verifier and the real maps."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from spa.kernel import ebpf as e
from spa.kernel.ebpf import FLAG_SHUT
from spa.kernel.tagkit import NONCE_LIMIT, SHUT_LIMIT
from spa.kernel.tagmap import TagMapFilter, fit_nonces, shut_pairs, source_key
from spa.server.capture import ETH_P_IP, ETH_P_IPV6, knock_filter, udp_payload_filter
from spa.server.errors import LocalError
from spa.server.sources import MAX_SHUT_SOURCES, SHUT_SAMPLE, FakeFilteredSource, Shut
from tests.bpf import run_filter
from tests.ebpf_vm import Skb, run

PORT = 62201
FDS = e.Maps(3, 4, 5)
TAGS = [bytes([i]) * 8 for i in range(1, 12)]
KNOWN4, KNOWN6 = "198.51.100.7", "2001:db8:7::7"
NONCE = bytes.fromhex("0123456789abcdef")
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the real verifier and maps need root")


def test_labels_resolve_and_a_wide_load_takes_two_slots() -> None:
    program = e.assemble([e.goto("end"), e.ld_map(e.R1, 7), "back", e.mov(e.R0, 0),
                          "end", e.jump(e.JEQ, e.R0, 1, "back"), e.EXIT_INSN])
    assert program[0].off == 3, "over the two-slot load and the mov"
    assert program[3].off == -2, "back to the mov"
    with pytest.raises(ValueError, match="no label"):
        e.assemble([e.goto("nowhere")])


def test_encoding_is_struct_bpf_insn() -> None:
    raw = e.encode([e.mov(e.R0, 0xFFFF), e.ld_map(e.R1, 9), e.stx(e.DW, e.R10, -8, e.R1),
                    e.EXIT_INSN])
    assert len(raw) == 40
    assert raw[:8] == bytes.fromhex("b7000000ffff0000")
    assert raw[8:24] == bytes.fromhex("1811000009000000" "0000000000000000"), "src 1: map fd"
    assert raw[24:32] == bytes.fromhex("7b1af8ff00000000"), "dst r10, src r1, off -8"
    assert raw[32:] == bytes.fromhex("9500000000000000")


@pytest.mark.parametrize("program", [e.capture_program(PORT, FDS), e.udp_program(FDS)])
def test_programs_are_small_and_every_jump_lands_inside(program: list[e.Insn]) -> None:
    slots = len(e.encode(program)) // 8
    assert slots < 120, "the size does not grow with the tags: they are in the maps"
    assert program[-1] == e.EXIT_INSN
    at = 0
    for insn in program:
        at += 2 if insn.code == e.LD | e.DW | e.IMM else 1
        if insn.code & 0x07 == e.JMP and insn.code not in (e.JMP | e.CALL, e.JMP | e.EXIT):
            assert isinstance(insn.off, int) and 0 <= at + insn.off < slots


def maps_for(tags: list[bytes], nonces: list[bytes], shut: Shut | None
             ) -> tuple[dict[int, dict[bytes, bytes]], dict[int, int]]:
    """What TagMapFilter puts in the three maps."""
    pairs = shut_pairs(tags, shut)
    flagged = {p[:8] for p in pairs}
    tag_map = {t: (FLAG_SHUT if t in flagged else 0).to_bytes(4, "little") for t in tags}
    return ({FDS.tags: tag_map, FDS.nonces: dict.fromkeys(fit_nonces(nonces), bytes(4)),
             FDS.shut: dict.fromkeys(pairs, bytes(4))},
            {FDS.tags: 8, FDS.nonces: 8, FDS.shut: 24})


def frames() -> list[tuple[str, bytes, int]]:
    """(name, packet from the IP header, protocol) that the filters must judge alike."""
    def payload(tag: bytes, nonce: bytes = bytes(8), size: int = 161) -> bytes:
        return (b"\x01" + tag + nonce + bytes(size))[:size]

    out = []
    other4, other6 = "203.0.113.7", "2001:db8::9"
    for name, tag, source in (("live", TAGS[0], other4), ("junk", bytes(8), KNOWN4),
                              ("shut-known", TAGS[5], KNOWN4), ("shut-other", TAGS[5], other4),
                              ("shut-known6", TAGS[5], KNOWN6), ("shut-other6", TAGS[5], other6),
                              ("live6", TAGS[3], other6), ("junk6", b"x" * 8, KNOWN6)):
        v6 = ":" in source
        ip = IPv6(src=source, dst="2001:db8::1") if v6 else IP(src=source, dst="192.0.2.1")
        proto = ETH_P_IPV6 if v6 else ETH_P_IP
        out.append((name, bytes(ip / UDP(sport=5555, dport=PORT) / Raw(payload(tag))), proto))
        out.append((name + "-nonce", bytes(ip / UDP(sport=5555, dport=PORT)
                                           / Raw(payload(tag, NONCE))), proto))
        out.append((name + "-short", bytes(ip / UDP(sport=5555, dport=PORT)
                                           / Raw(payload(tag, size=160))), proto))
        out.append((name + "-long", bytes(ip / UDP(sport=5555, dport=PORT)
                                          / Raw(payload(tag, size=162))), proto))
        out.append((name + "-port", bytes(ip / UDP(sport=5555, dport=PORT + 1)
                                          / Raw(payload(tag))), proto))
    live = Raw(payload(TAGS[1]))
    out += [("options", bytes(IP(src=KNOWN4, dst="192.0.2.1", options=b"\x01" * 8)
                              / UDP(dport=PORT) / live), ETH_P_IP),
            ("fragment", bytes(IP(src=KNOWN4, dst="192.0.2.1", flags="MF")
                               / UDP(dport=PORT) / live), ETH_P_IP),
            ("offset", bytes(IP(src=KNOWN4, dst="192.0.2.1", frag=3)
                             / UDP(dport=PORT) / live), ETH_P_IP),
            ("hop-by-hop", bytes(IPv6(src=KNOWN6, dst="2001:db8::1") / IPv6ExtHdrHopByHop()
                                 / UDP(dport=PORT) / live), ETH_P_IPV6),
            ("truncated", bytes(IP(src=KNOWN4, dst="192.0.2.1") / UDP(dport=PORT) / live)[:60],
             ETH_P_IP),
            ("arp", bytes(28), 0x0806)]
    return out


@pytest.mark.parametrize("mode", ["capture", "udp"])
@pytest.mark.parametrize("nonces", [[], [NONCE]])
@pytest.mark.parametrize("shut", [None, {TAGS[5]: [KNOWN4, KNOWN6]}])
def test_the_map_filter_decides_as_the_classic_one(mode: str, nonces: list[bytes],
                                                   shut: Shut | None) -> None:
    classic = (knock_filter(PORT, TAGS, nonces, shut) if mode == "capture"
               else udp_payload_filter(TAGS, nonces, shut))
    program = e.capture_program(PORT, FDS) if mode == "capture" else e.udp_program(FDS)
    maps, key_sizes = maps_for(TAGS, nonces, shut)
    decided = 0
    for name, packet, proto in frames():
        if mode == "udp" and (proto not in (ETH_P_IP, ETH_P_IPV6) or "port" in name
                              or name in ("fragment", "offset", "hop-by-hop", "truncated")):
            continue  # the IP stack delivers a UDP socket only whole datagrams to its port
        header = (packet[0] & 0x0F) * 4 if proto == ETH_P_IP else 40
        data = packet if mode == "capture" else packet[header:]
        for pkt_type, vlan, draw in ((0, False, 1), (0, False, 0), (0, False, SHUT_SAMPLE),
                                     (0, True, 1), (4, False, 1), (3, False, 0)):
            if mode == "udp" and (pkt_type or vlan):
                continue
            def kernel_random(d: int = draw) -> int:
                return d

            want = run_filter(classic, data, protocol=proto, pkttype=pkt_type, vlan=vlan,
                              network=packet, random=kernel_random) > 0
            got = run(program, Skb(data, packet, proto, pkt_type, vlan, kernel_random),
                      maps, key_sizes) > 0
            assert got == want, (name, pkt_type, vlan, draw)
            decided += want
    assert decided > 10, "some frames pass: the comparison is not all drops"


def test_ipv4_sources_are_keyed_mapped_into_ipv6() -> None:
    tag = TAGS[0]
    assert source_key(tag, "192.0.2.1") == tag + bytes(10) + b"\xff\xff\xc0\x00\x02\x01"
    assert source_key(tag, "::ffff:192.0.2.1") == source_key(tag, "192.0.2.1")
    assert source_key(tag, "a name") is None


def test_shut_pairs_are_bounded_whole_tags_at_a_time() -> None:
    many = [f"2001:db8::{i:x}" for i in range(40)]
    assert len(shut_pairs(TAGS, {TAGS[0]: many})) == MAX_SHUT_SOURCES
    assert shut_pairs(TAGS, {b"gone....": [KNOWN4]}) == set(), "a tag no longer live"
    tags = [i.to_bytes(8, "big") for i in range(SHUT_LIMIT // MAX_SHUT_SOURCES + 5)]
    shut = {t: many for t in tags}
    pairs = shut_pairs(tags, shut)
    assert len(pairs) == SHUT_LIMIT
    assert {p[:8] for p in pairs} == set(tags[:SHUT_LIMIT // MAX_SHUT_SOURCES])
    assert len(fit_nonces([i.to_bytes(8, "big") for i in range(NONCE_LIMIT + 9)])) == NONCE_LIMIT


def test_the_fake_models_the_map_filter_and_its_fallback() -> None:
    source = FakeFilteredSource()
    assert not source.kernel_map and source.filter_kind() == "port-only"
    with pytest.raises(LocalError):
        source.update_tags([TAGS[0]], [])
    assert "eBPF map filter on 2000 tags" in source.replace_tags(
        [i.to_bytes(8, "big") for i in range(2000)])
    assert source.kernel_map and source.filter_kind() == "ebpf map"
    source.update_tags([TAGS[0]], [(1).to_bytes(8, "big")])
    assert source.passes(b"\x01" + TAGS[0] + bytes(152))
    assert not source.passes(b"\x01" + (1).to_bytes(8, "big") + bytes(152))
    assert source.calls == ["replace", "update"]
    old = FakeFilteredSource(ebpf=False)
    assert "port-only" in old.replace_tags([i.to_bytes(8, "big") for i in range(2000)])
    assert not old.kernel_map and old.filter_kind() == "port-only"
    old.replace_tags(TAGS)
    assert old.filter_kind() == "classic" and not old.passes(b"\x01" + bytes(160))


# ---- as root: the kernel's verifier and maps ----

@ROOT
@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_the_kernel_verifier_takes_both_programs(mode: str) -> None:
    from spa.kernel.bpf import HashMap, load_program

    maps = [HashMap(8, 4, 64), HashMap(8, 4, 64), HashMap(24, 4, 64)]
    try:
        fds = e.Maps(*(m.fd for m in maps))
        program = e.capture_program(PORT, fds) if mode == "capture" else e.udp_program(fds)
        os.close(load_program(e.encode(program), "spa_test"))
    finally:
        for m in maps:
            m.close()


@ROOT
def test_a_refused_program_says_why() -> None:
    from spa.kernel.bpf import BpfError, load_program

    with pytest.raises(BpfError) as caught:
        load_program(e.encode([e.EXIT_INSN]))  # R0 never set
    assert caught.value.errno == errno.EACCES and "R0" in caught.value.log


@ROOT
def test_the_maps_hold_what_python_says_after_updates_and_growth(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from spa.kernel import tagmap

    monkeypatch.setattr(tagmap, "MIN_ENTRIES", 64)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        filt = TagMapFilter(sock, None)
        try:
            tags = [os.urandom(8) for _ in range(20)]
            filt.replace(tags, [NONCE], {tags[0]: [KNOWN4, KNOWN6], b"notlive!": [KNOWN4]})
            assert filt.capacity == 64
            more = [os.urandom(8) for _ in range(100)]
            filt.update(more, tags[:10], [], {tags[15]: [KNOWN4], tags[0]: [KNOWN4]})
            assert filt.grown == 1 and filt.capacity == 256
            live = set(tags[10:] + more)
            assert filt.map_keys() == (live, set(), {source_key(tags[15], KNOWN4)})
            assert {t for t, shut in filt.shut_flags().items() if shut} == {tags[15]}
            assert filt.memlock() > 0
        finally:
            filt.close()


@ROOT
def test_batches_fall_back_to_one_call_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from spa.kernel import bpf

    def no_batches(*args: object) -> None:
        raise bpf.BpfError(errno.EINVAL, "bpf map update batch")

    m = bpf.HashMap(8, 4, 64)
    try:
        monkeypatch.setattr(m, "_batch", no_batches)
        keys = [os.urandom(8) for _ in range(10)]
        m.update_batch(keys, [bytes(4)] * 10)
        m.delete_batch(keys[:4])
        assert set(m.all_keys()) == set(keys[4:])
    finally:
        m.close()


def test_without_ebpf_a_source_runs_the_classic_filter_and_refuses_updates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from spa.server.sources import UdpSource

    monkeypatch.setenv("SPA_NO_EBPF", "1")
    source = UdpSource("127.0.0.1", 0)
    try:
        note = source.replace_tags(TAGS)
        assert note.startswith("eBPF off (SPA_NO_EBPF=1); classic kernel filter on 11 tags")
        assert not source.kernel_map and source.filter_kind() == "classic"
        with pytest.raises(LocalError, match="replace_tags"):
            source.update_tags([TAGS[0]], [])
        assert "no kernel filter" in source.replace_tags([i.to_bytes(8, "big") for i in range(900)])
        assert source.filter_kind() == "port-only"
    finally:
        source.close()


@ROOT
def test_a_map_filter_then_set_tags_is_classic_again() -> None:
    from spa.server.sources import UdpSource

    source = UdpSource("127.0.0.1", 0)
    try:
        assert source.replace_tags(TAGS).startswith("eBPF map filter on 11 tags")
        assert source.kernel_map and source.filter_kind() == "ebpf map"
        assert "on 12 tags" in source.update_tags([b"twelfth!"], [])
        source.set_tags(TAGS)
        assert not source.kernel_map and source.filter_kind() == "classic"
    finally:
        source.close()


@ROOT
def test_the_kernel_runs_the_capture_program_as_the_interpreter_does() -> None:
    """BPF_PROG_TEST_RUN on the crafted IPv4 and IPv6 frames: the kernel's
    verdict is the interpreter's (pkt_type HOST: the test device's address)."""
    from scapy.layers.l2 import Ether

    from spa.kernel.bpf import HashMap, load_program, test_run

    maps = [HashMap(8, 4, 64), HashMap(8, 4, 64), HashMap(24, 4, 64)]
    try:
        fds = e.Maps(*(m.fd for m in maps))
        content, key_sizes = maps_for(TAGS, [NONCE], {TAGS[5]: [KNOWN4, KNOWN6]})
        for m, fd in zip(maps, FDS, strict=True):
            keys = list(content[fd])
            m.update_batch(keys, [content[fd][k] for k in keys])
        program = e.capture_program(PORT, FDS)  # the interpreter's, on the dicts
        prog = load_program(e.encode(e.capture_program(PORT, fds)))
        passed = 0
        for name, packet, proto in frames():
            if proto not in (ETH_P_IP, ETH_P_IPV6) or name == "truncated":
                continue
            frame = bytes(Ether(dst="00:00:00:00:00:00", type=proto)) + packet
            kernel = test_run(prog, frame, 1)[0]
            if "shut-other" in name:
                continue  # the kernel's own random number decides
            assert (kernel > 0) == (run(program, Skb(packet, packet, proto), content,
                                        key_sizes) > 0), name
            passed += kernel > 0
        os.close(prog)
        assert passed == 5, "live, live6, shut-known, shut-known6, options"
    finally:
        for m in maps:
            m.close()
