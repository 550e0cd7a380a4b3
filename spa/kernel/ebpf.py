"""A small eBPF assembler and the two tag-map socket filters.

Instructions are data (`Insn`), jumps name labels, `assemble` resolves them
and `encode` gives the bytes the kernel loads; tests check both without root.

The programs have exactly the classic filters' semantics (spa.server.capture:
`knock_filter` for capture mode, `udp_payload_filter` for udp mode; see
docs/threat-model.md, "Floods") except that the sets are hash maps, so
their size is the maps' and not the program's:
- the tag map: key the 8 tag bytes (payload bytes 1-8), value 4 bytes of
  flags (FLAG_SHUT: the tag passes only from its sources);
- the nonce map: key the first 8 bytes of a replayed packet's nonce
  (payload byte 9 on), value 4 bytes (unused); a hit drops;
- the shut map: key the tag then the source address as 16 bytes (IPv4 as
  ::ffff:a.b.c.d), value 4 bytes (unused); a shut tag from a source not in
  it passes when bpf_get_prandom_u32() is 0 modulo SHUT_SAMPLE, else drops.
Invariants: every path ends in `exit` with R0 = 0 (drop) or ACCEPT; the
socket filter sees no SKF_AD loads, so pkt_type, vlan_present and protocol
are read from the __sk_buff context.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import NamedTuple

from spa.server.capture import _NONCE_BASE, _TAG_BASE, ETH_P_IP, ETH_P_IPV6, KNOCK_LENGTH
from spa.server.sources import SHUT_SAMPLE

# instruction classes, sizes, modes, operations (linux/bpf.h, linux/bpf_common.h)
LD, LDX, ST, STX, ALU, JMP, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, ABS, IND, MEM = 0x00, 0x20, 0x40, 0x60
ADD, AND, LSH, MOV, END = 0x00, 0x50, 0x60, 0xB0, 0xD0
K, X = 0x00, 0x08
TO_BE = 0x08  # BPF_END source bit: convert to big-endian
JA, JEQ, JSET, JNE, CALL, EXIT = 0x00, 0x10, 0x40, 0x50, 0x80, 0x90
PSEUDO_MAP_FD = 1  # src_reg of a 64-bit immediate load: imm is a map fd
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
# helpers (enum bpf_func_id)
MAP_LOOKUP_ELEM, GET_PRANDOM_U32, SKB_LOAD_BYTES, SKB_LOAD_BYTES_RELATIVE = 1, 7, 26, 68
HDR_START_NET = 1  # bpf_skb_load_bytes_relative: offsets from the network header
# struct __sk_buff fields a socket filter may read
SKB_PKT_TYPE, SKB_PROTOCOL, SKB_VLAN_PRESENT = 4, 16, 20
PACKET_HOST = 0
ACCEPT = 0xFFFF  # the classic programs' accept (bytes kept)
UDP_HEADER = 8
TAG_SIZE = NONCE_PREFIX = 8
ADDRESS_SIZE = 16  # a source address in the shut map (IPv4 mapped into IPv6)
SHUT_KEY = TAG_SIZE + ADDRESS_SIZE
VALUE_SIZE = 4
FLAG_SHUT = 1
# the stack (R10 - offset): the tag, the nonce prefix, the shut key
TAG_AT, NONCE_AT, SHUT_AT = -8, -16, -16 - SHUT_KEY
INSN = struct.Struct("<BBhi" if sys.byteorder == "little" else ">BBhi")


class Insn(NamedTuple):
    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0  # a jump's offset may name a label
    imm: int = 0


Item = Insn | str  # a str is a label for the next instruction


def assemble(items: Sequence[Item]) -> list[Insn]:
    """Resolve labels: a jump's `off` naming a label becomes the offset
    (a 64-bit immediate load counts two slots).  Raises ValueError for an
    unknown label or an offset beyond 16 bits."""
    labels: dict[str, int] = {}
    slot = 0
    for item in items:
        if isinstance(item, str):
            labels[item] = slot
        else:
            slot += 2 if item.code == LD | DW | IMM else 1
    program: list[Insn] = []
    slot = 0
    for item in items:
        if isinstance(item, str):
            continue
        slot += 2 if item.code == LD | DW | IMM else 1
        if isinstance(item.off, str):
            if item.off not in labels:
                raise ValueError(f"no label {item.off!r}")
            item = item._replace(off=labels[item.off] - slot)
        assert isinstance(item.off, int)
        if not -0x8000 <= item.off <= 0x7FFF:
            raise ValueError(f"eBPF jump out of reach: {item}")
        program.append(item)
    return program


def encode(program: Sequence[Insn]) -> bytes:
    """The bytes of struct bpf_insn[] (a 64-bit immediate: two slots)."""
    out = []
    for insn in program:
        regs = insn.dst | insn.src << 4 if sys.byteorder == "little" else insn.dst << 4 | insn.src
        assert isinstance(insn.off, int)
        out.append(INSN.pack(insn.code, regs, insn.off, _s32(insn.imm)))
        if insn.code == LD | DW | IMM:
            out.append(INSN.pack(0, 0, 0, 0))
    return b"".join(out)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


# the few instruction shapes the programs use
def mov(dst: int, imm: int) -> Insn:
    return Insn(ALU64 | MOV | K, dst, 0, 0, imm)


def movx(dst: int, src: int) -> Insn:
    return Insn(ALU64 | MOV | X, dst, src)


def alu(op: int, dst: int, imm: int) -> Insn:
    return Insn(ALU64 | op | K, dst, 0, 0, imm)


def ld_abs(size: int, offset: int) -> Insn:
    return Insn(LD | ABS | size, 0, 0, 0, offset)


def ld_ind(size: int, src: int, offset: int) -> Insn:
    return Insn(LD | IND | size, 0, src, 0, offset)


def ldx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(LDX | MEM | size, dst, src, off)


def stx(size: int, dst: int, off: int, src: int) -> Insn:
    return Insn(STX | MEM | size, dst, src, off)


def st(size: int, dst: int, off: int, imm: int) -> Insn:
    return Insn(ST | MEM | size, dst, 0, off, imm)


def jump(op: int, dst: int, imm: int, label: str) -> Insn:
    return Insn(JMP | op | K, dst, 0, label, imm)


def goto(label: str) -> Insn:
    return Insn(JMP | JA, 0, 0, label)


def call(helper: int) -> Insn:
    return Insn(JMP | CALL, 0, 0, 0, helper)


def ld_map(dst: int, fd: int) -> Insn:
    return Insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd)


EXIT_INSN = Insn(JMP | EXIT)


class Maps(NamedTuple):
    tags: int  # fds
    nonces: int
    shut: int


def _load_bytes(offset_reg: int, offset: int, stack: int, size: int) -> list[Item]:
    """bpf_skb_load_bytes(skb, offset_reg + offset, R10 + stack, size); a
    short packet drops."""
    return [movx(R1, R6), movx(R2, offset_reg), alu(ADD, R2, offset), movx(R3, R10),
            alu(ADD, R3, stack), mov(R4, size), call(SKB_LOAD_BYTES),
            jump(JNE, R0, 0, "drop")]


def _lookup(fd: int, stack: int) -> list[Item]:
    """R0 = bpf_map_lookup_elem(map, R10 + stack)."""
    return [ld_map(R1, fd), movx(R2, R10), alu(ADD, R2, stack), call(MAP_LOOKUP_ELEM)]


def _source(offset: int, stack: int, size: int) -> list[Item]:
    """`size` bytes of the network header at `offset` to the stack."""
    return [movx(R1, R6), mov(R2, offset), movx(R3, R10), alu(ADD, R3, stack), mov(R4, size),
            mov(R5, HDR_START_NET), call(SKB_LOAD_BYTES_RELATIVE), jump(JNE, R0, 0, "drop")]


def _tail(maps: Maps) -> list[Item]:
    """With R8 = the payload's offset from skb->data and R7 = the protocol
    (host order): the tag, the nonce and the shut checks; accept or drop."""
    address = SHUT_AT + TAG_SIZE
    return [
        *_load_bytes(R8, _TAG_BASE, TAG_AT, TAG_SIZE),
        *_lookup(maps.tags, TAG_AT),
        jump(JEQ, R0, 0, "drop"),                       # not a live tag
        ldx(W, R9, R0, 0),                              # its flags
        *_load_bytes(R8, _NONCE_BASE, NONCE_AT, NONCE_PREFIX),
        *_lookup(maps.nonces, NONCE_AT),
        jump(JNE, R0, 0, "drop"),                       # a replay being flooded
        Insn(JMP | JSET | K, R9, 0, "shut", FLAG_SHUT),
        "accept",
        mov(R0, ACCEPT), EXIT_INSN,
        "shut",
        ldx(DW, R1, R10, TAG_AT), stx(DW, R10, SHUT_AT, R1),
        jump(JEQ, R7, ETH_P_IPV6, "v6_source"),
        st(DW, R10, address, 0), st(H, R10, address + 8, 0),
        st(H, R10, address + 10, 0xFFFF),              # ::ffff:a.b.c.d
        *_source(12, address + 12, 4),
        goto("source"),
        "v6_source",
        *_source(8, address, ADDRESS_SIZE),
        "source",
        *_lookup(maps.shut, SHUT_AT),
        jump(JNE, R0, 0, "accept"),                     # one of its sources
        call(GET_PRANDOM_U32),
        Insn(JMP | JSET | K, R0, 0, "drop", SHUT_SAMPLE - 1),
        goto("accept"),                                 # the sample from elsewhere
        "drop",
        mov(R0, 0), EXIT_INSN,
    ]


def _protocol() -> list[Item]:
    """R7 = skb->protocol in host order."""
    return [ldx(W, R7, R6, SKB_PROTOCOL), Insn(ALU | END | TO_BE, R7, 0, 0, 16)]


def capture_program(port: int, maps: Maps) -> list[Insn]:
    """Capture mode (an AF_PACKET SOCK_DGRAM socket: data starts at the IP
    header): pkttype HOST, no VLAN tag, IPv4 unfragmented or IPv6 without
    extension headers, UDP to `port` of exactly one knock's length, then
    the map checks."""
    return assemble([
        movx(R6, R1),
        ldx(W, R0, R6, SKB_PKT_TYPE), jump(JNE, R0, PACKET_HOST, "drop"),
        ldx(W, R0, R6, SKB_VLAN_PRESENT), jump(JNE, R0, 0, "drop"),
        *_protocol(),
        jump(JEQ, R7, ETH_P_IP, "v4"),
        jump(JNE, R7, ETH_P_IPV6, "drop"),
        ld_abs(B, 6), jump(JNE, R0, 17, "drop"),       # next header: UDP, no extensions
        ld_abs(H, 42), jump(JNE, R0, port, "drop"),     # 40 + 2: destination port
        ld_abs(H, 44), jump(JNE, R0, KNOCK_LENGTH, "drop"),
        mov(R8, 40 + UDP_HEADER),
        goto("payload"),
        "v4",
        ld_abs(B, 9), jump(JNE, R0, 17, "drop"),        # protocol UDP
        ld_abs(H, 6), Insn(JMP | JSET | K, R0, 0, "drop", 0x3FFF),  # MF or offset
        ld_abs(B, 0), alu(AND, R0, 0x0F), alu(LSH, R0, 2), movx(R8, R0),  # 4 * IHL
        ld_ind(H, R8, 2), jump(JNE, R0, port, "drop"),
        ld_ind(H, R8, 4), jump(JNE, R0, KNOCK_LENGTH, "drop"),
        alu(ADD, R8, UDP_HEADER),
        "payload",
        *_tail(maps),
    ])


def udp_program(maps: Maps) -> list[Insn]:
    """Udp mode (a bound UDP socket: data starts at the UDP header): exactly
    one knock's length, then the map checks."""
    return assemble([
        movx(R6, R1),
        *_protocol(),
        ld_abs(H, 4), jump(JNE, R0, KNOCK_LENGTH, "drop"),
        mov(R8, UDP_HEADER),
        *_tail(maps),
    ])
