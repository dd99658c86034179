#!/usr/bin/env python3
"""Datagrams per second through the edge's per-datagram path, on loopback: a UDP
transport's read, the Driver's hand-off to the core and back, and the send; and frames
per second a TCP transport delivers from one connection.

    python3 bench/driver_bench.py [--count 20000] [--trials 7] [--size 1452]

The core is a stub (gtun.testing.core's, cut down) that answers every datagram with one
datagram to another address, so what is timed is the edge alone (transport.py, udp.py,
driver.py): the socket is filled first, then the transport's read handler is called
until it is drained, as the event loop would when the socket is readable.  With
batching on, the filling sends use GSO so that reads take GRO trains.  A script that
prints figures, not a test.  The TCP figure runs the event loop (a writer on one end,
the TcpServer on the other) and the core only counts.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun.io.driver import Driver  # noqa: E402
from gtun.io.framing import push_frame  # noqa: E402
from gtun.io.tcp import TcpServer  # noqa: E402
from gtun.io.udp import UdpBatch, UdpTransport  # noqa: E402
from gtun.testing.core import FakeCore  # noqa: E402

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; needs root, else SO_RCVBUF (capped) is used
RCVBUF = 1 << 26


class EchoCore(FakeCore):
    """Answers each datagram with itself, sent to `to`, and records nothing: as cheap as
    a core can be, so that the figures are the edge's."""

    def __init__(self, to: Any) -> None:
        super().__init__()
        self.to = to
        self.handled = 0

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.out.append((data, self.to))
        self.handled += 1


def big_buffer(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)


def trial(loop: asyncio.AbstractEventLoop, batching: bool, count: int, size: int) -> float:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (sink, rx):
        sock.bind(("127.0.0.1", 0))
    core = EchoCore(sink.getsockname())
    driver = Driver(core, loop, lambda e: None)
    udp = UdpTransport(rx, loop, batching=batching)
    driver.attach(udp)
    big_buffer(rx)
    big_buffer(sink)
    filler = UdpBatch(tx)
    train = [(b"x" * size, rx.getsockname())] * 40
    for _ in range(count // 40):
        filler.send(train)
    readable = udp._readable  # what the loop calls when the socket is readable
    stats = udp.stats
    start = perf_counter()
    while True:
        before = stats["datagrams_received"]
        readable()
        # What the fair queue held back (a read over one wake-up's budget) is served as
        # the loop's timer would, so that what is timed is datagrams handled, not read.
        while driver.fair.held:
            driver._serve()
        if stats["datagrams_received"] == before:
            break
    elapsed = perf_counter() - start
    got = core.handled
    driver.close()
    tx.close()
    sink.close()
    return got / elapsed


class CountCore(FakeCore):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.count += 1


async def tcp_trial(count: int, size: int) -> float:
    loop = asyncio.get_running_loop()
    core = CountCore()
    driver = Driver(core, loop, lambda e: None)
    server = TcpServer(loop, lambda ep: None)
    driver.attach(server)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    await server.start(listener)
    _, writer = await asyncio.open_connection(*listener.getsockname())
    frames = push_frame(b"\x04\x00\x00\x00" + bytes(size - 4)) * 1000
    start = perf_counter()
    for _ in range(count // 1000):
        writer.write(frames)
        await writer.drain()
    while core.count < count // 1000 * 1000:
        await asyncio.sleep(0.0005)
    elapsed = perf_counter() - start
    writer.transport.abort()
    driver.close()
    await asyncio.sleep(0.01)
    return core.count / elapsed


def report(label: str, rates: list[float], unit: str) -> None:
    rates = sorted(rates)
    print(f"{label:<22} best {rates[-1]:>10,.0f}  median {statistics.median(rates):>10,.0f} {unit}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--size", type=int, default=1452)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    print(f"{args.size}-byte datagrams, {args.count} per trial, {args.trials} trials")
    for batching in (True, False):
        rates = [trial(loop, batching, args.count, args.size) for _ in range(args.trials)]
        report(f"edge  GSO/GRO {'on' if batching else 'off'}", rates, "datagrams/s")
    rates = [await tcp_trial(args.count, args.size) for _ in range(args.trials)]
    report("edge  TCP receive", rates, "frames/s")


if __name__ == "__main__":
    asyncio.run(main())
