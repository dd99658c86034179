"""Tier 3: the steering program in a real kernel.  Three UDP sockets share a port with
SO_REUSEPORT in a fresh namespace, io/steering.py's program is attached to the group,
and crafted datagrams of each type arrive at the socket the program names (checked
against the interpreter of testing/cbpf.py on the same bytes), while initiations and
short or malformed datagrams are spread by the kernel's hash rather than read out of
bounds into socket 0."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from gtun.core.wg.constants import INITIATION_SIZE
from gtun.io import steering
from gtun.lab.netns import Lab
from gtun.testing import cbpf

SCRIPT = Path(__file__).resolve().parent / "scripts" / "steer.py"
WORKERS = 3
SPREAD = 48  # datagrams of each falling-back kind, each from a source port of its own


@pytest.fixture
def lab_prefix() -> str:
    return "gtw"


def _message(kind: int, index: int, size: int) -> bytes:
    """`index` where `kind` has its receiver index (a response: after a random sender
    index); random tails tell datagrams apart."""
    if kind == 2:
        head = struct.pack("<I", kind) + os.urandom(4) + struct.pack("<I", index)
    else:
        head = struct.pack("<II", kind, index)
    return (head + os.urandom(size))[:size]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_kernel_delivers_where_the_program_says(lab: Lab, host: str) -> None:
    ns = lab.add_ns("steer")
    steered = [
        _message(kind, index, size)
        for index in (0, 1, 2, 3, 0x01020304, 0xFFFFFFFF, 0xFFFFFFFD)
        for kind, size in ((2, 92), (3, 64), (4, 32), (4, 1400))
    ]
    initiations = [_message(1, 3 * i, INITIATION_SIZE) for i in range(SPREAD)]  # all "0"
    short = [os.urandom(3) for _ in range(SPREAD)]  # would read as socket 0 unguarded
    truncated = [_message(4, 3 * i, 31) for i in range(SPREAD)]  # index names 0
    datagrams = steered + initiations + short + truncated
    assert len(set(datagrams)) == len(datagrams)
    result = ns.run(
        [sys.executable, str(SCRIPT), host, str(WORKERS)],
        input=json.dumps([d.hex() for d in datagrams]),
    )
    arrived = json.loads(result.stdout)
    assert None not in arrived, "a datagram was lost on loopback"
    code = steering.encode(steering.program(WORKERS))
    for data, socket_index in zip(steered, arrived[: len(steered)], strict=True):
        assert cbpf.run(code, data) == socket_index, data[:8].hex()
        at = 8 if data[0] == 2 else 4
        assert socket_index == int.from_bytes(data[at : at + 4], "little") % WORKERS
    rest = arrived[len(steered) :]
    for n, group in enumerate((initiations, short, truncated)):
        assert all(cbpf.run(code, d) == steering.FALLBACK for d in group)
        spread = rest[n * SPREAD : (n + 1) * SPREAD]
        # The kernel's hash over 48 source ports: all on one socket is (1/3)**47 by
        # chance; an out-of-bounds read or a steered sender index would put all on 0.
        assert len(set(spread)) > 1, (n, spread)
