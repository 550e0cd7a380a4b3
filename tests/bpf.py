"""A small classic-BPF interpreter, enough to run our capture filter on
crafted frames without root (the kernel runs the same program for real in
tests/netns)."""

from __future__ import annotations

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
    Insn,
)


def run_filter(program: list[Insn], frame: bytes, *, protocol: int, pkttype: int) -> int:
    a = x = 0
    memory = [0] * 16
    pc = 0
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
