"""A relay on every core: the relay as several worker processes sharing its port.

Theory of operation
-------------------
The relay daemon (app/server.py) is worker 0: it does everything it does with one
worker (the configuration, the store, the machine's set-up, the control socket,
metrics, `wg show`) and forwards like any worker.  Workers 1..N-1 are processes it
starts (`python -m gtun.app.workers`), each an event loop with its own relay core
(`Relay(worker=, workers=)`), driver and transports:

- **One port, steered.**  The relay binds N UDP sockets to its port with SO_REUSEPORT,
  in worker order, and attaches io/steering.py's program to the group: a response,
  cookie reply or transport message goes to the worker its receiver index names (each
  core allocates indexes that name itself), an initiation to the kernel's hash of its
  source (so handshakes are spread, and a client keeps its worker while it keeps its
  address).  The worker that answers a client's handshake holds its session.  TCP: N
  listeners on the port with SO_REUSEPORT; a connection's worker holds its sessions.
- **One device, N queues.**  The TUN (or TAP) device is opened with IFF_MULTI_QUEUE, a
  queue per worker: the kernel sends a flow's packets to the queue that last wrote
  that flow's, else spreads flows by hash.
- **Handed over, not routed twice.**  A packet for a peer whose session another worker
  holds is handed to that worker over a Unix datagram channel (io/handoff.py), which
  encrypts and sends it; a worker that makes a session tells the others.  TAP mode:
  frames a worker's switch floods are handed to the other workers' switches.
- **Kept by worker 0.**  The relay makes every socket, queue and channel before it
  starts the workers and keeps them open: a worker that dies is started again (after a
  growing pause when it keeps dying) on the same socket of the group, the same queue
  and channels; its peers' next packets reach it with unknown indexes, and it
  handshakes at once with their last endpoints, which worker 0 hands it.
- **One relay to look at.**  Worker 0 sends the peers to every worker at start and on
  each reload, and asks them for their counters (a snapshot: per-peer traffic and
  session, drops, data path counts) for `gtun status`, the metrics and `wg show`,
  which add them up.  The counters of a worker that died are kept.

The control channel between worker 0 and a worker is a Unix stream socket pair;
messages are JSON objects, each after its 4-byte length.  A worker exits when worker 0
says so or the channel closes (the relay is gone), and the kernel kills it when its
parent dies (PR_SET_PDEATHSIG); it ignores SIGTERM, SIGINT and SIGHUP, which a stop or a
Ctrl-C sends the whole process group: worker 0 stops the workers itself.

Not with several workers: a shared store (the relay mesh) and the in-process fake
platform; `effective_workers()` says why a relay runs one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from gtun.app.config import ServerConfig
from gtun.app.keys import decode_key, encode_key
from gtun.app.relaylog import RelayEvents
from gtun.app.uapi import WorkerPeer, uapi_endpoint
from gtun.core.drops import merge_counts
from gtun.core.relay import (
    CapsLearned,
    InitiationSeen,
    PeerSpec,
    Relay,
    RelaySettings,
    SessionHeld,
)
from gtun.core.tunnel import caps_bits, caps_from_bits, pull_health
from gtun.core.wg.events import Event
from gtun.errors import ConfigError
from gtun.io import steering
from gtun.io.driver import Driver
from gtun.io.handoff import Handoff, channel_pair
from gtun.io.tcp import TcpServer, endpoint_transport, forget_endpoint
from gtun.io.transport import endpoint_text
from gtun.io.tun import TunDevice
from gtun.io.udp import UdpTransport

log = logging.getLogger("gtun.app.workers")  # not __main__ when run with -m

START_TIMEOUT = 15.0  # seconds for a worker to say it is ready
SNAPSHOT_TIMEOUT = 2.0  # seconds for a worker's counters
RESTART_FIRST = 0.2  # seconds before a worker that died is started again
RESTART_MAX = 5.0  # the longest pause, for one that keeps dying
STABLE_AFTER = 30.0  # a worker that lived this long starts the pauses afresh
STOP_TIMEOUT = 3.0  # seconds for a worker to exit after it is told
DEFAULT_MAX = 16  # one per core, up to this many, when `workers` is left out
MAX_MESSAGE = 64 * 1024 * 1024  # a control message longer than this is a bug

_LEN = struct.Struct("<I")
PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """One per core this process may run on, at most DEFAULT_MAX."""
    try:
        cores = len(os.sched_getaffinity(0))
    except OSError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, DEFAULT_MAX))


def effective_workers(cfg: ServerConfig, *, real_platform: bool) -> tuple[int, str | None]:
    """How many workers the relay runs, and why only one when it was asked for more."""
    wanted = cfg.workers if cfg.workers is not None else default_workers()
    if wanted <= 1:
        return 1, None
    if cfg.store is not None:
        return 1, "a shared store (several relays) runs one worker per relay"
    if not real_platform:
        return 1, "an in-process relay on a fake platform runs one worker"
    return wanted, None


def bind_listener(
    cfg: ServerConfig, kind: int, *, reuseport: bool = False, port: int | None = None
) -> socket.socket:
    """A socket of `kind` bound to the listen address (its port, or `port`), sharing
    it with others of the same kind when `reuseport`.  Raises ConfigError."""
    host, listen_port = cfg.listen
    port = listen_port if port is None else port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    name = "TCP" if kind == socket.SOCK_STREAM else "UDP"
    sock = socket.socket(family, kind)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            # Restarting while old connections sit in TIME_WAIT must not fail.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {name} {host}:{port}: {exc.strerror}"
            + (" (another program uses this port)" if exc.errno == errno.EADDRINUSE else ""),
            file=cfg.path,
            key="server.listen",
        ) from exc
    return sock


def bind_group(cfg: ServerConfig, kind: int, count: int) -> list[socket.socket]:
    """`count` sockets of `kind` bound to the listen address with SO_REUSEPORT, in
    worker order (the order is the reuseport group's, which steering relies on), the
    UDP group with the steering program.  Raises ConfigError as the relay's single
    socket does."""
    socks: list[socket.socket] = []
    port: int | None = None
    try:
        for _ in range(count):
            sock = bind_listener(cfg, kind, reuseport=True, port=port)
            socks.append(sock)
            port = sock.getsockname()[1]  # a port 0 taken by the first: the others share it
        if kind == socket.SOCK_DGRAM:
            try:
                steering.attach(socks[0], count)
            except OSError as exc:
                raise ConfigError(
                    f"cannot steer UDP datagrams to {count} workers: {exc.strerror}",
                    file=cfg.path,
                    key="server.workers",
                ) from exc
    except ConfigError:
        for sock in socks:
            sock.close()
        raise
    return socks


# --- what crosses the control channel ----------------------------------------------------


async def send_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the channel is closed.  Raises ValueError for a
    malformed one."""
    try:
        head = await reader.readexactly(_LEN.size)
        (length,) = _LEN.unpack(head)
        if length > MAX_MESSAGE:
            raise ValueError(f"a control message of {length} bytes")
        data = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a control message that is not an object")
    return message


def specs_to_json(specs: Iterable[PeerSpec]) -> list[list[Any]]:
    return [
        [
            s.name,
            encode_key(s.public_key),
            str(s.address),
            [str(n) for n in s.subnets],
            str(s.address6) if s.address6 is not None else None,
            encode_key(s.preshared_key) if s.preshared_key is not None else None,
        ]
        for s in specs
    ]


def specs_from_json(data: list[list[Any]]) -> list[PeerSpec]:
    return [
        PeerSpec(
            name=name,
            public_key=decode_key(key),
            address=IPv4Address(address),
            subnets=tuple(ip_network(n) for n in subnets),
            address6=IPv6Address(address6) if address6 is not None else None,
            preshared_key=decode_key(psk) if psk is not None else None,
        )
        for name, key, address, subnets, address6, psk in data
    ]


def settings_to_json(s: RelaySettings) -> dict[str, Any]:
    return {
        "network": str(s.network),
        "relay_address": str(s.relay_address),
        "mtu": s.mtu,
        "routes": [str(r) for r in s.routes],
        "dns": [str(d) for d in s.dns],
        "mode": s.mode,
        "network6": str(s.network6) if s.network6 is not None else None,
        "partial_ok": s.partial_ok,
    }


def settings_from_json(d: dict[str, Any]) -> RelaySettings:
    network6 = d["network6"]
    return RelaySettings(
        network=ip_network(d["network"]),  # type: ignore[arg-type]
        relay_address=IPv4Address(d["relay_address"]),
        mtu=d["mtu"],
        routes=tuple(ip_network(r) for r in d["routes"]),
        dns=tuple(ip_address(a) for a in d["dns"]),
        mode=d["mode"],
        network6=IPv6Network(network6) if network6 is not None else None,
        partial_ok=d["partial_ok"],
    )


# --- counters -------------------------------------------------------------------------

# A peer's entry in a snapshot, by position.
RX_BYTES, TX_BYTES, RX_PACKETS, TX_PACKETS, HANDSHAKES = range(5)
LAST_HANDSHAKE, ENDPOINT, TRANSPORT, IS_GTUN, PATH_MTU, DROPS, UDP_ENDPOINT = range(5, 12)
UAPI_ENDPOINT = 12
WORKER = 13  # added by WorkerPool.peer_entries(): the worker's index (-1: retired)


def snapshot(relay: Relay, driver: Driver, tcp: TcpServer | None) -> dict[str, Any]:
    """A worker's counters: every peer it has seen anything of, its drops, its data path."""
    peers: dict[str, list[Any]] = {}
    for peer in list(relay.wg.peers.values()):
        if relay.is_mesh(peer):
            continue
        drops = peer.data.drops
        if not (peer.rx_bytes or peer.tx_bytes or peer.handshakes or drops):
            continue
        endpoint = peer.endpoint
        peers[encode_key(peer.public_key)] = [
            peer.rx_bytes,
            peer.tx_bytes,
            peer.rx_packets,
            peer.tx_packets,
            peer.handshakes,
            peer.last_handshake,
            endpoint_text(endpoint),
            endpoint_transport(endpoint),
            peer.data.is_gtun,
            peer.data.path_mtu,
            dict(drops),
            list(endpoint) if isinstance(endpoint, tuple) else None,
            uapi_endpoint(endpoint),
        ]
    tcp_counts = tcp.counts if tcp is not None else {}
    drops = merge_counts(relay.wg.drops, relay.drops, tcp_counts)
    return {
        "peers": peers,
        "drops": drops,
        "layers": {"wireguard": relay.wg.drops, "relay": relay.drops, "tcp": tcp_counts},
        "datapath": driver.datapath(),
        "tcp_connections": len(tcp.connections) if tcp is not None else 0,
    }


@dataclass
class Totals:
    """A peer's counters over the workers, as the metrics read a peer."""

    public_key: bytes
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    handshakes: int = 0
    last_handshake: float | None = None


def add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for reason, value in counts.items():
        if isinstance(value, int) and not isinstance(value, bool):
            into[reason] = into.get(reason, 0) + value


# --- worker 0's side ------------------------------------------------------------------


class _Worker:
    """Worker 0's handle on worker `index`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.started = 0.0
        self.pause = RESTART_FIRST
        self.restarts = 0
        self.latest: dict[str, Any] = {}  # its last snapshot
        self.waiting: list[asyncio.Future[dict[str, Any]]] = []
        self.task: asyncio.Task[None] | None = None


class WorkerPool:
    """Workers 1..N-1 of a relay, started, watched and restarted by worker 0."""

    def __init__(
        self,
        workers: int,
        udp: list[socket.socket],
        tcp: list[socket.socket],
        tuns: list[TunDevice],
        channels: dict[tuple[int, int], socket.socket],
        private_key: bytes,
        offload: bool,
    ) -> None:
        """`settings` is set before start()."""
        self.count = workers
        self.udp = udp
        self.tcp = tcp
        self.tuns = tuns
        # channels[(a, b)]: worker a's end of its channel to worker b.
        self.channels = channels
        self.private_key = private_key
        self.settings: RelaySettings | None = None
        self.offload = offload
        self.specs: list[PeerSpec] = []
        self.workers = {k: _Worker(k) for k in range(1, workers)}
        self.stopping = False
        self.holder: dict[bytes, int] = {}  # the worker each peer's newest session is at
        self.caps: dict[bytes, int] = {}  # what each gtun client negotiated (caps_bits)
        # Per peer: the UDP endpoint and time of the newest session a worker said it
        # holds (saved before the next snapshot brings it).
        self.noted: dict[bytes, tuple[tuple[Any, ...], float]] = {}
        # Counters of workers that died: per peer, and the relay's drops.
        self.retired: dict[str, list[Any]] = {}
        self.retired_drops: dict[str, int] = {}
        self.retired_layers: dict[str, dict[str, int]] = {}
        self.health: dict[str, Any] | None = None  # the last health payload sent
        self._sending: set[asyncio.Task[None]] = set()

    @staticmethod
    def channels_for(workers: int) -> dict[tuple[int, int], socket.socket]:
        channels: dict[tuple[int, int], socket.socket] = {}
        for a in range(workers):
            for b in range(a + 1, workers):
                channels[(a, b)], channels[(b, a)] = channel_pair()
        return channels

    def ends_of(self, worker: int) -> dict[int, socket.socket]:
        """Worker `worker`'s ends of its channels, by the worker at the other end."""
        return {b: sock for (a, b), sock in self.channels.items() if a == worker}

    async def start(self, specs: list[PeerSpec]) -> None:
        """Start every worker and wait until each is ready.  Raises RuntimeError."""
        self.specs = list(specs)
        for worker in self.workers.values():
            await self._spawn(worker)
        for worker in self.workers.values():
            try:
                await asyncio.wait_for(worker.ready.wait(), START_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(f"worker {worker.index} did not start") from None

    async def _spawn(self, worker: _Worker, endpoints: dict[str, list[Any]] | None = None) -> None:
        k = worker.index
        assert self.settings is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ends = self.ends_of(k)
        fds = {
            "control": theirs.fileno(),
            "udp": self.udp[k].fileno(),
            "tcp": self.tcp[k].fileno(),
            "tun": self.tuns[k].fileno(),
            "channels": {str(b): s.fileno() for b, s in ends.items()},
        }
        pass_fds = [theirs.fileno(), self.udp[k].fileno(), self.tcp[k].fileno()]
        pass_fds += [self.tuns[k].fileno(), *(s.fileno() for s in ends.values())]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gtun.app.workers",
                "--worker",
                str(k),
                "--fds",
                json.dumps(fds),
                "--parent",
                str(os.getpid()),
                pass_fds=pass_fds,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        worker.proc = proc
        worker.started = time.monotonic()
        worker.ready.clear()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker.writer = writer
        tun = self.tuns[k]
        await send_message(
            writer,
            {
                "op": "start",
                "workers": self.count,
                "private_key": encode_key(self.private_key),
                "settings": settings_to_json(self.settings),
                "specs": specs_to_json(self.specs),
                "offload": self.offload,
                "tun": {"name": tun.name, "tap": tun.tap, "vnet": tun.vnet},
                "debug": logging.getLogger("gtun").getEffectiveLevel() <= logging.DEBUG,
                "rejoin": endpoints or {},
                "health": self.health,
                # Where the other workers' sessions are: packets to those peers go there.
                "held": {encode_key(key): w for key, w in self.holder.items() if w != k},
                "caps": {encode_key(key): bits for key, bits in self.caps.items()},
            },
        )
        worker.task = asyncio.ensure_future(self._listen(worker, reader, proc))

    async def _listen(
        self, worker: _Worker, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process
    ) -> None:
        """A worker's messages until its channel closes; then, unless the relay is
        stopping, it is started again."""
        try:
            while True:
                try:
                    message = await read_message(reader)
                except ValueError as exc:
                    log.error("worker %d sent a malformed message: %s", worker.index, exc)
                    break
                if message is None:
                    break
                op = message.get("op")
                if op == "ready":
                    worker.ready.set()
                    log.debug("worker %d ready (pid %d)", worker.index, proc.pid)
                elif op == "held":
                    self._note_endpoint(message)
                elif op == "snapshot":
                    worker.latest = message
                    waiting, worker.waiting = worker.waiting, []
                    for fut in waiting:
                        if not fut.done():
                            fut.set_result(message)
        finally:
            code = await proc.wait()
            for fut in worker.waiting:
                if not fut.done():
                    fut.cancel()
            worker.waiting = []
            if worker.writer is not None:
                worker.writer.close()
                worker.writer = None
        if self.stopping:
            return
        await self._restart(worker, code)

    async def _restart(self, worker: _Worker, code: int) -> None:
        lived = time.monotonic() - worker.started
        if lived >= STABLE_AFTER:
            worker.pause = RESTART_FIRST
        how = f"signal {-code}" if code < 0 else f"code {code}"
        log.warning(
            "worker %d exited (%s) after %.1f s; starting it again in %.1f s",
            worker.index,
            how,
            lived,
            worker.pause,
        )
        # Its counters stay counted; its peers are handshaken anew where they were.
        latest = worker.latest
        endpoints: dict[str, list[Any]] = {}
        for key, entry in latest.get("peers", {}).items():
            kept = self.retired.setdefault(key, [0, 0, 0, 0, 0])
            for i in range(HANDSHAKES + 1):
                kept[i] += entry[i]
            raw = decode_key(key)
            if self.holder.get(raw) == worker.index and entry[UDP_ENDPOINT] is not None:
                endpoints[key] = entry[UDP_ENDPOINT]
        add_counts(self.retired_drops, latest.get("drops", {}))
        for layer, counts in latest.get("layers", {}).items():
            add_counts(self.retired_layers.setdefault(layer, {}), counts)
        worker.latest = {}
        await asyncio.sleep(worker.pause)
        worker.pause = min(worker.pause * 2, RESTART_MAX)
        if self.stopping:
            return
        worker.restarts += 1
        try:
            await self._spawn(worker, endpoints)
        except OSError as exc:
            log.error("worker %d could not be started again: %s", worker.index, exc)

    def noticed(self, worker: int, kind: str, key: bytes, value: Any) -> None:
        """A notice worker `worker` sent worker 0: kept for a worker started later."""
        if kind == "held":
            self.holder[key] = worker
        elif kind == "caps" and isinstance(value, int):
            self.caps[key] = value

    def noticed_here(self, event: Event) -> None:
        """An event of worker 0's own that the other workers were told of."""
        if isinstance(event, SessionHeld):
            self.holder[event.peer.public_key] = 0
        elif isinstance(event, CapsLearned):
            self.caps[event.peer.public_key] = caps_bits(event.caps)

    async def set_peers(self, specs: list[PeerSpec]) -> None:
        """Every worker's peers become `specs` (a reload)."""
        self.specs = list(specs)
        keys = {spec.public_key for spec in specs}
        self.noted = {k: v for k, v in self.noted.items() if k in keys}
        self.holder = {k: v for k, v in self.holder.items() if k in keys}
        self.caps = {k: v for k, v in self.caps.items() if k in keys}
        await self._send_all({"op": "peers", "specs": specs_to_json(self.specs)})

    def _note_endpoint(self, message: dict[str, Any]) -> None:
        try:
            key = decode_key(message["key"])
            since = float(message["since"])
            endpoint = tuple(message["endpoint"])
        except (KeyError, TypeError, ValueError):
            return
        had = self.noted.get(key)
        if had is None or since >= had[1]:
            self.noted[key] = (endpoint, since)

    def rejoin_elsewhere(self, endpoints: dict[bytes, tuple[Any, ...]]) -> dict[bytes, Any]:
        """Give each worker the stored endpoints of its share of the peers (by key) to
        handshake with; worker 0's share is returned."""
        shares: dict[int, dict[str, list[Any]]] = {}
        mine: dict[bytes, Any] = {}
        for key, endpoint in endpoints.items():
            k = int.from_bytes(key[:4], "little") % self.count
            if k == 0:
                mine[key] = endpoint
            else:
                shares.setdefault(k, {})[encode_key(key)] = list(endpoint)
        for k, share in shares.items():
            message = {"op": "rejoin", "endpoints": share}
            task = asyncio.ensure_future(self._send(self.workers[k], message))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return mine

    async def _send(self, worker: _Worker, message: dict[str, Any]) -> None:
        """`message` to a worker, unless it has no channel (being started again)."""
        if worker.writer is not None:
            with contextlib.suppress(ConnectionError):
                await send_message(worker.writer, message)

    async def _send_all(self, message: dict[str, Any]) -> None:
        for worker in self.workers.values():
            await self._send(worker, message)

    async def set_health(self, payload: dict[str, Any]) -> None:
        """What worker 0 saw of the machine, for every worker's health answers."""
        self.health = payload
        await self._send_all({"op": "health", "health": payload})

    async def refresh(self) -> None:
        """Ask every live worker for its counters and wait (SNAPSHOT_TIMEOUT at most):
        a worker that does not answer keeps its last snapshot."""
        futures = []
        loop = asyncio.get_running_loop()
        for worker in self.workers.values():
            if worker.writer is None or not worker.ready.is_set():
                continue
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            worker.waiting.append(fut)
            futures.append(fut)
            await self._send(worker, {"op": "snapshot"})
        if futures:
            await asyncio.wait(futures, timeout=SNAPSHOT_TIMEOUT)

    def peer_entries(self) -> dict[str, list[list[Any]]]:
        """Every worker's entries per peer (key text -> entries), the retired first."""
        out: dict[str, list[list[Any]]] = {}
        for key, kept in self.retired.items():
            out.setdefault(key, []).append(
                [*kept, None, None, None, False, None, {}, None, None, -1]
            )
        for worker in self.workers.values():
            for key, entry in worker.latest.get("peers", {}).items():
                out.setdefault(key, []).append([*entry, worker.index])
        return out

    def session_entry(
        self, key: bytes, entries: list[list[Any]], own_last: float | None
    ) -> list[Any] | None:
        """Whose session fields (endpoint, handshake) a peer shows: the entry of the
        worker holding its session, or None for worker 0's own.  Not the newest
        handshake: a replayed initiation answered by another worker is newer, and never
        used.  A peer no worker holds yet: the newest handshake's."""
        holder = self.holder.get(key)
        if holder == 0:
            return None
        if holder is not None:
            return next((e for e in entries if e[WORKER] == holder), None)
        newest, best = own_last, None
        for e in entries:
            last = e[LAST_HANDSHAKE]
            if last is not None and (newest is None or last > newest):
                newest, best = last, e
        return best

    def wg_peers(self) -> dict[bytes, list[WorkerPeer]]:
        """Every worker's bytes, handshake and endpoint per peer, for `wg show`."""
        out: dict[bytes, list[WorkerPeer]] = {}
        for key, entries in self.peer_entries().items():
            raw = decode_key(key)
            session = self.session_entry(raw, entries, None)
            out[raw] = [
                WorkerPeer(
                    e[RX_BYTES], e[TX_BYTES], e[LAST_HANDSHAKE], e[UAPI_ENDPOINT], e is session
                )
                for e in entries
            ]
        return out

    def endpoints(self) -> dict[bytes, tuple[tuple[Any, ...], float]]:
        """Per peer, the UDP endpoint of the workers' newest session with it and when
        that session was made (to be saved for the next start's rejoin)."""
        out: dict[bytes, tuple[tuple[Any, ...], float]] = dict(self.noted)
        for worker in self.workers.values():
            for key, e in worker.latest.get("peers", {}).items():
                last, endpoint = e[LAST_HANDSHAKE], e[UDP_ENDPOINT]
                if last is None or endpoint is None:
                    continue
                raw = decode_key(key)
                had = out.get(raw)
                if had is None or last > had[1]:
                    out[raw] = (tuple(endpoint), last)
        return out

    def drops(self) -> dict[str, int]:
        total = dict(self.retired_drops)
        for worker in self.workers.values():
            add_counts(total, worker.latest.get("drops", {}))
        return total

    def layer_drops(self) -> dict[str, dict[str, int]]:
        """The workers' drops per counting layer (wireguard, relay, tcp), summed."""
        total: dict[str, dict[str, int]] = {}
        for layer, counts in self.retired_layers.items():
            add_counts(total.setdefault(layer, {}), counts)
        for worker in self.workers.values():
            for layer, counts in worker.latest.get("layers", {}).items():
                add_counts(total.setdefault(layer, {}), counts)
        return total

    def datapath(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for worker in self.workers.values():
            add_counts(total, worker.latest.get("datapath", {}))
        return total

    def tcp_connections(self) -> int:
        return sum(w.latest.get("tcp_connections", 0) for w in self.workers.values())

    def describe(self) -> list[dict[str, Any]]:
        """Each worker: index, pid, alive, restarts."""
        out = []
        for worker in self.workers.values():
            proc = worker.proc
            alive = proc is not None and proc.returncode is None
            out.append(
                {
                    "worker": worker.index,
                    "pid": proc.pid if proc is not None else None,
                    "alive": alive,
                    "restarts": worker.restarts,
                }
            )
        return out

    async def stop(self) -> None:
        """Tell every worker to stop, and kill those that do not within STOP_TIMEOUT."""
        self.stopping = True
        procs = []
        for worker in self.workers.values():
            if worker.writer is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await send_message(worker.writer, {"op": "stop"})
            if worker.proc is not None and worker.proc.returncode is None:
                procs.append(worker.proc)
        if procs:
            done = asyncio.gather(*(p.wait() for p in procs))
            try:
                await asyncio.wait_for(asyncio.shield(done), STOP_TIMEOUT)
            except TimeoutError:
                for p in procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
                await done
        for worker in self.workers.values():
            if worker.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(worker.task, 1.0)

    def close(self) -> None:
        """Close what worker 0 kept for the workers (after stop())."""
        for k in range(1, self.count):
            self.udp[k].close()
            self.tcp[k].close()
            self.tuns[k].close()
        for (a, _), sock in self.channels.items():
            if a != 0:
                sock.close()


def merge_peer(
    entry: dict[str, Any], entries: list[list[Any]], wall: float, session: list[Any] | None
) -> None:
    """Add the workers' `entries` for one peer to its status `entry` (worker 0's): the
    counters summed; the session (endpoint, transport, last handshake, path MTU) from
    `session` (WorkerPool.session_entry(); None: worker 0's, as it is)."""
    if session is not None and session[LAST_HANDSHAKE] is not None:
        entry["endpoint"] = session[ENDPOINT]
        entry["transport"] = session[TRANSPORT]
        entry["last_handshake"] = session[LAST_HANDSHAKE] + wall
        if session[PATH_MTU] is not None:
            entry["path_mtu"] = session[PATH_MTU]
    for e in entries:
        entry["rx_bytes"] += e[RX_BYTES]
        entry["tx_bytes"] += e[TX_BYTES]
        entry["rx_packets"] += e[RX_PACKETS]
        entry["tx_packets"] += e[TX_PACKETS]
        if e[IS_GTUN]:
            entry["kind"] = "gtun"
        drops = entry["drops"]
        add_counts(drops, e[DROPS] or {})


def merged_totals(
    key: bytes, own: Any, entries: list[list[Any]], session: list[Any] | None
) -> Totals:
    """A peer's counters over worker 0 (`own`, its wg Peer) and the others' entries; its
    last handshake `session`'s (WorkerPool.session_entry(); None: worker 0's)."""
    t = Totals(
        key,
        own.rx_bytes,
        own.tx_bytes,
        own.rx_packets,
        own.tx_packets,
        own.handshakes,
        own.last_handshake,
    )
    for e in entries:
        t.rx_bytes += e[RX_BYTES]
        t.tx_bytes += e[TX_BYTES]
        t.rx_packets += e[RX_PACKETS]
        t.tx_packets += e[TX_PACKETS]
        t.handshakes += e[HANDSHAKES]
    if session is not None and session[LAST_HANDSHAKE] is not None:
        t.last_handshake = session[LAST_HANDSHAKE]
    return t


def announce(handoff: Handoff, event: Event) -> None:
    """Tell the other workers what they must know of a relay event: a session held
    here, an initiation accepted here, a client's capabilities."""
    if isinstance(event, SessionHeld):
        handoff.announce(event.peer.public_key, event.since)
    elif isinstance(event, InitiationSeen):
        handoff.announce_initiation(event.peer.public_key, event.timestamp)
    elif isinstance(event, CapsLearned):
        handoff.announce_caps(event.peer.public_key, caps_bits(event.caps))


def apply_notice(relay: Relay, worker: int, kind: str, key: bytes, value: Any) -> None:
    """What another worker told this one (io/handoff.py's notices), into the core."""
    if kind == "held":
        relay.held_by(key, worker, value)
    elif kind == "initiation":
        relay.seen_initiation(key, value)
    elif kind == "caps":
        relay.learned_caps(key, caps_from_bits(value))


# --- a worker's side ------------------------------------------------------------------


class Worker:
    """Worker `index` of a relay: a relay core on its own socket, TCP listener, queue
    of the device and channels, told what to do by worker 0."""

    def __init__(self, index: int, fds: dict[str, Any]) -> None:
        self.index = index
        self.fds = fds
        self.relay: Relay | None = None
        self.driver: Driver | None = None
        self.tcp: TcpServer | None = None
        self.handoff: Handoff | None = None
        self.events = RelayEvents()
        self.writer: asyncio.StreamWriter | None = None  # the control channel
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        control = socket.socket(fileno=self.fds["control"])
        reader, writer = await asyncio.open_unix_connection(sock=control)
        self.writer = writer
        start = await read_message(reader)
        if start is None or start.get("op") != "start":
            return
        # Worker 0 says when to stop (a "stop", or its channel closing; the kernel kills
        # a worker whose relay died): a Ctrl-C or `systemctl stop` reaching the whole
        # process group must not end workers that worker 0 would then start again.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        if start.get("debug"):
            logging.getLogger("gtun").setLevel(logging.DEBUG)
        settings = settings_from_json(start["settings"])
        workers = start["workers"]
        relay = Relay(
            decode_key(start["private_key"]),
            settings,
            wall_offset=time.time() - loop.time(),
            worker=self.index,
            workers=workers,
        )
        relay.set_peers(specs_from_json(start["specs"]))
        self.relay = relay
        driver = Driver(relay, loop, self.on_event)
        self.driver = driver
        udp = socket.socket(fileno=self.fds["udp"])
        driver.attach(UdpTransport(udp, loop, batching=start["offload"]))
        tcp = TcpServer(loop, lambda ep: forget_endpoint(relay.wg.peers.values(), ep))
        self.tcp = tcp
        driver.attach(tcp)
        await tcp.start(socket.socket(fileno=self.fds["tcp"]))
        t = start["tun"]
        tun = TunDevice(self.fds["tun"], t["name"], t["tap"], vnet=t["vnet"])
        driver.attach_tun(tun)
        channels = {int(b): socket.socket(fileno=fd) for b, fd in self.fds["channels"].items()}
        handoff = Handoff(
            self.index,
            channels,
            loop,
            lambda w, key, items: relay.handed(w, key, items, loop.time()),
            lambda w, kind, key, value: apply_notice(relay, w, kind, key, value),
            driver.after,
        )
        self.handoff = handoff
        driver.handoff = handoff
        for key, holder in start.get("held", {}).items():
            with contextlib.suppress(ValueError):
                relay.held_by(decode_key(key), holder, 0.0)
        for key, bits in start.get("caps", {}).items():
            with contextlib.suppress(ValueError, TypeError):
                relay.learned_caps(decode_key(key), caps_from_bits(bits))
        self._rejoin(start.get("rejoin"))
        self._health(start.get("health"))
        driver.poke()
        await send_message(writer, {"op": "ready"})
        try:
            await self._listen(reader, writer)
        finally:
            self.events.close()
            handoff.close()
            driver.close()
            tcp.close()
            tun.close()
            writer.close()

    async def _listen(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay, driver = self.relay, self.driver
        assert relay is not None and driver is not None
        while True:
            message = await read_message(reader)
            if message is None:
                return  # the relay is gone
            op = message.get("op")
            if op == "stop":
                return
            if op == "peers":
                try:
                    relay.set_peers(specs_from_json(message["specs"]))
                except Exception as exc:  # worker 0 applied the same set: a bug
                    log.error("peers not applied: %s", exc)
                driver.poke()
            elif op == "snapshot":
                await send_message(writer, {"op": "snapshot", **snapshot(relay, driver, self.tcp)})
            elif op == "health":
                self._health(message.get("health"))
            elif op == "rejoin":
                self._rejoin(message.get("endpoints"))
                driver.poke()

    def _rejoin(self, endpoints: Any) -> None:
        """Handshake with peers at their last endpoints (key text -> address list)."""
        if self.relay is None or not isinstance(endpoints, dict):
            return
        rejoin: dict[bytes, Any] = {}
        for key, endpoint in endpoints.items():
            with contextlib.suppress(ValueError, TypeError):
                rejoin[decode_key(key)] = tuple(endpoint)
        if rejoin:
            queued = self.relay.rejoin(rejoin, asyncio.get_running_loop().time())
            log.info("handshaking with %d peers at their last endpoints", queued)

    def _health(self, payload: Any) -> None:
        """Worker 0's look at the machine, answered to this worker's clients."""
        if self.relay is None or not isinstance(payload, dict):
            return
        try:
            health = pull_health(payload)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("a health snapshot it cannot read: %s", exc)
            return
        self.relay.set_health(health, asyncio.get_running_loop().time())

    def on_event(self, event: Event) -> None:
        if isinstance(event, InitiationSeen | CapsLearned):
            if self.handoff is not None:
                announce(self.handoff, event)
            return
        if isinstance(event, SessionHeld):
            if self.handoff is not None:
                announce(self.handoff, event)
            endpoint = event.peer.endpoint
            if self.writer is not None and isinstance(endpoint, tuple):
                # Worker 0 saves it for the next start's rejoin (snapshots come later).
                message = {
                    "op": "held",
                    "key": encode_key(event.peer.public_key),
                    "since": event.since,
                    "endpoint": list(endpoint),
                }
                task = asyncio.ensure_future(send_message(self.writer, message))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            return
        relay = self.relay
        peer = getattr(event, "peer", None)
        if peer is not None and relay is not None and relay.is_mesh(peer):
            return
        self.events.on_event(event)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gtun relay worker")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    if os.getppid() != args.parent:
        return 1  # the relay died before we could ask to die with it
    from gtun.app.logs import setup_logging

    setup_logging(False, "server")
    prefix = f"worker {args.worker}: "

    def said_by_worker(record: logging.LogRecord) -> bool:
        # Every line of this process says which worker it is, in the journal too.
        record.msg = prefix + str(record.msg)
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(said_by_worker)
    worker = Worker(args.worker, json.loads(args.fds))
    try:
        asyncio.run(worker.run())
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
