"""`gtun server`: the relay's edge.  Wires the sans-IO Relay to a UDP socket, a TUN
device, netlink, nftables, the state store and the control socket; undoes all of its
network changes on exit.  Every FOLD_INTERVAL (and at stop) it folds the peers' counters
into the store's traffic history and enforces their monthly quotas (app/traffic.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_network,
)
from pathlib import Path
from typing import Any

from gtun.app.background import off_loop
from gtun.app.config import ServerConfig, load_server_config
from gtun.app.control import ControlServer
from gtun.app.keys import decode_key, encode_key
from gtun.app.metrics import RelayCollector, serve_metrics
from gtun.app.peerset import (
    PeerSet,
    open_state,
    publish_config_peers,
    read_peers,
    refused_lines,
)
from gtun.app.pgstore import LiveRow, PgStore, StoreUnavailable, StoreWatch
from gtun.app.platform import Device, Link, LinuxPlatform, Platform
from gtun.app.relaylog import RelayEvents
from gtun.app.runtime import Runtime, peer_traffic
from gtun.app.store import Store
from gtun.app.traffic import QUOTA_REASON, Quotas, enforce_quotas, fold
from gtun.app.uapi import relay_answer, start_uapi, udp_port
from gtun.app.workers import (
    WorkerPool,
    announce,
    apply_notice,
    bind_group,
    bind_listener,
    effective_workers,
    merge_peer,
)
from gtun.core.drops import merge_counts
from gtun.core.l2frame import mac_for_key
from gtun.core.relay import (
    CapsLearned,
    InitiationSeen,
    MeshError,
    MeshRelay,
    Network,
    PeerSetError,
    PeerSpec,
    Relay,
    RelaySettings,
    SessionHeld,
    SessionHere,
)
from gtun.core.tunnel import RelayHealth, health_payload
from gtun.core.wg import HandshakeCompleted, HandshakeTimedOut
from gtun.core.wg.constants import REJECT_AFTER_TIME
from gtun.core.wg.events import Event
from gtun.errors import ConfigError, GtunError, RuntimeFailure
from gtun.io.driver import Driver
from gtun.io.handoff import Handoff
from gtun.io.tcp import TcpServer, endpoint_transport, forget_endpoint
from gtun.io.transport import endpoint_text
from gtun.io.udp import UdpTransport
from gtun.system import journal
from gtun.system.malloc import keep_heap
from gtun.system.nft import table_name

log = logging.getLogger("gtun")

ENDPOINT_SAVE_INTERVAL = 1.0  # seconds between looks for peers' new UDP endpoints
STATUS_CHUNK = 500  # peers described between two yields to the event loop
ANNOUNCED_PEERS = 100  # peers named one a line at start; more are counted
PRESENCE_INTERVAL = 10.0  # seconds between heartbeats of the sessions held (shared store)
PRESENCE_TTL = 3 * PRESENCE_INTERVAL  # how long a heartbeat says a session is here
PRESENCE_RECENT = 180.0  # seconds since a peer's last packet for its session to count
HEALTH_INTERVAL = 5.0  # seconds between looks at the relay's own machine (health answers)
WORKER_REFRESH = 2.0  # seconds between looks at the other workers' counters (metrics)
FOLD_INTERVAL = 10.0  # seconds between folds of the peers' counters into the store
MESH_UP_WITHIN = REJECT_AFTER_TIME  # a mesh session is up with a handshake this recent


def bind_udp(cfg: ServerConfig) -> socket.socket:
    return bind_listener(cfg, socket.SOCK_DGRAM)


def bind_tcp(cfg: ServerConfig) -> socket.socket:
    """The TCP listener on the same host and port as UDP.  Raises ConfigError."""
    return bind_listener(cfg, socket.SOCK_STREAM)


class Server:
    """The relay daemon.  `platform` is what it changes on the machine (the real one
    unless a test gives gtun.testing.platform's fake)."""

    def __init__(self, cfg: ServerConfig, platform: Platform | None = None) -> None:
        self.cfg = cfg
        self.platform: Platform = platform if platform is not None else LinuxPlatform()
        self.rt = Runtime("relay", cfg.device, cfg.public_key)
        self.stop = self.rt.stop
        self.relay: Relay | None = None
        self.driver: Driver | None = None
        self.tcp: TcpServer | None = None
        self.link: Link | None = None
        self.subnet_routes: set[Any] = set()
        self.events = RelayEvents()  # what is said of the clients' events
        self.handoff: Handoff | None = None  # the channels to the other workers, if any
        self.pool: WorkerPool | None = None  # the other workers (app/workers.py), if any
        # How many processes share the port (worker 0 is this one), and why one only.
        self.workers, self.workers_why = effective_workers(
            cfg, real_platform=isinstance(self.platform, LinuxPlatform)
        )
        self._refresh_task: asyncio.Task[None] | None = None
        # Peers' UDP endpoints as the store has them (key -> text), and the task saving them.
        self._saved_endpoints: dict[bytes, str] = {}
        self._seen_endpoints: dict[bytes, Any] = {}  # the endpoint at the last look
        self._endpoint_task: asyncio.Task[None] | None = None
        self.refused: list[str] = []  # peers the full address pool left out
        self._reloading = asyncio.Lock()  # one reload at a time
        # The shared store (PostgreSQL): whether it answers (None until the watch first
        # reports), and the reloads its notifications ask for, coalesced.
        self.store_up: bool | None = None
        self._watch: StoreWatch | None = None
        self._reload_wanted = False
        self._reload_task: asyncio.Task[None] | None = None
        self._next_heartbeat = 0.0  # loop time of the next presence heartbeat
        # The next heartbeat tells every relay (NOTIFY): sessions that came here while
        # the store was away were claimed in no presence row the others read.
        self._announce_held = False
        # The mesh (shared store): re-reads of the relays and the presence, coalesced.
        self._mesh_wanted = False
        self._mesh_task: asyncio.Task[None] | None = None
        self._mesh_said: str | None = None  # the last mesh refusal logged
        self._presence_tasks: set[asyncio.Task[None]] = set()
        self.health_interval = HEALTH_INTERVAL
        self._health_said: str | None = None  # the last failure to look, logged once
        # Traffic history (app/traffic.py): the counters at the last written fold, the
        # last failure (logged once per run of failures), and for metrics (no store
        # access in a scrape) each peer's bytes this month and quota at the last fold.
        self.fold_interval = FOLD_INTERVAL
        self._fold_last: dict[str, tuple[int, int]] = {}
        self._fold_said: str | None = None
        self._fold_lock = asyncio.Lock()
        self.month_bytes: dict[str, int] = {}  # peer name -> rx+tx this month (UTC)
        self.quotas: dict[str, tuple[int, bool]] = {}  # name -> (quota, disabled for it)

    # --- life cycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped; then undo everything, whatever failed on the way."""
        rt = self.rt
        try:
            specs, (sock, tcp_sock), tun = self._open()
            driver = await self._start(specs, sock, tcp_sock, tun)
            await self._configure_device(tun, specs)
            driver.attach_tun(tun)
            if self.pool is not None:
                await self._start_workers(specs)
            self._configure_host(tun)
            self._keep_health()
            self._rejoin()
            control = ControlServer(
                self.cfg.control_socket, self.on_control, config_file=self.cfg.path
            )
            await control.start()
            rt.push("control socket", control.close)
            if self.cfg.console_listen is not None:
                from gtun.app.console import start_console

                console = await start_console(self)
                rt.push("web console", console.close)
            if self.cfg.uapi:
                uapi_dir = self.platform.wg_socket_dir()
                await start_uapi(rt.push, uapi_dir, self.cfg.device, self.wg_get)
            rt.handle_signals(reload=self.reload)
            self._watch_store()
            self._keep_traffic()
            self._announce(tun, specs)
            rt.serving(self._describe)
            # What start-up built lives as long as the relay: out of the collector's
            # sight, so that a full collection (during a reload of 10,000 peers, say)
            # does not walk it all while the event loop waits.
            gc.freeze()
            driver.poke()
            await rt.stop.wait()
            log.info("stopping")
        finally:
            await rt.unwind()

    async def _start_workers(self, specs: list[PeerSpec]) -> None:
        """Workers 1..N-1 (app/workers.py), stopped before the device closes."""
        pool = self.pool
        assert pool is not None
        self.rt.push("workers", pool.stop)
        try:
            await pool.start(specs)
        except (OSError, RuntimeError) as exc:
            raise RuntimeFailure(f"relay workers: {exc}") from exc
        self._refresh_task = asyncio.ensure_future(self._refresh_workers())
        self.rt.push("worker counters", self._refresh_task.cancel)
        log.info("%d workers share %s:%d", pool.count, *self.cfg.listen)

    async def _refresh_workers(self) -> None:
        """The workers' counters, fresh for a metrics scrape (status asks anew)."""
        assert self.pool is not None
        while True:
            await asyncio.sleep(WORKER_REFRESH)
            await self.pool.refresh()

    def _open(self) -> tuple[list[PeerSpec], tuple[socket.socket, socket.socket], Device]:
        """The peers, the bound UDP and TCP sockets and the device, in an order where
        any failure leaves nothing open.  Raises ConfigError or RuntimeFailure."""
        cfg, rt = self.cfg, self.rt
        # What a killed run left (forwarding on, its NAT table) goes first, so that
        # the values found below are the host's own.
        self.platform.recover_host(journal.host_journal_path(cfg.state_dir, cfg.path))
        store = open_state(cfg)
        rt.push("state store", store.close)
        self.store = store
        peerset = read_peers(cfg, store)  # a clash refused before anything is published
        publish_config_peers(cfg, store)
        self._note_refused(cfg, peerset)
        specs = peerset.specs
        if self.workers > 1:
            return specs, *self._open_workers()
        sock = bind_udp(cfg)
        try:
            tcp_sock = bind_tcp(cfg)
        except ConfigError:
            sock.close()
            raise
        # The device before the relay: whether it completes TCP checksums (offloads
        # granted) is part of what the relay offers its clients.
        try:
            tun = self.platform.open_tun(cfg.device, tap=cfg.mode == "tap", offload=cfg.offload)
        except GtunError:
            sock.close()
            tcp_sock.close()
            raise
        rt.push(f"device {cfg.device}", tun.close)
        return specs, (sock, tcp_sock), tun

    def _open_workers(self) -> tuple[tuple[socket.socket, socket.socket], Device]:
        """_open() for several workers: a socket of the UDP and of the TCP group and a
        queue of the device for each, and the channels between them, all kept here (the
        workers' by the pool, which closes them at the end)."""
        cfg, rt, n = self.cfg, self.rt, self.workers
        udp = bind_group(cfg, socket.SOCK_DGRAM, n)
        try:
            tcp = bind_group(cfg, socket.SOCK_STREAM, n)
        except ConfigError:
            for sock in udp:
                sock.close()
            raise
        try:
            assert isinstance(self.platform, LinuxPlatform)  # effective_workers() says so
            tuns = self.platform.open_tun_queues(
                cfg.device, n, tap=cfg.mode == "tap", offload=cfg.offload
            )
        except GtunError:
            for sock in udp + tcp:
                sock.close()
            raise
        rt.push(f"device {cfg.device}", tuns[0].close)
        channels = WorkerPool.channels_for(n)
        pool = WorkerPool(n, udp, tcp, tuns, channels, cfg.private_key, cfg.offload)
        rt.push("the workers' sockets and queues", pool.close)
        self.pool = pool
        return (udp[0], tcp[0]), tuns[0]

    async def _start(
        self, specs: list[PeerSpec], sock: socket.socket, tcp_sock: socket.socket, tun: Device
    ) -> Driver:
        """The relay core on a driver with its UDP and TCP transports, and metrics."""
        cfg, rt = self.cfg, self.rt
        loop = asyncio.get_running_loop()
        settings = RelaySettings(
            network=cfg.network,
            relay_address=cfg.relay_address,
            mtu=cfg.mtu,
            routes=cfg.routes,
            dns=cfg.dns,
            mode=cfg.mode,
            network6=cfg.network6,
            partial_ok=tun.vnet,
        )
        relay = Relay(
            cfg.private_key,
            settings,
            wall_offset=time.time() - loop.time(),
            worker=0,
            workers=self.workers,
        )
        apply_peers(relay, specs, cfg, self.store)
        self.relay = relay
        driver = Driver(relay, loop, self.on_event)
        self.driver = driver
        pool = self.pool
        if pool is not None:
            pool.settings = settings

            def notice(worker: int, kind: str, key: bytes, value: Any) -> None:
                apply_notice(relay, worker, kind, key, value)
                pool.noticed(worker, kind, key, value)

            handoff = Handoff(
                0,
                pool.ends_of(0),
                loop,
                lambda w, key, items: relay.handed(w, key, items, loop.time()),
                notice,
                driver.after,
            )
            self.handoff = handoff
            driver.handoff = handoff
            rt.push("the channels to the workers", handoff.close)
        rt.push("unknown-key report", self.events.close)
        driver.attach(UdpTransport(sock, loop, batching=cfg.offload))
        rt.push("UDP socket", driver.close)
        tcp = TcpServer(loop, lambda ep: forget_endpoint(relay.wg.peers.values(), ep))
        self.tcp = tcp
        driver.attach(tcp)
        await tcp.start(tcp_sock)
        rt.push("TCP listener", tcp.close)
        if cfg.metrics_listen is not None:
            metrics = await serve_metrics(
                RelayCollector(
                    relay, loop.time, lambda: tcp.counts, pool=self.pool, quotas=self.quota_rows
                ),
                cfg.metrics_listen,
                config_file=cfg.path,
                key="server.metrics_listen",
            )
            rt.push("metrics endpoint", metrics.close)
        self.platform.log_offloads(tun, cfg.offload)  # once nothing can fail for want of a port
        # Stop watching the descriptor before the device is closed.
        rt.push(f"reading {cfg.device}", driver.detach_tun)
        return driver

    async def _configure_device(self, tun: Device, specs: list[PeerSpec]) -> None:
        """MTU, MAC (TAP), addresses, link up, and the routes to the LANs behind peers."""
        cfg, rt = self.cfg, self.rt
        link = self.platform.link(tun.name)
        self.link = link
        rt.push(f"configuration of {tun.name}", link.undo, in_netlink=True)
        await rt.nl(link.set_mtu, cfg.mtu)
        if cfg.mode == "tap":
            await rt.nl(link.set_mac, mac_for_key(cfg.public_key))
            self.platform.eui64_link_local(tun.name)  # the link-local its MAC gives
        await rt.nl(link.add_address, IPv4Interface(f"{cfg.relay_address}/{cfg.network.prefixlen}"))
        if cfg.network6 is not None:
            self.platform.enable_ipv6(tun.name)
            await rt.nl(
                link.add_address, IPv6Interface(f"{cfg.relay_address6}/{cfg.network6.prefixlen}")
            )
        await rt.nl(link.set_up)
        await rt.nl(self.sync_subnet_routes, specs)

    def _configure_host(self, tun: Device) -> None:
        """IP forwarding, and NAT for the virtual networks, each recorded in a journal
        before it is made (system/journal.py): the next run undoes what a killed one
        left, from the values found before, not from what the killed run set."""
        cfg, rt = self.cfg, self.rt
        path = journal.host_journal_path(cfg.state_dir, cfg.path)
        changes = journal.HostChanges(
            os.getpid(), str(cfg.path), nft_table=table_name(tun.name) if cfg.nat else None
        )

        def record(sysctls: dict[str, str]) -> None:
            changes.sysctls = sysctls
            journal.record_host(path, changes)

        undone = [True]  # whether every change the journal lists was undone

        def undo(step: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                try:
                    return step()
                except BaseException:
                    undone[0] = False  # the journal stays, for the next run to retry
                    raise

            return run

        def forget() -> None:
            if undone[0]:
                journal.remove(path)
            else:
                log.warning("keeping %s: the next run undoes what is left", path)

        # Pushed first, so run last: removed once everything it lists is undone.
        rt.push("the relay's journal", forget)
        forwarding = self.platform.forwarding()
        forwarding.enable(ipv6=cfg.network6 is not None, record=record)
        rt.push("IP forwarding", undo(forwarding.restore))
        if cfg.nat:
            nat = self.platform.nat(
                tun.name, [cfg.network, *([cfg.network6] if cfg.network6 else [])]
            )
            nat.apply()
            rt.push("NAT rules", undo(nat.remove))

    def _keep_health(self) -> None:
        """Every `health_interval`, look at the relay's own machine in a worker thread
        (forwarding, its NAT table, its device and the routes it made into it:
        Platform.relay_health) and give the core the snapshot it answers clients' health
        requests from, with whether the shared store answers (known here)."""
        assert self.relay is not None
        relay, cfg = self.relay, self.cfg
        nat_table = table_name(cfg.device) if cfg.nat else None
        loop = asyncio.get_running_loop()

        async def keep() -> None:
            while True:
                routes: list[Network] = [cfg.network]
                if cfg.network6 is not None:
                    routes.append(cfg.network6)
                routes.extend(sorted(self.subnet_routes, key=str))
                try:
                    look = functools.partial(
                        self.platform.relay_health,
                        cfg.device,
                        ipv6=cfg.network6 is not None,
                        nat_table=nat_table,
                        routes=routes,
                    )
                    health = await off_loop(look)
                except Exception as exc:  # a bug: the relay serves on, unable to say
                    if self._health_said != str(exc):
                        log.warning("cannot look at this relay's health: %s", exc)
                    self._health_said = str(exc)
                    health = RelayHealth(device=cfg.device)
                store = self.store_up if isinstance(self.store, PgStore) else None
                health = replace(health, store=store)
                relay.set_health(health, loop.time())
                if self.pool is not None:
                    await self.pool.set_health(health_payload(health))
                await asyncio.sleep(self.health_interval)

        task = asyncio.ensure_future(keep())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.rt.push("health look", stop)

    def _rejoin(self) -> None:
        """Handshake with every peer at the UDP endpoint it last used (a restart is
        healed in a round trip, not when the clients' timers fire), then keep the
        store's endpoints current."""
        assert self.relay is not None and self.driver is not None
        relay_key = encode_key(self.cfg.public_key)
        endpoints: dict[bytes, tuple[Any, ...]] = {}
        for key_text, text in self.store.endpoints(relay_key).items():
            endpoint = endpoint_from_text(text)
            key = decode_key_or_none(key_text)
            if endpoint is not None and key is not None:
                endpoints[key] = endpoint
                self._saved_endpoints[key] = text
        if self.pool is not None:
            # Spread over the workers (each peer by its key), as the clients' own
            # handshakes would be: the one that initiates holds the session.
            endpoints = self.pool.rejoin_elsewhere(endpoints)
        queued = self.relay.rejoin(endpoints, self.driver.loop.time())
        if queued:
            log.info("handshaking with %d peers at their last endpoints", queued)
            self.driver.poke()
        self._endpoint_task = asyncio.ensure_future(self._keep_endpoints(relay_key))
        self.rt.push("peer endpoints", lambda: self._stop_endpoints(relay_key))

    def _rejoin_added(self, added: list[str]) -> None:
        """Handshake at once with the added peers that were here before (`gtun peer
        enable`): at the endpoint this relay last saved for them.  Their own timers
        would take up to 15 s more."""
        if self.relay is None or self.driver is None:
            return
        endpoints: dict[bytes, tuple[Any, ...]] = {}
        for name in added:
            peer = self.relay.peer_by_name(name)
            text = None if peer is None else self._saved_endpoints.get(peer.public_key)
            endpoint = None if text is None else endpoint_from_text(text)
            if peer is not None and endpoint is not None:
                endpoints[peer.public_key] = endpoint
        if endpoints and self.relay.rejoin(endpoints, self.driver.loop.time()):
            self.driver.poke()

    def _changed_endpoints(self) -> dict[bytes, str]:
        """Peers whose UDP endpoint differs from the stored one (a TCP one is not kept:
        a connection does not outlive the relay)."""
        assert self.relay is not None
        saved, seen = self._saved_endpoints, self._seen_endpoints
        changed: dict[bytes, str] = {}
        relay = self.relay
        # With workers: the endpoints of sessions they hold (newer than any here).
        elsewhere = self.pool.endpoints() if self.pool is not None else {}
        for key, peer in relay.wg.peers.items():
            if relay.is_mesh(peer):
                continue  # another relay: its endpoint is the store's relays row
            endpoint = peer.endpoint
            other = elsewhere.get(key)
            if other is not None and (
                peer.last_handshake is None or other[1] > peer.last_handshake
            ):
                endpoint = other[0]
                if seen.get(key) != endpoint:
                    seen[key] = endpoint
                    text = endpoint_to_text(endpoint)
                    if saved.get(key) != text:
                        changed[key] = text
                continue
            # Compared as the tuple first: a scan of 10,000 peers formats only the new.
            if endpoint.__class__ is tuple and seen.get(key) != endpoint:
                if peer.last_received is None:
                    continue
                seen[key] = endpoint
                text = endpoint_to_text(endpoint)
                if saved.get(key) != text:
                    changed[key] = text
        return changed

    async def _keep_endpoints(self, relay_key: str) -> None:
        loop = asyncio.get_running_loop()
        failing = False  # said once per run of failures (a read-only or full state dir)
        while True:
            await asyncio.sleep(ENDPOINT_SAVE_INTERVAL)
            if self.store_up is False:
                continue  # the store is away (said once, by _store_state); saved later
            await self._heartbeat(relay_key)
            changed = self._changed_endpoints()
            if not changed:
                continue
            rows = {encode_key(key): text for key, text in changed.items()}
            try:
                # Off the event loop: a commit waits for the disk.
                await loop.run_in_executor(None, self.store.save_endpoints, relay_key, rows)
            except StoreUnavailable as exc:
                self._store_state(False, str(exc))
                for key in changed:
                    self._seen_endpoints.pop(key, None)
                continue
            except GtunError as exc:
                if not failing:
                    log.warning("cannot save the peers' endpoints (retrying): %s", exc)
                failing = True
                for key in changed:  # looked at again next time
                    self._seen_endpoints.pop(key, None)
                continue
            if failing:
                log.info("peers' endpoints saved again")
                failing = False
            self._saved_endpoints.update(changed)

    async def _stop_endpoints(self, relay_key: str) -> None:
        task = self._endpoint_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        changed = self._changed_endpoints()
        if changed and self.store_up is not False:
            self.store.save_endpoints(
                relay_key, {encode_key(key): text for key, text in changed.items()}
            )

    async def _heartbeat(self, relay_key: str) -> None:
        """Shared store: every PRESENCE_INTERVAL, record that this relay is alive (with
        its clock) and which peers' sessions it holds (a packet from them within
        PRESENCE_RECENT); the first after the store's return also tells every relay
        (NOTIFY)."""
        store = self.store
        if not isinstance(store, PgStore) or self.relay is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + PRESENCE_INTERVAL
        held = [
            encode_key(key)
            for key, peer in self.relay.wg.peers.items()
            if peer.last_received is not None
            and now - peer.last_received < PRESENCE_RECENT
            and not self.relay.is_mesh(peer)
            and peer.data.here  # claimed here (not a failover client's RTT handshake)
            and self.relay.presence_of(peer) is None
        ]
        notify = self._announce_held
        self._announce_held = False

        def beat() -> None:
            store.relay_alive(relay_key, time.time())  # for doctor: alive, and its clock
            if held:
                store.heartbeat(relay_key, held, PRESENCE_TTL, notify=notify)

        try:
            await off_loop(beat)
        except StoreUnavailable as exc:
            self._store_state(False, str(exc))  # announced again when it is back
        except GtunError as exc:
            log.debug("presence heartbeat failed: %s", exc)

    # --- traffic history ---------------------------------------------------------------

    def _keep_traffic(self) -> None:
        """Every fold_interval, and once at stop, fold the peers' counters into the
        store (fold_traffic)."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(self.fold_interval)
                await self._fold_safely()

        task = asyncio.ensure_future(keep())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._fold_safely()

        self.rt.push("traffic history", stop)

    async def _fold_safely(self) -> None:
        try:
            await self.fold_traffic()
        except Exception:  # a bug: say so, and let the relay serve on
            log.exception("traffic fold failed (a bug)")

    async def fold_traffic(self) -> None:
        """Fold the merged per-peer counters of status() into the store, off the event
        loop: the deltas since the last fold into the history's buckets, the endpoints
        that carried them, on a shared store the sessions held here and this relay's
        stats; then disable the stored peers over their monthly quota and enable those
        back under it (a reload here, NOTIFY on a shared store).  A failure is logged
        once per run of failures; its deltas are written by the next fold that works.
        Never raises but for a bug."""
        async with self._fold_lock:
            store = self.store
            if self.relay is None or self.store_up is False:
                return  # a shared store away: said by _store_state; folded later
            status = await self.status()
            now = time.time()
            result = fold(self._fold_last, status["peers"])
            shared = isinstance(store, PgStore)
            name = self.cfg.path.stem if shared else ""
            live, stats = self._live(status, now) if shared else ([], {})
            try:
                # First the history alone: once it is written, these deltas are done
                # with, whatever fails after.
                await off_loop(store.add_traffic, result.deltas, now)
                self._fold_last = result.totals

                def settle() -> Quotas:
                    store.note_sources(name, result.seen, now)
                    if isinstance(store, PgStore):
                        store.publish_live(name, live, stats)
                    return enforce_quotas(store, now)

                quotas = await off_loop(settle)
            except GtunError as exc:
                if isinstance(exc, StoreUnavailable):
                    self._store_state(False, str(exc))
                elif self._fold_said is None:
                    log.warning("cannot write the traffic history (retrying): %s", exc)
                self._fold_said = str(exc)
                return
            if self._fold_said is not None:
                log.info("traffic history written again")
                self._fold_said = None
            disable, enable = quotas.disabled, quotas.enabled
            self._note_month(status["peers"], quotas)
            for peer in disable:
                log.warning("peer %s disabled: over its monthly quota", peer)
            for peer in enable:
                log.info("peer %s enabled again: under its monthly quota", peer)
            if (disable or enable) and not shared and not self.stop.is_set():
                self._request_reload()  # a shared store told every relay (NOTIFY)

    def _note_month(self, peers: list[dict[str, Any]], quotas: Quotas) -> None:
        """Keep each peer's month total and quota of this fold, for metrics."""
        stored, month = quotas.stored, quotas.month
        disable, enable = quotas.disabled, quotas.enabled
        keys = {p["name"]: p["public_key"] for p in peers}
        keys.update({p.name: p.public_key for p in stored})
        self.month_bytes = {n: sum(month.get(k, (0, 0))) for n, k in keys.items()}
        self.quotas = {
            p.name: (
                p.quota,
                p.name in disable
                or (not p.enabled and p.disabled_reason == QUOTA_REASON and p.name not in enable),
            )
            for p in stored
            if p.quota is not None
        }

    def quota_rows(self) -> list[tuple[str, int, int | None, bool]]:
        """(peer name, bytes this month, quota or None, disabled for it) of the last
        fold, for metrics."""
        rows = []
        for name, used in sorted(self.month_bytes.items()):
            quota, over = self.quotas.get(name, (None, False))
            rows.append((name, used, quota, over))
        return rows

    def _live(self, status: dict[str, Any], now: float) -> tuple[list[LiveRow], dict[str, Any]]:
        """The sessions held here (a handshake, and no other relay holding the peer)
        and this relay's stats, from a status() answer."""
        assert self.relay is not None
        rows = [
            LiveRow(
                p["public_key"],
                self.cfg.path.stem,
                p["endpoint"],
                p["transport"],
                p["last_handshake"],
                p["rx_bytes"],
                p["tx_bytes"],
                0.0,
            )
            for p in status["peers"]
            if p["relay"] is None and p["last_handshake"] is not None
        ]
        stats = {
            "peers": len(rows),
            "rx_bytes": sum(p["rx_bytes"] for p in status["peers"]),
            "tx_bytes": sum(p["tx_bytes"] for p in status["peers"]),
            "handshakes": self.relay.wg.handshakes_completed,
            "drops": sum(v for v in status["drops"].values() if isinstance(v, int)),
            "store_up": self.store_up is not False,
            "mesh": {
                m["name"]: m["last_handshake"] is not None
                and now - m["last_handshake"] < MESH_UP_WITHIN
                for m in status.get("mesh", [])
            },
        }
        return rows, stats

    # --- the shared store ----------------------------------------------------------------

    def _watch_store(self) -> None:
        """Shared store: register this relay, and LISTEN for changes to the peers on a
        connection of its own, in a thread (StoreWatch): a change made through any relay
        or `gtun peer add` reloads the peers here, through the usual off-loop reload."""
        store = self.store
        if not isinstance(store, PgStore):
            return
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        endpoint = f"{cfg.endpoint[0]}:{cfg.endpoint[1]}" if cfg.endpoint else None
        store.register_relay(
            encode_key(cfg.public_key), cfg.path.stem, endpoint, [str(r) for r in cfg.routes]
        )

        def call(fn: Callable[..., object], *args: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the relay stopped
                loop.call_soon_threadsafe(fn, *args)

        watch = StoreWatch(
            store.dsn,
            store.network,
            lambda: call(self._request_reload),
            lambda up, error: call(self._store_state, up, error),
            lambda: call(self._request_mesh),
        )
        self._watch = watch
        watch.start()

        async def stop() -> None:
            await asyncio.to_thread(watch.stop)
            for task in (self._reload_task, self._mesh_task, *self._presence_tasks):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        self.rt.push("store watch", stop)

    def _store_state(self, up: bool, error: str | None) -> None:
        """The store answers, or not: one log line per change, not per attempt.  When
        it answers again (or first LISTENs), reload: notifications sent while this
        relay was not listening are lost, the peers they announced are not."""
        was = self.store_up
        if up == was:
            return
        self.store_up = up
        if up:
            if was is False:
                log.info("store %s is back: catching up with the peers", self.store.path)
                # Tell the others where the sessions held here are (at the next tick
                # of _keep_endpoints): a client that joined or moved here meanwhile
                # was not written by _note_session_here.
                self._announce_held = True
                self._next_heartbeat = 0.0
            self._request_reload()
            self._request_mesh()
        else:
            # The store's own connection died with it, unnoticed if unused meanwhile:
            # its first use after the return would fail and say the store is away again.
            if isinstance(self.store, PgStore):
                self.store.suspect_connection()
            log.error(
                "%s; forwarding the sessions it has, refusing new peers and leases "
                "until it returns (retrying)",
                error or f"store {self.store.path} is unavailable",
            )

    def _request_reload(self) -> None:
        """A reload soon; requests made while one runs are served by one more."""
        self._reload_wanted = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.ensure_future(self._reload_while_wanted())

    async def _reload_while_wanted(self) -> None:
        while self._reload_wanted and not self.stop.is_set():
            self._reload_wanted = False
            await self.reload()

    def _request_mesh(self) -> None:
        """A re-read of the relays and the presence soon (coalesced, as reloads)."""
        self._mesh_wanted = True
        if self._mesh_task is None or self._mesh_task.done():
            self._mesh_task = asyncio.ensure_future(self._mesh_while_wanted())

    async def _mesh_while_wanted(self) -> None:
        while self._mesh_wanted and not self.stop.is_set():
            self._mesh_wanted = False
            await self.refresh_mesh()

    async def refresh_mesh(self) -> None:
        """Shared store: read the network's relays and the presence map (in a worker
        thread) and give them to the core (on the loop): Relay.set_mesh() and
        set_presence().  A refusal is logged once and changes nothing."""
        store, relay = self.store, self.relay
        if not isinstance(store, PgStore) or relay is None or self.driver is None:
            return

        def read() -> tuple[list[tuple[str, str, str | None, tuple[str, ...]]], dict[str, str]]:
            return store.relay_rows(), store.presence()

        try:
            rows, presence = await off_loop(read)
        except StoreUnavailable as exc:
            self._store_state(False, str(exc))
            return
        except GtunError as exc:
            log.warning("cannot read the relay mesh from the store: %s", exc)
            return
        mesh, names = mesh_relays(rows)
        own = encode_key(self.cfg.public_key)
        held: dict[bytes, str | None] = {}
        for key_text, relay_key in presence.items():
            key = decode_key_or_none(key_text)
            if key is not None:
                held[key] = None if relay_key == own else names.get(relay_key)
        try:
            added, removed = relay.set_mesh(mesh, self.driver.loop.time())
            relay.set_presence(held)
        except MeshError as exc:
            if str(exc) != self._mesh_said:
                log.error("relay mesh refused, keeping the current one: %s", exc)
                self._mesh_said = str(exc)
            return
        self._mesh_said = None
        if added or removed:
            log.info(
                "relay mesh: %s (added %s, removed %s)",
                _names(sorted(names.values())),
                _names(added),
                _names(removed),
            )
        self.driver.poke()

    def _note_session_here(self, key: bytes) -> None:
        """Shared store: a client's session completed here; say so (presence), telling
        every relay, off the loop."""
        store = self.store
        if not isinstance(store, PgStore) or self.store_up is False:
            return

        async def write() -> None:
            try:
                await off_loop(
                    lambda: store.heartbeat(
                        encode_key(self.cfg.public_key),
                        [encode_key(key)],
                        PRESENCE_TTL,
                        notify=True,
                    )
                )
            except StoreUnavailable as exc:
                self._store_state(False, str(exc))
            except GtunError as exc:
                log.debug("presence of a new session not written: %s", exc)

        task = asyncio.ensure_future(write())
        self._presence_tasks.add(task)
        task.add_done_callback(self._presence_tasks.discard)

    def _announce(self, tun: Device, specs: list[PeerSpec]) -> None:
        cfg = self.cfg
        log.info(
            "relay %s listening on UDP and TCP %s, device %s %s/%d, %d peers, public key %s",
            cfg.path.name,
            endpoint_text(cfg.listen),
            tun.name,
            cfg.relay_address,
            cfg.network.prefixlen,
            len(specs),
            encode_key(cfg.public_key),
        )
        if cfg.network6 is not None:
            log.info("IPv6 inside the tunnel: %s/%d", cfg.relay_address6, cfg.network6.prefixlen)
        for spec in specs[:ANNOUNCED_PEERS]:
            log.info("peer %s: %s%s", spec.name, spec.address, _v6(spec))
        if len(specs) > ANNOUNCED_PEERS:
            more = len(specs) - ANNOUNCED_PEERS
            log.info("and %d more peers (`gtun status` lists them all)", more)

    def _describe(self) -> str:
        """The relay's status line for systemd (STATUS=)."""
        cfg, relay = self.cfg, self.relay
        peers = sum(1 for p in relay.wg.peers.values() if not relay.is_mesh(p)) if relay else 0
        where = endpoint_text(cfg.listen)
        return f"serving {peers} peers on UDP and TCP {where}, device {cfg.device}"

    # --- peers -----------------------------------------------------------------------

    def sync_subnet_routes(self, specs: list[PeerSpec]) -> None:
        """Kernel routes into the TUN for the LANs behind peers (so the relay's own
        host and its LAN reach them), IPv6 ones too."""
        assert self.link is not None
        wanted = {net for s in specs for net in s.subnets}
        if any(net.version == 6 for net in wanted):
            self.platform.enable_ipv6(self.link.ifname)  # a no-op when already on
        for net in self.subnet_routes - wanted:
            self.link.remove_route(net)
        for net in wanted - self.subnet_routes:
            self.link.add_route(net, gateway=self.subnet_gateway(specs, net))
        self.subnet_routes = wanted

    def subnet_gateway(self, specs: list[PeerSpec], net: Any) -> IPv4Address | IPv6Address | None:
        """In TAP mode a LAN behind a peer is reached through the peer's address on the
        link (the kernel resolves it by ARP or neighbour discovery); in TUN mode the
        device is the way."""
        if self.cfg.mode != "tap":
            return None
        owner = next((s for s in specs if net in s.subnets), None)
        if owner is None:
            return None
        return owner.address if net.version == 4 else owner.address6

    def _note_refused(self, cfg: ServerConfig, peerset: PeerSet) -> None:
        """Log the peers a full pool refused (when that changes) and keep them for
        `status`."""
        if peerset.refused != self.refused:
            for line in refused_lines(peerset.refused, cfg.network):
                log.warning("%s", line)
        self.refused = peerset.refused

    def _read_peers(self) -> tuple[ServerConfig, PeerSet]:
        """The config and the peer set, read afresh: run in a worker thread, as parsing
        thousands of [[peers]] and leasing them takes a while.  Raises ConfigError or
        RuntimeFailure."""
        cfg = load_server_config(self.cfg.path)
        peerset = read_peers(cfg, self.store)  # a clash refused before anything is published
        publish_config_peers(cfg, self.store)
        return cfg, peerset

    async def reload(self) -> dict[str, Any]:
        """Re-read the peers (SIGHUP, `gtun peer add`), keeping others' sessions.  The
        config and the store are read in a worker thread; only the new peer set is
        applied on the event loop.  A peer set that fails to load or apply changes
        nothing (Relay.set_peers is all or nothing): the error is logged and the relay
        serves on with its current peers."""
        assert self.relay is not None
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        assert self.relay is not None
        try:
            cfg, peerset = await off_loop(self._read_peers)
            specs = peerset.specs
            # A peer removed or disabled takes its counters with it: what it carried
            # since the last fold goes into the history first.
            await self._fold_safely()
            added, removed = apply_peers(self.relay, specs, cfg, self.store)
            if self.pool is not None:
                await self.pool.set_peers(specs)
        except StoreUnavailable as exc:
            # Said once for the whole outage (_store_state), not once per attempt.
            log.debug("reload refused, keeping the current peers: %s", exc)
            self._store_state(False, str(exc))
            return {"ok": False, "error": str(exc)}
        except GtunError as exc:
            log.error("reload failed, keeping the current peers: %s", exc)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug: say so, and keep serving the peers we have
            log.exception("reload failed (a bug), keeping the current peers")
            return {"ok": False, "error": f"internal error: {exc!r}"}
        self._note_refused(cfg, peerset)
        self._rejoin_added(added)
        try:
            await self.rt.nl(self.sync_subnet_routes, specs)
        except GtunError as exc:
            log.error("reload: peers updated, but not the routes to the LANs behind them: %s", exc)
            return {"ok": False, "error": str(exc), "added": added, "removed": removed}
        log.info(
            "reloaded %s: %d peers (added %s, removed %s)%s",
            self.cfg.path.name,
            len(specs),
            _names(added),
            _names(removed),
            f", {len(peerset.refused)} refused (pool full)" if peerset.refused else "",
        )
        if self.driver is not None:
            self.driver.poke()
        return {"ok": True, "added": added, "removed": removed, "refused": peerset.refused}

    # --- events and control ---------------------------------------------------------

    def on_event(self, event: Event) -> None:
        peer = getattr(event, "peer", None)
        if peer is not None and self.relay is not None and self.relay.is_mesh(peer):
            self._mesh_event(event)
            return
        if isinstance(event, SessionHere):
            if self.relay is not None and self.relay.name is not None:
                self._note_session_here(event.peer.public_key)
            return
        if isinstance(event, SessionHeld | InitiationSeen | CapsLearned):
            # What the other workers need to know (app/workers.py).
            if self.handoff is not None:
                announce(self.handoff, event)
            if self.pool is not None:
                self.pool.noticed_here(event)
            return
        self.events.on_event(event)

    def _mesh_event(self, event: Event) -> None:
        """An event of a mesh peer (another relay): no client, so no spec."""
        if isinstance(event, HandshakeCompleted):
            peer = event.peer
            log.debug(
                "mesh session with relay %s at %s", peer.data.name, endpoint_text(peer.endpoint)
            )
        elif isinstance(event, HandshakeTimedOut):
            log.debug("mesh relay %s stopped answering", event.peer.data.name)

    async def on_control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return await self.status()
        if command == "reload":
            return await self.reload()
        return {"error": f"unknown command {command!r}"}

    async def wg_get(self) -> list[bytes]:
        """What `wg show` reads (app/uapi.py): the relay's key and port, every peer."""
        assert self.relay is not None and self.driver is not None
        udp = self.driver.udp
        port = udp_port(udp.sock if udp is not None else None)
        others = None
        if self.pool is not None:
            await self.pool.refresh()
            others = self.pool.wg_peers()
        return await relay_answer(self.relay, self.cfg.private_key, port, others)

    async def status(self) -> dict[str, Any]:
        """The `gtun status` answer.  Built STATUS_CHUNK peers at a time, yielding to
        the event loop in between, so that 10,000 peers do not stall forwarding (the
        control socket encodes the answer in a worker thread)."""
        relay = self.relay
        assert relay is not None
        wall = relay.wg.wall_offset  # fixed at start, so reported times do not jitter
        pool = self.pool
        others: dict[str, list[list[Any]]] = {}
        if pool is not None:
            await pool.refresh()
            others = pool.peer_entries()
        peers = []
        mesh = []
        for i, peer in enumerate(list(relay.wg.peers.values())):
            if i and i % STATUS_CHUNK == 0:
                await asyncio.sleep(0)
            if relay.is_mesh(peer):
                mesh.append(
                    {
                        "name": peer.data.name,
                        "public_key": encode_key(peer.public_key),
                        "endpoint": endpoint_text(peer.endpoint),
                        "routes": [str(r) for r in peer.data.relay.routes],
                        **peer_traffic(peer, wall),
                        "drops": dict(peer.data.drops),
                    }
                )
                continue
            spec = peer.data.spec
            peers.append(
                {
                    "name": spec.name,
                    "public_key": encode_key(peer.public_key),
                    "address": str(spec.address),
                    "address6": str(spec.address6) if spec.address6 is not None else None,
                    "subnets": [str(s) for s in spec.subnets],
                    "endpoint": endpoint_text(peer.endpoint),
                    "transport": endpoint_transport(peer.endpoint),
                    "kind": "gtun" if peer.data.is_gtun else "wireguard",
                    "path_mtu": peer.data.path_mtu,  # what the client's probes found
                    "relay": relay.presence_of(peer),  # None: its session is here
                    **peer_traffic(peer, wall),
                    "drops": dict(peer.data.drops),
                }
            )
            if pool is not None:
                entry = peers[-1]
                held = pool.holder.get(peer.public_key)
                entry["worker"] = held
                entries = others.get(entry["public_key"])
                if entries:
                    session = pool.session_entry(peer.public_key, entries, peer.last_handshake)
                    merge_peer(entry, entries, wall, session)
        drops = merge_counts(relay.wg.drops, relay.drops, self.tcp.counts if self.tcp else {})
        datapath = self.driver.datapath() if self.driver is not None else None
        tcp_connections = len(self.tcp.connections) if self.tcp else 0
        workers: list[dict[str, Any]] = [{"worker": 0, "pid": os.getpid(), "alive": True}]
        if pool is not None:
            drops = merge_counts(drops, pool.drops())
            if datapath is not None:
                for name, value in pool.datapath().items():
                    if isinstance(datapath.get(name), int) and not isinstance(value, bool):
                        datapath[name] += value
            tcp_connections += pool.tcp_connections()
            workers[0]["restarts"] = 0
            workers.extend(pool.describe())
        cfg = self.cfg
        return self.rt.status(
            {
                "mode": cfg.mode,
                "address": f"{cfg.relay_address}/{cfg.network.prefixlen}",
                "address6": (
                    f"{cfg.relay_address6}/{cfg.network6.prefixlen}"
                    if cfg.network6 is not None
                    else None
                ),
                "listen": f"{cfg.listen[0]}:{cfg.listen[1]}",
            },
            sorted(peers, key=lambda p: p["name"]),
            drops,
            datapath,
            tail={
                "workers": workers,
                "tcp_connections": tcp_connections,
                "refused_peers": list(self.refused),
                "relay_name": relay.name,
                "mesh": sorted(mesh, key=lambda r: r["name"]),
            },
        )


def apply_peers(
    relay: Relay, specs: list[PeerSpec], cfg: ServerConfig, store: Store
) -> tuple[list[str], list[str]]:
    """relay.set_peers(specs), its refusal as a ConfigError naming the file the peer at
    fault comes from (the config's [[peers]], or the state file `gtun peer add` wrote).
    Returns (added names, removed names); on error the relay's peers are unchanged."""
    try:
        return relay.set_peers(specs)
    except PeerSetError as exc:
        in_config = any(p.name == exc.peer for p in cfg.peers)
        raise ConfigError(str(exc), file=cfg.path if in_config else store.path) from exc


def mesh_endpoint(text: str | None) -> tuple[Any, ...] | None:
    """A relay's endpoint as the store has it ("host:port", an IPv6 host in brackets
    or not) as the UDP socket's address tuple; None for none or a host name (not
    resolved)."""
    if not text:
        return None
    host, _, port_text = text.rpartition(":")
    try:
        address = ip_address(host.strip("[]"))
        port = int(port_text)
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    if address.version == 6:
        return (str(address), port, 0, 0)
    return (str(address), port)


def mesh_relays(
    rows: list[tuple[str, str, str | None, tuple[str, ...]]],
) -> tuple[list[MeshRelay], dict[str, str]]:
    """The store's relays rows as the core's MeshRelays (a row with a bad key or route
    is skipped), and each relay's name by its key text."""
    mesh: list[MeshRelay] = []
    names: dict[str, str] = {}
    for key_text, name, endpoint, route_texts in rows:
        key = decode_key_or_none(key_text)
        if key is None:
            continue
        try:
            routes: tuple[Network, ...] = tuple(ip_network(r) for r in route_texts)
        except ValueError:
            continue
        mesh.append(MeshRelay(name, key, mesh_endpoint(endpoint), routes))
        names[key_text] = name
    return mesh, names


def endpoint_to_text(endpoint: tuple[Any, ...]) -> str:
    """A UDP endpoint (the socket's address tuple) as the store keeps it: JSON."""
    return json.dumps(list(endpoint))


def endpoint_from_text(text: str) -> tuple[Any, ...] | None:
    """The address tuple endpoint_to_text() wrote, or None for anything else."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if (
        not isinstance(value, list)
        or len(value) not in (2, 4)
        or not isinstance(value[0], str)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
    ):
        return None
    return tuple(value)


def decode_key_or_none(text: str) -> bytes | None:
    try:
        return decode_key(text)
    except ConfigError:
        return None


def _names(names: list[str], limit: int = 20) -> str:
    """Names for a log line: all of a few, the first `limit` and a count of many."""
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _v6(spec: PeerSpec) -> str:
    return f", {spec.address6}" if spec.address6 is not None else ""


def run_server(path: Path) -> None:
    """Raises ConfigError or RuntimeFailure (translated by the CLI)."""
    platform = LinuxPlatform()
    platform.check_privileges()
    cfg = load_server_config(path)
    server = Server(cfg, platform)
    keep_heap()  # no brk churn from the 64 KB buffers of the data path
    try:
        asyncio.run(server.run())
    except OSError as exc:
        raise RuntimeFailure(f"relay failed: {exc}") from exc
