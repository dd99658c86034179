"""`gtun client`: a client's edge.  Wires the sans-IO ClientCore to a UDP socket and a
TUN device, configures the device from what the relay pushed, and undoes it on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any

from gtun.app.config import ClientConfig, load_client_config
from gtun.app.control import ControlServer
from gtun.app.keys import encode_key
from gtun.app.metrics import ClientCollector, MetricsServer, serve_metrics
from gtun.app.platform import Device, ExitRoute, Link, LinuxPlatform, Platform
from gtun.app.relays import load_relays, relays_file, save_relays, udp_endpoint
from gtun.app.runtime import Runtime, peer_traffic
from gtun.app.uapi import client_allowed_ips, client_answer, start_uapi, udp_port
from gtun.core.client import (
    ClientCore,
    ConfigReceived,
    Connected,
    Disconnected,
    Fallback,
    GaveUpRound,
    HealthReceived,
    MtuChanged,
    NoAnswer,
    NoHandshake,
    Refused,
    RelayChanged,
    RelaysLearned,
    UdpBack,
    UdpBlocked,
    UdpUnanswered,
)
from gtun.core.drops import merge_counts
from gtun.core.l2frame import mac_for_key
from gtun.core.tunnel import PushedConfig, RelayHealth, health_payload
from gtun.core.wg.events import Event
from gtun.errors import GtunError, RuntimeFailure
from gtun.io.driver import Driver
from gtun.io.tcp import TCP_DROP_REASONS, TcpDialer, TcpEndpoint
from gtun.io.transport import endpoint_text
from gtun.io.udp import UdpTransport
from gtun.system import dns as dnsconf
from gtun.system import fulltunnel as exitroute
from gtun.system.malloc import keep_heap
from gtun.system.netlink import PathWatcher, source_for

log = logging.getLogger("gtun")

RESOLVE_RETRY = 5.0
PATH_SETTLE = 0.05  # seconds after an address or route change before the way is looked up
NOTICE_EVERY = 6  # handshake attempts between two "does not answer" warnings
HEALTH_WAIT = 2.0  # seconds `relay_health` waits for the relay's answer


class Client:
    """A client daemon.  `platform` is what it changes on the machine (the real one
    unless a test gives gtun.testing.platform's fake)."""

    def __init__(self, cfg: ClientConfig, platform: Platform | None = None) -> None:
        self.cfg = cfg
        self.platform: Platform = platform if platform is not None else LinuxPlatform()
        self.rt = Runtime("client", cfg.device, cfg.public_key)
        self.stop = self.rt.stop
        self.core: ClientCore | None = None
        self.driver: Driver | None = None
        self.dialer: TcpDialer | None = None
        # "auto" back on UDP: the dialer it closed (whose counters its closing may still
        # raise), and the sum of those closed before it.
        self.old_dialer: TcpDialer | None = None
        self.tcp_past = dict.fromkeys(TCP_DROP_REASONS, 0)
        self.transport = "tcp" if cfg.transport == "tcp" else "udp"  # the one in use
        self.endpoint: tuple[str, int] | None = None  # the relay's resolved address
        # The configured relay as the log names it ("[v6]:port"), and the one in use:
        # after a failover, not the configured one.
        self.configured_relay = endpoint_text(cfg.server)
        self.relay_in_use = self.configured_relay
        self.tun: Device | None = None
        self.link: Link | None = None
        self.applied: PushedConfig | None = None
        self.dns_change: dnsconf.DnsChange | None = None  # split tunnel, via resolvconf
        self.ipv6 = False  # the applied configuration's IPv6 address is on the device
        # default_route: made at start (its mark must be on the relay's socket).
        self.full_tunnel: ExitRoute | None = None
        self.exit_error: GtunError | None = None
        self._config_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics: MetricsServer | None = None
        # Roaming: the netlink watcher, the path to the relay last seen, a pending look.
        self.watcher: PathWatcher | None = None
        self.path: str | None = None
        self._path_check: asyncio.Task[None] | None = None
        # `relay_health` commands waiting for the relay's answer, by request id (at most
        # the control socket's connections).
        self._health_waiters: dict[int, asyncio.Future[RelayHealth]] = {}

    async def run(self) -> None:
        cfg = self.cfg
        rt = self.rt
        loop = asyncio.get_running_loop()
        # Undone in the reverse order: each step finds what exists by then.
        rt.push(f"device {cfg.device}", self.close_device)
        rt.push("UDP socket", self.close_driver)
        rt.push("TCP connection", self.close_dialer)
        rt.push(f"configuration of {cfg.device}", self.unconfigure_locked)
        try:
            rt.handle_signals()
            endpoint = await self.resolve()
            if endpoint is None:
                return
            family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
            v6 = family == socket.AF_INET6
            known = load_relays(relays_file(cfg.state_dir, cfg.path))
            await rt.nl(self.prepare_full_tunnel)
            core = ClientCore(
                cfg.private_key,
                cfg.server_public_key,
                endpoint if self.transport == "udp" else None,
                mode=cfg.mode,
                wall_offset=time.time() - loop.time(),
                # The device completes TCP checksums (offloads), or the edge does when
                # the kernel refuses them: either way the relay may leave them partial.
                accept_partial=cfg.offload,
                transport=cfg.transport,
                pmtu=cfg.pmtu,
                raise_interval=float(cfg.pmtu_raise_interval),
                known=known,
                endpoint_of=lambda text: udp_endpoint(text, v6),
                udp_probe_interval=float(cfg.udp_probe_interval),
                preshared_key=cfg.preshared_key,
            )
            self.core = core
            driver = Driver(core, loop, self.on_event)
            self.driver = driver
            if self.transport == "udp":
                sock = self.open_socket(family, socket.SOCK_DGRAM)
                driver.attach(
                    UdpTransport(sock, loop, batching=cfg.offload, on_error=self.on_udp_error)
                )
            if cfg.metrics_listen is not None:
                self.metrics = await serve_metrics(
                    ClientCollector(core, loop.time, self.tcp_drops),
                    cfg.metrics_listen,
                    config_file=cfg.path,
                    key="client.metrics_listen",
                )
                rt.push("metrics endpoint", self.metrics.close)
            # The TUN exists from the start so its name is taken, but it is configured
            # only once the relay has pushed an address.  A client that follows the
            # relay's mode (no `mode` key) opens its device when it learns the mode.
            if cfg.mode is not None:
                self.open_device(cfg.mode)
            control = ControlServer(cfg.control_socket, self.on_control, config_file=cfg.path)
            await control.start()
            rt.push("control socket", control.close)
            if cfg.uapi:
                await start_uapi(rt.push, self.platform.wg_socket_dir(), cfg.device, self.wg_get)
            over = "UDP, falling back to TCP" if cfg.transport == "auto" else self.transport.upper()
            log.info(
                "client %s: connecting to relay %s over %s (public key %s)",
                cfg.path.name,
                self.configured_relay,
                over,
                encode_key(cfg.public_key),
            )
            # Ready once up and trying, not once connected: the client keeps trying on
            # its own, and a relay that is down must not make `systemctl start` fail.
            rt.serving(self._describe)
            self.endpoint = endpoint
            await self.watch_paths()
            if self.transport == "tcp":
                self.start_tcp(endpoint)
            else:
                core.start(loop.time())
                driver.poke()
            await rt.stop.wait()
            log.info("stopping")
        finally:
            await rt.unwind()
        if self.exit_error is not None:
            raise self.exit_error

    async def unconfigure_locked(self) -> None:
        async with self._config_lock:
            await self.rt.nl(self.unconfigure)

    def close_device(self) -> None:
        if self.tun is not None:
            self.tun.close()

    def close_driver(self) -> None:
        if self.driver is not None:
            self.driver.close()

    def close_dialer(self) -> None:
        if self.dialer is not None:
            self.dialer.close()

    def prepare_full_tunnel(self) -> None:
        """Undo what a run that did not exit cleanly left (whatever default_route is
        now), then, in full-tunnel mode, pick the routing table and mark."""
        cfg = self.cfg
        path = exitroute.state_file(cfg.state_dir, cfg.path)
        self.platform.recover_full_tunnel(path)
        if cfg.default_route:
            self.full_tunnel = self.platform.full_tunnel(cfg.device, path, cfg.path)

    def open_socket(self, family: int, kind: int) -> socket.socket:
        """Every socket the client sends tunnel traffic on (UDP, and each TCP
        connection) is made here: in full-tunnel mode it is marked so that it goes
        around the tunnel."""
        sock = socket.socket(family, kind)
        if self.full_tunnel is not None:
            try:
                self.platform.mark_socket(sock, self.full_tunnel.fwmark)
            except BaseException:
                sock.close()
                raise
        return sock

    # --- roaming -------------------------------------------------------------------------

    async def watch_paths(self) -> None:
        """Act on local address and route changes as wireguard-go does: when the way to
        the relay changes (another source address or device), tell the relay at once
        (ClientCore.roamed), rather than when the next packet happens to go."""
        assert self.endpoint is not None
        try:
            watcher = PathWatcher()
        except GtunError as exc:
            log.warning("%s; a change of address is noticed only at the next keepalive", exc)
            return
        self.watcher = watcher
        self.path = await self.rt.nl(source_for, self.endpoint[0], self.fwmark())
        loop = asyncio.get_running_loop()
        loop.add_reader(watcher.fileno(), self.on_netlink)
        self.rt.push("address watch", self.stop_watching)

    def fwmark(self) -> int:
        """The mark the relay's sockets carry (full tunnel), for the look-up to find
        the way they take, not the tunnel."""
        return self.full_tunnel.fwmark if self.full_tunnel is not None else 0

    def stop_watching(self) -> None:
        if self.watcher is not None:
            asyncio.get_running_loop().remove_reader(self.watcher.fileno())
            self.watcher.close()
            self.watcher = None
        if self._path_check is not None:
            self._path_check.cancel()

    def on_netlink(self) -> None:
        assert self.watcher is not None
        self.watcher.drain()
        if self._path_check is None or self._path_check.done():
            self._path_check = asyncio.ensure_future(self.check_path())

    async def check_path(self) -> None:
        assert self.endpoint is not None
        await asyncio.sleep(PATH_SETTLE)  # an address moves in a few messages
        path = await self.rt.nl(source_for, self.endpoint[0], self.fwmark())
        if path == self.path:
            return
        before, self.path = self.path, path
        if path is None:
            log.info("no route to relay %s now (was from %s)", self.endpoint[0], before)
            return
        log.info(
            "the way to relay %s changed: now from %s (was %s)", self.endpoint[0], path, before
        )
        core, driver = self.core, self.driver
        if core is None or driver is None:
            return
        if self.dialer is not None:
            self.dialer.reconnect("the local address changed")
        else:
            core.roamed(driver.loop.time())
            driver.poke()

    # --- TCP ---------------------------------------------------------------------------

    def tcp_drops(self) -> dict[str, int]:
        """The TCP dialers' counters: this run's, over every dialer "auto" made and
        closed (so that they never go down), zero before there is one."""
        counts = [d.counts for d in (self.old_dialer, self.dialer) if d is not None]
        return merge_counts(self.tcp_past, *counts)

    def start_tcp(self, endpoint: tuple[str, int]) -> None:
        assert self.driver is not None
        self.transport = "tcp"
        self.dialer = TcpDialer(
            self.driver.loop, endpoint, self.open_socket, self.on_tcp_connected, self.on_tcp_lost
        )
        self.driver.attach(self.dialer)

    def on_tcp_connected(self, ep: TcpEndpoint) -> None:
        core, driver = self.core, self.driver
        assert core is not None and driver is not None
        core.new_path(ep, driver.loop.time())
        driver.poke()

    def on_tcp_lost(self, ep: TcpEndpoint) -> None:
        if self.core is not None:
            self.core.path_lost(ep)

    async def resolve(self) -> tuple[str, int] | None:
        host, port = self.cfg.server
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                return (str(infos[0][4][0]), port)
            except OSError as exc:
                log.warning(
                    "cannot resolve relay %s: %s; retrying in %ds", host, exc, RESOLVE_RETRY
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), RESOLVE_RETRY)
        return None

    # --- events ----------------------------------------------------------------------

    def on_udp_error(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            log.debug("relay %s refused (nothing listens on that UDP port)", self.configured_relay)
        else:
            log.debug("UDP error: %s", exc)

    def on_event(self, event: Event) -> None:
        if isinstance(event, Connected):
            log.info("handshake with relay %s complete", self.relay_in_use)
            self.rt.say(self._describe())
        elif isinstance(event, ConfigReceived):
            if event.changed or self.applied is None:
                task = asyncio.ensure_future(self.apply_config(event.config))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif isinstance(event, Refused):
            self.exit_error = RuntimeFailure(f"the relay refused this client: {event.reason}")
            log.error("the relay refused this client: %s", event.reason)
            self.stop.set()
        elif isinstance(event, Disconnected):
            log.warning("relay silent for %.0fs: connection lost, reconnecting", event.silent_for)
            self.rt.say(f"relay {self.relay_in_use} silent: reconnecting")
            if self.dialer is not None:
                self.dialer.reconnect("the relay is silent")
        elif isinstance(event, NoAnswer):
            if event.attempts == 1 or event.attempts % NOTICE_EVERY == 0:
                log.warning(
                    "relay %s does not answer (%d handshake attempts): is it running, "
                    "is %s port %d reachable, and is this key (%s) one of its peers? "
                    "still trying",
                    self.configured_relay,
                    event.attempts + 1,
                    self.transport.upper(),
                    self.cfg.server[1],
                    encode_key(self.cfg.public_key),
                )
        elif isinstance(event, Fallback):
            log.warning(
                "no answer over UDP from relay %s in %gs; falling back to TCP",
                self.configured_relay,
                event.after,
            )
            assert self.endpoint is not None
            # The UDP socket stays: the core probes UDP through it, to come back.
            self.start_tcp(self.endpoint)
        elif isinstance(event, (NoHandshake, UdpBlocked, UdpUnanswered, UdpBack)):
            self.on_transport_event(event)
        elif isinstance(event, MtuChanged):
            task = asyncio.ensure_future(self.apply_mtu(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, RelaysLearned):
            try:
                save_relays(relays_file(self.cfg.state_dir, self.cfg.path), event.relays)
            except GtunError as exc:
                log.warning("%s; the relays learnt are not kept", exc)
        elif isinstance(event, RelayChanged):
            self.on_relay_changed(event)
        elif isinstance(event, HealthReceived):
            waiter = self._health_waiters.pop(event.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.health)
        elif isinstance(event, GaveUpRound):
            log.warning(
                "relay %s did not answer for 90s; next attempt in %.0fs",
                self.configured_relay,
                event.retry_in,
            )

    def on_transport_event(self, event: Event) -> None:
        """What the core concluded about the transports (see its "auto transport")."""
        relay = self.relay_in_use
        if isinstance(event, NoHandshake):
            log.warning(
                "the relay at %s answers no handshake over %s (TCP connects, then silence "
                "for %.0fs): is this client's public key %s a peer of the relay? add it "
                "with `gtun peer add` or a [[peers]] entry (and check server_public_key)",
                relay,
                " or ".join(event.transports),
                event.after,
                encode_key(self.cfg.public_key),
            )
        elif isinstance(event, UdpBlocked):
            log.warning(
                "UDP to relay %s is blocked (TCP handshakes, UDP does not): staying on TCP, "
                "trying UDP again in %.0fs",
                relay,
                event.probe_in,
            )
        elif isinstance(event, UdpUnanswered):
            log.debug("UDP to relay %s still unanswered; next try in %.0fs", relay, event.probe_in)
        elif isinstance(event, UdpBack):
            log.warning(
                "UDP to relay %s answers again: back on UDP after %.0fs on TCP", relay, event.after
            )
            dialer, self.dialer = self.dialer, None
            self.transport = "udp"
            if self.old_dialer is not None:
                self.tcp_past = merge_counts(self.tcp_past, self.old_dialer.counts)
            self.old_dialer = dialer
            if dialer is not None and self.driver is not None:
                # Closed with a reset: what it still holds is stale, and delivered late it
                # would take the relay back to TCP.
                dialer.close("back on UDP")
                self.driver.detach(dialer)

    def on_relay_changed(self, event: RelayChanged) -> None:
        """Failover moved to another relay: over UDP the core already sends there (the
        roaming watch follows it); over TCP the dialer connects to it instead."""
        where = event.endpoint or self.configured_relay
        self.relay_in_use = where
        log.warning(
            "now through relay %s (%s): %s", event.name or "configured", where, event.reason
        )
        v6 = self.endpoint is not None and ":" in self.endpoint[0]
        address = self.cfg.server if event.endpoint is None else udp_endpoint(event.endpoint, v6)
        if address is None:
            return
        self.endpoint = address
        if self.dialer is not None:
            self.dialer.address = address
            self.dialer.reconnect(f"moving to relay {event.name or 'configured'}")

    # --- device configuration ----------------------------------------------------------

    def open_device(self, mode: str) -> None:
        """Open the device (TUN or TAP) and attach it to the driver.  Raises
        RuntimeFailure."""
        assert self.driver is not None
        tun = self.platform.open_tun(self.cfg.device, tap=mode == "tap", offload=self.cfg.offload)
        self.tun = tun
        self.platform.log_offloads(tun, self.cfg.offload)
        # Peers may leave TCP checksums partial (accept_partial); without offloads the
        # driver completes them.
        finish = mode == "tun" and self.cfg.offload and not tun.vnet
        self.driver.attach_tun(tun, finish_checksums=finish)
        if mode == "tap":
            log.info("opened TAP device %s (layer 2, the relay's mode)", tun.name)

    async def ensure_device(self, mode: str) -> None:
        """Have a device of the relay's mode: open it the first time, and replace it if
        the relay came back in the other mode."""
        tun = self.tun
        if tun is not None and tun.tap == (mode == "tap"):
            return
        if tun is not None:
            log.warning("the relay now runs in %s mode; replacing device %s", mode, tun.name)
            await self.rt.nl(self.unconfigure)
            assert self.driver is not None
            self.driver.detach_tun()
            tun.close()
            self.tun = None
        self.open_device(mode)

    async def apply_config(self, config: PushedConfig) -> None:
        async with self._config_lock:
            if self.stop.is_set() or config == self.applied:
                return
            try:
                await self.ensure_device(config.mode)
                await self.rt.nl(self.configure, config)
            except GtunError as exc:
                self.exit_error = RuntimeFailure(f"cannot configure {self.cfg.device}: {exc}")
                self.stop.set()
                return
            self.rt.say(self._describe())

    async def apply_mtu(self, event: MtuChanged) -> None:
        """Give the device the MTU the core found (once it is configured: until then
        configure() takes the core's MTU itself)."""
        async with self._config_lock:
            link = self.link
            if self.stop.is_set() or link is None or self.core is None:
                return
            mtu = self.core.mtu  # the latest, should events have queued up
            if mtu is None:
                return
            try:
                await self.rt.nl(link.set_mtu, mtu)
            except GtunError as exc:
                log.error("cannot set the MTU of %s to %d: %s", self.cfg.device, mtu, exc)
                return
            log.warning("path MTU: %s; %s mtu %d", event.reason, self.cfg.device, mtu)

    def configure(self, config: PushedConfig) -> None:
        assert self.tun is not None
        if self.applied is not None:
            log.info("the relay changed this client's configuration; reapplying")
            if self.applied.address != config.address:
                log.warning(
                    "the address changed from %s to %s (another relay's lease)",
                    self.applied.address,
                    config.address,
                )
        if self.link is not None:
            self.unconfigure()  # also what an interrupted earlier configure left
        link = self.platform.link(self.tun.name)
        self.link = link
        # The path's MTU when probing found it lower than the relay's (never higher).
        mtu = config.mtu
        if self.core is not None and self.core.path_mtu is not None:
            mtu = min(mtu, self.core.path_mtu)
        link.set_mtu(mtu)
        if config.mode == "tap":
            link.set_mac(mac_for_key(self.cfg.public_key))
            # The relay pins this peer to the link-local address its MAC gives.
            self.platform.eui64_link_local(self.tun.name)
        link.add_address(IPv4Interface(f"{config.address}/{config.prefix}"))
        ipv6 = config.address6 is not None
        if ipv6:
            try:
                self.platform.enable_ipv6(self.tun.name)
            except RuntimeFailure as exc:
                # A host without IPv6 still gets the IPv4 tunnel.
                log.warning("%s; going on with IPv4 only", exc)
                ipv6 = False
        if ipv6:
            link.add_address(IPv6Interface(f"{config.address6}/{config.prefix6}"))
        link.set_up()
        # On a TAP device routes go via a neighbour (the relay); on a TUN, straight in.
        gateway = config.gateway if config.mode == "tap" else None
        gateway6 = config.gateway6 if config.mode == "tap" and ipv6 else None
        for route in config.routes:
            # An IPv6 route is of no use to a client without an IPv6 address.
            if route.version == 4:
                link.add_route(route, gateway=gateway)
            elif ipv6:
                link.add_route(route, gateway=gateway6)
        if self.full_tunnel is not None:
            # The relay's IPv6 push (when there is one) routes IPv6 into the tunnel too;
            # otherwise the full tunnel makes IPv6 unreachable rather than leak it.
            address6 = config.address6 if ipv6 else None
            self.full_tunnel.apply(
                [config.address] + ([address6] if address6 is not None else []),
                config.dns,
                ipv6=address6 is not None,
                gateways=[g for g in (gateway, gateway6) if g is not None],
            )
            log.info(
                "full tunnel: all traffic through the relay (routing table %d, fwmark %#x)%s",
                self.full_tunnel.table,
                self.full_tunnel.fwmark,
                f", DNS {', '.join(str(d) for d in config.dns)}" if config.dns else "",
            )
        else:
            self.apply_dns(config)
        # Last: status (read by another thread) reports the address only once all of the
        # configuration is in place, and `ipv6` before `applied` for the same reason.
        self.ipv6 = ipv6
        self.applied = config
        log.info(
            "configured %s: %s/%d%s, mtu %d, routes %s%s",
            self.tun.name,
            config.address,
            config.prefix,
            f", {config.address6}/{config.prefix6}" if ipv6 else "",
            mtu,
            ", ".join(str(r) for r in config.routes) or "none",
            f", dns {', '.join(str(d) for d in config.dns)}" if config.dns else "",
        )

    def _describe(self) -> str:
        """The client's status line for systemd (STATUS=)."""
        config, core = self.applied, self.core
        if core is not None and core.connected and config is not None:
            return (
                f"connected to relay {self.relay_in_use} over {self.transport.upper()}: "
                f"{config.address}/{config.prefix} on {self.cfg.device}"
            )
        return f"connecting to relay {self.relay_in_use} over {self.transport.upper()}"

    def apply_dns(self, config: PushedConfig) -> None:
        """Hand the pushed DNS servers to resolvconf when there is one (as wg-quick)."""
        if not config.dns:
            return
        if self.platform.dns_method() != "resolvconf":
            # Without resolvconf, or when resolv.conf is a private mount (ip netns exec,
            # containers) whose resolvconf state would be the host's.
            log.info(
                "pushed DNS servers %s not applied: no resolvconf here",
                ", ".join(str(d) for d in config.dns),
            )
            return
        assert self.tun is not None
        change = dnsconf.DnsChange("resolvconf", interface=f"tun.{self.tun.name}")
        try:
            self.platform.apply_dns(change, config.dns)
            self.dns_change = change
        except RuntimeFailure as exc:
            log.warning("could not apply DNS servers with resolvconf: %s", exc)

    def unconfigure(self) -> None:
        if self.full_tunnel is not None:
            try:
                self.full_tunnel.undo()
            except GtunError as exc:
                log.error("while undoing the full tunnel: %s", exc)
        if self.link is not None:
            try:
                self.link.undo()
                self.link.close()
            except GtunError as exc:
                log.error("while removing the configuration of %s: %s", self.cfg.device, exc)
            self.link = None
        if self.dns_change is not None:
            try:
                self.platform.restore_dns(self.dns_change)
            except RuntimeFailure as exc:
                log.warning("while removing the DNS servers: %s", exc)
            self.dns_change = None
        self.applied = None
        self.ipv6 = False

    # --- control ---------------------------------------------------------------------

    async def wg_get(self) -> list[bytes]:
        """What `wg show` reads (app/uapi.py): the client's key, port and fwmark (full
        tunnel), its relays, the one in use with what is routed into the tunnel."""
        core = self.core
        assert core is not None
        udp = self.driver.udp if self.driver is not None else None
        full = self.full_tunnel is not None and self.full_tunnel.active
        return await client_answer(
            list(core.wg.peers.values()),
            core.server,
            core.wg.wall_offset,
            self.cfg.private_key,
            udp_port(udp.sock if udp is not None else None),
            self.fwmark(),
            client_allowed_ips(self.applied, self.ipv6, full),
        )

    def on_control(
        self, request: dict[str, Any]
    ) -> dict[str, Any] | Coroutine[Any, Any, dict[str, Any]]:
        if request.get("command") == "relay_health":
            return self.relay_health()
        if request.get("command") != "status":
            return {"error": f"unknown command {request.get('command')!r}"}
        core = self.core
        assert core is not None
        wall = core.wg.wall_offset  # fixed at start, so reported times do not jitter
        peer = core.server
        config = self.applied
        full = self.full_tunnel is not None and self.full_tunnel.active
        return self.rt.status(
            {
                "mode": core.device_mode,
                "address": f"{config.address}/{config.prefix}" if config else None,
                "address6": (
                    f"{config.address6}/{config.prefix6}"
                    if config and config.address6 is not None and self.ipv6
                    else None
                ),
                "routes": [str(r) for r in config.routes] if config else [],
                "dns": [str(d) for d in config.dns] if config else [],
                "mtu": core.mtu if config else None,
                # The path MTU probing found (None: not probing: TCP, off, or a relay
                # that does not answer probes), and its state.
                "path_mtu": core.path_mtu,
                "pmtu_state": core.pmtu_state,
                "full_tunnel": full,
                "fwmark": self.full_tunnel.fwmark if full and self.full_tunnel else None,
                "connected": core.connected,
                # What the client concluded about the way to the relay: "udp_blocked"
                # (on TCP, UDP tried again in udp_probe_in s), "no_handshake" (the relay
                # answers no handshake: this key is not its peer), or None.
                "reachability": core.reachability,
                "udp_probe_in": (
                    max(0.0, probe - self.driver.loop.time())
                    if (probe := core.next_udp_probe) is not None and self.driver is not None
                    else None
                ),
                # What it was started with, for doctor to compare with the file now (the
                # relay in use, peers[0], may be another after a failover).
                "config_file": str(self.cfg.path),
                "server": _hostport(*self.cfg.server),
                "server_public_key": encode_key(self.cfg.server_public_key),
                "transport_configured": self.cfg.transport,
                "relays": [encode_key(key) for key in core.wg.peers],
            },
            [
                {
                    "name": "relay",
                    "public_key": encode_key(peer.public_key),
                    "address": str(config.gateway) if config else None,
                    "address6": str(config.gateway6) if config and self.ipv6 else None,
                    "endpoint": endpoint_text(peer.endpoint),
                    # The core's word: data goes over UDP from the moment a probe's
                    # handshake completes, before the TCP connection is closed.
                    "transport": "tcp" if core.transport == "tcp" else "udp",
                    **peer_traffic(peer, wall),
                }
            ],
            merge_counts(
                core.wg.drops,
                core.drops,
                self.tcp_drops() if self.dialer or self.old_dialer else {},
            ),
            self.driver.datapath() if self.driver is not None else None,
        )

    async def relay_health(self) -> dict[str, Any]:
        """The `relay_health` control command: ask the relay in use what its edge last
        saw of its machine (a HEALTH_REQUEST through the core) and wait HEALTH_WAIT at
        most.  {"health": {...}, "relay": ...}, or {"health": None, "reason": ...}."""
        core, driver = self.core, self.driver
        if core is None or driver is None or not core.connected:
            return {"health": None, "reason": "not connected to the relay"}
        if core.config is None:
            return {"health": None, "reason": "no configuration from the relay yet"}
        request_id = core.ask_health(driver.loop.time())
        if request_id is None:
            return {
                "health": None,
                "reason": "the relay does not answer health requests (an older gtun)",
            }
        waiter: asyncio.Future[RelayHealth] = driver.loop.create_future()
        self._health_waiters[request_id] = waiter
        driver.poke()  # sent now, not at the next timer
        try:
            health = await asyncio.wait_for(waiter, HEALTH_WAIT)
        except TimeoutError:
            return {"health": None, "reason": f"the relay did not answer in {HEALTH_WAIT:g} s"}
        finally:
            self._health_waiters.pop(request_id, None)
        return {"health": health_payload(health), "relay": self.relay_in_use}


def run_client(path: Path) -> None:
    """Raises ConfigError or RuntimeFailure (translated by the CLI)."""
    platform = LinuxPlatform()
    platform.check_privileges()
    cfg = load_client_config(path)
    client = Client(cfg, platform)
    keep_heap()  # no brk churn from the 64 KB buffers of the data path
    try:
        asyncio.run(client.run())
    except OSError as exc:
        raise RuntimeFailure(f"client failed: {exc}") from exc


def _hostport(host: str, port: int) -> str:
    """An address as a config's `server` writes it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
