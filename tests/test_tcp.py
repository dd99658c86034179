"""Tier 2: the TCP edge on loopback (gtun.io.tcp), with short test-only timeouts.

A fake core (gtun.testing.core) records what the relay's TCP listener delivers and
sends back what a test queues; raw sockets play misbehaving peers.  The last tests run
the real relay and client cores against each other over a loopback TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from typing import Any

import pytest

from gtun.core.client import ClientCore, ConfigReceived, Connected
from gtun.core.relay import PeerSpec, Relay
from gtun.core.wg.endpoint import address_bytes, cookie_source, mark_authentic
from gtun.core.wg.events import Event
from gtun.core.wg.messages import is_wireguard_message
from gtun.io.driver import Driver
from gtun.io.framing import MAX_FRAME, push_frame
from gtun.io.tcp import (
    TcpDialer,
    TcpEndpoint,
    TcpLimits,
    TcpServer,
    endpoint_transport,
    forget_endpoint,
)
from gtun.testing.core import FakeCore
from gtun.testing.link import relay_settings

LIMITS = TcpLimits(first_frame=0.4, idle=0.8, stall=0.4, write_buffer=32 * 1024, max_connections=4)
BOUND = 5.0  # seconds any wait in these tests may take


def wg_message(n: int = 64, fill: int = 0) -> bytes:
    """Something shaped like a WireGuard transport message (type 4, >= 32 bytes)."""
    return b"\x04\x00\x00\x00" + bytes([fill]) * (n - 4)


class AcceptingCore(FakeCore):
    """A FakeCore that, as the WireGuard core does for a message that authenticates,
    marks the connection of each frame `accept(frame)` approves authentic."""

    def __init__(self, accept: Callable[[bytes], bool]) -> None:
        super().__init__()
        self.accept = accept

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        if self.accept(data):
            mark_authentic(addr)
        super().receive_datagram(data, addr, now)


class Rig:
    """A TcpServer on 127.0.0.1 with a FakeCore behind a Driver; the core takes every
    frame as authentic unless told otherwise (`accept`)."""

    def __init__(
        self, limits: TcpLimits = LIMITS, *, accept: Callable[[bytes], bool] = lambda d: True
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.core = AcceptingCore(accept)
        self.driver = Driver(self.core, self.loop, lambda e: None)
        self.closed: list[TcpEndpoint] = []
        self.server = TcpServer(self.loop, self.closed.append, limits)
        self.driver.attach(self.server)
        self.port = 0

    async def __aenter__(self) -> Rig:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        await self.server.start(sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        self.driver.close()
        await asyncio.sleep(0)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def until(cond: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    deadline = asyncio.get_running_loop().time() + bound
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def closed_by_server(reader: asyncio.StreamReader, bound: float = BOUND) -> bool:
    """True when the server ends the stream (EOF or reset) within `bound` seconds."""
    try:
        async with asyncio.timeout(bound):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


# --- messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "ok"),
    [
        (b"\x01\x00\x00\x00" + bytes(144), True),  # initiation: exactly 148 bytes
        (b"\x02\x00\x00\x00" + bytes(88), True),  # response: 92
        (b"\x03\x00\x00\x00" + bytes(60), True),  # cookie reply: 64
        (wg_message(32), True),  # keepalive: the smallest transport message
        (wg_message(1500), True),
        (b"\x01\x00\x00\x00" + bytes(100), False),  # an initiation of the wrong size
        (wg_message(31), False),
        (b"\x04\x00\x01\x00" + bytes(60), False),  # reserved bytes set
        (b"\x05\x00\x00\x00" + bytes(60), False),  # no such type
        (b"\x45\x00\x00\x54" + bytes(80), False),  # a bare IP packet
    ],
)
def test_what_a_frame_may_carry(message: bytes, ok: bool) -> None:
    assert is_wireguard_message(message) is ok


# --- reading ----------------------------------------------------------------------------


def test_frames_across_split_writes_reach_the_core_whole() -> None:
    messages = [wg_message(32), wg_message(1400, 7), b"\x01\x00\x00\x00" + bytes(144)]
    stream = b"".join(push_frame(m) for m in messages)

    async def main() -> None:
        async with Rig() as rig:
            reader, writer = await rig.connect()
            for i in range(0, len(stream), 5):  # odd pieces, each its own segment
                writer.write(stream[i : i + 5])
                await writer.drain()
                await asyncio.sleep(0.001)
            await until(lambda: len(rig.core.received) == 3, "three frames")
            assert [d for d, _ in rig.core.received] == messages
            endpoints = {a for _, a in rig.core.received}
            assert len(endpoints) == 1
            (ep,) = endpoints
            assert isinstance(ep, TcpEndpoint) and endpoint_transport(ep) == "tcp"
            assert ep.peername == writer.get_extra_info("sockname")
            assert ep.owner is rig.server  # the Driver sends to it through the server
            assert cookie_source(ep) == address_bytes(*ep.peername)  # mac2 binds to it
            # A second connection is another endpoint.
            _, writer2 = await rig.connect()
            writer2.write(push_frame(wg_message()))
            await until(lambda: len(rig.core.received) == 4, "the second connection's frame")
            assert rig.core.received[-1][1] is not ep
            close_writer(writer)
            close_writer(writer2)
            await until(lambda: len(rig.closed) == 2, "both closes reported")
            assert rig.server.counts["tcp_bad_frame"] == 0  # clean ends are not bad

    run(main)


def test_replies_are_framed_back_on_the_same_connection() -> None:
    async def main() -> None:
        async with Rig() as rig:
            rig.core.reply = lambda data, addr: [(data[:4] + b"echo" + data[8:], addr)]
            readers = []
            for fill in (1, 2):
                reader, writer = await rig.connect()
                writer.write(push_frame(wg_message(100, fill)))
                readers.append((reader, writer, fill))
            for reader, writer, fill in readers:
                async with asyncio.timeout(BOUND):
                    (length,) = struct.unpack(">H", await reader.readexactly(2))
                    body = await reader.readexactly(length)
                assert body == b"\x04\x00\x00\x00echo" + bytes([fill]) * 92
                close_writer(writer)

    run(main)


@pytest.mark.parametrize(
    ("data", "half_close"),
    [
        pytest.param(
            struct.pack(">H", MAX_FRAME) + b"\x09" + bytes(MAX_FRAME - 1), False, id="max-length"
        ),
        pytest.param(struct.pack(">H", 3) + bytes(3), False, id="too-short"),
        pytest.param(push_frame(b"\x09\x00\x00\x00" + bytes(60)), False, id="not-wireguard"),
        pytest.param(push_frame(wg_message(148))[:70], True, id="truncated-at-eof"),
        pytest.param(b"\x00", True, id="half-a-header-at-eof"),
    ],
)
def test_bad_frames_close_that_connection_only(data: bytes, half_close: bool) -> None:
    async def main() -> None:
        async with Rig() as rig:
            good_reader, good = await rig.connect()
            good.write(push_frame(wg_message(64, 1)))
            await until(lambda: len(rig.core.received) == 1, "the good frame")
            bad_reader, bad = await rig.connect()
            bad.write(data)
            if half_close:
                bad.write_eof()
            assert await closed_by_server(bad_reader)
            assert rig.server.counts["tcp_bad_frame"] == 1
            assert len(rig.closed) == 1 and rig.closed[0] is not rig.core.received[0][1]
            # The other connection is untouched and still delivers.
            good.write(push_frame(wg_message(64, 2)))
            await until(lambda: len(rig.core.received) == 2, "the good connection's next")
            assert not rig.core.received[0][1].closed  # type: ignore[attr-defined]
            close_writer(good)
            close_writer(bad)

    run(main)


# --- time and numbers -----------------------------------------------------------------------


def test_no_first_frame_and_silence_time_out() -> None:
    async def main() -> None:
        async with Rig() as rig:
            loop = asyncio.get_running_loop()
            mute_reader, mute = await rig.connect()  # never sends
            quiet_reader, quiet = await rig.connect()  # one frame, then silence
            quiet.write(push_frame(wg_message()))
            chatty_reader, chatty = await rig.connect()  # a frame every 0.1 s
            started = loop.time()

            async def chat() -> None:
                while True:
                    chatty.write(push_frame(wg_message()))
                    await asyncio.sleep(0.1)

            chatter = asyncio.ensure_future(chat())
            assert await closed_by_server(mute_reader)
            assert LIMITS.first_frame is not None
            assert loop.time() - started >= LIMITS.first_frame - 0.05
            assert await closed_by_server(quiet_reader)
            assert loop.time() - started >= LIMITS.idle - 0.05
            await asyncio.sleep(LIMITS.idle)  # well past every deadline
            assert not chatty_reader.at_eof()
            assert rig.server.counts["tcp_timeout"] == 2
            assert len(rig.server.connections) == 1
            chatter.cancel()
            for w in (mute, quiet, chatty):
                close_writer(w)

    run(main)


def test_connections_are_bounded() -> None:
    async def main() -> None:
        async with Rig() as rig:
            conns = [await rig.connect() for _ in range(LIMITS.max_connections)]
            for _, w in conns:
                w.write(push_frame(wg_message()))
            await until(lambda: len(rig.core.received) == LIMITS.max_connections, "all frames")
            extra_reader, extra = await rig.connect()
            assert await closed_by_server(extra_reader)
            assert rig.server.counts["tcp_refused"] == 1
            assert len(rig.server.connections) == LIMITS.max_connections
            # Once one closes, a new one is welcome again.
            close_writer(conns[0][1])
            await until(lambda: len(rig.server.connections) == LIMITS.max_connections - 1, "one")
            again_reader, again = await rig.connect()
            again.write(push_frame(wg_message()))
            await until(lambda: len(rig.core.received) == LIMITS.max_connections + 1, "new one")
            for _, w in [*conns[1:], (extra_reader, extra), (again_reader, again)]:
                close_writer(w)

    run(main)


def test_a_peer_that_stops_reading_is_bounded_then_closed_without_delaying_others() -> None:
    limits = TcpLimits(first_frame=0.4, idle=10.0, stall=0.4, write_buffer=32 * 1024)

    async def main() -> None:
        async with Rig(limits) as rig:
            loop = asyncio.get_running_loop()
            # The stalled peer: a small receive buffer, and it never reads.
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", rig.port))
            raw.sendall(push_frame(wg_message(64, 9)))
            await until(lambda: len(rig.core.received) == 1, "the stalled peer's frame")
            stalled = rig.core.received[0][1]
            assert isinstance(stalled, TcpEndpoint)
            good_reader, good = await rig.connect()
            rig.core.reply = lambda data, addr: [(data, addr)]  # echo
            stall_started: float | None = None

            # Flood the stalled peer through the driver, as the relay's packet path does,
            # and check at every step that its buffer stays bounded and others get echoes.
            flood = [(wg_message(1400), stalled)] * 200
            for i in range(200):
                rig.core.out.extend(flood)
                rig.driver.after()
                assert stalled.transport.get_write_buffer_size() <= limits.write_buffer
                good.write(push_frame(wg_message(64, i)))
                async with asyncio.timeout(1.0):  # an echo is never held up by the flood
                    (length,) = struct.unpack(">H", await good_reader.readexactly(2))
                    assert await good_reader.readexactly(length) == wg_message(64, i)
                if stalled.closed:
                    break
                await asyncio.sleep(0.02)
                if rig.core.drops["queue_full"] and stall_started is None:
                    stall_started = loop.time()  # the buffer is full from here on
            assert stall_started is not None
            await until(lambda: stalled in rig.closed, "the stalled connection closed")
            assert rig.server.counts == {**rig.server.counts, "tcp_stalled": 1, "tcp_timeout": 0}
            assert loop.time() - stall_started >= limits.stall - 0.1
            assert rig.server.connections == {rig.core.received[-1][1]}
            # Sends to a closed connection are refused (and counted by the driver).
            before = rig.core.drops["queue_full"]
            rig.core.out.append((wg_message(), stalled))
            rig.driver.after()
            assert rig.core.drops["queue_full"] == before + 1
            raw.close()
            close_writer(good)

    run(main)


def test_a_slow_reader_that_keeps_reading_is_not_closed() -> None:
    async def main() -> None:
        async with Rig() as rig:
            reader, writer = await rig.connect()
            writer.write(push_frame(wg_message()))
            await until(lambda: len(rig.core.received) == 1, "the frame")
            ep = rig.core.received[0][1]
            assert isinstance(ep, TcpEndpoint)
            received = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 3 * LIMITS.stall
            while loop.time() < end:
                for _ in range(40):  # more than it reads: the buffer stays full
                    ep.send(wg_message(1400))
                writer.write(push_frame(wg_message()))  # not idle either
                received += len(await reader.read(8192))
                await asyncio.sleep(0.05)
            assert not ep.closed and received > 0
            assert rig.server.counts["tcp_stalled"] == 0
            close_writer(writer)

    run(main)


def test_forget_endpoint() -> None:
    class P:
        def __init__(self, endpoint: object) -> None:
            self.endpoint = endpoint

    ep, other = object(), ("10.0.0.1", 1)
    peers = [P(ep), P(other), P(None)]
    forget_endpoint(peers, ep)  # type: ignore[arg-type]
    assert [p.endpoint for p in peers] == [None, other, None]
    assert endpoint_transport(None) is None and endpoint_transport(other) == "udp"


# --- the dialer ---------------------------------------------------------------------------


def test_dialer_reconnects_with_backoff() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = FakeCore()
        driver = Driver(core, loop, lambda e: None)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there yet
        ups: list[TcpEndpoint] = []
        downs: list[TcpEndpoint] = []
        made: list[socket.socket] = []

        def open_socket(family: int, kind: int) -> socket.socket:
            sock = socket.socket(family, kind)
            made.append(sock)
            return sock

        def connected(ep: TcpEndpoint) -> None:
            ups.append(ep)
            ep.send(wg_message(48, len(ups)))  # a hello, as a handshake would be

        dialer = TcpDialer(
            loop,
            ("127.0.0.1", port),
            open_socket,
            connected,
            downs.append,
            first_backoff=0.05,
            max_backoff=0.2,
        )
        driver.attach(dialer)
        await asyncio.sleep(0.3)  # a few refused attempts
        assert ups == [] and len(made) >= 2

        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        accepted = asyncio.Queue()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put((r, w))

        server = await asyncio.start_server(on_conn, "127.0.0.1", port)
        async with asyncio.timeout(BOUND):
            r1, w1 = await accepted.get()
            (n,) = struct.unpack(">H", await r1.readexactly(2))
            assert await r1.readexactly(n) == wg_message(48, 1)
        assert dialer.endpoint is ups[0] and dialer.connects == 1
        w1.write(push_frame(wg_message(40, 5)))  # the relay answers: the dialer feeds it on
        await until(lambda: len(core.received) == 1, "the relay's frame")
        assert core.received[0] == (wg_message(40, 5), ups[0])
        w1.transport.abort()  # the relay drops the connection: the dialer comes back
        async with asyncio.timeout(BOUND):
            r2, w2 = await accepted.get()
            (n,) = struct.unpack(">H", await r2.readexactly(2))
            assert await r2.readexactly(n) == wg_message(48, 2)
        assert downs == [ups[0]] and len(ups) == 2 and ups[1] is not ups[0]
        # A frame that is not WireGuard closes the connection and is counted.
        w2.write(push_frame(b"\x07\x00\x00\x00" + bytes(40)))
        await until(lambda: dialer.counts["tcp_bad_frame"] == 1, "the bad frame counted")
        async with asyncio.timeout(BOUND):
            _, w3 = await accepted.get()
        dialer.close()
        server.close()
        for w in (w2, w3):
            w.transport.abort()
        driver.close()
        await asyncio.sleep(0)
        assert all(s.fileno() == -1 for s in made)  # every socket it made is closed

    run(main)


def test_dialer_reconnect_does_not_wait_out_its_backoff() -> None:
    """Failover (or a new local address) asks the dialer to connect again, perhaps to
    another relay: it does at once, whether it was waiting out the backoff after the
    old relay refused, still connecting to a relay that does not answer, or connected."""
    backoff = 30.0  # far longer than any wait here: a dialer that waits it fails

    async def main() -> None:
        loop = asyncio.get_running_loop()
        driver = Driver(FakeCore(), loop, lambda e: None)
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        # A relay that does not answer: its one-slot accept queue is full, so the
        # kernel drops further SYNs and a connect() hangs.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            with contextlib.suppress(BlockingIOError):
                filler.connect(silent.getsockname())
        accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put(w)

        good = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        ups: list[TcpEndpoint] = []
        dialer = TcpDialer(
            loop,
            refused.getsockname(),
            socket.socket,
            ups.append,
            lambda ep: None,
            first_backoff=backoff,
            max_backoff=backoff,
            connect_timeout=backoff,
        )
        driver.attach(dialer)
        try:
            await asyncio.sleep(0.2)  # refused: waiting out the backoff now
            assert ups == []
            dialer.address = good.sockets[0].getsockname()
            dialer.reconnect("moving to relay r2")
            async with asyncio.timeout(BOUND):
                first = await accepted.get()
            await until(lambda: len(ups) == 1, "the dialer to be connected")
            # Connected: asked again, it reconnects at once (not after its backoff).
            dialer.reconnect("the local address changed")
            async with asyncio.timeout(BOUND):
                second = await accepted.get()
            await until(lambda: len(ups) == 2, "the dialer to be connected again")
            # Connecting to a relay that does not answer, it is moved elsewhere.
            dialer.address = silent.getsockname()
            dialer.reconnect("moving to relay r3")
            await asyncio.sleep(0.3)
            assert len(ups) == 2 and accepted.empty()  # still connecting, in vain
            dialer.address = good.sockets[0].getsockname()
            dialer.reconnect("moving to relay r2")
            async with asyncio.timeout(BOUND):
                third = await accepted.get()
            await until(lambda: len(ups) == 3, "the dialer to be connected once more")
            for w in (first, second, third):
                w.transport.abort()
        finally:
            dialer.close()
            good.close()
            driver.close()
            for sock in (refused, silent, *fillers):
                sock.close()
            await asyncio.sleep(0)

    run(main)


# --- the real cores over TCP ---------------------------------------------------------


class CoresOverTcp:
    """A relay core with one peer (c1) behind a TcpServer on 127.0.0.1, and that
    client's core dialing it, each on its own Driver; the client's events in `events`."""

    def __init__(self, limits: TcpLimits | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.relay = Relay(secrets.token_bytes(32), relay_settings())
        self.client = ClientCore(secrets.token_bytes(32), self.relay.wg.public_key, None)
        spec = PeerSpec("c1", self.client.wg.public_key, IPv4Address("10.66.0.5"))
        self.relay.set_peers([spec])
        self.relay_driver = Driver(self.relay, self.loop, lambda e: None)
        peers = self.relay.wg.peers.values()
        self.server = TcpServer(self.loop, lambda ep: forget_endpoint(peers, ep), limits)
        self.relay_driver.attach(self.server)
        self.events: list[Event] = []
        self.client_driver = Driver(self.client, self.loop, self.events.append)
        self.sock = socket.socket()

    async def __aenter__(self) -> CoresOverTcp:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        await self.server.start(self.sock)
        self.dialer = TcpDialer(
            self.loop, self.sock.getsockname(), socket.socket, self._connected, lambda ep: None
        )
        self.client_driver.attach(self.dialer)
        return self

    def _connected(self, ep: TcpEndpoint) -> None:
        self.client.set_endpoint(ep)
        self.client.start(self.loop.time())
        self.client_driver.poke()

    async def configured(self) -> None:
        await until(lambda: any(isinstance(e, ConfigReceived) for e in self.events), "config")

    async def __aexit__(self, *exc: object) -> None:
        self.dialer.close()
        self.server.close()
        self.relay_driver.close()
        self.client_driver.close()
        await asyncio.sleep(0)


def test_relay_and_client_cores_handshake_and_push_config_over_tcp() -> None:
    async def main() -> None:
        async with CoresOverTcp() as net:
            await net.configured()
            events, relay, server = net.events, net.relay, net.server
            assert any(isinstance(e, Connected) for e in events)
            config = next(e for e in events if isinstance(e, ConfigReceived)).config
            assert config.address == IPv4Address("10.66.0.5")
            peer = relay.peer_by_name("c1")
            assert peer is not None and endpoint_transport(peer.endpoint) == "tcp"
            assert peer.endpoint in server.connections
            net.dialer.close()  # the client goes away: the relay forgets the connection
            await until(lambda: peer.endpoint is None, "the relay to forget the endpoint")

    run(main)
