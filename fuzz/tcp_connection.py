#!/usr/bin/env python3
"""Fuzz the TCP transport's per-connection code (gtun.io.tcp): the asyncio Protocol of
each connection (its FrameDecoder, what it hands the core), its TcpEndpoint (sends,
pause and resume, timeouts) and the listener's bookkeeping (slots, pending connections
per source), through a fake asyncio transport and a fake event loop clock.

Each input drives a fresh TcpServer (the relay's listener, small limits) or a bare
TcpTransport with a client's limits (no first-frame deadline), through a sequence of
operations: a connection opens from one of a few addresses (two share an IPv6 /64, one
is no IP address at all); bytes arrive on one, raw or a WireGuard-shaped frame, in any
chunking (held while the connection is paused, as asyncio does); the other end ends the
stream or resets it; the driver pauses or resumes reading, or sends a message of any
size; the kernel stops or starts taking written bytes; time passes and the timeouts are
swept.  The fake core takes a frame as authentic when its last byte is GOOD (as
tests/test_tcp_limits.py's does) and says so through the endpoint, as the WireGuard core
does.

Oracle, after every operation: nothing raises; what reached the core from a connection
is exactly the complete frames of the bytes it was given, each WireGuard-shaped (read
here), in order, while it was open: never a partial frame, never anything after a bad
one, nothing left behind by an open connection; a connection closed by us is aborted,
and its close is counted under a registered reason; the decoder never holds more than
one frame; the write buffer stays within its bound and what was written is whole
frames; the listener's open connections, and its count of those not yet authentic per
source, agree with the endpoints and stay within their limits."""

from __future__ import annotations

import asyncio

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from typing import Any

    from gtun.core.drops import TCP_DROP_REASONS
    from gtun.io import tcp
    from gtun.io.framing import HEADER_SIZE, MAX_FRAME, MIN_FRAME

import oracles
from common import main

GOOD = 0xAA  # the last byte of a frame the fake core takes as authentic
PEERNAMES: list[Any] = [
    ("192.0.2.1", 40000),
    ("192.0.2.7", 40001),
    ("2001:db8::1", 5000, 0, 0),
    ("2001:db8::2", 5001, 0, 0),  # the same /64 as the one before
    ("not an address", 0),
    None,  # a socket without a peer name
]
# WireGuard message types and their sizes (whitepaper section 5.4), read independently of
# gtun.core.wg.messages; the transport message is the smallest it can be (header, tag).
SIZES = {1: 148, 2: 92, 3: 64, 4: 32}


def wireguard_shaped(message: bytes) -> bool:
    if len(message) < 4 or message[1:4] != b"\0\0\0" or message[0] not in SIZES:
        return False
    size = SIZES[message[0]]
    return len(message) >= size if message[0] == 4 else len(message) == size


def frames(stream: bytes) -> list[bytes]:
    """The frames a connection must hand over for `stream`: complete, WireGuard-shaped
    ones, up to the first bad length or message."""
    out = []
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        length = int.from_bytes(stream[pos : pos + HEADER_SIZE], "big")
        end = pos + HEADER_SIZE + length
        if length < MIN_FRAME or end > len(stream):
            break
        message = stream[pos + HEADER_SIZE : end]
        if not wireguard_shaped(message):
            break
        out.append(message)
        pos = end
    return out


class Clock:
    """The event loop as the transport uses it: its clock and call_later (the sweeper's
    timer, which the harness fires itself)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any, *args: Any) -> Timer:
        return Timer()


class Timer:
    def cancel(self) -> None:
        pass


class FakeTransport(asyncio.Transport):
    """A socket's asyncio transport: what was written, how much the kernel has not taken
    yet (`buffered`, while `stuck`), closing, paused."""

    def __init__(self, peername: Any) -> None:
        super().__init__()
        self.peername = peername
        self.written = bytearray()
        self.buffered = 0
        self.stuck = False
        self.closing = False
        self.paused = False
        self.high = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peername if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high or 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        oracles.check(not self.closing, "written after abort")
        self.written += data
        if self.stuck:
            self.buffered += len(data)

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Conn:
    """One connection as the harness sees it."""

    def __init__(self, protocol: Any, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.inbox = bytearray()  # arrived, not yet read (paused)
        self.fed = bytearray()  # given to data_received
        self.got: list[bytes] = []  # what reached the core
        self.lost = False  # connection_lost was called


class Harness:
    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self.fdp = fdp
        self.clock = Clock()
        self.server_side = fdp.ConsumeBool()
        self.limits = tcp.TcpLimits(
            first_frame=1.0 if self.server_side else None,
            idle=5.0,
            stall=2.0,
            write_buffer=fdp.PickValueInList([4096, 70000, tcp.WRITE_BUFFER]),
            max_connections=3,
            max_pending_per_source=2,
        )
        loop: Any = self.clock
        self.closed: list[Any] = []
        self.transport: Any = (
            tcp.TcpServer(loop, self.closed.append, self.limits)
            if self.server_side
            else tcp.TcpTransport(loop, self.limits)
        )
        self.transport.open(self.receive)
        self.conns: list[Conn] = []
        self.by_ep: dict[Any, Conn] = {}

    def receive(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        for message, ep in batch:
            conn = self.by_ep.get(ep)
            oracles.check(conn is not None, "a message from an unknown endpoint")
            assert conn is not None
            oracles.check(ep.reason is None and not conn.lost, "a message after the close")
            conn.got.append(message)
            if message[-1] == GOOD:
                ep.authenticated()

    def open(self) -> None:
        transport = FakeTransport(self.fdp.PickValueInList(PEERNAMES))
        protocol = self.transport._protocol()
        protocol.connection_made(transport)
        conn = Conn(protocol, transport)
        self.conns.append(conn)
        if protocol.ep is None:
            oracles.check(transport.closing, "a refused connection left open")
        else:
            self.by_ep[protocol.ep] = conn

    def pick(self) -> Conn | None:
        if not self.conns:
            return None
        i: int = self.fdp.ConsumeIntInRange(0, len(self.conns) - 1)
        return self.conns[i]

    def arrive(self, conn: Conn) -> None:
        fdp = self.fdp
        if fdp.ConsumeBool():
            conn.inbox += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        else:
            kind = fdp.ConsumeIntInRange(1, 4)
            size = SIZES[kind] + (16 * fdp.ConsumeIntInRange(0, 100) if kind == 4 else 0)
            body = bytes([kind, 0, 0, 0]) + fdp.ConsumeBytes(size - 5).ljust(size - 5, b"\0")
            message = body + bytes([GOOD if fdp.ConsumeBool() else 1])
            conn.inbox += len(message).to_bytes(2, "big") + message
        self.read(conn, fdp.ConsumeIntInRange(0, len(conn.inbox)))

    def read(self, conn: Conn, n: int) -> None:
        """asyncio reads what arrived, `n` bytes at most, unless paused or closed."""
        t = conn.transport
        while conn.inbox and n > 0 and not t.paused and not t.closing and not conn.lost:
            chunk = bytes(conn.inbox[: min(n, 1 + self.fdp.ConsumeIntInRange(0, n - 1))])
            del conn.inbox[: len(chunk)]
            n -= len(chunk)
            conn.fed += chunk
            conn.protocol.data_received(chunk)

    def step(self) -> None:
        fdp = self.fdp
        op = fdp.ConsumeIntInRange(0, 8)
        if op == 0:
            self.open()
            return
        if op == 8:  # time passes; the sweeper runs
            self.clock.now += fdp.ConsumeIntInRange(0, 3000) / 1000
            self.transport._sweeper._sweep()
            return
        conn = self.pick()
        if conn is None or conn.lost:
            return
        ep = conn.protocol.ep
        t = conn.transport
        if op == 1:
            self.arrive(conn)
        elif op == 2 and not t.closing:  # the other end ends its stream
            conn.protocol.eof_received()
        elif op == 3:  # reset by the other end
            conn.lost = True
            conn.protocol.connection_lost(ConnectionResetError() if fdp.ConsumeBool() else None)
        elif op == 4 and ep is not None:  # the driver's fair queue
            if fdp.ConsumeBool():
                ep.pause_reading()
            else:
                ep.resume_reading()
                self.read(conn, len(conn.inbox))
        elif op == 5 and ep is not None:
            n = fdp.PickValueInList([MIN_FRAME, 148, 1452, MAX_FRAME, MAX_FRAME + 1])
            before = len(t.written)
            sent = ep.send(bytes(n))
            grew = len(t.written) - before
            oracles.check(grew == (n + HEADER_SIZE if sent else 0), f"send wrote {grew}")
            oracles.check(t.buffered <= self.limits.write_buffer, "write buffer over its bound")
        elif op == 6:
            t.stuck = fdp.ConsumeBool()
        elif op == 7:  # the kernel takes some of what was buffered
            t.buffered -= fdp.ConsumeIntInRange(0, t.buffered)

    def settle(self) -> None:
        """What asyncio does soon after an abort: connection_lost."""
        for conn in self.conns:
            if conn.transport.closing and not conn.lost:
                conn.lost = True
                conn.protocol.connection_lost(None)

    def check(self) -> None:
        limits = self.limits
        pending: dict[bytes, int] = {}
        for conn in self.conns:
            ep = conn.protocol.ep
            oracles.check(
                conn.protocol.decoder.buffered <= HEADER_SIZE + MAX_FRAME, "decoder holds too much"
            )
            want = frames(bytes(conn.fed))
            oracles.check(conn.got == want[: len(conn.got)], "messages differ from the stream's")
            if ep is None:
                oracles.check(not conn.got, "a refused connection delivered")
                continue
            if ep.reason is None and not conn.lost:
                oracles.check(conn.got == want, "complete frames held back")
                if not ep.authentic:
                    pending[ep.source_key] = pending.get(ep.source_key, 0) + 1
            else:
                oracles.check(ep.reason is not None, "lost without a reason")
                oracles.check(conn.transport.closing or conn.lost, "closed but not aborted")
            if conn.lost:
                oracles.check(ep not in self.transport.connections, "a lost connection kept")
            oracles.check(wellframed(bytes(conn.transport.written)), "a partial frame written")
        live = [c for c in self.conns if c.protocol.ep is not None and not c.lost]
        oracles.check(len(self.transport.connections) == len(live), "connections miscounted")
        if self.server_side:
            oracles.check(len(live) <= limits.max_connections, f"{len(live)} connections open")
            oracles.check(self.transport.pending == pending, "pending per source miscounted")
            for source, n in pending.items():
                oracles.check(n <= limits.max_pending_per_source, f"{n} pending from {source!r}")
            oracles.check(len(self.closed) == len(set(map(id, self.closed))), "closed twice")
        for reason, count in self.transport.counts.items():
            oracles.check(reason in TCP_DROP_REASONS and count >= 0, f"counter {reason}")
        oracles.counters_known(self.transport.counts)


def wellframed(stream: bytes) -> bool:
    """`stream` is whole frames of MIN_FRAME to MAX_FRAME bytes (what send() writes)."""
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < HEADER_SIZE:
            return False
        pos += HEADER_SIZE + int.from_bytes(stream[pos : pos + HEADER_SIZE], "big")
    return pos == len(stream)


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    h = Harness(fdp)
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        h.step()
        h.settle()
        h.check()
    if h.server_side:
        h.transport.close()
        h.settle()
        oracles.check(not h.transport.connections, "connections left after close()")
        h.check()


if __name__ == "__main__":
    main(test_one)
