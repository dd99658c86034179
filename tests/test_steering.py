"""The steering program's verdicts (io/steering.py), run on crafted datagrams by the
classic BPF interpreter of testing/cbpf.py: responses, cookie replies and transport
data go to the worker their receiver index names, everything else to the kernel's hash,
and no datagram, however short or malformed, is read out of bounds into socket 0."""

from __future__ import annotations

import os
import struct
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():  # see tests/test_wg_device.py
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtun.core.wg import WireGuard
from gtun.core.wg.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MAX_WORKERS,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from gtun.io import steering
from gtun.io.steering import (
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_B,
    BPF_DIV,
    BPF_JA,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_LEN,
    BPF_MISC,
    BPF_RET,
    BPF_TAX,
    BPF_W,
    BPF_X,
    FALLBACK,
    Insn,
    encode,
)
from gtun.testing import cbpf

MIN_SIZE = {2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE, 4: TRANSPORT_MIN_SIZE}


INDEX_AT = {2: 8, 3: 4, 4: 4}  # where each steered type has its receiver index


def message(kind: int, index: int, size: int, sender: int | None = None) -> bytes:
    """A datagram of `size` bytes: type, zero reserved bytes, `index` where the type
    has its receiver index (a response: at 8..12, after the sender's, random unless
    given; any other type: at 4..8)."""
    if kind == 2:
        own = sender if sender is not None else struct.unpack("<I", os.urandom(4))[0]
        head = struct.pack("<III", kind, own, index)
    else:
        head = struct.pack("<II", kind, index)
    return (head + os.urandom(max(0, size - len(head))))[:size]


def verdict(workers: int, data: bytes) -> int:
    return cbpf.run(encode(steering.program(workers)), data)


def expected(workers: int, data: bytes) -> int:
    """The rule, written plainly: the worker of the receiver index for types 2, 3 and
    4 with zero reserved bytes and at least their size; the kernel's hash otherwise."""
    kind = data[0] if data else 0
    if kind in MIN_SIZE and data[1:4] == bytes(3) and len(data) >= max(8, MIN_SIZE[kind]):
        at = INDEX_AT[kind]
        return int.from_bytes(data[at : at + 4], "little") % workers
    return FALLBACK


def test_a_response_goes_by_its_receiver_index_not_its_senders() -> None:
    """A response to a handshake the relay started (a rejoin, a re-enabled peer)
    carries the peer's own index first: steered by that, half of them would reach a
    worker that never sent the initiation."""
    for receiver, sender in [(0, 1), (1, 0), (2, 7), (0x01020304, 0xFFFFFFFF)]:
        data = message(2, receiver, RESPONSE_SIZE, sender=sender)
        assert verdict(3, data) == receiver % 3
        assert verdict(2, data) == receiver % 2


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 16, MAX_WORKERS])
def test_sessions_go_to_the_worker_their_index_names(workers: int) -> None:
    for index in [0, 1, 2, 255, 256, 0x01020304, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]:
        for kind, size in [(2, 92), (3, 64), (4, 32), (4, 1452), (4, 65507)]:
            assert verdict(workers, message(kind, index, size)) == index % workers


@pytest.mark.parametrize("workers", [2, 3])
def test_initiations_and_garbage_get_the_kernels_hash(workers: int) -> None:
    fall_back = [
        message(1, 0, INITIATION_SIZE),  # the sender index is the sender's to choose
        message(1, 1, INITIATION_SIZE),
        b"",
        b"\x04",
        b"\x04\x00\x00",
        b"\x04\x00\x00\x00",
        b"\x04\x00\x00\x00\x01\x00\x00",  # one byte short of an index
        message(4, 1, 8),  # an index, but too short for a transport message
        message(4, 1, TRANSPORT_MIN_SIZE - 1),
        message(2, 1, RESPONSE_SIZE - 1),
        message(3, 1, COOKIE_REPLY_SIZE - 1),
        b"\x04\x01\x00\x00" + bytes(60),  # reserved bytes set
        b"\x04\x00\x00\x80" + bytes(60),
        message(0, 1, 100),
        message(5, 1, 100),
        message(0xFF, 1, 100),
        message(0x0104, 1, 100),  # type 4 with its next byte set
    ]
    for data in fall_back:
        assert verdict(workers, data) == FALLBACK, data.hex()


def test_no_prefix_of_a_message_is_read_out_of_bounds() -> None:
    """Every truncation of every steered type falls back: a load past the end, which
    ends a classic BPF program with 0 (socket 0), never happens."""
    for kind, size in MIN_SIZE.items():
        whole = message(kind, 5, size)
        assert verdict(3, whole) == 2
        for cut in range(size):
            assert verdict(3, whole[:cut]) == FALLBACK, (kind, cut)


@settings(max_examples=400, deadline=None)
@given(
    workers=st.integers(1, 64),
    data=st.one_of(
        st.binary(max_size=120),
        st.builds(
            lambda kind, index, size, tail: message(kind, index, size) + tail,
            st.integers(0, 6),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 100),
            st.binary(max_size=8),
        ),
    ),
)
def test_the_program_is_the_rule_on_any_datagram(workers: int, data: bytes) -> None:
    assert verdict(workers, data) == expected(workers, data)


def test_what_the_core_sends_a_worker_is_steered_to_it() -> None:
    """Real messages: an initiation to worker 2 of 3 falls back; the transport data
    and responses that follow name the worker of their receiver."""
    client = WireGuard(X25519PrivateKey.generate().private_bytes_raw())
    relay = WireGuard(X25519PrivateKey.generate().private_bytes_raw(), worker=2, workers=3)
    peer = client.add_peer(relay.public_key, endpoint="relay")
    relay.add_peer(client.public_key)
    client.initiate_handshake(peer, 1.0)
    [(initiation, _)] = client.datagrams_to_send()
    assert verdict(3, initiation) == FALLBACK
    relay.receive_datagram(initiation, "client", 1.0)
    [(response, _)] = relay.datagrams_to_send()
    client.receive_datagram(response, "relay", 1.0)
    client.send(peer, bytes(64), 1.0)
    to_relay = [data for data, _ in client.datagrams_to_send()]
    assert to_relay and all(verdict(3, data) == 2 for data in to_relay)


@pytest.mark.parametrize("workers", [0, -1, MAX_WORKERS + 1])
def test_program_refuses_a_bad_count(workers: int) -> None:
    with pytest.raises(ValueError):
        steering.program(workers)


# --- the interpreter ------------------------------------------------------------------


def test_the_interpreter_ends_a_load_past_the_end_with_zero() -> None:
    """The trap the steering program guards against: a naive `ldb [4]; ret a`."""
    naive = encode([Insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 4), Insn(BPF_RET | BPF_A, 0, 0, 0)])
    assert cbpf.run(naive, b"\x00\x00\x00\x00\x09") == 9
    assert cbpf.run(naive, b"\x00\x00\x00\x00") == 0
    word = encode([Insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, 1), Insn(BPF_RET | BPF_A, 0, 0, 0)])
    assert cbpf.run(word, b"\x00\x01\x02\x03\x04") == 0x01020304  # big-endian
    assert cbpf.run(word, b"\x00\x01\x02\x03") == 0


def test_the_interpreter_ends_a_division_by_x_zero_with_zero() -> None:
    prog = encode(
        [
            Insn(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),
            Insn(BPF_MISC | BPF_TAX, 0, 0, 0),
            Insn(BPF_LD | 0x00, 0, 0, 100),  # A = 100
            Insn(BPF_ALU | BPF_DIV | BPF_X, 0, 0, 0),
            Insn(BPF_RET | BPF_A, 0, 0, 0),
        ]
    )
    assert cbpf.run(prog, bytes(7)) == 14
    assert cbpf.run(prog, b"") == 0


@pytest.mark.parametrize(
    "insns",
    [
        [],
        [Insn(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0)],  # no return at the end
        [Insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), Insn(BPF_RET | BPF_K, 0, 0, 0)],
        [Insn(BPF_JMP | BPF_JA, 0, 0, 1), Insn(BPF_RET | BPF_K, 0, 0, 0)],
        [Insn(BPF_ALU | BPF_DIV | BPF_K, 0, 0, 0), Insn(BPF_RET | BPF_A, 0, 0, 0)],
        [Insn(0xFFFF, 0, 0, 0), Insn(BPF_RET | BPF_A, 0, 0, 0)],
        [Insn(BPF_RET | BPF_K, 0, 0, 0)] * 4097,
    ],
)
def test_the_interpreter_refuses_what_the_kernel_refuses(insns: list[Insn]) -> None:
    with pytest.raises(cbpf.Rejected):
        cbpf.run(encode(insns), b"")


def test_the_steering_program_passes_the_checker() -> None:
    for workers in (1, 2, 3, MAX_WORKERS):
        insns = steering.program(workers)
        cbpf.check(insns)
        assert insns[-1] == Insn(BPF_RET | BPF_K, 0, 0, FALLBACK)
