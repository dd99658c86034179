"""The live machine behind `gtun doctor`: `LiveSystem` gathers the facts the checks
(checks.py) decide over, by running `ip`, `nft` and `ping`, reading /proc and /sys,
asking the control socket, and probing the relay (handshake.py).

Every call is bounded: commands by CMD_TIMEOUT, pings by PING_WAIT (run in parallel),
the handshake probes by their own waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any

from gtun.app.config import ClientConfig, ServerConfig
from gtun.app.control import query
from gtun.core.tunnel import RelayHealth, pull_health
from gtun.doctor.checks import PROBE_STEPS, Link, Probe, RelayFacts, Route, StoreFacts
from gtun.doctor.handshake import probe_tcp, probe_udp
from gtun.errors import GtunError

# Tuning knobs, in seconds.
POKE_WAIT = 1.0  # for an ICMP port unreachable after an empty datagram
PING_WAIT = 1  # ping -W
CMD_TIMEOUT = 5.0
HEALTH_QUERY_WAIT = 4.0  # the running client waits 2 s for its relay's answer

ICMP_OVERHEAD = 28  # IPv4 header (20) + ICMP echo header (8)


def _cmd(
    args: Sequence[str], timeout: float = CMD_TIMEOUT
) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _ping_args(address: str, payload: int | None) -> list[str]:
    args = ["ping", "-n", "-c", "1", "-W", str(PING_WAIT)]
    if payload is not None:
        args += ["-M", "do", "-s", str(payload)]
    return [*args, address]


@dataclass
class LiveSystem:
    """The real machine.  Every call is bounded by CMD_TIMEOUT or the probe's own wait."""

    proc: Path = Path("/proc/sys")
    sys_class_net: Path = Path("/sys/class/net")
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(PROBE_STEPS))

    def now(self) -> float:
        return time.time()

    def status(self, path: Path) -> dict[str, Any] | None:
        try:
            answer = query(path, {"command": "status"}, timeout=2.0)
        except GtunError:
            return None
        return None if "error" in answer else answer

    def link(self, dev: str) -> Link | None:
        out = _cmd(["ip", "-j", "addr", "show", "dev", dev])
        if out is None or out.returncode != 0:
            return None
        try:
            info = json.loads(out.stdout)[0]
        except (ValueError, IndexError):
            return None
        addresses = tuple(
            (IPv4Interface if a.get("family") == "inet" else IPv6Interface)(
                f"{a['local']}/{a['prefixlen']}"
            )
            for a in info.get("addr_info", [])
            if a.get("family") in ("inet", "inet6") and a.get("scope") != "link"
        )
        flags: int | None = None
        with contextlib.suppress(OSError, ValueError):
            flags = int((self.sys_class_net / dev / "tun_flags").read_text().strip(), 16)
        return Link(dev, "UP" in info.get("flags", []), int(info.get("mtu", 0)), addresses, flags)

    def route_dev(self, address: str, mark: int | None = None) -> str | None:
        """The device a packet to `address` leaves by (with firewall mark `mark`: as the
        full-tunnel client's own packets to the relay do)."""
        marked = ["mark", str(mark)] if mark else []
        out = _cmd(["ip", "-j", "route", "get", address, *marked])
        if out is None or out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)[0].get("dev")
        except (ValueError, IndexError):
            return None

    def routes(self) -> list[Route]:
        routes = []
        for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            out = _cmd(["ip", "-j", family, "route", "show"])
            if out is None or out.returncode != 0:
                continue
            with contextlib.suppress(ValueError):
                for r in json.loads(out.stdout or "[]"):
                    dst = default if r.get("dst") == "default" else r.get("dst")
                    with contextlib.suppress(ValueError, TypeError):
                        routes.append(Route(ipaddress.ip_network(dst), r.get("dev")))
        return routes

    def sysctl(self, key: str) -> str | None:
        try:
            return (self.proc / key.replace(".", "/")).read_text().strip()
        except OSError:
            return None

    def nft_ruleset(self) -> list[dict[str, Any]] | str:
        out = _cmd(["nft", "-j", "list", "ruleset"])
        if out is None:
            return "nft did not run (is nftables installed?)"
        if out.returncode != 0:
            return out.stderr.strip() or f"nft exited with {out.returncode}"
        try:
            return list(json.loads(out.stdout or '{"nftables": []}')["nftables"])
        except (ValueError, KeyError):
            return "nft gave output that is not JSON"

    def ping_sizes(self, address: str, sizes: Sequence[int]) -> dict[int, bool]:
        def one(size: int) -> bool:
            out = _cmd(_ping_args(address, size - ICMP_OVERHEAD), timeout=PING_WAIT + 2)
            return out is not None and out.returncode == 0

        return dict(zip(sizes, self._pool.map(one, sizes), strict=True))

    def ping_host(self, host: str) -> bool:
        out = _cmd(_ping_args(host, None), timeout=PING_WAIT + 2)
        return out is not None and out.returncode == 0

    def udp_refused(self, host: str, port: int) -> bool:
        """Send an empty datagram (the relay counts it as malformed, nothing more) and
        wait briefly for an ICMP port unreachable."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            return False
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(POKE_WAIT)
            try:
                sock.connect(addr)
                sock.send(b"")
                sock.recv(1)
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
        return False

    def relay_health(self, path: Path) -> RelayHealth | str:
        """Ask the running client on `path` for its relay's health (it waits
        client.HEALTH_WAIT for the relay at most)."""
        try:
            answer = query(path, {"command": "relay_health"}, timeout=HEALTH_QUERY_WAIT)
        except GtunError as exc:
            return str(exc)
        error = answer.get("error")
        if error is not None:
            if "unknown command" in str(error):
                return "the running client is an older gtun (it has no relay_health command)"
            return f"the running client said: {error}"
        health = answer.get("health")
        if not isinstance(health, dict):
            return str(answer.get("reason") or "no answer")
        return pull_health(health)

    def handshake(self, cfg: ClientConfig, transport: str) -> Probe:
        probe = probe_udp if transport == "udp" else probe_tcp
        return asyncio.run(probe(cfg))

    def store(self, cfg: ServerConfig) -> StoreFacts | None:
        """Read the relay's shared store: its schema, its clock (against this
        machine's, the query's round trip halved) and its relays.  Bounded by the
        store's connect and statement timeouts."""
        if cfg.store is None:
            return None
        from gtun.app import pgstore  # psycopg is loaded only for a shared store

        where = pgstore.redact(cfg.store)
        try:
            with pgstore.PgStore(cfg.store, cfg.network, check_schema=False) as store:
                schema = pgstore.schema_version(cfg.store)
                before = time.time()
                clock = store.clock()
                after = time.time()
                relays = store.relay_health() if schema >= 3 else []
        except GtunError as exc:
            return StoreFacts(where, error=str(exc))
        return StoreFacts(
            where,
            schema=schema,
            wanted_schema=pgstore.SCHEMA_VERSION,
            clock_offset=(before + after) / 2 - clock,
            relays=tuple(
                RelayFacts(r.name, r.public_key, r.endpoint, r.seen_ago, r.clock_offset)
                for r in relays
            ),
        )
