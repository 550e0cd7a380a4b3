"""Capture mode: see knocks without binding the knock port.

An AF_PACKET socket (SOCK_DGRAM: frames arrive from the network header on)
with a classic BPF program attached in the kernel, so that only unfragmented
UDP datagrams addressed to this host on the knock port reach Python.  Nothing
listens on the port: to a scanner it is a closed port like any other.

Invariants:
- The filter is built once at start, as data (a list of instructions) that
  tests check without root; the kernel runs it for every frame.
- Per packet, IPv4/IPv6 and UDP headers are parsed with `struct`-free slicing;
  fragments, IP options we cannot skip, IPv6 extension headers, and lengths
  that do not add up are dropped.
- Only frames for this host are accepted (pkttype HOST): a copy of our own
  outgoing traffic, or frames for others on a promiscuous link, never count.
- Each knock carries the interface where the IP stack takes it (for the
  reverse-path check, spa.server.routes): a frame seen on a bridge or bond
  port counts as its master's, and a frame still carrying a VLAN tag is
  dropped by the filter (it comes up again, untagged, on the VLAN's device),
  so the first copy of a frame is judged where its route lives.
- A shut tag (a captured tag being flooded, over its failure limit) passes
  only from the sources its client authenticated from, and one copy in
  SHUT_SAMPLE from anywhere else (so the limiter goes on seeing the flood);
  a tag that is not shut passes exactly as without the list.  Shut tags that
  do not fit in the program pass as if not shut (docs/threat-model.md,
  "Floods").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from spa.kernel.mapsource import MapFiltered
from spa.server.errors import LocalError
from spa.server.sources import (
    BATCH,
    MAX_SHUT_SOURCES,
    SHUT_SAMPLE,
    Datagram,
    Shut,
    Waiter,
    filter_note,
)

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SO_ATTACH_FILTER = 26
PACKET_HOST = 0
RECV_SIZE = 2048
RECV_BUFFER = 4 * 1024 * 1024
_DOWN = (errno.ENETDOWN, errno.ENXIO, errno.ENODEV)
SOL_PACKET, PACKET_STATISTICS = 263, 6  # linux/if_packet.h  # the interface went away

# classic BPF opcodes (linux/filter.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_JMP, BPF_RET = 0x00, 0x01, 0x02, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
BPF_JEQ, BPF_JSET = 0x10, 0x40
BPF_K = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_VLAN_TAG_PRESENT = 48
SKF_AD_RANDOM = 56  # a fresh 32-bit random number (prandom_u32)
SKF_NET_OFF = -0x100000  # loads relative to the network header (udp mode sees UDP on)


class Insn(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


def _k(value: int) -> int:
    return value & 0xFFFFFFFF


Label = str | int


BPF_JA = BPF_JMP | 0x00  # unconditional jump: a 32-bit offset in k
MAX_JUMP = 255  # jt and jf are 8-bit offsets


def assemble(items: list[tuple[int, Label, Label, int] | str]) -> list[Insn]:
    """Resolve symbolic jump targets: a str item is a label for the next
    instruction; jt/jf (or, for BPF_JA, jt) may name a label.

    Raises ValueError if a conditional jump does not reach (jt/jf are 8 bits):
    the caller must keep conditional targets near, and use BPF_JA for far ones.
    """
    labels: dict[str, int] = {}
    code: list[tuple[int, Label, Label, int]] = []
    for item in items:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    program = []
    for pc, (op, jt, jf, k) in enumerate(code):
        def offset(target: Label, pc: int = pc) -> int:
            return target if isinstance(target, int) else labels[target] - pc - 1
        if op == BPF_JA:
            program.append(Insn(op, 0, 0, offset(jt)))
            continue
        insn = Insn(op, offset(jt), offset(jf), k)
        if not (0 <= insn.jt <= MAX_JUMP and 0 <= insn.jf <= MAX_JUMP):
            raise ValueError(f"BPF jump out of reach at instruction {pc}: {insn}")
        program.append(insn)
    return program


MAX_INSNS = 4096  # BPF_MAXINSNS: the kernel refuses longer classic programs
KNOCK_LENGTH = 8 + 161  # UDP header + one packet of wire format v1
_TAG_BASE = 1  # the knock tag is at payload bytes 1-8 (after the version byte)
_PER_TAG = 5  # instructions per tag in the tag list


_NONCE_BASE = 9  # the nonce starts at payload byte 9; its first 8 bytes identify a packet
_ACCEPT = (BPF_RET | BPF_K, 0, 0, 0xFFFF)
_DROP = (BPF_RET | BPF_K, 0, 0, 0)
Code = list[tuple[int, Label, Label, int] | str]


def _word_blocks(values: Sequence[bytes], cells: tuple[int, int],
                 hit: tuple[int, Label, Label, int],
                 jumps: Mapping[bytes, Label] | None = None) -> Code:
    """With A = M[cells[0]] = bytes 0-3 and M[cells[1]] = bytes 4-7 of a field:
    one five-instruction block per 8-byte value (a miss skips to the next
    block, a hit runs `hit`, or jumps to `jumps[value]` where given, so no
    conditional jump leaves its block)."""
    jeq = BPF_JMP | BPF_JEQ | BPF_K
    code: Code = []
    for value in values:
        if jumps and value in jumps:
            hit_here: tuple[int, Label, Label, int] = (BPF_JA, jumps[value], 0, 0)
        else:
            hit_here = hit
        high, low = int.from_bytes(value[:4], "big"), int.from_bytes(value[4:8], "big")
        code += [
            (jeq, 0, 4, high),                          # miss: to the next block
            (BPF_LD | BPF_MEM, 0, 0, cells[1]),
            (jeq, 0, 1, low),                           # miss: restore A, go on
            hit_here,
            (BPF_LD | BPF_MEM, 0, 0, cells[0]),
        ]
    return code


def _tag_blocks(tags: Sequence[bytes], nonces: Sequence[bytes] = (),
                shut: Shut | None = None, base: int = 0) -> Code:
    """The tag list (tag in M[0], M[1]): no tag matched drops.  With
    `nonces` (the first 8 bytes of replayed packets' nonces, in M[2], M[3]),
    a tag hit goes on to the nonce list, where a hit drops and the end accepts.
    With `shut`, a hit on a shut tag goes first through its sources (the
    network header at `base`), see _shut_code."""
    passed = _ACCEPT if not nonces else (BPF_JA, "nonces", 0, 0)
    jumps, checks = _shut_code(shut or {}, base, passed)
    code: Code = [*_word_blocks(tags, (0, 1), passed, jumps), _DROP, *checks]
    if nonces:
        code += ["nonces", (BPF_LD | BPF_MEM, 0, 0, 2), *_word_blocks(nonces, (2, 3), _DROP),
                 _ACCEPT]
    return code


def _addresses(sources: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found = []
    for text in sources[:MAX_SHUT_SOURCES]:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue  # not an address (a name in a test): it matches no packet
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's way of saying IPv4
        found.append(address)
    return found


def _source_check(label: str, sources: Sequence[str], base: int,
                  passed: tuple[int, Label, Label, int]) -> Code:
    """From `label`: the IPv4 source is one word compared per source, the
    IPv6 source four (an eight-instruction block per source whose misses
    stay inside it); a known source runs `passed`, any other source does too
    when the kernel's random number is 0 modulo SHUT_SAMPLE, else drops.
    At most MAX_SHUT_SOURCES sources: every jump stays within 255."""
    jeq, ld_w = BPF_JMP | BPF_JEQ | BPF_K, BPF_LD | BPF_W | BPF_ABS
    addresses = _addresses(sources)
    code: Code = [label, (BPF_LD | BPF_H | BPF_ABS, 0, 0, _k(SKF_AD_OFF + SKF_AD_PROTOCOL)),
                  (jeq, 0, f"{label}_v6", ETH_P_IP),
                  (ld_w, 0, 0, _k(base + 12))]                    # IPv4 source
    code += [(jeq, f"{label}_pass", 0, int(a)) for a in addresses if a.version == 4]
    code += [(BPF_JA, f"{label}_sample", 0, 0), f"{label}_v6"]
    for address in addresses:
        if address.version == 6:
            words = [int.from_bytes(address.packed[i:i + 4], "big") for i in range(0, 16, 4)]
            code += [(ld_w, 0, 0, _k(base + 8)), (jeq, 0, 6, words[0]),   # IPv6 source
                     (ld_w, 0, 0, _k(base + 12)), (jeq, 0, 4, words[1]),
                     (ld_w, 0, 0, _k(base + 16)), (jeq, 0, 2, words[2]),
                     (ld_w, 0, 0, _k(base + 20)), (jeq, f"{label}_pass", 0, words[3])]
    return [*code, f"{label}_sample",
            (ld_w, 0, 0, _k(SKF_AD_OFF + SKF_AD_RANDOM)),
            (BPF_JMP | BPF_JSET | BPF_K, 0, f"{label}_pass", SHUT_SAMPLE - 1),
            _DROP, f"{label}_pass", passed]


def _shut_code(shut: Shut, base: int, passed: tuple[int, Label, Label, int]
               ) -> tuple[dict[bytes, Label], Code]:
    """Where each shut tag's hit jumps, and the source checks there (one per
    distinct list of sources: a client's shut tags share one)."""
    groups: dict[tuple[str, ...], list[bytes]] = {}
    for tag, sources in shut.items():
        groups.setdefault(tuple(sources[:MAX_SHUT_SOURCES]), []).append(tag)
    jumps: dict[bytes, Label] = {}
    code: Code = []
    for index, (sources, tags) in enumerate(groups.items()):
        label = f"shut{index}"
        jumps.update((tag, label) for tag in tags)
        code += _source_check(label, sources, base, passed)
    return jumps, code


def knock_filter(port: int, tags: list[bytes] | None = None,
                 nonces: Sequence[bytes] = (), shut: Shut | None = None) -> list[Insn]:
    """Accept unfragmented UDP to `port` for this host, IPv4 or IPv6.

    With `tags` (issue 6: drop junk before Python wakes), also require a UDP
    length of exactly one knock and a payload whose bytes 1-8 equal one of
    the tags.  The two 32-bit words sit in scratch memory M[0], M[1]; each tag
    is a block of five instructions whose jumps stay inside the block (a
    miss skips to the next block, a hit returns at once), so no conditional
    jump ever needs more than the 8 bits classic BPF gives it.

    With `nonces` (a replay flood: the first 8 bytes of the nonces of packets
    being replayed), a knock carrying a live tag and one of those nonces is
    dropped too: its copies no longer wake Python.

    With `shut` (a captured tag flooded: over its failure limit), a knock
    carrying a shut tag passes only from the sources given for it, and one
    copy in SHUT_SAMPLE from elsewhere (the frame starts at its IP header).
    """
    ld_h, ld_b = BPF_LD | BPF_H | BPF_ABS, BPF_LD | BPF_B | BPF_ABS
    jeq = BPF_JMP | BPF_JEQ | BPF_K
    accept_insn = (BPF_RET | BPF_K, 0, 0, 0xFFFF)
    drop_insn = (BPF_RET | BPF_K, 0, 0, 0)
    program: list[tuple[int, Label, Label, int] | str] = [
        (ld_b, 0, 0, _k(SKF_AD_OFF + SKF_AD_PKTTYPE)),
        (jeq, 0, "drop", PACKET_HOST),
        (ld_b, 0, 0, _k(SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT)),
        (jeq, 0, "drop", 0),                            # tagged: seen again on the VLAN
        (ld_h, 0, 0, _k(SKF_AD_OFF + SKF_AD_PROTOCOL)),
        (jeq, 0, "ipv6", ETH_P_IP),
        (ld_b, 0, 0, 9),                                # IPv4 protocol
        (jeq, 0, "drop", socket.IPPROTO_UDP),
        (ld_h, 0, 0, 6),                                # flags + fragment offset
        (BPF_JMP | BPF_JSET | BPF_K, "drop", 0, 0x3FFF),  # MF or offset: a fragment
        (BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),           # X = 4 * IHL
        (BPF_LD | BPF_H | BPF_IND, 0, 0, 2),            # UDP destination port
        (jeq, "v4_port_ok", "drop", port),
        "ipv6",
        (jeq, 0, "drop", ETH_P_IPV6),
        (ld_b, 0, 0, 6),                                # next header (no extensions)
        (jeq, 0, "drop", socket.IPPROTO_UDP),
        (ld_h, 0, 0, 42),                               # 40 + 2: UDP destination port
        (jeq, "v6_port_ok", "drop", port),
        "drop",
        drop_insn,
    ]
    if tags is None:
        return assemble([*program, "v4_port_ok", "v6_port_ok", accept_insn])
    ld_w_ind, ld_w_abs = BPF_LD | BPF_W | BPF_IND, BPF_LD | BPF_W | BPF_ABS
    st, ld_mem = BPF_ST, BPF_LD | BPF_MEM
    # The kernel's checker reads the program in order and wants every scratch
    # cell written before any read on every path it can see, including the
    # fall-through after a return: write both cells first.
    cells = range(4 if nonces else 2)
    program = [(BPF_LD | BPF_IMM, 0, 0, 0), *[(st, 0, 0, c) for c in cells], *program]

    def fields(load: int, base: int) -> Code:
        offsets = [_TAG_BASE, _TAG_BASE + 4, _NONCE_BASE, _NONCE_BASE + 4][:len(cells)]
        code: Code = []
        for cell, offset in zip(cells, offsets, strict=True):
            code += [(load, 0, 0, base + offset), (st, 0, 0, cell)]
        return code

    program += [
        "v4_port_ok",
        (BPF_LD | BPF_H | BPF_IND, 0, 0, 4),            # UDP length
        (jeq, 0, "drop_length", KNOCK_LENGTH),
        *fields(ld_w_ind, 8),
        (BPF_JA, "tags", 0, 0),
        "v6_port_ok",
        (ld_h, 0, 0, 44),                               # UDP length
        (jeq, 0, "drop_length", KNOCK_LENGTH),
        *fields(ld_w_abs, 48),
        (BPF_JA, "tags", 0, 0),
        "drop_length",
        drop_insn,
        "tags",
        (ld_mem, 0, 0, 0),
    ]
    program += _tag_blocks(tags, nonces, shut, 0)
    return assemble(program)


def udp_payload_filter(tags: list[bytes], nonces: Sequence[bytes] = (),
                       shut: Shut | None = None) -> list[Insn]:
    """For a bound UDP socket (udp mode), where a socket filter sees the
    datagram from its UDP header on: exactly one knock's length and one of
    the live tags at payload bytes 1-8, in the same 5-instruction blocks;
    with `nonces`, the same replay drop as knock_filter; with `shut`, the
    same source check (the source address read through SKF_NET_OFF)."""
    ld_h, ld_w = BPF_LD | BPF_H | BPF_ABS, BPF_LD | BPF_W | BPF_ABS
    jeq = BPF_JMP | BPF_JEQ | BPF_K
    program: Code = [(BPF_LD | BPF_IMM, 0, 0, 0), (BPF_ST, 0, 0, 0), (BPF_ST, 0, 0, 1)]
    if nonces:
        program += [(BPF_ST, 0, 0, 2), (BPF_ST, 0, 0, 3),
                    (ld_w, 0, 0, 8 + _NONCE_BASE), (BPF_ST, 0, 0, 2),
                    (ld_w, 0, 0, 8 + _NONCE_BASE + 4), (BPF_ST, 0, 0, 3)]
    program += [
        (ld_h, 0, 0, 4),                                # UDP length
        (jeq, 0, "drop", KNOCK_LENGTH),
        (ld_w, 0, 0, 8 + _TAG_BASE + 4), (BPF_ST, 0, 0, 1),
        (ld_w, 0, 0, 8 + _TAG_BASE),  (BPF_ST, 0, 0, 0),
        (BPF_JA, "tags", 0, 0),
        "drop",
        (BPF_RET | BPF_K, 0, 0, 0),
        "tags",
    ]
    program += _tag_blocks(tags, nonces, shut, SKF_NET_OFF)
    return assemble(program)


def fit(tags: Sequence[bytes], nonces: Sequence[bytes]) -> Sequence[bytes] | None:
    """The nonces that fit in one program beside the tags (the tags come
    first: blocking replays in the kernel is a saving, the tags are the
    filter), or None if not even the tags fit."""
    if len(tags) <= max_tags(len(nonces)):
        return nonces
    return () if len(tags) <= max_tags() else None


def fit_shut(tags: Sequence[bytes], nonces: Sequence[bytes], shut: Shut) -> dict[bytes,
                                                                               Sequence[str]]:
    """The shut tags (of `tags`: a tag no longer live needs no check) whose
    source checks fit in the program beside the tags and nonces, whole
    clients at a time in the order given; the rest pass as if not shut."""
    live = set(tags)
    wanted = {tag: sources for tag, sources in shut.items() if tag in live}
    if not wanted:
        return {}
    room = MAX_INSNS - len(knock_filter(1, list(tags), nonces))  # udp mode's is shorter
    fitted: dict[bytes, Sequence[str]] = {}
    checked: set[tuple[str, ...]] = set()
    for tag, sources in wanted.items():
        key = tuple(sources[:MAX_SHUT_SOURCES])
        if key not in checked:
            size = sum(1 for item in _source_check("x", key, 0, _ACCEPT)
                       if not isinstance(item, str))
            if size > room:
                continue
            room -= size
            checked.add(key)
        fitted[tag] = sources
    return fitted


def max_tags(nonces: int = 0) -> int:
    """How many tags fit in one classic program (beside `nonces` blocked nonces)."""
    return (MAX_INSNS - len(knock_filter(1, [], [bytes(8)] * nonces))) // _PER_TAG


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_filter(sock: socket.socket, program: list[Insn]) -> None:
    """Attach (or atomically replace) a classic BPF program on a socket."""
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(raw)
    fprog = _SockFprog(len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def attach_tags(sock: socket.socket, build: Callable[[Shut], list[Insn]], shut: Shut) -> Shut:
    """Attach build(shut); if it cannot be attached, build({}): the shut
    tags' checks are a saving, the tag list is the filter.  Returns the shut
    tags attached.  Raises OSError, ValueError or struct.error if neither is."""
    try:
        attach_filter(sock, build(shut))
    except (OSError, ValueError, struct.error):
        if not shut:
            raise
        attach_filter(sock, build({}))
        return {}
    return shut


def parse_datagram(frame: bytes, port: int) -> tuple[bytes, str] | None:
    """(UDP payload, source address) of an IPv4/IPv6 frame, or None."""
    if not frame:
        return None
    version = frame[0] >> 4
    if version == 4:
        ihl = (frame[0] & 0x0F) * 4
        total = int.from_bytes(frame[2:4], "big")
        if ihl < 20 or total > len(frame) or total < ihl + 8 or frame[9] != socket.IPPROTO_UDP:
            return None
        if int.from_bytes(frame[6:8], "big") & 0x3FFF:
            return None  # a fragment
        udp = frame[ihl:total]
        source = socket.inet_ntop(socket.AF_INET, frame[12:16])
    elif version == 6:
        if len(frame) < 48 or frame[6] != socket.IPPROTO_UDP:
            return None
        total = 40 + int.from_bytes(frame[4:6], "big")
        if total > len(frame):
            return None
        udp = frame[40:total]
        source = socket.inet_ntop(socket.AF_INET6, frame[8:24])
    else:
        return None
    if len(udp) < 8 or int.from_bytes(udp[2:4], "big") != port:
        return None
    length = int.from_bytes(udp[4:6], "big")
    if length < 8 or length > len(udp):
        return None
    return udp[8:length], source


def arrival_index(name: str) -> int:
    """The index of the interface where the IP stack takes a frame seen on
    `name`: its master's for a bridge or bond port (the frame comes up
    again there), else its own; 0 if it is gone."""
    with contextlib.suppress(OSError):
        name = os.path.basename(os.readlink(f"/sys/class/net/{name}/master"))
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


class CaptureSource(MapFiltered):
    """Knocks from an AF_PACKET socket; the knock port stays unbound.
    `replace_tags`/`update_tags` (spa.kernel.mapsource) run the eBPF map
    filter, `set_tags` the classic one."""

    def __init__(self, port: int, interface: str = "") -> None:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise LocalError("capture mode needs root (or CAP_NET_RAW); run as root or use "
                             "--mode udp") from None
        try:
            # Attach before binding so that nothing unfiltered is ever queued.
            attach_filter(sock, knock_filter(port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if interface:
                sock.bind((interface, ETH_P_ALL))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENODEV, errno.ENXIO):
                raise LocalError(f"no network interface named {interface!r} (see: ip link)"
                                 ) from None
            raise LocalError(f"cannot capture on {interface or 'all interfaces'}: "
                             f"{exc.strerror}") from None
        # Drain what arrived between socket() and attach: it was not filtered.
        sock.setblocking(False)
        try:
            while True:
                sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            pass
        self._sock = sock
        self._waiter = Waiter(sock)
        self.wake = self._waiter.wake
        self._queue_drops = 0
        self.port = self._map_port = port

    def set_tags(self, tags: list[bytes] | None, nonces: Sequence[bytes] = (),
                 shut: Shut | None = None) -> str:
        """Filter on these knock tags in the kernel (None: port only), drop
        knocks carrying one of `nonces` (replays being flooded), and knocks
        carrying a `shut` tag from a source not listed for it (but one in
        SHUT_SAMPLE).

        Re-attaching replaces the program atomically.  Too many tags for one
        program, or a kernel that refuses its size (net.core.optmem_max), falls
        back to the port-only filter (first, to the program without the shut
        tags' checks).  Returns a line for the log.
        """
        self._drop_map()
        fitted = None if tags is None else fit(tags, nonces)
        if tags is not None and fitted is None:
            tags, fitted = None, ()
            note = f"too many tags for one BPF program (max {max_tags()}); port-only filter"
        else:
            note = "port-only filter" if tags is None else ""
        wanted = fit_shut(tags, fitted or (), shut or {}) if tags is not None else {}
        try:
            gated = attach_tags(self._sock, lambda gate: knock_filter(self.port, tags,
                                                                      fitted or (), gate), wanted)
            note = note or filter_note(tags or [], fitted or (), gated)
        except (OSError, ValueError, struct.error) as exc:
            attach_filter(self._sock, knock_filter(self.port))
            size = len(knock_filter(self.port, tags or [], fitted or ()))
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            note = (f"kernel filter of {size} instructions not attached ({reason}; "
                    "raise net.core.optmem_max?); port-only filter")
        return self._classic(note)

    def queue_drops(self) -> int | None:
        """Frames the kernel dropped because this socket's queue was full
        (PACKET_STATISTICS, which resets on reading: summed here)."""
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return None
        self._queue_drops += struct.unpack("II", raw)[1]
        return self._queue_drops

    def receive(self, timeout: float) -> list[Datagram]:
        """Queued knocks (see spa.server.sources); [] after `timeout` idle."""
        try:
            items = self._drain()
            if not items and self._waiter.wait(timeout):
                items = self._drain()
        except OSError as exc:
            if exc.errno in _DOWN:
                time.sleep(timeout)  # the interface went down: wait for it
                return []
            raise
        return items

    def _drain(self) -> list[Datagram]:
        items: list[Datagram] = []
        recvfrom, port = self._sock.recvfrom, self.port
        arrivals: dict[str, int] = {}  # per batch: an interface made again keeps its name
        try:
            for _ in range(BATCH):
                frame, address = recvfrom(RECV_SIZE)
                if address[2] == PACKET_HOST:
                    item = parse_datagram(frame, port)
                    if item is not None:
                        name = address[0]
                        ifindex = arrivals.get(name)
                        if ifindex is None:
                            ifindex = arrivals[name] = arrival_index(name)
                        items.append((item[0], item[1], ifindex))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if not (items and exc.errno in _DOWN):
                raise  # (what came before the interface went down is kept)
        return items

    def close(self) -> None:
        self._drop_map()
        self._sock.close()
        self._waiter.close()
