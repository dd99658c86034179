"""Idle wake-ups read once (transport.LONE_GAP): a UDP socket's or the TUN's wake-up after
a quiet spell takes the one packet that woke it and does not read again only to hear
EAGAIN; what else was waiting is read on the loop's next turn, in batches, and a busy
input keeps reading in batches however long its wake-ups take."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gtun.core.offload import Gso
from gtun.io.driver import TUN_BATCH, Driver
from gtun.io.transport import LONE_GAP
from gtun.io.udp import UdpBatch, UdpTransport
from gtun.testing.core import FakeCore
from gtun.testing.tun import FakeTun


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    try:
        yield tx, rx
    finally:
        tx.close()
        rx.close()


def queued(rx: socket.socket, datagrams: list[bytes], tx: socket.socket) -> None:
    """Send `datagrams` to `rx` and wait until the kernel holds them all."""
    for data in datagrams:
        tx.sendto(data, rx.getsockname())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        select.select([rx], [], [], 0.1)
        # Loopback delivers in the sender's call; the last one queued means all were.
        if len(rx.recv(65536, socket.MSG_PEEK | socket.MSG_TRUNC) or b"") > 0:
            return
    raise AssertionError("nothing arrived")


@pytest.mark.parametrize("gro", [True, False])
def test_recv_once_takes_one_datagram_and_leaves_the_rest(udp_pair, gro) -> None:
    tx, rx = udp_pair
    batch = UdpBatch(rx, gro=gro)
    queued(rx, [b"a" * 10, b"b" * 20, b"c" * 30], tx)
    first = batch.recv(64, True)
    assert [d for d, _ in first] == [b"a" * 10]
    assert batch.reads == 1
    rest = batch.recv(64)
    assert [d for d, _ in rest] == [b"b" * 20, b"c" * 30]
    assert batch.reads == 2
    assert batch.recv(64, True) == [] and batch.reads == 0


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    def __call__(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        self.batches.append([d for d, _ in batch])


async def _settle(loop: asyncio.AbstractEventLoop, got: Recorder, total: int) -> None:
    deadline = loop.time() + 2
    while sum(len(b) for b in got.batches) < total and loop.time() < deadline:
        await asyncio.sleep(0)


def test_idle_udp_wake_up_reads_once_and_a_busy_one_in_batches(udp_pair) -> None:
    tx, rx = udp_pair
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    async def main() -> list[list[list[bytes]]]:
        loop = asyncio.get_running_loop()
        transport = UdpTransport(sock, loop, batching=False)
        got = Recorder()
        rounds = []
        try:
            # Idle: the wake-up takes one; the rest on the loop's next turn, together.
            queued(sock, [b"1", b"2", b"3"], tx)
            transport.open(got)
            await _settle(loop, got, 3)
            rounds.append(got.batches)
            # The last wake-up read two: busy, so even after a quiet spell it batches.
            got.batches = []
            await asyncio.sleep(2 * LONE_GAP)
            queued(sock, [b"4", b"5"], tx)
            await _settle(loop, got, 2)
            rounds.append(got.batches)
            # Quiet again, after a wake-up that read two: one read, then two together.
            got.batches = []
            await asyncio.sleep(2 * LONE_GAP)
            queued(sock, [b"6"], tx)
            await _settle(loop, got, 1)
            await asyncio.sleep(2 * LONE_GAP)
            queued(sock, [b"7", b"8", b"9"], tx)
            await _settle(loop, got, 4)
            rounds.append(got.batches)
        finally:
            transport.close()
        return rounds

    rounds = asyncio.run(main())
    assert rounds == [
        [[b"1"], [b"2", b"3"]],
        [[b"4", b"5"]],
        [[b"6"], [b"7"], [b"8", b"9"]],
    ]


class TunCore(FakeCore):
    """Records each TUN wake-up's packets: after() runs once per wake-up."""

    def __init__(self) -> None:
        super().__init__()
        self.wakes: list[list[bytes]] = [[]]

    def tun_packet(self, packet: bytes, now: float) -> None:
        self.wakes[-1].append(packet)

    def tun_super(self, hdr: Gso, packet: bytes, now: float) -> None:
        self.wakes[-1].append(packet)

    def tun_writes(self) -> list[bytes | tuple[Gso, bytes]]:
        if self.wakes[-1]:
            self.wakes.append([])
        return []


def test_idle_tun_wake_up_reads_once_and_a_busy_one_in_batches() -> None:
    tun, kernel = FakeTun.create()

    async def main() -> list[list[bytes]]:
        loop = asyncio.get_running_loop()
        core = TunCore()
        driver = Driver(core, loop, lambda event: None)

        async def settle(total: int) -> None:
            deadline = loop.time() + 2
            while sum(len(w) for w in core.wakes) < total and loop.time() < deadline:
                await asyncio.sleep(0)

        try:
            for packet in (b"p1", b"p2", b"p3"):
                kernel.send(packet)
            driver.attach_tun(tun)
            await settle(3)
            await asyncio.sleep(2 * LONE_GAP)  # quiet, but the last wake-up read two
            for i in range(TUN_BATCH + 1):
                kernel.send(b"q%d" % i)
            await settle(3 + TUN_BATCH + 1)
        finally:
            driver.close()
        return [w for w in core.wakes if w]

    try:
        wakes = asyncio.run(main())
    finally:
        tun.close()
        kernel.close()
    assert wakes[:2] == [[b"p1"], [b"p2", b"p3"]]
    assert wakes[2:] == [[b"q%d" % i for i in range(TUN_BATCH)], [b"q%d" % TUN_BATCH]]
