"""`gtun client`: a client's edge.  Wires the sans-IO ClientCore to a UDP socket and a
TUN device, configures the device from what the relay pushed, and undoes it on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from gtun.clientcore import (
    ClientCore,
    ConfigReceived,
    Connected,
    Disconnected,
    GaveUpRound,
    Refused,
)
from gtun.config import ClientConfig, load_client_config
from gtun.control import ControlServer
from gtun.edge import Driver, merge_counts
from gtun.errors import ConfigError, GtunError, RuntimeFailure
from gtun.keys import encode_key
from gtun.netconf import LinkConfig
from gtun.relay import PushedConfig
from gtun.server import _fmt_endpoint, check_privileges
from gtun.tcp import TcpDialer, TcpEndpoint
from gtun.tun import PacketDevice, open_tun
from gtun.wg.events import Event

log = logging.getLogger("gtun")

RESOLVE_RETRY = 5.0
SLOW_HANDSHAKE_NOTICE = 1  # retransmissions before saying the relay does not answer
AUTO_FALLBACK = 5.0  # transport "auto": seconds without a handshake answer over UDP


class Client:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.stop = asyncio.Event()
        self.core: ClientCore | None = None
        self.driver: Driver | None = None
        self.dialer: TcpDialer | None = None
        self.transport = "tcp" if cfg.transport == "tcp" else "udp"  # the one in use
        self.tun: PacketDevice | None = None
        self.link: LinkConfig | None = None
        self.applied: PushedConfig | None = None
        self.dns_applied = False
        self.exit_error: GtunError | None = None
        self._told_attempts = 0
        self._netlink = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._config_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def nl(self, fn: Callable[..., Any], *args: Any) -> Any:
        """pyroute2's synchronous API runs its own asyncio loop: call it in a thread."""
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn, *args)

    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        control: ControlServer | None = None
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop.set)
            endpoint = await self.resolve()
            if endpoint is None:
                return
            family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
            core = ClientCore(
                cfg.private_key,
                cfg.server_public_key,
                endpoint if self.transport == "udp" else None,
                wall_offset=time.time() - loop.time(),
            )
            self.core = core
            driver = Driver(core, loop, self.on_event, self.on_udp_error)
            self.driver = driver
            if self.transport == "udp":
                driver.attach_udp(self.open_socket(family, socket.SOCK_DGRAM))
            # The TUN exists from the start so its name is taken, but it is configured
            # only once the relay has pushed an address.
            self.tun = open_tun(cfg.device)
            driver.attach_tun(self.tun)
            control = ControlServer(cfg.control_socket, self.on_control, config_file=cfg.path)
            await control.start()
            log.info(
                "client %s: connecting to relay %s:%d over %s (public key %s)",
                cfg.path.name,
                cfg.server[0],
                cfg.server[1],
                "UDP, falling back to TCP" if cfg.transport == "auto" else self.transport.upper(),
                encode_key(cfg.public_key),
            )
            if cfg.metrics_listen is not None:
                log.warning("metrics_listen is not implemented yet; ignored")
            watchers = [asyncio.create_task(self.watch_handshakes())]
            if self.transport == "tcp":
                self.start_tcp(endpoint)
            else:
                core.start(loop.time())
                driver.poke()
                if cfg.transport == "auto":
                    watchers.append(asyncio.create_task(self.auto_fallback(endpoint)))
            await self.stop.wait()
            for watch in watchers:
                watch.cancel()
            log.info("stopping")
        finally:
            if control is not None:
                await control.close()
            async with self._config_lock:
                await self.nl(self.unconfigure)
            self._netlink.shutdown(wait=True)
            if self.dialer is not None:
                self.dialer.close()
            if self.driver is not None:
                self.driver.close()
            if self.tun is not None:
                self.tun.close()
        if self.exit_error is not None:
            raise self.exit_error

    def open_socket(self, family: int, kind: int) -> socket.socket:
        """Every socket the client sends tunnel traffic on (UDP, and each TCP
        connection) is made here."""
        return socket.socket(family, kind)

    # --- TCP ---------------------------------------------------------------------------

    def start_tcp(self, endpoint: tuple[str, int]) -> None:
        assert self.driver is not None
        self.transport = "tcp"
        self.dialer = TcpDialer(
            self.driver, endpoint, self.open_socket, self.on_tcp_connected, self.on_tcp_lost
        )
        self.dialer.start()

    def on_tcp_connected(self, ep: TcpEndpoint) -> None:
        core, driver = self.core, self.driver
        assert core is not None and driver is not None
        now = driver.loop.time()
        core.set_endpoint(ep)
        if core.server.has_session:
            # The relay moves this peer to the new connection on the first authentic
            # message; the handshake covers a relay that restarted and forgot the session.
            core.wg.send_keepalive(core.server, now)
        # A new connection is a new path: handshake on it now, not when WireGuard's
        # rate limit (one initiation per REKEY_TIMEOUT) next allows.
        core.server.last_initiation_sent = None
        core.start(now)
        driver.poke()

    def on_tcp_lost(self, ep: TcpEndpoint) -> None:
        core = self.core
        if core is not None and core.server.endpoint is ep:
            core.server.endpoint = None

    async def auto_fallback(self, endpoint: tuple[str, int]) -> None:
        """transport "auto": switch to TCP when UDP brings no handshake answer."""
        await asyncio.sleep(AUTO_FALLBACK)
        core, driver = self.core, self.driver
        assert core is not None and driver is not None
        if core.connected or self.stop.is_set():
            return
        log.warning(
            "no answer over UDP from relay %s:%d in %.0fs; falling back to TCP",
            *self.cfg.server,
            AUTO_FALLBACK,
        )
        driver.detach_udp()
        core.server.endpoint = None
        self.start_tcp(endpoint)

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

    async def watch_handshakes(self) -> None:
        """Say so when the relay does not answer, once a while, while retrying."""
        while True:
            await asyncio.sleep(1.0)
            core = self.core
            if core is None or core.connected:
                self._told_attempts = 0
                continue
            attempts = core.server.handshake_attempts
            if attempts >= SLOW_HANDSHAKE_NOTICE and attempts != self._told_attempts:
                if attempts == SLOW_HANDSHAKE_NOTICE or attempts % 6 == 0:
                    log.warning(
                        "relay %s:%d does not answer (%d handshake attempts): is it running, "
                        "is %s port %d reachable, and is this key (%s) one of its peers? "
                        "still trying",
                        *self.cfg.server,
                        attempts + 1,
                        self.transport.upper(),
                        self.cfg.server[1],
                        encode_key(self.cfg.public_key),
                    )
                self._told_attempts = attempts

    # --- events ----------------------------------------------------------------------

    def on_udp_error(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            log.debug("relay %s:%d refused (nothing listens on that UDP port)", *self.cfg.server)
        else:
            log.debug("UDP error: %s", exc)

    def on_event(self, event: Event) -> None:
        if isinstance(event, Connected):
            log.info("handshake with relay %s:%d complete", *self.cfg.server)
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
            if self.dialer is not None:
                self.dialer.reconnect("the relay is silent")
        elif isinstance(event, GaveUpRound):
            log.warning(
                "relay %s:%d did not answer for 90s; next attempt in %.0fs",
                *self.cfg.server,
                event.retry_in,
            )

    # --- device configuration ----------------------------------------------------------

    async def apply_config(self, config: PushedConfig) -> None:
        async with self._config_lock:
            if self.stop.is_set() or config == self.applied:
                return
            try:
                await self.nl(self.configure, config)
            except GtunError as exc:
                self.exit_error = RuntimeFailure(f"cannot configure {self.cfg.device}: {exc}")
                self.stop.set()

    def configure(self, config: PushedConfig) -> None:
        assert self.tun is not None
        if self.applied is not None:
            log.info("the relay changed this client's configuration; reapplying")
            self.unconfigure()
        link = LinkConfig(self.tun.name)
        self.link = link
        link.set_mtu(config.mtu)
        link.add_address(IPv4Interface(f"{config.address}/{config.prefix}"))
        link.set_up()
        for route in config.routes:
            if route.version == 4:
                link.add_route(route)
        self.applied = config
        self.apply_dns(config)
        log.info(
            "configured %s: %s/%d, mtu %d, routes %s%s",
            self.tun.name,
            config.address,
            config.prefix,
            config.mtu,
            ", ".join(str(r) for r in config.routes) or "none",
            f", dns {', '.join(str(d) for d in config.dns)}" if config.dns else "",
        )

    def apply_dns(self, config: PushedConfig) -> None:
        """Hand the pushed DNS servers to resolvconf when there is one (as wg-quick)."""
        if not config.dns:
            return
        resolvconf = shutil.which("resolvconf")
        if resolvconf is None:
            log.info("pushed DNS servers %s not applied: no resolvconf here", list(config.dns))
            return
        text = "".join(f"nameserver {d}\n" for d in config.dns)
        assert self.tun is not None
        try:
            subprocess.run(
                [resolvconf, "-a", f"tun.{self.tun.name}", "-m", "0", "-x"],
                input=text,
                text=True,
                check=True,
                capture_output=True,
                timeout=10,
            )
            self.dns_applied = True
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not apply DNS servers with resolvconf: %s", exc)

    def unconfigure(self) -> None:
        if self.link is not None:
            try:
                self.link.undo()
                self.link.close()
            except GtunError as exc:
                log.error("while removing the configuration of %s: %s", self.cfg.device, exc)
            self.link = None
        if self.dns_applied and self.tun is not None:
            resolvconf = shutil.which("resolvconf")
            if resolvconf:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(
                        [resolvconf, "-d", f"tun.{self.tun.name}", "-f"],
                        check=False,
                        capture_output=True,
                        timeout=10,
                    )
            self.dns_applied = False
        self.applied = None

    # --- control ---------------------------------------------------------------------

    def on_control(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("command") != "status":
            return {"error": f"unknown command {request.get('command')!r}"}
        core = self.core
        assert core is not None
        wall = core.wg.wall_offset  # fixed at start, so reported times do not jitter
        peer = core.server
        config = self.applied
        return {
            "role": "client",
            "device": self.cfg.device,
            "address": f"{config.address}/{config.prefix}" if config else None,
            "routes": [str(r) for r in config.routes] if config else [],
            "dns": [str(d) for d in config.dns] if config else [],
            "mtu": config.mtu if config else None,
            "connected": core.connected,
            "public_key": encode_key(self.cfg.public_key),
            "uptime": time.time() - self.started,
            "peers": [
                {
                    "name": "relay",
                    "public_key": encode_key(peer.public_key),
                    "address": str(config.gateway) if config else None,
                    "endpoint": _fmt_endpoint(peer.endpoint),
                    "transport": self.transport,
                    "rx_bytes": peer.rx_bytes,
                    "tx_bytes": peer.tx_bytes,
                    "rx_packets": peer.rx_packets,
                    "tx_packets": peer.tx_packets,
                    "last_handshake": (
                        peer.last_handshake + wall if peer.last_handshake is not None else None
                    ),
                }
            ],
            "drops": merge_counts(
                core.wg.drops, core.drops, self.dialer.counts if self.dialer else {}
            ),
        }


def run_client(path: Path) -> None:
    """Raises ConfigError or RuntimeFailure (translated by the CLI)."""
    check_privileges(path)
    cfg = load_client_config(path)
    if cfg.default_route:
        raise ConfigError(
            "default_route = true (full tunnel) is not implemented yet",
            file=cfg.path,
            key="client.default_route",
        )
    client = Client(cfg)
    try:
        asyncio.run(client.run())
    except OSError as exc:
        raise RuntimeFailure(f"client failed: {exc}") from exc
