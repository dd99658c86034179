"""A classic BPF interpreter, to run a program's bytes on a packet without a kernel.

It takes the array of struct sock_filter the kernel would take (io/steering.py's
encode()), refuses what the kernel's checker refuses (net/core/filter.c,
bpf_check_classic(): an empty or too long program, a jump past the end, a last
instruction that is not a return, a scratch word out of range, a constant division by
zero or shift of 32 or more, an unknown opcode), and runs it as the kernel does: 32-bit
unsigned registers A and X, sixteen scratch words, forward jumps only, and the program
ended with 0 by a load past the end of the data or a division by X = 0.  Not modelled:
ancillary loads (SKF_AD_*, offsets from 0xfffff000), which raise; a scratch word read
before it was written, which the kernel's checker refuses and this raises at run time.
"""

from __future__ import annotations

from gtun.io.steering import (
    BPF_A,
    BPF_ABS,
    BPF_ADD,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_DIV,
    BPF_H,
    BPF_IMM,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_LDX,
    BPF_LEN,
    BPF_LSH,
    BPF_MAXINSNS,
    BPF_MEM,
    BPF_MEMWORDS,
    BPF_MISC,
    BPF_MOD,
    BPF_MSH,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_RET,
    BPF_RSH,
    BPF_ST,
    BPF_STX,
    BPF_SUB,
    BPF_TAX,
    BPF_TXA,
    BPF_W,
    BPF_X,
    BPF_XOR,
    Insn,
    decode,
)

MASK = 0xFFFFFFFF
SKF_AD_OFF = 0xFFFFF000  # ancillary data: -0x1000 as the unsigned k
_SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}
_ALU_OPS = {BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH}
_ALU_OPS |= {BPF_NEG, BPF_MOD, BPF_XOR}
_JUMPS = {BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET}


class Rejected(ValueError):
    """A program the kernel would refuse to attach."""


def check(insns: list[Insn]) -> None:
    """Raises Rejected for a program the kernel's checker refuses."""
    if not 1 <= len(insns) <= BPF_MAXINSNS:
        raise Rejected(f"{len(insns)} instructions: 1 to {BPF_MAXINSNS}")
    for pc, (code, jt, jf, k) in enumerate(insns):
        cls, op = code & 0x07, code & 0xF0
        where = f"instruction {pc} ({code:#x})"
        if cls in (BPF_LD, BPF_LDX):
            mode, size = code & 0xE0, code & 0x18
            if cls == BPF_LDX and code not in (
                BPF_LDX | BPF_W | BPF_IMM,
                BPF_LDX | BPF_W | BPF_MEM,
                BPF_LDX | BPF_W | BPF_LEN,
                BPF_LDX | BPF_B | BPF_MSH,
            ):
                raise Rejected(f"{where}: unknown load into X")
            if cls == BPF_LD and (
                size not in _SIZES
                or mode not in (BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN)
                or (mode in (BPF_IMM, BPF_MEM, BPF_LEN) and size != BPF_W)
            ):
                raise Rejected(f"{where}: unknown load")
            if mode == BPF_MEM and k >= BPF_MEMWORDS:
                raise Rejected(f"{where}: scratch word {k}")
        elif cls in (BPF_ST, BPF_STX):
            if code != cls or k >= BPF_MEMWORDS:
                raise Rejected(f"{where}: bad store")
        elif cls == BPF_ALU:
            if op not in _ALU_OPS or code > 0xFF:
                raise Rejected(f"{where}: unknown ALU operation")
            if not code & BPF_X and op in (BPF_DIV, BPF_MOD) and k == 0:
                raise Rejected(f"{where}: division by zero")
            if not code & BPF_X and op in (BPF_LSH, BPF_RSH) and k >= 32:
                raise Rejected(f"{where}: shift by {k}")
        elif cls == BPF_JMP:
            if op not in _JUMPS or code > 0xFF or (op == BPF_JA and code & BPF_X):
                raise Rejected(f"{where}: unknown jump")
            targets = [k] if op == BPF_JA else [jt, jf]
            if any(pc + 1 + t >= len(insns) for t in targets):
                raise Rejected(f"{where}: jump past the end")
        elif cls == BPF_RET:
            if code not in (BPF_RET | BPF_K, BPF_RET | BPF_A):
                raise Rejected(f"{where}: unknown return")
        elif cls == BPF_MISC and code not in (BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA):
            raise Rejected(f"{where}: unknown register transfer")
    if insns[-1].code & 0x07 != BPF_RET:
        raise Rejected("the last instruction is not a return")


def run(code: bytes, packet: bytes) -> int:
    """What the program in `code` (struct sock_filter bytes) returns for `packet`.
    Raises Rejected for a program the kernel would refuse, NotImplementedError for an
    ancillary load, and ValueError for a scratch word read before it was written."""
    insns = decode(code)
    check(insns)
    a = x = 0
    mem: list[int | None] = [None] * BPF_MEMWORDS
    n = len(packet)
    pc = 0
    while True:
        op_code, jt, jf, k = insns[pc]
        pc += 1
        cls = op_code & 0x07
        if cls == BPF_RET:
            return k if op_code == BPF_RET | BPF_K else a
        if cls in (BPF_LD, BPF_LDX):
            mode = op_code & 0xE0
            if mode == BPF_IMM:
                value = k
            elif mode == BPF_LEN:
                value = n
            elif mode == BPF_MEM:
                word = mem[k]
                if word is None:
                    raise ValueError(f"scratch word {k} read before it was written")
                value = word
            else:
                offset = k if mode in (BPF_ABS, BPF_MSH) else (x + k) & MASK
                if k >= SKF_AD_OFF:
                    raise NotImplementedError("ancillary loads are not modelled")
                size = 1 if mode == BPF_MSH else _SIZES[op_code & 0x18]
                if offset + size > n:
                    return 0  # a load past the end ends the program with 0
                value = int.from_bytes(packet[offset : offset + size], "big")
                if mode == BPF_MSH:
                    value = (value & 0x0F) * 4
            if cls == BPF_LD:
                a = value
            else:
                x = value
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_STX:
            mem[k] = x
        elif cls == BPF_ALU:
            op = op_code & 0xF0
            v = x if op_code & BPF_X else k
            if op in (BPF_DIV, BPF_MOD) and v == 0:
                return 0  # division by X = 0 ends the program with 0
            if op in (BPF_LSH, BPF_RSH) and v >= 32:
                raise ValueError(f"shift by X = {v}: undefined in the kernel")
            a = _alu(op, a, v) & MASK
        elif cls == BPF_JMP:
            op = op_code & 0xF0
            if op == BPF_JA:
                pc += k
                continue
            v = x if op_code & BPF_X else k
            pc += jt if _taken(op, a, v) else jf
        else:  # BPF_MISC
            if op_code & 0xF8 == BPF_TAX:
                x = a
            else:
                a = x


def _taken(op: int, a: int, v: int) -> bool:
    if op == BPF_JEQ:
        return a == v
    if op == BPF_JGT:
        return a > v
    if op == BPF_JGE:
        return a >= v
    return bool(a & v)  # BPF_JSET


def _alu(op: int, a: int, v: int) -> int:
    if op == BPF_ADD:
        return a + v
    if op == BPF_SUB:
        return a - v
    if op == BPF_MUL:
        return a * v
    if op == BPF_DIV:
        return a // v
    if op == BPF_MOD:
        return a % v
    if op == BPF_OR:
        return a | v
    if op == BPF_AND:
        return a & v
    if op == BPF_XOR:
        return a ^ v
    if op == BPF_LSH:
        return a << v
    if op == BPF_RSH:
        return a >> v
    return -a  # BPF_NEG
