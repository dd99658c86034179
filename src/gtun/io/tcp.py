"""The TCP transport: WireGuard messages over TCP streams, one connection one endpoint.

Theory of operation
-------------------
Each TCP connection is an endpoint object (TcpEndpoint) that the WireGuard core treats
like a UDP address: frames read from the connection (framing.py: a 2-byte big-endian
length, then one message) go to `core.receive_datagram(message, endpoint, now)`, and the
core's roaming makes the connection that last brought an authentic message the peer's
endpoint.  The edge's Driver hands datagrams addressed to a TcpEndpoint to its `send()`,
which writes the frame to the transport (sent at once while the kernel's socket buffer
has room, else kept in the transport's buffer); it never awaits.

Bounds, all per connection so that one bad connection never touches another:
- reading: frames are read exactly (`readexactly`); a frame of impossible size, a frame
  cut off by the end of the stream, or a message that cannot be a WireGuard message closes
  that connection ("tcp_bad_frame").  The StreamReader's buffer is bounded (READ_LIMIT).
- writing: the transport's buffer may hold `write_buffer` bytes; past that a message is
  refused (the Driver counts it as "queue_full").  A connection whose buffered bytes make
  no progress for `stall` seconds (the peer stopped reading) is closed ("tcp_stalled").
- time: a connection that brings no valid frame within `first_frame` seconds of opening,
  or none for `idle` seconds, is closed ("tcp_timeout").  gtun clients ping every 10 s.
- count: the relay accepts at most `max_connections` at once ("tcp_refused").

When a connection closes, the owner's `on_close` lets the core forget it as an endpoint
(forget_endpoint), so the peer is unreachable until it comes back on a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from gtun.core.wg.messages import is_wireguard_message
from gtun.io.driver import Driver
from gtun.io.framing import LENGTH, MAX_FRAME, FrameError, read_frame

log = logging.getLogger("gtun")

# Tuning knobs.
FIRST_FRAME_TIMEOUT = 5.0  # seconds from accept to the first valid frame
IDLE_TIMEOUT = 60.0  # seconds without any frame (gtun clients ping every 10 s)
STALL_TIMEOUT = 5.0  # seconds a non-empty write buffer may go without draining
WRITE_BUFFER = 256 * 1024  # bytes queued in user space per connection
MAX_CONNECTIONS = 512  # simultaneous connections the relay accepts
READ_LIMIT = 64 * 1024  # StreamReader buffer: reading pauses beyond twice this
CONNECT_TIMEOUT = 10.0  # a client's connect() to the relay
FIRST_BACKOFF = 1.0  # a client's pause before reconnecting, doubling ...
MAX_BACKOFF = 15.0  # ... up to this

TCP_DROP_REASONS = ("tcp_bad_frame", "tcp_timeout", "tcp_stalled", "tcp_refused")
_WHY = {
    "tcp_timeout": "no frame within the time allowed",
    "tcp_stalled": "the other end stopped reading (its data made no progress)",
}


@dataclass(frozen=True)
class TcpLimits:
    """The bounds of one side's connections (the defaults above; tests shorten them).
    `first_frame` None: no such deadline (a client waits for the relay's answer)."""

    first_frame: float | None = FIRST_FRAME_TIMEOUT
    idle: float = IDLE_TIMEOUT
    stall: float = STALL_TIMEOUT
    write_buffer: int = WRITE_BUFFER
    max_connections: int = MAX_CONNECTIONS

    @property
    def tick(self) -> float:
        """How often the timeouts are checked: a fraction of the shortest."""
        shortest = min(t for t in (self.first_frame, self.idle, self.stall) if t is not None)
        return min(1.0, shortest / 4)


class TcpEndpoint:
    """One TCP connection, as a WireGuard endpoint (hashable by identity)."""

    stream = True  # frames may be as large as MAX_FRAME: bulk frames go here (bulk.py)

    __slots__ = (
        "transport",
        "peername",
        "limits",
        "opened",
        "last_rx",
        "valid",
        "reason",
        "written",
        "_progress",
        "_stuck_since",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        peername: tuple[Any, ...],
        limits: TcpLimits,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.transport = transport
        self.peername = (str(peername[0]), int(peername[1]))
        self.limits = limits
        self.opened = self.last_rx = loop.time()
        self.valid = False  # a valid frame has arrived
        self.reason: str | None = None  # why we closed it; None while open
        self.written = 0  # bytes handed to the transport
        self._progress = 0
        self._stuck_since: float | None = None
        transport.set_write_buffer_limits(high=limits.write_buffer)

    def __repr__(self) -> str:
        # Also the source the cookie mechanism (mac2) binds to: stable per connection.
        return f"<tcp {self.address}>"

    @property
    def address(self) -> str:
        host, port = self.peername
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def closed(self) -> bool:
        return self.reason is not None or self.transport.is_closing()

    def send(self, message: bytes) -> bool:
        """Write one frame; False (nothing written) when closed or the buffer is full.

        The transport sends at once while the kernel takes the bytes (as a UDP send
        would) and buffers them only when it does not: that buffer is the bound."""
        n = len(message)
        if self.reason is not None or n > MAX_FRAME:
            return False
        transport = self.transport
        if transport.get_write_buffer_size() + n > self.limits.write_buffer:
            return False
        if transport.is_closing():
            return False
        self.written += n + 2
        transport.write(LENGTH.pack(n) + message)
        return True

    def expired(self, now: float) -> str | None:
        """The reason to close this connection now, if its time is up."""
        limits = self.limits
        if not self.valid and limits.first_frame is not None:
            if now - self.opened > limits.first_frame:
                return "tcp_timeout"
        elif now - self.last_rx > limits.idle:
            return "tcp_timeout"
        buffered = self.transport.get_write_buffer_size()
        progress = self.written - buffered  # bytes the kernel has taken
        if buffered == 0 or progress != self._progress:
            self._progress = progress
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        elif now - self._stuck_since >= limits.stall:
            return "tcp_stalled"
        return None

    def close(self, reason: str) -> None:
        """Close at once (RST, buffered data discarded).  Idempotent."""
        if self.reason is None:
            self.reason = reason
        self.transport.abort()


def endpoint_transport(endpoint: Hashable | None) -> str | None:
    """The transport for status: "tcp" or "udp"; None when the peer has no endpoint."""
    if endpoint is None:
        return None
    return "tcp" if isinstance(endpoint, TcpEndpoint) else "udp"


def forget_endpoint(peers: Any, endpoint: TcpEndpoint) -> None:
    """Peers (an iterable of wg Peer) whose endpoint was `endpoint` lose it."""
    for peer in peers:
        if peer.endpoint is endpoint:
            peer.endpoint = None


async def pump(reader: asyncio.StreamReader, ep: TcpEndpoint, driver: Driver) -> tuple[str, str]:
    """Feed the frames of one connection to the driver's core until the connection ends.

    Returns (reason, detail): a TCP_DROP_REASONS key when the connection misbehaved or
    was closed by us, "closed" when the other end closed it."""
    loop = driver.loop
    core = driver.core
    while True:
        try:
            message = await read_frame(reader)
        except FrameError as exc:
            return ep.reason or "tcp_bad_frame", str(exc)
        except asyncio.IncompleteReadError as exc:
            if ep.reason is not None:
                return ep.reason, _WHY.get(ep.reason, "closed by us")
            if exc.partial:
                return "tcp_bad_frame", f"stream ended inside a frame ({len(exc.partial)} bytes)"
            return "closed", "closed by the other end"
        except OSError as exc:  # reset by the peer
            return ep.reason or "closed", str(exc) or type(exc).__name__
        if not is_wireguard_message(message):
            return "tcp_bad_frame", f"a frame of {len(message)} bytes that is not WireGuard"
        now = loop.time()
        ep.last_rx = now
        ep.valid = True
        core.receive_datagram(message, ep, now)
        driver.after()


class _Sweeper:
    """Checks the timeouts of a set of connections every `limits.tick` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: TcpLimits) -> None:
        self.loop = loop
        self.limits = limits
        self.connections: set[TcpEndpoint] = set()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = self.loop.call_later(self.limits.tick, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for ep in list(self.connections):
            reason = ep.expired(now)
            if reason is not None:
                ep.close(reason)
        self._handle = self.loop.call_later(self.limits.tick, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class TcpServer:
    """The relay's TCP listener: accepted connections feed the driver's core."""

    def __init__(
        self,
        driver: Driver,
        on_close: Callable[[TcpEndpoint], None],
        limits: TcpLimits | None = None,
    ) -> None:
        self.driver = driver
        self.on_close = on_close
        self.limits = limits or TcpLimits()
        self.counts: dict[str, int] = dict.fromkeys(TCP_DROP_REASONS, 0)
        self._sweeper = _Sweeper(driver.loop, self.limits)
        self._server: asyncio.base_events.Server | None = None

    @property
    def connections(self) -> set[TcpEndpoint]:
        return self._sweeper.connections

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`, a bound TCP socket."""
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=READ_LIMIT)
        self._sweeper.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        peername = writer.get_extra_info("peername") or ("?", 0)
        if len(self.connections) >= self.limits.max_connections:
            self.counts["tcp_refused"] += 1
            log.debug("TCP connection from %s refused: %d open", peername, len(self.connections))
            transport.abort()
            return
        ep = TcpEndpoint(transport, peername, self.limits, self.driver.loop)
        self.connections.add(ep)
        reason, detail = "closed", "relay stopping"
        try:
            reason, detail = await pump(reader, ep, self.driver)
        except asyncio.CancelledError:
            # The loop is shutting down.  Ending quietly: asyncio's stream server logs a
            # connection task that ends cancelled as an error.
            pass
        finally:
            self.connections.discard(ep)
            ep.close(reason)
            self.on_close(ep)
            if reason in self.counts:
                self.counts[reason] += 1
            log.log(
                logging.INFO if reason == "tcp_stalled" else logging.DEBUG,
                "TCP connection from %s closed (%s): %s",
                ep.address,
                reason,
                detail,
            )

    def close(self) -> None:
        self._sweeper.stop()
        if self._server is not None:
            self._server.close()
            self._server = None
        for ep in list(self.connections):
            ep.close("closed")


class TcpDialer:
    """A client's connection to the relay: connects, feeds frames to the driver's core,
    and reconnects with a bounded backoff whenever the connection ends.

    `open_socket(family, type)` makes the (unconnected) socket; `on_connected(ep)` runs
    when a connection is up (make it the peer's endpoint, start a handshake) and
    `on_lost(ep)` when it is gone."""

    def __init__(
        self,
        driver: Driver,
        address: tuple[str, int],
        open_socket: Callable[[int, int], socket.socket],
        on_connected: Callable[[TcpEndpoint], None],
        on_lost: Callable[[TcpEndpoint], None],
        limits: TcpLimits | None = None,
        *,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.driver = driver
        self.address = address
        self.open_socket = open_socket
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.limits = limits or TcpLimits(first_frame=None)
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.counts: dict[str, int] = dict.fromkeys(TCP_DROP_REASONS, 0)
        self.endpoint: TcpEndpoint | None = None
        self.connects = 0  # connections made, for status and tests
        self._sweeper = _Sweeper(driver.loop, self.limits)
        self._task: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self._sweeper.start()
        self._task = asyncio.ensure_future(self._run())

    def reconnect(self, why: str) -> None:
        """Drop the current connection (it will be made again)."""
        if self.endpoint is not None:
            log.info("closing the TCP connection to relay %s: %s", self.where, why)
            self.endpoint.close("closed")

    def close(self) -> None:
        self._sweeper.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.endpoint is not None:
            self.endpoint.close("closed")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.open_socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self.connect_timeout):
                await self.driver.loop.sock_connect(sock, (host, port))
            return await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
        except BaseException:
            sock.close()
            raise

    async def _run(self) -> None:
        loop = self.driver.loop
        backoff = self.first_backoff
        while True:
            try:
                reader, writer = await self._connect()
            except OSError as exc:  # TimeoutError included
                what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.warning(
                    "cannot connect to relay %s over TCP (%s); retrying in %.0fs",
                    self.where,
                    what or "timed out",
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            peername = writer.get_extra_info("peername") or self.address
            ep = TcpEndpoint(writer.transport, peername, self.limits, loop)
            self.endpoint = ep
            self.connects += 1
            self._sweeper.connections.add(ep)
            log.info("connected to relay %s over TCP", self.where)
            reason, detail = "closed", "client stopping"
            try:
                self.on_connected(ep)
                reason, detail = await pump(reader, ep, self.driver)
            finally:
                self._sweeper.connections.discard(ep)
                self.endpoint = None
                ep.close(reason)
                self.on_lost(ep)
                if reason in self.counts:
                    self.counts[reason] += 1
            if ep.valid:
                backoff = self.first_backoff
            log.warning(
                "TCP connection to relay %s lost (%s); reconnecting in %.0fs",
                self.where,
                detail if reason == "closed" else f"{reason}: {detail}",
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
