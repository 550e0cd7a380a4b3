"""The capture filter and header parsing, on frames crafted with scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from spa.server.capture import (
    ETH_P_IP,
    ETH_P_IPV6,
    PACKET_HOST,
    Insn,
    knock_filter,
    parse_datagram,
)
from spa.server.routes import LOOPBACK_IFINDEX
from spa.server.sources import Shut
from tests.bpf import run_filter

PORT = 62201
PAYLOAD = b"\x01" + bytes(range(160))
PROGRAM = knock_filter(PORT)
OUTGOING, OTHERHOST = 4, 3


def accepts(frame: bytes, protocol: int, pkttype: int = PACKET_HOST) -> bool:
    return run_filter(PROGRAM, frame, protocol=protocol, pkttype=pkttype) > 0


def v4(**kw: object) -> bytes:
    header = IP(src="192.0.2.7", dst="192.0.2.1", **kw)  # type: ignore[arg-type]
    return bytes(header / UDP(sport=5555, dport=PORT) / Raw(PAYLOAD))


def v6() -> bytes:
    return bytes(IPv6(src="2001:db8::7", dst="2001:db8::1") / UDP(sport=5555, dport=PORT)
                 / Raw(PAYLOAD))


def test_knocks_pass_and_parse() -> None:
    assert accepts(v4(), ETH_P_IP)
    assert parse_datagram(v4(), PORT) == (PAYLOAD, "192.0.2.7")
    assert accepts(v6(), ETH_P_IPV6)
    assert parse_datagram(v6(), PORT) == (PAYLOAD, "2001:db8::7")


def test_a_frame_still_tagged_with_a_vlan_is_left_for_the_vlans_device() -> None:
    """Seen first on the VLAN's parent with its tag, then untagged on the
    VLAN's own device, where its route lives: only that copy is taken (the
    reverse-path check judges the first copy of a knock)."""
    tags = [PAYLOAD[1:9]]
    for program in (PROGRAM, knock_filter(PORT, tags)):
        for frame, protocol in ((v4(), ETH_P_IP), (v6(), ETH_P_IPV6)):
            assert run_filter(program, frame, protocol=protocol, pkttype=PACKET_HOST)
            assert not run_filter(program, frame, protocol=protocol, pkttype=PACKET_HOST,
                                  vlan=True)


def test_ip_options_are_skipped_by_both() -> None:
    from scapy.layers.inet import IPOption_NOP

    frame = v4(options=[IPOption_NOP()] * 4)
    assert frame[0] & 0x0F == 6
    assert accepts(frame, ETH_P_IP)
    assert parse_datagram(frame, PORT) == (PAYLOAD, "192.0.2.7")


@pytest.mark.parametrize(
    ("frame", "protocol", "pkttype"),
    [
        (bytes(IP(dst="192.0.2.1") / UDP(dport=PORT + 1) / Raw(PAYLOAD)), ETH_P_IP, PACKET_HOST),
        (bytes(IP(dst="192.0.2.1") / TCP(dport=PORT)), ETH_P_IP, PACKET_HOST),
        (bytes(IPv6(dst="2001:db8::1") / TCP(dport=PORT)), ETH_P_IPV6, PACKET_HOST),
        (bytes(IPv6(dst="2001:db8::1") / IPv6ExtHdrHopByHop() / UDP(dport=PORT)
               / Raw(PAYLOAD)), ETH_P_IPV6, PACKET_HOST),
        (bytes(IPv6(dst="2001:db8::1") / IPv6ExtHdrFragment() / UDP(dport=PORT)
               / Raw(PAYLOAD)), ETH_P_IPV6, PACKET_HOST),
        (v4(), ETH_P_IP, OUTGOING),
        (v4(), ETH_P_IP, OTHERHOST),
        (v4(), 0x0806, PACKET_HOST),
        (b"", ETH_P_IP, PACKET_HOST),
        (v4()[:10], ETH_P_IP, PACKET_HOST),
    ],
    ids=["other port", "tcp", "tcp6", "v6 extension header", "v6 fragment header",
         "outgoing", "other host", "arp", "empty", "truncated"],
)
def test_filter_drops_what_is_not_a_knock_for_us(frame: bytes, protocol: int,
                                                 pkttype: int) -> None:
    assert not accepts(frame, protocol, pkttype)


def test_fragments_are_dropped_by_filter_and_parser() -> None:
    whole = IP(src="192.0.2.7", dst="192.0.2.1") / UDP(dport=PORT) / Raw(PAYLOAD * 4)
    pieces = [bytes(p) for p in fragment(whole, fragsize=200)]  # type: ignore[no-untyped-call]
    assert len(pieces) > 1
    for piece in pieces:
        assert not accepts(piece, ETH_P_IP)
        assert parse_datagram(piece, PORT) is None


@pytest.mark.parametrize("cut", [1, 19, 27, 100])
def test_parser_drops_truncated_or_inconsistent_frames(cut: int) -> None:
    assert parse_datagram(v4()[:cut], PORT) is None
    assert parse_datagram(v6()[:cut], PORT) is None


def test_parser_drops_lying_lengths() -> None:
    frame = bytearray(v4())
    frame[24:26] = (4000).to_bytes(2, "big")  # UDP length beyond the frame
    assert parse_datagram(bytes(frame), PORT) is None
    frame6 = bytearray(v6())
    frame6[4:6] = (4000).to_bytes(2, "big")  # IPv6 payload length beyond the frame
    assert parse_datagram(bytes(frame6), PORT) is None
    assert parse_datagram(b"\x50" + bytes(60), PORT) is None  # IP version 5


TAGS = [bytes([i]) * 8 for i in range(1, 40)] + [bytes.fromhex("fd846dd9e4ff55d7")]


def knock(tag: bytes, *, size: int = 161, v6: bool = False) -> bytes:
    payload = b"\x01" + tag + bytes(size - 9)
    header = IPv6(src="2001:db8::7", dst="2001:db8::1") if v6 else IP(
        src="192.0.2.7", dst="192.0.2.1")
    return bytes(header / UDP(sport=5555, dport=PORT) / Raw(payload))


@pytest.mark.parametrize("v6", [False, True])
def test_tag_filter_passes_live_tags_only(v6: bool) -> None:
    program = knock_filter(PORT, TAGS)
    proto = ETH_P_IPV6 if v6 else ETH_P_IP
    for tag in (TAGS[0], TAGS[17], TAGS[-1]):
        assert run_filter(program, knock(tag, v6=v6), protocol=proto, pkttype=PACKET_HOST)
    for junk in (bytes(8), bytes.fromhex("fd846dd9e4ff55d8"), bytes.fromhex("fd846dd9") * 2,
                 TAGS[3][:4] + TAGS[4][4:]):
        assert not run_filter(program, knock(junk, v6=v6), protocol=proto, pkttype=PACKET_HOST)
    assert not run_filter(program, knock(TAGS[0], size=160, v6=v6), protocol=proto,
                          pkttype=PACKET_HOST), "wrong length dropped in the kernel too"


def test_tag_filter_with_ip_options_and_empty_tag_list() -> None:
    from scapy.layers.inet import IPOption_NOP

    frame = bytes(IP(src="192.0.2.7", dst="192.0.2.1", options=[IPOption_NOP()] * 8)
                  / UDP(dport=PORT) / Raw(b"\x01" + TAGS[5] + bytes(152)))
    assert run_filter(knock_filter(PORT, TAGS), frame, protocol=ETH_P_IP, pkttype=PACKET_HOST)
    assert not run_filter(knock_filter(PORT, []), frame, protocol=ETH_P_IP, pkttype=PACKET_HOST)


def test_tag_filter_size_limit() -> None:
    from spa.server.capture import MAX_INSNS, max_tags

    assert len(knock_filter(PORT, [bytes(8)] * max_tags())) <= MAX_INSNS
    assert len(knock_filter(PORT, [bytes(8)] * (max_tags() + 1))) > MAX_INSNS
    assert max_tags() >= 800


def test_every_jump_reaches_with_many_tags() -> None:
    """Review finding: jumps past a long tag list overflowed 8-bit offsets."""
    tags = [i.to_bytes(8, "big") for i in range(1, 700)]
    program = knock_filter(PORT, tags)
    assert all(insn.jt <= 255 and insn.jf <= 255 for insn in program)
    for tag in (tags[0], tags[350], tags[-1]):
        assert run_filter(program, knock(tag), protocol=ETH_P_IP, pkttype=PACKET_HOST)
        assert run_filter(program, knock(tag, v6=True), protocol=ETH_P_IPV6,
                          pkttype=PACKET_HOST)
    assert not run_filter(program, knock(bytes(8)), protocol=ETH_P_IP, pkttype=PACKET_HOST)
    assert not run_filter(program, v4(), protocol=ETH_P_IP, pkttype=PACKET_HOST)


def test_assembler_refuses_a_jump_out_of_reach() -> None:
    from spa.server.capture import BPF_JEQ, BPF_JMP, BPF_RET, assemble

    far: list[tuple[int, str | int, str | int, int] | str] = [
        (BPF_JMP | BPF_JEQ, "end", 0, 1), *[(BPF_RET, 0, 0, 0)] * 300, "end", (BPF_RET, 0, 0, 1)]
    with pytest.raises(ValueError, match="out of reach"):
        assemble(far)


def test_udp_socket_filter_passes_live_tags_only() -> None:
    """udp mode: the socket filter sees the datagram from its UDP header on."""
    from spa.server.capture import udp_payload_filter

    program = udp_payload_filter(TAGS)

    def datagram(tag: bytes, size: int = 161) -> bytes:
        return bytes(UDP(sport=5555, dport=PORT) / Raw(b"\x01" + tag + bytes(size - 9)))

    assert run_filter(program, datagram(TAGS[7]), protocol=0, pkttype=0)
    assert run_filter(program, datagram(TAGS[-1]), protocol=0, pkttype=0)
    assert not run_filter(program, datagram(bytes(8)), protocol=0, pkttype=0)
    assert not run_filter(program, datagram(TAGS[7], size=162), protocol=0, pkttype=0)


def test_udp_filter_failure_removes_the_old_tag_list() -> None:
    """A failed re-attach must not leave a stale tag list dropping knocks."""
    import os
    import socket as socketlib

    from spa.server import capture
    from spa.server.sources import UdpSource

    src = UdpSource("127.0.0.1", 0)
    try:
        assert src.set_tags([b"AAAAAAAA"]) == "kernel filter on 1 tags"
        real = capture.udp_payload_filter
        def refuse(tags: object, nonces: object = (), shut: object = None
                   ) -> list[capture.Insn]:
            raise ValueError("too far")

        capture.udp_payload_filter = refuse
        try:
            assert "not attached" in src.set_tags([b"BBBBBBBB"])
        finally:
            capture.udp_payload_filter = real
        with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as sender:
            sender.sendto(b"\x01BBBBBBBB" + os.urandom(152), ("127.0.0.1", src.port))
        items = src.receive(1.0)
        assert len(items) == 1 and items[0][0][1:9] == b"BBBBBBBB"
    finally:
        src.close()


def test_udp_source_takes_what_is_queued_in_batches() -> None:
    """One receive takes up to BATCH queued datagrams without waiting; an idle
    receive waits its timeout and returns nothing."""
    import socket as socketlib
    import time

    from spa.server.sources import BATCH, UdpSource

    src = UdpSource("127.0.0.1", 0)
    try:
        with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as sender:
            for i in range(BATCH + 10):
                sender.sendto(i.to_bytes(2, "big") * 80, ("127.0.0.1", src.port))
        first, second = src.receive(1.0), src.receive(1.0)
        assert [len(first), len(second)] == [BATCH, 10]
        got = [int.from_bytes(data[:2], "big") for data, _, _ in first + second]
        assert got == list(range(BATCH + 10))
        # each with its source and the interface it came in on (loopback)
        assert {(source, ifindex) for _, source, ifindex in first + second} == {
            ("127.0.0.1", LOOPBACK_IFINDEX)}
        started = time.monotonic()
        assert src.receive(0.2) == []
        assert time.monotonic() - started >= 0.15
    finally:
        src.close()


def knock_with_nonce(tag: bytes, nonce: bytes, *, v6: bool = False) -> bytes:
    payload = b"\x01" + tag + nonce + bytes(161 - 9 - len(nonce))
    header = IPv6(src="2001:db8::7", dst="2001:db8::1") if v6 else IP(
        src="192.0.2.7", dst="192.0.2.1")
    return bytes(header / UDP(sport=5555, dport=PORT) / Raw(payload))


@pytest.mark.parametrize("v6", [False, True])
def test_replayed_nonces_are_dropped_in_the_kernel_and_nothing_else(v6: bool) -> None:
    """A replay flood: the copies carry a live tag and one known nonce."""
    from tests.bpf import check_like_the_kernel

    blocked = [bytes.fromhex("0123456789abcdef"), bytes.fromhex("fedcba9876543210")]
    program = knock_filter(PORT, TAGS, blocked)
    check_like_the_kernel(program)
    proto = ETH_P_IPV6 if v6 else ETH_P_IP

    def passes(tag: bytes, nonce: bytes) -> bool:
        frame = knock_with_nonce(tag, nonce + bytes(16), v6=v6)
        return run_filter(program, frame, protocol=proto, pkttype=PACKET_HOST) > 0

    assert not passes(TAGS[3], blocked[0]) and not passes(TAGS[-1], blocked[1])
    assert passes(TAGS[3], bytes.fromhex("0123456789abcdee"))  # one bit away: a new nonce
    assert passes(TAGS[3], blocked[0][:4] + blocked[1][4:])  # halves of two: no match
    assert not passes(bytes(8), bytes(8))  # junk still dropped
    assert run_filter(knock_filter(PORT, TAGS), knock_with_nonce(TAGS[3], blocked[0] + bytes(16),
                      v6=v6), protocol=proto, pkttype=PACKET_HOST), "no nonces: passes"


def test_udp_socket_filter_drops_replayed_nonces() -> None:
    from spa.server.capture import udp_payload_filter
    from tests.bpf import check_like_the_kernel

    nonce = bytes.fromhex("0123456789abcdef")
    program = udp_payload_filter(TAGS, [nonce])
    check_like_the_kernel(program)

    def datagram(tag: bytes, first: bytes) -> bytes:
        return bytes(UDP(sport=5555, dport=PORT) / Raw(b"\x01" + tag + first + bytes(144)))

    assert not run_filter(program, datagram(TAGS[7], nonce), protocol=0, pkttype=0)
    assert run_filter(program, datagram(TAGS[7], bytes(8)), protocol=0, pkttype=0)
    assert not run_filter(program, datagram(bytes(8), bytes(8)), protocol=0, pkttype=0)


def test_tags_come_first_when_the_program_is_full() -> None:
    from spa.server.capture import MAX_INSNS, fit, max_tags

    nonces = [bytes(8)] * 64
    assert fit([bytes(8)] * 10, nonces) == nonces
    full = [bytes(8)] * max_tags()
    assert fit(full, nonces) == ()
    assert fit([bytes(8)] * (max_tags() + 1), nonces) is None
    fitted = [bytes(8)] * max_tags(64)
    assert len(knock_filter(PORT, fitted, nonces)) <= MAX_INSNS


def test_dual_stack_udp_source_gives_ipv4_senders_as_ipv4() -> None:
    """Review finding: events and logs said src=::ffff:10.0.0.2 in udp mode,
    which fail2ban would ban as another address than the sender's."""
    import socket as socketlib

    from spa.server.sources import UdpSource

    src = UdpSource("::", 0)
    try:
        with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as sender:
            sender.sendto(b"x", ("127.0.0.1", src.port))
        with socketlib.socket(socketlib.AF_INET6, socketlib.SOCK_DGRAM) as sender:
            sender.sendto(b"y", ("::1", src.port))
        got = src.receive(1.0)
        if len(got) < 2:
            got += src.receive(1.0)
        assert sorted(got) == [(b"x", "127.0.0.1", LOOPBACK_IFINDEX),
                               (b"y", "::1", LOOPBACK_IFINDEX)]
    finally:
        src.close()


# ---- issue 13, finding 7: a captured tag flooded from elsewhere stays in the kernel ----

KNOWN4, KNOWN6 = "198.51.100.7", "2001:db8:7::7"  # where the tag's client authenticated from
SHUT = {TAGS[5]: [KNOWN4, KNOWN6]}


def knock_from(tag: bytes, source: str) -> tuple[bytes, int]:
    """A knock-shaped frame with `tag` from `source` (IP header on), and its protocol."""
    payload = b"\x01" + tag + bytes(152)
    if ":" in source:
        return (bytes(IPv6(src=source, dst="2001:db8::1") / UDP(sport=5555, dport=PORT)
                      / Raw(payload)), ETH_P_IPV6)
    return (bytes(IP(src=source, dst="192.0.2.1") / UDP(sport=5555, dport=PORT)
                  / Raw(payload)), ETH_P_IP)


def capture_passes(program: list[Insn], tag: bytes, source: str,
                   draw: int = 1) -> bool:
    frame, proto = knock_from(tag, source)
    return run_filter(program, frame, protocol=proto, pkttype=PACKET_HOST,
                      random=lambda: draw) > 0


def udp_passes(program: list[Insn], tag: bytes, source: str, draw: int = 1) -> bool:
    """udp mode: the filter sees the datagram from its UDP header on, and the
    IP header through SKF_NET_OFF."""
    frame, proto = knock_from(tag, source)
    header = 40 if proto == ETH_P_IPV6 else 20
    return run_filter(program, frame[header:], protocol=proto, pkttype=PACKET_HOST,
                      network=frame, random=lambda: draw) > 0


MODES = [("capture", capture_passes), ("udp", udp_passes)]


def build(mode: str, tags: list[bytes], nonces: list[bytes], shut: Shut | None) -> list[Insn]:
    from spa.server.capture import udp_payload_filter

    if mode == "capture":
        return knock_filter(PORT, tags, nonces, shut)
    return udp_payload_filter(tags, nonces, shut)


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_a_shut_tag_passes_only_from_its_known_sources_both_families(mode: str) -> None:
    """A flooded tag over its limit: from the addresses its client
    authenticated from it passes, from any other address it is dropped in
    the kernel; every tag that is not shut passes from anywhere, as before."""
    from tests.bpf import check_like_the_kernel

    passes = dict(MODES)[mode]
    program = build(mode, TAGS, [], SHUT)
    check_like_the_kernel(program)
    assert passes(program, TAGS[5], KNOWN4) and passes(program, TAGS[5], KNOWN6)
    for stranger in ("198.51.100.8", "203.0.113.7", "2001:db8:7::8", "2001:db8:6::7",
                     "::ffff:198.51.100.7", "c633:6407::"):  # last: KNOWN4's word first
        assert not passes(program, TAGS[5], stranger), stranger
    for tag in (TAGS[0], TAGS[4], TAGS[6], TAGS[-1]):
        for source in (KNOWN4, "203.0.113.7", "2001:db8:6::7"):
            assert passes(program, tag, source), (tag, source)
    assert not passes(program, bytes(8), KNOWN4), "junk is still junk"
    assert build(mode, TAGS, [], {}) == build(mode, TAGS, [], None), "nothing shut: as before"


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_a_shut_tag_still_reaches_python_one_copy_in_shut_sample(mode: str) -> None:
    """The kernel's random number decides: 0 modulo SHUT_SAMPLE passes (so the
    limiter keeps counting the flood and the tag stays shut while it lasts)."""
    from spa.server.sources import SHUT_SAMPLE

    passes = dict(MODES)[mode]
    program = build(mode, TAGS, [], SHUT)
    draws = range(0, 4 * SHUT_SAMPLE * 7919, 7919)
    passed = [d for d in draws if passes(program, TAGS[5], "203.0.113.7", draw=d)]
    assert passed == [d for d in draws if d % SHUT_SAMPLE == 0] and len(passed) == 4


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_shut_tags_beside_replayed_nonces(mode: str) -> None:
    """A known source still meets the nonce list; several clients' shut
    tags with their own sources, and one with none (never authenticated)."""
    from tests.bpf import check_like_the_kernel

    passes = dict(MODES)[mode]
    nonce = bytes(8)  # the frames' nonce bytes are zero: a blocked nonce drops them
    shut = {TAGS[5]: [KNOWN4], TAGS[6]: [KNOWN4], TAGS[7]: ["2001:db8:9::9"], TAGS[8]: []}
    program = build(mode, TAGS, [bytes.fromhex("0123456789abcdef")], shut)
    check_like_the_kernel(program)
    assert passes(program, TAGS[5], KNOWN4) and passes(program, TAGS[6], KNOWN4)
    assert not passes(program, TAGS[7], KNOWN4) and passes(program, TAGS[7], "2001:db8:9::9")
    assert not passes(program, TAGS[8], KNOWN4) and not passes(program, TAGS[8], KNOWN6)
    assert passes(program, TAGS[9], "203.0.113.7")
    blocked = build(mode, TAGS, [nonce], shut)
    assert not passes(blocked, TAGS[5], KNOWN4), "a replayed nonce from a known source"


def test_shut_tags_that_do_not_fit_pass_as_if_not_shut() -> None:
    """Bounded: at most MAX_SHUT_SOURCES sources per tag, and only the shut
    tags whose checks fit in MAX_INSNS beside the tag list; a tag left out
    passes from anywhere (never a live tag dropped for want of room)."""
    from spa.server.capture import MAX_INSNS, fit_shut, max_tags
    from spa.server.sources import MAX_SHUT_SOURCES
    from tests.bpf import check_like_the_kernel

    many = [f"2001:db8:{i:x}::1" for i in range(40)]
    assert fit_shut(TAGS, [], {b"gone....": [KNOWN4]}) == {}, "a tag no longer live"
    full = [i.to_bytes(8, "big") for i in range(1, max_tags() - 60)]  # room for two
    shut = {full[i]: [f"2001:db8:{i:x}::{j}" for j in range(1, 17)] for i in range(10)}
    fitted = fit_shut(full, [], shut)
    assert 0 < len(fitted) < 10 and list(fitted) == list(shut)[:len(fitted)]
    program = knock_filter(PORT, full, [], fitted)
    assert len(program) <= MAX_INSNS
    check_like_the_kernel(program)
    left_out = list(shut)[len(fitted)]
    assert capture_passes(program, left_out, "203.0.113.7"), "not fitted: as if not shut"
    assert not capture_passes(program, full[0], "203.0.113.7")
    assert capture_passes(program, full[0], "2001:db8:0::16")
    program = knock_filter(PORT, TAGS, [], {TAGS[5]: many})
    check_like_the_kernel(program)
    assert capture_passes(program, TAGS[5], many[MAX_SHUT_SOURCES - 1])
    assert not capture_passes(program, TAGS[5], many[MAX_SHUT_SOURCES])
