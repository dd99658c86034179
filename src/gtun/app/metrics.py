"""Prometheus metrics for the relay and the client, read from the cores' own counters.

Nothing is counted for the sake of metrics: the WireGuard core already keeps each peer's
bytes, packets, handshakes and last handshake, and every layer keeps its drops by reason
(`WireGuard.drops`, `Relay.drops` and each relay peer's `PeerState.drops`,
`ClientCore.drops`).  A custom collector reads them when Prometheus scrapes, so the
per-packet path costs nothing extra.

The HTTP endpoint is a small asyncio server on the process's own event loop, not
prometheus_client's threaded server: a scrape then never reads the cores' dicts while
the loop is changing them.  It answers `GET /metrics` (and HEAD), 404 for any other
path, 405 for any other method, 400 for a request that does not parse; a request head is
bounded in size and must arrive within READ_TIMEOUT, and at most MAX_CONNECTIONS are
served at once, so a slow or hostile scraper cannot pin memory or the loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gtun import __version__
from gtun.app.background import off_loop
from gtun.app.keys import encode_key
from gtun.app.workers import DROPS, WorkerPool, merged_totals
from gtun.core.drops import PEER_DROP_REASONS
from gtun.core.wg.constants import REJECT_AFTER_TIME
from gtun.errors import ConfigError

if TYPE_CHECKING:
    from gtun.core.client import ClientCore
    from gtun.core.relay import Relay
    from gtun.core.wg import Peer, WireGuard

log = logging.getLogger("gtun")

# A peer counts as connected when its last handshake is younger than this: past
# REJECT_AFTER_TIME (WireGuard whitepaper 6.1) no session from it can still carry data.
CONNECTED_WITHIN = REJECT_AFTER_TIME

# The relay's per-peer counters (core/drops.py); a reason not listed there still appears
# once a peer has been counted for it.  Listing them gives every peer's series from the
# start, so rate() sees the first increment.

PEER_LABELS = ("peer", "public_key")

# Tuning knobs of the HTTP endpoint.
MAX_REQUEST_HEAD = 8192  # bytes of request line + headers
READ_TIMEOUT = 5.0  # seconds for the whole request head
WRITE_TIMEOUT = 10.0  # seconds for the response to drain
MAX_CONNECTIONS = 16  # served at once; more are closed unanswered

# The text exposition format generate_latest() writes (with its default escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --- the collectors ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeerView:
    """One peer as the metrics see it."""

    name: str
    peer: Peer
    drops: Mapping[str, int] | None  # per-peer drops, None where the role keeps none


class GtunCollector:
    """Reads a role's live counters at scrape time.  Subclasses say which peers and
    which drop counters there are; `clock` is the cores' clock (the event loop's)."""

    role = ""

    def __init__(
        self,
        wg: WireGuard,
        clock: Callable[[], float],
        drops: Mapping[str, int],
        tcp_drops: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.wg = wg
        self.clock = clock
        self.drops = drops  # the role's own counters (layer `role`)
        self.tcp_drops = tcp_drops  # the TCP listener's or dialer's (layer "tcp")

    def peers(self) -> list[PeerView]:
        raise NotImplementedError

    def drop_layers(self) -> list[tuple[str, Mapping[str, int]]]:
        """(layer, drops by reason) of each layer that counts drops."""
        layers = [("wireguard", self.wg.drops), (self.role, self.drops)]
        if self.tcp_drops is not None:
            layers.append(("tcp", self.tcp_drops()))
        return layers

    def extra(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        wall = self.wg.wall_offset  # device clock -> Unix time, fixed at start
        info = GaugeMetricFamily(
            "gtun_info",
            "This gtun process: its role, public key and version (always 1).",
            labels=("role", "public_key", "version"),
        )
        info.add_metric([self.role, encode_key(self.wg.public_key), __version__], 1)
        yield info

        rx_bytes = CounterMetricFamily(
            "gtun_peer_rx_bytes",
            "Bytes of WireGuard transport messages (data, keepalives) received from the peer.",
            labels=PEER_LABELS,
        )
        tx_bytes = CounterMetricFamily(
            "gtun_peer_tx_bytes",
            "Bytes of WireGuard messages (transport and handshake) sent to the peer.",
            labels=PEER_LABELS,
        )
        rx_packets = CounterMetricFamily(
            "gtun_peer_rx_packets",
            "Packets received from the peer through the tunnel (keepalives excluded).",
            labels=PEER_LABELS,
        )
        tx_packets = CounterMetricFamily(
            "gtun_peer_tx_packets",
            "Packets sent to the peer through the tunnel (keepalives excluded).",
            labels=PEER_LABELS,
        )
        handshakes = CounterMetricFamily(
            "gtun_peer_handshakes",
            "WireGuard handshakes completed with the peer (sessions established).",
            labels=PEER_LABELS,
        )
        last_handshake = GaugeMetricFamily(
            "gtun_peer_last_handshake_seconds",
            "Unix time of the last completed handshake with the peer; 0 if none yet.",
            labels=PEER_LABELS,
        )
        connected = GaugeMetricFamily(
            "gtun_peer_connected",
            f"1 if the peer's last handshake is less than {CONNECTED_WITHIN:g} s old.",
            labels=PEER_LABELS,
        )
        peer_drops = CounterMetricFamily(
            "gtun_peer_drops",
            "Packets from the peer dropped by the relay, by reason.",
            labels=(*PEER_LABELS, "reason"),
        )
        views = self.peers()
        n_connected = 0
        any_peer_drops = False
        for view in views:
            peer = view.peer
            labels = [view.name, encode_key(peer.public_key)]
            rx_bytes.add_metric(labels, peer.rx_bytes)
            tx_bytes.add_metric(labels, peer.tx_bytes)
            rx_packets.add_metric(labels, peer.rx_packets)
            tx_packets.add_metric(labels, peer.tx_packets)
            handshakes.add_metric(labels, peer.handshakes)
            last = peer.last_handshake
            last_handshake.add_metric(labels, last + wall if last is not None else 0)
            is_connected = last is not None and now - last < CONNECTED_WITHIN
            n_connected += is_connected
            connected.add_metric(labels, 1 if is_connected else 0)
            if view.drops is not None:
                any_peer_drops = True
                counts = dict.fromkeys(PEER_DROP_REASONS, 0)
                counts.update(view.drops)
                for reason, value in counts.items():
                    peer_drops.add_metric([*labels, reason], value)
        yield from (rx_bytes, tx_bytes, rx_packets, tx_packets, handshakes)
        yield from (last_handshake, connected)
        if any_peer_drops:
            yield peer_drops

        yield GaugeMetricFamily("gtun_peers", "Peers configured.", value=len(views))
        yield GaugeMetricFamily(
            "gtun_peers_connected",
            f"Peers whose last handshake is less than {CONNECTED_WITHIN:g} s old.",
            value=n_connected,
        )
        drops = CounterMetricFamily(
            "gtun_drops",
            "Datagrams and packets dropped, by the layer that dropped them and why.",
            labels=("layer", "reason"),
        )
        for layer, layer_drops in self.drop_layers():
            for reason, value in dict(layer_drops).items():  # a copy: the loop counts on
                drops.add_metric([layer, reason], value)
        yield drops
        yield from self.extra()


class RelayCollector(GtunCollector):
    role = "relay"

    def __init__(
        self,
        relay: Relay,
        clock: Callable[[], float],
        tcp_drops: Callable[[], Mapping[str, int]] | None = None,
        pool: WorkerPool | None = None,
        quotas: Callable[[], list[tuple[str, int, int | None, bool]]] | None = None,
    ) -> None:
        super().__init__(relay.wg, clock, relay.drops, tcp_drops)
        self.relay = relay
        self.pool = pool  # the other workers, whose last counters are added
        # (peer, bytes this month, quota or None, disabled for it) of the last traffic
        # fold (Server.quota_rows): kept by the relay, so a scrape reads no store.
        self.quotas = quotas

    def extra(self) -> Iterator[Metric]:
        if self.quotas is None:
            return
        month = GaugeMetricFamily(
            "gtun_peer_month_bytes",
            "Bytes received from and sent to the peer this calendar month (UTC), rx+tx, "
            "as of the last traffic fold (every relay of a shared store).",
            labels=("peer",),
        )
        quota = GaugeMetricFamily(
            "gtun_peer_quota_bytes",
            "The peer's monthly quota in bytes (peers with one only).",
            labels=("peer",),
        )
        over = GaugeMetricFamily(
            "gtun_peer_over_quota",
            "1 if the relay disabled the peer for its monthly quota, else 0.",
            labels=("peer",),
        )
        for name, used, limit, is_over in self.quotas():
            month.add_metric([name], used)
            if limit is not None:
                quota.add_metric([name], limit)
                over.add_metric([name], 1 if is_over else 0)
        yield from (month, quota, over)

    def peers(self) -> list[PeerView]:
        # list() copies the dict in one step: a scrape runs beside the event loop,
        # which may change the peer set meanwhile.
        pool = self.pool
        others = pool.peer_entries() if pool is not None else {}
        views = []
        for peer in list(self.relay.wg.peers.values()):
            mesh = self.relay.is_mesh(peer)
            drops = dict(peer.data.drops)
            counted: Any = peer
            entries = others.get(encode_key(peer.public_key)) if others else None
            if entries:
                assert pool is not None
                session = pool.session_entry(peer.public_key, entries, peer.last_handshake)
                counted = merged_totals(peer.public_key, peer, entries, session)
                for e in entries:
                    for reason, value in (e[DROPS] or {}).items():
                        drops[reason] = drops.get(reason, 0) + value
            name = f"relay {peer.data.name}" if mesh else peer.data.spec.name
            views.append(PeerView(name, counted, drops))
        return views

    def drop_layers(self) -> list[tuple[str, Mapping[str, int]]]:
        layers = super().drop_layers()
        if self.pool is None:
            return layers
        others = self.pool.layer_drops()
        merged: list[tuple[str, Mapping[str, int]]] = []
        for layer, counts in layers:
            total = dict(counts)
            for reason, value in others.pop(layer, {}).items():
                total[reason] = total.get(reason, 0) + value
            merged.append((layer, total))
        merged.extend(others.items())
        return merged


class ClientCollector(GtunCollector):
    role = "client"

    def __init__(
        self,
        core: ClientCore,
        clock: Callable[[], float],
        tcp_drops: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        super().__init__(core.wg, clock, core.drops, tcp_drops)
        self.core = core

    def peers(self) -> list[PeerView]:
        return [PeerView("relay", self.core.server, None)]

    def extra(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gtun_connected",
            "1 while the client is connected to the relay (the relay answers).",
            value=1 if self.core.connected else 0,
        )
        yield GaugeMetricFamily(
            "gtun_configured",
            "1 once the relay has pushed this client's address and routes.",
            value=1 if self.core.config is not None else 0,
        )


def make_registry(collector: GtunCollector) -> CollectorRegistry:
    """A private registry: gtun's collector and the process's own metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)  # process_* from /proc/self, read at scrape
    return registry


# --- the HTTP endpoint -------------------------------------------------------------------


class BadRequest(Exception):
    pass


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


def _response(code: int, body: bytes, *, head_only: bool = False, extra: str = "") -> bytes:
    content_type = CONTENT_TYPE if code == 200 else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def pull_request_line(head: bytes) -> tuple[str, str]:
    """(method, path) of an HTTP/1.x request head.  Raises BadRequest."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("malformed request line") from None
    if not version.startswith("HTTP/1.") or not method.isalpha() or not target:
        raise BadRequest("malformed request line")
    return method, target.split("?", 1)[0]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, up to the blank line.  Raises BadRequest for a
    head over MAX_REQUEST_HEAD or cut short."""
    head = bytearray()
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the reader's limit
            raise BadRequest("request too large") from None
        if not line.endswith(b"\n"):
            raise BadRequest("request cut short")
        head += line
        if len(head) > MAX_REQUEST_HEAD:
            raise BadRequest("request too large")
        if line in (b"\r\n", b"\n"):
            if len(head) == len(line):
                continue  # tolerated: blank lines before the request line (RFC 9112 2.2)
            return bytes(head)


class MetricsServer:
    """Serves `registry` over HTTP on the running event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        config_file: Path | str | None = None,
        key: str = "metrics_listen",
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.config_file = config_file
        self.key = key
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Raises ConfigError when the address cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD, reuse_address=True
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason += " (another program uses this port)"
            raise ConfigError(
                f"cannot serve metrics on TCP {self.host}:{self.port}: {reason}",
                file=self.config_file,
                key=self.key,
            ) from exc

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when 0 was asked for)."""
        assert self._server is not None and self._server.sockets
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._writers.add(writer)
        try:
            try:
                head = await asyncio.wait_for(read_head(reader), READ_TIMEOUT)
                # In a worker thread: a scrape of 10,000 peers takes a while, and the
                # event loop forwards meanwhile (the collectors only read snapshots).
                response = await off_loop(self.respond, head)
            except BadRequest as exc:
                response = _response(400, f"{exc}\n".encode())
            writer.write(response)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, OSError):
            pass  # a silent, slow or vanished client: just close
        finally:
            self._writers.discard(writer)
            writer.close()

    def respond(self, head: bytes) -> bytes:
        """The whole HTTP response to a request head.  Raises BadRequest."""
        method, path = pull_request_line(head)
        if path != "/metrics":
            return _response(404, b"not found: gtun serves /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response(405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
        try:
            body = generate_latest(self.registry)
        except Exception as exc:  # a bug in a collector must not take the endpoint down
            log.error("metrics scrape failed: %s", exc, exc_info=log.isEnabledFor(10))
            return _response(500, b"scrape failed\n")
        return _response(200, body, head_only=method == "HEAD")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()


async def serve_metrics(
    collector: GtunCollector,
    listen: tuple[str, int],
    *,
    config_file: Path | str | None = None,
    key: str = "metrics_listen",
) -> MetricsServer:
    """Start the endpoint for `collector` on `listen`.  Raises ConfigError."""
    server = MetricsServer(
        make_registry(collector), listen[0], listen[1], config_file=config_file, key=key
    )
    await server.start()
    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, port)
    return server
