"""A small classic-BPF interpreter, enough to run our capture filter on
crafted frames without root (the kernel runs the same program for real in
tests/netns)."""

from __future__ import annotations

from collections.abc import Callable

from spa.server.capture import (
    BPF_ABS,
    BPF_B,
    BPF_H,
    BPF_IND,
    BPF_JEQ,
    BPF_JMP,
    BPF_JSET,
    BPF_LD,
    BPF_LDX,
    BPF_MEM,
    BPF_MSH,
    BPF_RET,
    BPF_ST,
    SKF_AD_OFF,
    SKF_AD_PKTTYPE,
    SKF_AD_PROTOCOL,
    SKF_AD_RANDOM,
    SKF_AD_VLAN_TAG_PRESENT,
    SKF_NET_OFF,
    Insn,
)


def check_like_the_kernel(program: list[Insn]) -> None:
    """The kernel's static checks (net/core/filter.c, bpf_check_classic and
    check_load_and_stores): forward jumps inside the program, 8-bit jt/jf, a
    return at the end, and every scratch cell written before it is read on
    every path, read in program order (a return does not reset what is known,
    so code after a return must still see its cells written)."""
    size = len(program)
    assert 0 < size <= 4096, "the kernel refuses longer programs"
    assert program[-1].code & 0x07 == BPF_RET, "the last instruction must return"
    masks = [0xFFFF] * size
    valid = 0
    for pc, insn in enumerate(program):
        valid &= masks[pc]
        cls = insn.code & 0x07
        if cls == BPF_ST:
            valid |= 1 << insn.k
        elif cls == BPF_LD and insn.code & 0xE0 == BPF_MEM:
            assert valid & (1 << insn.k), f"M[{insn.k}] read before written at {pc}"
        elif cls == BPF_JMP and insn.code & 0xF0 == 0x00:
            assert pc + 1 + insn.k < size, f"jump out of the program at {pc}"
            masks[pc + 1 + insn.k] &= valid
            valid = 0xFFFF
        elif cls == BPF_JMP:
            assert 0 <= insn.jt <= 255 and 0 <= insn.jf <= 255, f"8-bit offsets: {insn}"
            assert pc + 1 + max(insn.jt, insn.jf) < size, f"jump out of the program at {pc}"
            masks[pc + 1 + insn.jt] &= valid
            masks[pc + 1 + insn.jf] &= valid
            valid = 0xFFFF


def never_sampled() -> int:
    return 1  # the kernel's random number: nonzero modulo any sample size


def run_filter(program: list[Insn], frame: bytes, *, protocol: int, pkttype: int,
               vlan: bool = False, network: bytes | None = None,
               random: Callable[[], int] = never_sampled) -> int:
    """Run `program` on `frame` (what the socket sees: for capture mode the
    IP header on, for udp mode the UDP header on).  `network`: the packet
    from its IP header (loads at SKF_NET_OFF), by default the frame itself;
    `random`: the kernel's random numbers (SKF_AD_RANDOM)."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    check_like_the_kernel(program)
    while True:
        insn = program[pc]
        pc += 1
        cls = insn.code & 0x07
        if cls == BPF_RET:
            return insn.k
        if cls == BPF_ST:
            memory[insn.k] = a
            continue
        if cls == BPF_LD and insn.code & 0xE0 == BPF_MEM:
            a = memory[insn.k]
            continue
        if cls == BPF_LD and insn.code & 0xE0 == 0x00:  # BPF_IMM
            a = insn.k
            continue
        if cls == BPF_LD:
            size = insn.code & 0x18
            width = {BPF_B: 1, BPF_H: 2}.get(size, 4)
            if insn.code & 0xE0 == BPF_ABS:
                offset = insn.k - (1 << 32) if insn.k >= 1 << 31 else insn.k
                if offset == SKF_AD_OFF + SKF_AD_PROTOCOL:
                    a = protocol
                    continue
                if offset == SKF_AD_OFF + SKF_AD_PKTTYPE:
                    a = pkttype
                    continue
                if offset == SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT:
                    a = int(vlan)
                    continue
                if offset == SKF_AD_OFF + SKF_AD_RANDOM:
                    a = random() & 0xFFFFFFFF
                    continue
                if SKF_NET_OFF <= offset < SKF_AD_OFF:
                    data = frame if network is None else network
                    start = offset - SKF_NET_OFF
                    if start + width > len(data):
                        return 0
                    a = int.from_bytes(data[start:start + width], "big")
                    continue
                assert offset >= 0, f"an ancillary load we do not model: {insn}"
            elif insn.code & 0xE0 == BPF_IND:
                offset = x + insn.k
            else:
                raise AssertionError(f"unsupported load {insn}")
            if offset + width > len(frame):
                return 0  # the kernel drops the packet on an out-of-bounds load
            a = int.from_bytes(frame[offset:offset + width], "big")
        elif cls == BPF_LDX:
            assert insn.code & 0xE0 == BPF_MSH
            if insn.k >= len(frame):
                return 0
            x = 4 * (frame[insn.k] & 0x0F)
        elif cls == BPF_JMP and insn.code & 0xF0 == 0x00:  # BPF_JA
            pc += insn.k
        elif cls == BPF_JMP:
            op = insn.code & 0xF0
            taken = a == insn.k if op == BPF_JEQ else bool(a & insn.k)
            assert op in (BPF_JEQ, BPF_JSET)
            pc += insn.jt if taken else insn.jf
        else:
            raise AssertionError(f"unsupported instruction {insn}")
