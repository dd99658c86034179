"""The TCP transport: WireGuard messages over TCP streams, one connection one endpoint.

Theory of operation
-------------------
TcpServer (the relay's listener) and TcpDialer (a client's connection to the relay) are
transports (transport.py).  Each TCP connection is an endpoint object (TcpEndpoint) that
the WireGuard core treats like a UDP address: the bytes a connection brings are fed to a
FrameDecoder (framing.py: a 2-byte big-endian length, then one message), and the
messages of one read go to the transport's receive callback as one batch, each with the
connection as its endpoint; the core's roaming makes the connection that last brought an
authentic message the peer's endpoint.  Sends to a connection (`send()`) write the frame
to its asyncio transport (sent at once while the kernel's socket buffer has room, else
kept in the transport's buffer); nothing ever awaits.

Bounds, all per connection so that one bad connection never touches another:
- reading: a frame of impossible size, a frame cut off by the end of the stream, or a
  message that cannot be a WireGuard message closes that connection ("tcp_bad_frame").
  The decoder holds at most one incomplete frame (HEADER_SIZE + MAX_FRAME bytes), and a
  read is handed to the core before the next one is taken, so reading needs no other
  buffer.
- writing: the transport's buffer may hold `write_buffer` bytes; past that a message is
  refused (the Driver counts it as "queue_full").  A connection whose buffered bytes make
  no progress for `stall` seconds (the peer stopped reading) is closed ("tcp_stalled").
- time: a connection that has not carried an authentic message within `first_frame`
  seconds of opening, or brings no frame for `idle` seconds, is closed ("tcp_timeout").
  gtun clients ping every 10 s.  Authentic means that the WireGuard core accepted it:
  a handshake completed through the connection, or a transport message from it
  decrypted and made it a peer's endpoint; the core says so by calling the endpoint's
  authenticated() (gtun.core.wg.endpoint.mark_authentic), once, never per message.
  WireGuard-shaped bytes alone (anyone can make them) earn nothing.
- count: the relay holds at most `max_connections` at once; when it is full, a new one
  takes the place of the oldest connection not yet authentic, and only when every one
  is authentic is it refused ("tcp_refused" counts both); and it accepts at
  most `max_pending_per_source` not yet authentic from one address (an IPv6 /64;
  "tcp_source_limit"), so that connections from one source that send nothing, a byte a
  second or well-formed garbage cannot take the slots of others.  Authentic
  connections are not counted per source: many clients may share one NAT address.

When a connection closes, the owner's `on_close` lets the core forget it as an endpoint
(forget_endpoint), so the peer is unreachable until it comes back on a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from gtun.core.drops import TCP_DROP_REASONS
from gtun.core.wg.endpoint import address_bytes, address_key
from gtun.core.wg.messages import is_wireguard_message
from gtun.io.framing import LENGTH, MAX_FRAME, FrameDecoder, FrameError
from gtun.io.transport import Receive, endpoint_text

log = logging.getLogger("gtun")

# Tuning knobs.
# Seconds from accept to the first authentic message: room for a first initiation
# answered by a cookie reply (or lost) and its retransmission REKEY_TIMEOUT (5 s, plus
# up to 1/3 s of jitter) later.
FIRST_FRAME_TIMEOUT = 12.0
IDLE_TIMEOUT = 60.0  # seconds without any frame (gtun clients ping every 10 s)
STALL_TIMEOUT = 5.0  # seconds a non-empty write buffer may go without draining
WRITE_BUFFER = 256 * 1024  # bytes queued in user space per connection
MAX_CONNECTIONS = 512  # simultaneous connections the relay accepts
MAX_PENDING_PER_SOURCE = 8  # of those, not yet authentic from one address
CONNECT_TIMEOUT = 10.0  # a client's connect() to the relay
FIRST_BACKOFF = 1.0  # a client's pause before reconnecting, doubling ...
MAX_BACKOFF = 15.0  # ... up to this

_WHY = {
    "tcp_timeout": "no frame within the time allowed",
    "tcp_stalled": "the other end stopped reading (its data made no progress)",
}


@dataclass(frozen=True)
class TcpLimits:
    """The bounds of one side's connections (the defaults above; tests shorten them).
    `first_frame`: seconds to the first authentic message; None: no such deadline (a
    client waits for the relay's answer)."""

    first_frame: float | None = FIRST_FRAME_TIMEOUT
    idle: float = IDLE_TIMEOUT
    stall: float = STALL_TIMEOUT
    write_buffer: int = WRITE_BUFFER
    max_connections: int = MAX_CONNECTIONS
    max_pending_per_source: int = MAX_PENDING_PER_SOURCE

    @property
    def tick(self) -> float:
        """How often the timeouts are checked: a fraction of the shortest."""
        shortest = min(t for t in (self.first_frame, self.idle, self.stall) if t is not None)
        return min(1.0, shortest / 4)


class TcpEndpoint:
    """One TCP connection, as a WireGuard endpoint (hashable by identity)."""

    stream = True  # frames may be as large as MAX_FRAME: bulk frames go here (bulk.py)

    __slots__ = (
        "owner",
        "transport",
        "peername",
        "cookie_source",
        "source_key",
        "limits",
        "opened",
        "last_rx",
        "authentic",
        "reason",
        "detail",
        "written",
        "_progress",
        "_stuck_since",
    )

    def __init__(
        self,
        owner: TcpTransport,
        transport: asyncio.WriteTransport,
        peername: tuple[Any, ...],
        limits: TcpLimits,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.owner = owner  # the transport that sends to it (transport.py)
        self.transport = transport
        self.peername = (str(peername[0]), int(peername[1]))
        try:  # the cookie (mac2) binds to the other end's address, as for UDP
            self.cookie_source = address_bytes(*self.peername)
        except ValueError:  # no address known: stable for this connection all the same
            self.cookie_source = f"tcp {id(self)}".encode()
        try:  # what per-source limits charge (the core's ratelimiter, the listener)
            self.source_key = address_key(self.peername[0])
        except ValueError:
            self.source_key = self.cookie_source
        self.limits = limits
        self.opened = self.last_rx = loop.time()
        self.authentic = False  # the core accepted a message from it (authenticated())
        self.reason: str | None = None  # why it closed; None while open
        self.detail = ""  # what happened, for the log
        self.written = 0  # bytes handed to the transport
        self._progress = 0
        self._stuck_since: float | None = None
        transport.set_write_buffer_limits(high=limits.write_buffer)

    def __repr__(self) -> str:
        return f"<tcp {self.address}>"

    @property
    def address(self) -> str:
        host, port = self.peername
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def closed(self) -> bool:
        return self.reason is not None or self.transport.is_closing()

    def authenticated(self) -> None:
        """The WireGuard core accepted a message from this connection (called through
        gtun.core.wg.endpoint.mark_authentic, when it becomes a peer's endpoint)."""
        if not self.authentic:
            self.authentic = True
            self.owner._authenticated(self)

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

    def pause_reading(self) -> None:
        """Stop reading this connection (the driver's fair queue for it is half full):
        TCP's own flow control then holds the sender back instead of our dropping."""
        if not self.transport.is_closing():
            pause = getattr(self.transport, "pause_reading", None)
            if pause is not None:
                pause()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            resume = getattr(self.transport, "resume_reading", None)
            if resume is not None:
                resume()

    def expired(self, now: float) -> str | None:
        """The reason to close this connection now, if its time is up."""
        limits = self.limits
        if not self.authentic and limits.first_frame is not None:
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

    def close(self, reason: str, detail: str | None = None) -> None:
        """Close at once (RST, buffered data discarded).  Idempotent: the first reason
        (a TCP_DROP_REASONS key, or "closed") and its `detail` are kept."""
        if self.reason is None:
            self.reason = reason
            self.detail = detail or _WHY.get(reason, "closed by us")
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


class _Connection(asyncio.Protocol):
    """The asyncio side of one connection: its bytes become frames, the frames of one
    read one batch for the transport's receive callback."""

    def __init__(self, owner: TcpTransport) -> None:
        self.owner = owner
        self.ep: TcpEndpoint | None = None  # None: refused, or not yet made
        self.decoder = FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.ep = self.owner._opened(transport)

    def data_received(self, data: bytes) -> None:
        ep = self.ep
        if ep is None or ep.reason is not None:
            return
        try:
            messages = self.decoder.feed(data)
        except FrameError as exc:
            ep.close("tcp_bad_frame", str(exc))
            return
        batch = []
        bad: bytes | None = None
        for message in messages:
            if not is_wireguard_message(message):
                bad = message
                break
            batch.append((message, ep))
        if batch:
            owner = self.owner
            now = owner.loop.time()
            ep.last_rx = now
            owner._receive(batch, now)
        if bad is not None:
            ep.close("tcp_bad_frame", f"a frame of {len(bad)} bytes that is not WireGuard")

    def eof_received(self) -> bool:
        ep = self.ep
        if ep is not None:
            if self.decoder.buffered:
                n = self.decoder.buffered
                ep.close("tcp_bad_frame", f"stream ended inside a frame ({n} bytes)")
            else:
                ep.close("closed", "closed by the other end")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        ep = self.ep
        if ep is None:
            return
        if ep.reason is None:  # reset by the other end
            ep.reason = "closed"
            ep.detail = (str(exc) or type(exc).__name__) if exc else "closed by the other end"
        self.owner._closed(ep)


def _not_open(batch: list[tuple[bytes, Any]], now: float) -> None:
    raise RuntimeError("a TCP transport received before it was opened")


class TcpTransport:
    """What the relay's listener and a client's dialer share: connections as endpoints,
    their timeouts, their counters (TCP_DROP_REASONS)."""

    addressed = False  # endpoints are TcpEndpoint objects (transport.py)

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: TcpLimits) -> None:
        self.loop = loop
        self.limits = limits
        self.counts: dict[str, int] = dict.fromkeys(TCP_DROP_REASONS, 0)
        self._receive: Receive = _not_open
        self._sweeper = _Sweeper(loop, limits)

    @property
    def connections(self) -> set[TcpEndpoint]:
        return self._sweeper.connections

    def open(self, receive: Receive) -> None:
        self._receive = receive
        self._sweeper.start()

    def send(self, datagrams: Sequence[tuple[bytes, Any]]) -> int:
        dropped = 0
        for message, ep in datagrams:
            if not ep.send(message):
                dropped += 1
        return dropped

    def _protocol(self) -> _Connection:
        return _Connection(self)

    def _opened(self, transport: asyncio.WriteTransport) -> TcpEndpoint | None:
        """A connection is up: its endpoint, or None when it is refused."""
        peername = transport.get_extra_info("peername") or ("?", 0)
        ep = TcpEndpoint(self, transport, peername, self.limits, self.loop)
        self.connections.add(ep)
        return ep

    def _closed(self, ep: TcpEndpoint) -> None:
        """A connection is gone (ep.reason and ep.detail say why)."""
        self.connections.discard(ep)
        if ep.reason in self.counts:
            self.counts[ep.reason] += 1

    def _authenticated(self, ep: TcpEndpoint) -> None:
        """`ep` carried its first authentic message."""


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


class TcpServer(TcpTransport):
    """The relay's TCP listener, a transport: open() it, then start() it on a socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[TcpEndpoint], None],
        limits: TcpLimits | None = None,
    ) -> None:
        super().__init__(loop, limits or TcpLimits())
        self.on_close = on_close
        self._server: asyncio.base_events.Server | None = None
        # Open connections not yet authentic, by source (TcpEndpoint.source_key).
        self.pending: dict[bytes, int] = {}

    async def start(self, sock: socket.socket) -> None:
        """Accept connections on `sock`, a bound TCP socket."""
        self._server = await self.loop.create_server(self._protocol, sock=sock)

    def _opened(self, transport: asyncio.WriteTransport) -> TcpEndpoint | None:
        peername = transport.get_extra_info("peername") or ("?", 0)
        if len(self.connections) >= self.limits.max_connections and not self._evict():
            self.counts["tcp_refused"] += 1
            log.debug(
                "TCP connection from %s refused: %d open",
                endpoint_text(peername),
                len(self.connections),
            )
            transport.abort()
            return None
        try:
            source = address_key(peername[0])
        except ValueError:
            source = None  # no address to charge (not an IP socket)
        if source is not None and self.pending.get(source, 0) >= self.limits.max_pending_per_source:
            self.counts["tcp_source_limit"] += 1
            log.debug(
                "TCP connection from %s refused: too many not authentic",
                endpoint_text(peername),
            )
            transport.abort()
            return None
        ep = super()._opened(transport)
        assert ep is not None
        self.pending[ep.source_key] = self.pending.get(ep.source_key, 0) + 1
        return ep

    def _evict(self) -> bool:
        """Make room by closing the oldest connection not yet authentic, if any: slots
        held by connections that prove nothing go to newcomers before peers are
        refused (sources are many; each holds max_pending_per_source at most)."""
        pending = [ep for ep in self.connections if not ep.authentic and ep.reason is None]
        if not pending:
            return False
        oldest = min(pending, key=lambda ep: ep.opened)
        oldest.close("tcp_refused", "closed to make room: not authentic, and the oldest")
        return True

    def _unpend(self, ep: TcpEndpoint) -> None:
        left = self.pending.get(ep.source_key, 0) - 1
        if left > 0:
            self.pending[ep.source_key] = left
        else:
            self.pending.pop(ep.source_key, None)

    def _authenticated(self, ep: TcpEndpoint) -> None:
        if ep in self.connections:
            self._unpend(ep)

    def _closed(self, ep: TcpEndpoint) -> None:
        if ep in self.connections and not ep.authentic:
            self._unpend(ep)
        super()._closed(ep)
        self.on_close(ep)
        log.log(
            logging.INFO if ep.reason == "tcp_stalled" else logging.DEBUG,
            "TCP connection from %s closed (%s): %s",
            ep.address,
            ep.reason,
            ep.detail,
        )

    def close(self) -> None:
        self._sweeper.stop()
        if self._server is not None:
            self._server.close()
            self._server = None
        for ep in list(self.connections):
            ep.close("closed", "relay stopping")


class TcpDialer(TcpTransport):
    """A client's connection to the relay, a transport: once opened it connects, and
    reconnects with a bounded backoff whenever the connection ends.  reconnect() (the
    relay went silent, the local address changed, failover moved to another relay at
    `address`) connects again at once, whatever the dialer is doing: connected, still
    connecting, or waiting out its backoff after the old relay refused.

    `open_socket(family, type)` makes the (unconnected) socket; `on_connected(ep)` runs
    when a connection is up (make it the peer's endpoint, start a handshake) and
    `on_lost(ep)` when it is gone."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
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
        super().__init__(loop, limits or TcpLimits(first_frame=None))
        self.address = address
        self.open_socket = open_socket
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.endpoint: TcpEndpoint | None = None
        self.connects = 0  # connections made, for status and tests
        self._task: asyncio.Task[None] | None = None
        # The connection being made or in use, and a future done when it ends.
        self._gone: tuple[TcpEndpoint, asyncio.Future[None]] | None = None
        self._asked = asyncio.Event()  # reconnect() was called: attempt again now

    @property
    def where(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def open(self, receive: Receive) -> None:
        super().open(receive)
        self._task = self.loop.create_task(self._run())

    def reconnect(self, why: str) -> None:
        """Drop the current connection, or the attempt or the backoff under way, and
        connect (to `address`, which the caller may have changed) at once."""
        self._asked.set()
        if self.endpoint is not None:
            log.info("closing the TCP connection to relay %s: %s", self.where, why)
            self.endpoint.close("closed")

    def close(self, why: str | None = None) -> None:
        """Stop: close the connection (with a reset) and connect no more.  `why`, when
        given, is logged (the client is not stopping, but done with TCP)."""
        self._sweeper.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.endpoint is not None:
            if why is not None and not self.endpoint.closed:
                log.info("closing the TCP connection to relay %s: %s", self.where, why)
            self.endpoint.close("closed", why or "client stopping")

    def _opened(self, transport: asyncio.WriteTransport) -> TcpEndpoint | None:
        ep = super()._opened(transport)
        assert ep is not None
        self._gone = (ep, self.loop.create_future())
        return ep

    def _closed(self, ep: TcpEndpoint) -> None:
        # Only wakes _run(), which does the bookkeeping (it also runs when cancelled).
        if self._gone is not None and self._gone[0] is ep and not self._gone[1].done():
            self._gone[1].set_result(None)

    async def _connect(self) -> TcpEndpoint | None:
        """A connection to `address`; None when reconnect() came first.  Raises
        OSError (TimeoutError after `connect_timeout`)."""
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.open_socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            connecting = asyncio.ensure_future(self.loop.sock_connect(sock, (host, port)))
            async with asyncio.timeout(self.connect_timeout):
                if await self._unless_asked(connecting):
                    sock.close()
                    return None
            connecting.result()
            _, connection = await self.loop.create_connection(self._protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        assert connection.ep is not None  # a dialer refuses none
        return connection.ep

    async def _unless_asked(self, step: asyncio.Future[Any]) -> bool:
        """Wait for `step` or reconnect(), whichever comes first: True for reconnect()
        (`step`, unless done, is cancelled)."""
        asked = asyncio.ensure_future(self._asked.wait())
        try:
            await asyncio.wait((step, asked), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when cancelled (close()): nothing is left running
            asked.cancel()
            cut = not step.done()
            if cut:
                step.cancel()
        return cut

    async def _pause(self, seconds: float) -> bool:
        """The backoff: True when reconnect() cut it short."""
        return await self._unless_asked(asyncio.ensure_future(asyncio.sleep(seconds)))

    async def _run(self) -> None:
        backoff = self.first_backoff
        while True:
            self._asked.clear()  # this attempt is the one asked for
            try:
                ep = await self._connect()
            except OSError as exc:  # TimeoutError included
                what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.warning(
                    "cannot connect to relay %s over TCP (%s); retrying in %.0fs",
                    self.where,
                    what or "timed out",
                    backoff,
                )
                if await self._pause(backoff):
                    backoff = self.first_backoff
                else:
                    backoff = min(backoff * 2, self.max_backoff)
                continue
            if ep is None:
                backoff = self.first_backoff
                continue  # asked again while connecting: perhaps elsewhere now
            assert self._gone is not None and self._gone[0] is ep
            gone = self._gone[1]
            self.endpoint = ep
            self.connects += 1
            log.info("connected to relay %s over TCP", self.where)
            try:
                self.on_connected(ep)
                await gone
            finally:
                self.endpoint = None
                self._gone = None
                ep.close("closed", "client stopping")  # keeps the reason it closed, if it did
                super()._closed(ep)
                self.on_lost(ep)
            if self._asked.is_set():
                backoff = self.first_backoff
                continue  # closed by reconnect(), which said why
            if ep.authentic:
                backoff = self.first_backoff
            log.warning(
                "TCP connection to relay %s lost (%s); reconnecting in %.0fs",
                self.where,
                ep.detail if ep.reason == "closed" else f"{ep.reason}: {ep.detail}",
                backoff,
            )
            if await self._pause(backoff):
                backoff = self.first_backoff
            else:
                backoff = min(backoff * 2, self.max_backoff)
