"""Steering: which of several relay workers sharing one UDP port gets a datagram.

Theory of operation
-------------------
Each worker binds its own UDP socket to the relay's port with SO_REUSEPORT, in worker
order, so worker w owns socket w of the kernel's reuseport group.  One classic BPF
program attached to the group (SO_ATTACH_REUSEPORT_CBPF) runs on every datagram that
arrives and returns the index of the socket to deliver it to; a value that is not the
index of a socket (>= the group's size) makes the kernel choose by its own hash of the
addresses and ports, as it does without a program (net/core/sock_reuseport.c,
run_bpf_filter() and reuseport_select_sock()).  For UDP the program's data is the UDP
payload: the kernel pulls the UDP header before it runs the program, and its length is
the payload's (the first datagram's and those behind it, for a GRO train; they share a
flow, hence a worker).

Every local index a worker's WireGuard core allocates names that worker
(`WireGuard(worker=, workers=)`: index % workers == worker), and three messages carry
an index for their receiver to look up, little-endian: transport data (type 4) and
cookie replies (3) at bytes 4..8, responses (2) at bytes 8..12, after the responder's
own index.  So:

- types 2, 3 and 4, with zero reserved bytes and at least the length of their type,
  go to socket `receiver index % workers`: the worker that owns the session or the
  handshake it answers;
- initiations (type 1) carry only the sender's index, which the sender chooses; steering
  by it would let anyone aim every initiation, each a Diffie-Hellman, at one worker.  They
  get the kernel's hash instead, keyed with a secret of the kernel's, over addresses and
  ports: a client keeps its worker while it keeps its address, and a flood from many
  sources is spread;
- anything else (short, unknown type, reserved bytes set, too short for its type) gets
  the hash as well: garbage is spread, and dropped by whichever core gets it.

A hostile datagram cannot read out of bounds or be steered by accident: classic BPF ends
the program with 0 on a load past the end of the data, which here would mean socket 0, so
every load is preceded by a length check (8 bytes, a type and an index, before the type
is read; the type's own minimum, 32 bytes at least, before the index).  A datagram can at
most be sent to the worker its index names, which is what a well-formed message under a
guessed index gets too, and that worker drops an unknown index for the cost of a
dictionary lookup.

`program(workers)` builds the instructions, `encode()` the bytes the kernel takes, and
`attach()` gives them to a socket of the group.  testing/cbpf.py runs the same bytes.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import NamedTuple

from gtun.core.wg.constants import (
    COOKIE_REPLY_SIZE,
    MAX_WORKERS,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)

# --- Classic BPF encoding (include/uapi/linux/filter.h, bpf_common.h) -----------------
# Instruction classes
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_MISC = 0x07
# Load sizes and modes
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_LEN = 0x80
BPF_MSH = 0xA0
# ALU operations
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_DIV = 0x30
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_NEG = 0x80
BPF_MOD = 0x90
BPF_XOR = 0xA0
# Jumps
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
# Operand source (ALU, JMP) and return value (RET)
BPF_K = 0x00
BPF_X = 0x08
BPF_A = 0x10
# Register transfers (MISC)
BPF_TAX = 0x00
BPF_TXA = 0x80

BPF_MAXINSNS = 4096  # the longest program the kernel takes
BPF_MEMWORDS = 16  # scratch memory words M[0..15]
SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)  # asm/socket.h

# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }, in host byte order.
INSN = struct.Struct("=HBBI")

# --- Steering ---------------------------------------------------------------------------
# What the program returns for "let the kernel hash": never a socket's index.
FALLBACK = 0xFFFFFFFF
# Where each steered message carries its receiver index (whitepaper 5.4.3 - 5.4.7): a
# transport message and a cookie reply right after the type, a response after its
# sender's index.
INDEX_OFFSET = 4
RESPONSE_INDEX_OFFSET = 8
INDEX_END = INDEX_OFFSET + 4  # what any message must have for its type to be read
# A message's first word as `ld [0]` reads it (network byte order): its type, then
# three reserved bytes that must be zero.  (type, least size, index offset)
_STEERED = (
    (MESSAGE_TRANSPORT, TRANSPORT_MIN_SIZE, INDEX_OFFSET),  # first: the per-packet case
    (MESSAGE_RESPONSE, RESPONSE_SIZE, RESPONSE_INDEX_OFFSET),
    (MESSAGE_COOKIE_REPLY, COOKIE_REPLY_SIZE, INDEX_OFFSET),
)


class Insn(NamedTuple):
    """One classic BPF instruction: `jt`/`jf` are forward offsets from the next one."""

    code: int
    jt: int
    jf: int
    k: int


class _Assembler:
    """Instructions with jumps to named labels, resolved into forward offsets."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, str | None, str | None]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def op(self, code: int, k: int = 0) -> None:
        self._code.append((code, k, None, None))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None = None) -> None:
        """A conditional jump (to the next instruction where a label is None), or with
        BPF_JA an unconditional one to `jt`."""
        self._code.append((code, k, jt, jf))

    def assemble(self) -> list[Insn]:
        """Raises ValueError for a jump backwards or too far: classic BPF has neither."""
        out: list[Insn] = []
        for i, (code, k, jt, jf) in enumerate(self._code):
            off_t, off_f = (0 if t is None else self._labels[t] - i - 1 for t in (jt, jf))
            if code == BPF_JMP | BPF_JA:
                out.append(Insn(code, 0, 0, off_t))
                continue
            if not (0 <= off_t <= 0xFF and 0 <= off_f <= 0xFF):
                raise ValueError(f"jump out of reach at instruction {i}")
            out.append(Insn(code, off_t, off_f, k))
        return out


def program(workers: int) -> list[Insn]:
    """The steering program for `workers` sockets bound in worker order.  Raises
    ValueError for a count outside 1..MAX_WORKERS."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}")
    asm = _Assembler()
    asm.op(BPF_LD | BPF_W | BPF_LEN)
    # Shorter than a type and an index: nothing is read (a load past the end would end
    # the program with 0, which means socket 0).
    asm.jump(BPF_JMP | BPF_JGE | BPF_K, INDEX_END, None, "fallback")
    asm.op(BPF_MISC | BPF_TAX)  # X = the length, for the checks below
    asm.op(BPF_LD | BPF_W | BPF_ABS, 0)  # the type and reserved bytes, big-endian
    for kind, _, _ in _STEERED:
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, kind << 24, f"type{kind}")
    asm.jump(BPF_JMP | BPF_JA, 0, "fallback")  # initiations and anything else
    for kind, size, at in _STEERED:
        asm.label(f"type{kind}")
        asm.op(BPF_MISC | BPF_TXA)
        asm.jump(BPF_JMP | BPF_JGE | BPF_K, size, f"steer{at}", "fallback")
    # The receiver index, little-endian at `at`..`at`+4, into A byte by byte (`ld [at]`
    # reads a word big-endian), then the worker it names.
    for at in sorted({at for _, _, at in _STEERED}):
        asm.label(f"steer{at}")
        asm.op(BPF_LD | BPF_B | BPF_ABS, at + 3)
        for offset in range(at + 2, at - 1, -1):
            asm.op(BPF_ALU | BPF_LSH | BPF_K, 8)
            asm.op(BPF_MISC | BPF_TAX)
            asm.op(BPF_LD | BPF_B | BPF_ABS, offset)
            asm.op(BPF_ALU | BPF_OR | BPF_X)
        asm.op(BPF_ALU | BPF_MOD | BPF_K, workers)
        asm.op(BPF_RET | BPF_A)
    asm.label("fallback")
    asm.op(BPF_RET | BPF_K, FALLBACK)
    return asm.assemble()


def encode(insns: list[Insn]) -> bytes:
    """The program as the array of struct sock_filter the kernel takes."""
    return b"".join(INSN.pack(*insn) for insn in insns)


def decode(data: bytes) -> list[Insn]:
    """The instructions of encode()'s bytes.  Raises ValueError for a ragged length."""
    if len(data) % INSN.size:
        raise ValueError("not a whole number of instructions")
    return [Insn(*INSN.unpack_from(data, i)) for i in range(0, len(data), INSN.size)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, workers: int) -> None:
    """Attach the steering program for `workers` to the reuseport group of `sock` (a UDP
    socket with SO_REUSEPORT).  Raises OSError when the kernel refuses it."""
    code = encode(program(workers))
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
