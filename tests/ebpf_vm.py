"""A small eBPF interpreter, enough to run the tag-map socket filters
(spa.kernel.ebpf) on crafted packets without root, with maps as dicts (the
kernel's verifier and the real maps run them in tests/netns/test_tagmap.py
and tests/unit/test_ebpf.py's root test)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from spa.kernel import ebpf as e
from spa.server.capture import SKF_NET_OFF

MASK = (1 << 64) - 1
STACK, CTX, VALUE, MAP = 0x1000_0000, 0x2000_0000, 0x3000_0000, 0x4000_0000  # regions
STACK_SIZE = 512


@dataclass
class Skb:
    data: bytes  # from skb->data (capture mode: the IP header; udp mode: the UDP header)
    network: bytes  # from the network header
    protocol: int  # ETH_P_IP / ETH_P_IPV6 (host order)
    pkt_type: int = e.PACKET_HOST
    vlan: bool = False
    draw: Callable[[], int] = field(default=lambda: 1)


def _field(skb: Skb, offset: int) -> int:
    if offset == e.SKB_PKT_TYPE:
        return skb.pkt_type
    if offset == e.SKB_VLAN_PRESENT:
        return int(skb.vlan)
    assert offset == e.SKB_PROTOCOL, offset
    return int.from_bytes(skb.protocol.to_bytes(2, "big"), "little")  # a __be16 read on LE


def run(program: list[e.Insn], skb: Skb, maps: dict[int, dict[bytes, bytes]],
        key_sizes: dict[int, int]) -> int:
    """R0 at exit (0: drop)."""
    reg = [0] * 11
    reg[e.R1], reg[e.R10] = CTX, STACK + STACK_SIZE
    stack = bytearray(STACK_SIZE)
    value = b""
    slots: list[e.Insn] = []  # as the kernel counts: a 64-bit immediate load takes two
    for insn in program:
        slots += [insn, e.Insn(0xFF)] if insn.code == e.LD | e.DW | e.IMM else [insn]
    pc = 0
    for _ in range(10_000):
        insn = slots[pc]
        pc += 2 if insn.code == e.LD | e.DW | e.IMM else 1
        cls, op, imm = insn.code & 0x07, insn.code & 0xF0, insn.imm
        assert isinstance(insn.off, int)
        if insn.code == e.LD | e.DW | e.IMM:
            reg[insn.dst] = MAP + imm
        elif cls == e.ALU64 or cls == e.ALU:
            src = reg[insn.src] if insn.code & e.X else imm & MASK
            if op == e.MOV:
                reg[insn.dst] = src
            elif op == e.ADD:
                reg[insn.dst] = (reg[insn.dst] + src) & MASK
            elif op == e.AND:
                reg[insn.dst] &= src
            elif op == e.LSH:
                reg[insn.dst] = (reg[insn.dst] << src) & MASK
            else:
                assert op == e.END and imm == 16 and cls == e.ALU
                low = reg[insn.dst] & 0xFFFF
                reg[insn.dst] = (low >> 8) | ((low & 0xFF) << 8)  # to big-endian on LE
        elif cls == e.LD:
            width = {e.B: 1, e.H: 2, e.W: 4}[insn.code & 0x18]
            offset = imm + (reg[insn.src] if insn.code & 0xE0 == e.IND else 0)
            data, start = (skb.network, offset - SKF_NET_OFF) if offset < 0 else (skb.data, offset)
            if start < 0 or start + width > len(data):
                return 0  # the kernel drops on an out-of-bounds load
            reg[e.R0] = int.from_bytes(data[start:start + width], "big")
            reg[1:6] = [0xDEAD] * 5  # clobbered
        elif cls == e.LDX:
            width = {e.B: 1, e.H: 2, e.W: 4, e.DW: 8}[insn.code & 0x18]
            base = reg[insn.src]
            if base == CTX:
                reg[insn.dst] = _field(skb, insn.off)
            elif base == VALUE:
                reg[insn.dst] = int.from_bytes(value[insn.off:insn.off + width], "little")
            else:
                at = base + insn.off - STACK
                reg[insn.dst] = int.from_bytes(stack[at:at + width], "little")
        elif cls in (e.ST, e.STX):
            width = {e.B: 1, e.H: 2, e.W: 4, e.DW: 8}[insn.code & 0x18]
            at = reg[insn.dst] + insn.off - STACK
            assert at >= 0 and at + width <= STACK_SIZE
            what = reg[insn.src] if cls == e.STX else imm & MASK
            stack[at:at + width] = (what & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif insn.code == e.JMP | e.EXIT:
            return reg[e.R0]
        elif insn.code == e.JMP | e.CALL:
            reg[e.R0], value = _call(imm, reg, stack, skb, maps, key_sizes, value)
            reg[1:6] = [0xDEAD] * 5
        elif insn.code == e.JMP | e.JA:
            pc += insn.off
        else:
            left = reg[insn.dst]
            taken = {e.JEQ: left == imm, e.JNE: left != imm, e.JSET: bool(left & imm)}[op]
            pc += insn.off if taken else 0
    raise AssertionError("no exit in 10,000 steps")


def _call(helper: int, reg: list[int], stack: bytearray, skb: Skb,
          maps: dict[int, dict[bytes, bytes]], key_sizes: dict[int, int],
          value: bytes) -> tuple[int, bytes]:
    def stack_bytes(pointer: int, size: int) -> tuple[int, int]:
        at = pointer - STACK
        assert at >= 0 and at + size <= STACK_SIZE
        return at, at + size

    if helper == e.MAP_LOOKUP_ELEM:
        fd = reg[e.R1] - MAP
        assert fd in maps
        lo, hi = stack_bytes(reg[e.R2], key_sizes[fd])
        found = maps[fd].get(bytes(stack[lo:hi]))
        return (0, value) if found is None else (VALUE, found)
    if helper == e.GET_PRANDOM_U32:
        return skb.draw() & 0xFFFFFFFF, value
    assert helper in (e.SKB_LOAD_BYTES, e.SKB_LOAD_BYTES_RELATIVE), helper
    assert reg[e.R1] == CTX
    data = skb.data
    if helper == e.SKB_LOAD_BYTES_RELATIVE:
        assert reg[e.R5] == e.HDR_START_NET
        data = skb.network
    offset, size = reg[e.R2], reg[e.R4]
    lo, hi = stack_bytes(reg[e.R3], size)
    if offset + size > len(data):
        return (-14) & MASK, value  # -EFAULT
    stack[lo:hi] = data[offset:offset + size]
    return 0, value
