"""`gtun doctor`: check a relay or a client, the machine and the path, and explain.

Shape: the facts are gathered by a `System` (the real one runs `ip`, `nft`, `ping`, reads
/proc and /sys, asks the control socket and probes the relay with a short-lived WireGuard
core); every check is a small pure function from facts to a `Result`, so the tests give
each check its facts directly.  The whole run is bounded: every probe has its own timeout
(the handshake probe 3 s over UDP and 2 s over TCP, pings 1 s each, run in parallel).

On a client, a running client is asked first (control socket) and trusted: doctor never
starts a handshake with the client's key while a client runs, since a second session with
the same key would take the running client's endpoint at the relay.  Only when no client
runs does it probe with its own WireGuard core, over UDP and then TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any, Protocol

from gtun.app.config import ClientConfig, ServerConfig, load_client_config, load_server_config
from gtun.app.keys import decode_key, encode_key
from gtun.core import tunnel as tm
from gtun.core.wg import HandshakeCompleted, PacketReceived, WireGuard
from gtun.errors import ConfigError, GtunError
from gtun.io.framing import HEADER_SIZE, LENGTH, FrameError, check_length, push_frame
from gtun.system.nft import table_name

Network = IPv4Network | IPv6Network

# Tuning knobs: the bounds of each probe, in seconds.
UDP_HANDSHAKE_WAIT = 3.0
TCP_HANDSHAKE_WAIT = 2.0
CONFIG_WAIT = 1.5  # after the handshake, for the relay's CONFIG or REFUSED
POKE_WAIT = 1.0  # for an ICMP port unreachable after an empty datagram
PING_WAIT = 1  # ping -W
CMD_TIMEOUT = 5.0
STALE_HANDSHAKE = 180.0  # REJECT_AFTER_TIME: a session older than this is dead
MIN_PROBE = 576  # the smallest packet the MTU probe tries (RFC 791)
PROBE_STEPS = 12  # packet sizes tried in parallel per round of the MTU probe
PROBE_ROUNDS = 3  # each round narrows the gap between the best pass and the next fail

IFF_TUN = 0x0001  # <linux/if_tun.h>
IFF_TAP = 0x0002
ICMP_OVERHEAD = 28  # IPv4 header (20) + ICMP echo header (8)


# ---------------------------------------------------------------------------
# Results and their output


@dataclass(frozen=True)
class Result:
    check: str
    ok: bool
    detail: str
    fix: str | None = None


def ok(check: str, detail: str) -> Result:
    return Result(check, True, detail)


def problem(check: str, detail: str, fix: str) -> Result:
    return Result(check, False, detail, fix)


def format_text(results: Sequence[Result]) -> str:
    lines = []
    for r in results:
        if r.ok:
            lines.append(f"OK    {r.check}: {r.detail}")
        else:
            lines.append(f"PROBLEM {r.check}: {r.detail} — fix: {r.fix}")
    return "\n".join(lines)


def format_json(results: Sequence[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False)


def exit_code(results: Sequence[Result]) -> int:
    return 0 if all(r.ok for r in results) else 1


# ---------------------------------------------------------------------------
# Facts


@dataclass(frozen=True)
class Link:
    """A network device as `ip -j addr show` and /sys describe it."""

    name: str
    up: bool  # administratively up (IFF_UP)
    mtu: int
    addresses: tuple[IPv4Interface | IPv6Interface, ...] = ()
    tun_flags: int | None = None  # None: not a TUN/TAP device (or unknown)


@dataclass(frozen=True)
class Route:
    network: Network
    dev: str | None


@dataclass
class Probe:
    """What a handshake probe (sans-IO, below) learned from the relay."""

    transport: str
    answered: bool = False
    error: str | None = None  # why it could not even talk: "refused", "timed out", ...
    connected: bool = False  # TCP only: the connection was accepted
    config: dict[str, Any] | None = None
    refused: str | None = None  # the relay's REFUSED reason
    rtt: float | None = None


class System(Protocol):
    """The facts doctor gathers; the real one is `LiveSystem`, tests inject their own."""

    def status(self, path: Path) -> dict[str, Any] | None: ...
    def link(self, dev: str) -> Link | None: ...
    def route_dev(self, address: str, mark: int | None = None) -> str | None: ...
    def routes(self) -> list[Route]: ...
    def sysctl(self, key: str) -> str | None: ...
    def nft_ruleset(self) -> list[dict[str, Any]] | str: ...
    def ping_sizes(self, address: str, sizes: Sequence[int]) -> dict[int, bool]: ...
    def ping_host(self, host: str) -> bool: ...
    def udp_refused(self, host: str, port: int) -> bool: ...
    def handshake(self, cfg: ClientConfig, transport: str) -> Probe: ...


# ---------------------------------------------------------------------------
# Checks (pure)


def _fix_server(path: Path) -> str:
    return f"gtun server -c {path}"


def check_client_running(cfg: ClientConfig, status: dict[str, Any] | None) -> Result:
    if status is None:
        return problem(
            "client",
            f"no client runs with this config (nothing answers on {cfg.control_socket})",
            f"gtun client -c {cfg.path}",
        )
    state = "connected" if status.get("connected") else "not connected"
    return ok("client", f"running, {state}, address {status.get('address') or 'none yet'}")


def check_relay_running(cfg: ServerConfig, status: dict[str, Any] | None) -> Result:
    if status is None:
        return problem(
            "relay",
            f"the relay is not running (nothing answers on {cfg.control_socket})",
            _fix_server(cfg.path),
        )
    return ok(
        "relay",
        f"running, {len(status.get('peers', []))} peers",
    )


def _hostport(cfg: ClientConfig) -> str:
    host, port = cfg.server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _add_peer_fix(key: str, server_config: str) -> str:
    return (
        f'add [[peers]] name = "NAME" public_key = "{key}" to {server_config} and send the '
        f"relay SIGHUP (or use the key pair `gtun peer add NAME -c {server_config}` makes)"
    )


def _silent_fix(cfg: ClientConfig) -> str:
    key = encode_key(cfg.public_key)
    return (
        f"on the relay, `gtun pubkey < server.key` must print {encode_key(cfg.server_public_key)}"
        f" (this config's server_public_key), and `gtun doctor -c server.toml --key {key}` "
        f"says whether this client is a peer; if not, {_add_peer_fix(key, 'server.toml')}"
    )


def check_path(
    cfg: ClientConfig,
    status: dict[str, Any] | None,
    udp_refused: bool,
    udp: Probe | None,
    tcp: Probe | None,
    host_pings: bool | None,
) -> list[Result]:
    """The relay's reachability and the handshake.

    `status` is the running client's (None: none runs, so `udp`/`tcp` are our own probes);
    `udp_refused`: an ICMP port unreachable came back from the relay's UDP port."""
    where = _hostport(cfg)
    port = cfg.server[1]
    start = f'on the relay: {_fix_server(Path("server.toml"))} (listen = "0.0.0.0:{port}")'
    results: list[Result] = []
    tcp_works = tcp is not None and tcp.answered
    running_ok = status is not None and bool(status.get("connected"))
    udp_ok = udp is not None and udp.answered
    if udp_refused or (udp is not None and udp.error == "refused"):
        if tcp_works:
            results.append(
                problem(
                    "relay",
                    f"nothing listens on UDP {where} (ICMP port unreachable) but TCP answers",
                    f'set transport = "tcp" (or "auto") in [client] of {cfg.path}',
                )
            )
        else:
            results.append(
                problem(
                    "relay",
                    f"nothing listens on UDP {where} (ICMP port unreachable): "
                    "the relay is not running there",
                    start,
                )
            )
        return results
    if tcp_works and cfg.transport == "tcp":
        results.append(ok("relay", f"{where} reachable over TCP"))
        results.append(ok("handshake", "answered over TCP"))
        return results
    if running_ok or udp_ok:
        how = "the running client has a session" if running_ok else "answers the handshake"
        if udp_ok and udp is not None and udp.rtt is not None:
            how += f" over UDP in {udp.rtt * 1000:.0f} ms"
        results.append(ok("relay", f"{where} reachable"))
        results.append(ok("handshake", how))
        return results
    if tcp_works:
        results.append(
            problem(
                "relay",
                f"UDP to {where} gets no answer but TCP does (UDP is blocked on the way)",
                f'set transport = "auto" (or "tcp") in [client] of {cfg.path}',
            )
        )
        results.append(ok("handshake", "answered over TCP"))
        return results
    if udp is not None and udp.error not in (None, "refused"):
        results.append(
            problem(
                "relay",
                f"cannot send UDP to {where}: {udp.error} (a firewall on this machine?)",
                f"nft list ruleset  (and remove what drops UDP to port {port}), "
                f'or set transport = "auto" in [client] of {cfg.path}',
            )
        )
        return results
    if status is not None:
        silent = f"the running client has no session with {where}"
        last = _last_handshake(status)
        if last is not None:
            silent += f" (last handshake {time.time() - last:.0f} s ago)"
    else:
        silent = f"{where} does not answer this client's handshake ({_tried(udp, tcp)})"
    # A TCP reset, an open TCP port or a ping reply: the relay's host is there.
    tcp_open = tcp is not None and tcp.connected
    tcp_reset = tcp is not None and tcp.error == "refused"
    if tcp_open or tcp_reset or host_pings:
        if tcp_open:
            seen = "its TCP port is open"
        elif host_pings:
            seen = "the host answers ping"
        else:
            seen = "the host answers on TCP"
        results.append(ok("relay", f"{where} reachable ({seen})"))
        results.append(
            problem(
                "handshake",
                f"{silent}: wrong server_public_key, this client's key is not a peer, "
                f"or UDP port {port} is filtered",
                _silent_fix(cfg),
            )
        )
        return results
    results.append(
        problem(
            "relay",
            f"{where} unreachable: no answer ({_tried(udp, tcp)}; ping: none)",
            f"{start}, and open UDP port {port} on its firewall "
            f"(nft add rule inet filter input udp dport {port} accept)",
        )
    )
    return results


def _tried(udp: Probe | None, tcp: Probe | None) -> str:
    parts = []
    for probe, wait in ((udp, UDP_HANDSHAKE_WAIT), (tcp, TCP_HANDSHAKE_WAIT)):
        if probe is not None:
            what = probe.error or f"no answer in {wait:g} s"
            if probe.error == "refused":
                what = "connection refused" if probe.transport == "tcp" else "port unreachable"
            parts.append(f"{probe.transport.upper()}: {what}")
    return "; ".join(parts) or "the running client's session"


def _last_handshake(status: dict[str, Any]) -> float | None:
    for peer in status.get("peers", []):
        if peer.get("last_handshake") is not None:
            return float(peer["last_handshake"])
    return None


def check_mode(
    want: str | None, link: Link | None, dev: str, refused: str | None, path: Path, section: str
) -> Result | None:
    """TUN/TAP: the relay's REFUSED answer, or an existing device of the other type."""
    if refused is not None:
        other = "tap" if want == "tun" else "tun"
        return problem(
            "mode",
            f"the relay refused this client: {refused}",
            f'set mode = "{other}" (or remove mode) in [{section}] of {path}',
        )
    if link is None or link.tun_flags is None or want is None:
        return None
    actual = "tap" if link.tun_flags & IFF_TAP else "tun"
    if actual != want:
        return problem(
            "mode",
            f'{dev} is a {actual.upper()} device but the config says mode = "{want}"',
            f"stop what owns {dev}, then `ip link del {dev}`, and restart gtun",
        )
    return ok("mode", f"{dev} is a {actual.upper()} device as configured")


def check_device(dev: str, link: Link | None, restart: str) -> Result:
    if link is None:
        return problem("device", f"{dev} does not exist", restart)
    if not link.up:
        return problem("device", f"{dev} is down", f"ip link set {dev} up")
    return ok("device", f"{dev} is up, mtu {link.mtu}")


def check_address(
    dev: str,
    link: Link | None,
    want: IPv4Interface | IPv6Interface | None,
    check: str = "address",
) -> Result | None:
    if link is None or want is None:
        return None
    if want in link.addresses:
        return ok(check, f"{want} on {dev}")
    have = ", ".join(str(a) for a in link.addresses) or "none"
    return problem(
        check, f"{want} is missing from {dev} (it has {have})", f"ip addr add {want} dev {dev}"
    )


def _probe_host(net: Network) -> str:
    return str(net.network_address if net.prefixlen == net.max_prefixlen else net[1])


def check_routes(
    dev: str, wanted: Iterable[Network], route_dev: Callable[[str], str | None], table: list[Route]
) -> Result | None:
    """Each network must leave by `dev`: missing, or shadowed by a more specific route."""
    wanted = list(wanted)
    if not wanted:
        return None
    problems: list[tuple[str, str]] = []
    for net in wanted:
        via = route_dev(_probe_host(net))
        shadow = [
            r
            for r in table
            if r.dev != dev
            and r.network.version == net.version
            and r.network.prefixlen > net.prefixlen
            and r.network.subnet_of(net)  # type: ignore[arg-type]
        ]
        ours = any(r.network == net and r.dev == dev for r in table)
        if shadow:
            s = shadow[0]
            other = f"{s.network} dev {s.dev}" if s.dev else f"{s.network} (no device)"
            undo = f"ip route del {s.network}" + (f" dev {s.dev}" if s.dev else "")
            problems.append((f"{net} is shadowed by {other}", undo))
        elif via == dev:
            continue
        elif not ours:
            problems.append((f"{net} has no route through {dev}", f"ip route add {net} dev {dev}"))
        else:
            problems.append(
                (
                    f"{net} leaves by {via or 'no device'}, not {dev} (a policy rule or a more "
                    "specific route wins)",
                    f"ip route get {_probe_host(net)}; ip rule list",
                )
            )
    if not problems:
        return ok("routes", f"{', '.join(str(n) for n in wanted)} leave by {dev}")
    fixes = dict.fromkeys(p[1] for p in problems)
    return problem("routes", "; ".join(p[0] for p in problems), "; ".join(fixes))


def check_endpoint(dev: str, host: str, via: str | None) -> Result | None:
    """The relay's own endpoint must not be routed into the tunnel (a loop)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if via == dev:
        return problem(
            "endpoint",
            f"the relay's endpoint {host} is routed into {dev}: the tunnel would carry itself",
            f"ip route add {host} via <your gateway>  (a more specific route outside {dev})",
        )
    return None


def mtu_probe_sizes(low: int, high: int, steps: int = PROBE_STEPS) -> list[int]:
    """Packet sizes from `high` down to `low` (both included), evenly spaced."""
    if high <= low:
        return [high]
    step = max(1, (high - low) // (steps - 1))
    sizes = list(range(high, low, -step))[: steps - 1] + [low]
    return sorted(set(sizes), reverse=True)


def check_mtu(dev: str, mtu: int, target: str, passed: dict[int, bool]) -> Result:
    """`passed`: packet size (IP total length, DF set) -> a reply came back."""
    good = [s for s, p in passed.items() if p]
    if passed.get(mtu):
        return ok("mtu", f"{mtu}-byte packets with DF reach {target} and back")
    if not good:
        return problem(
            "tunnel",
            f"{target} (the relay's tunnel address) answers no ping through {dev}, "
            f"not even {min(passed) if passed else MIN_PROBE}-byte packets",
            "run `gtun doctor -c server.toml` on the relay",
        )
    largest = max(good)
    return problem(
        "mtu",
        f"black hole: {mtu}-byte packets to {target} vanish; the largest that passes is "
        f"{largest} bytes",
        f"ip link set {dev} mtu {largest} (now); mtu = {largest} in the relay's [server] "
        "(lasting; it is pushed to the clients)",
    )


def check_forwarding(ip_forward: str | None, dev_forwarding: str | None, dev: str) -> Result:
    if ip_forward != "1":
        return problem(
            "forwarding",
            f"IPv4 forwarding is off (net.ipv4.ip_forward = {ip_forward})",
            "sysctl -w net.ipv4.ip_forward=1",
        )
    if dev_forwarding is not None and dev_forwarding != "1":
        return problem(
            "forwarding",
            f"forwarding is off on {dev} (net.ipv4.conf.{dev}.forwarding = {dev_forwarding})",
            f"sysctl -w net.ipv4.conf.{dev}.forwarding=1",
        )
    return ok("forwarding", "IPv4 forwarding is on")


def check_rp_filter(all_value: str | None, dev_value: str | None, dev: str) -> Result:
    # The kernel uses the larger of conf.all and conf.<dev> (Documentation/networking/
    # ip-sysctl.rst); 1 is strict, 2 loose.
    values = [int(v) for v in (all_value, dev_value) if v is not None and v.isdigit()]
    effective = max(values, default=0)
    if effective == 1:
        where = [
            f"net.ipv4.conf.{name}.rp_filter = 1"
            for name, v in (("all", all_value), (dev, dev_value))
            if v == "1"
        ]
        return problem(
            "rp_filter",
            f"strict reverse-path filtering ({', '.join(where)}) drops tunnel packets whose "
            f"source is not routed back through {dev} (peers' LANs, full-tunnel traffic)",
            f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{dev}.rp_filter=2",
        )
    return ok("rp_filter", f"reverse-path filter {('off', 'strict', 'loose')[effective]}")


_VERDICTS = ("accept", "drop", "reject")


def _rule_facts(expr: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any], bool, bool]:
    """(verdict, interface matches {iifname/oifname: value}, other matches?, established?)"""
    verdict = None
    ifaces: dict[str, Any] = {}
    other = False
    established = False
    for e in expr:
        for v in _VERDICTS:
            if v in e:
                verdict = v
        match = e.get("match")
        if match is None:
            continue
        left = match.get("left", {})
        key = left.get("meta", {}).get("key") if isinstance(left, dict) else None
        if key in ("iifname", "oifname", "iif", "oif") and match.get("op") in ("==", "in"):
            ifaces[key.replace("name", "")] = match.get("right")
        elif isinstance(left, dict) and left.get("ct", {}).get("key") == "state":
            right = match.get("right")
            states = right if isinstance(right, list) else [right]
            established = "established" in states
            other = True
        else:
            other = True
    return verdict, ifaces, other, established


def _names(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict) and "set" in value:
        return [str(v) for v in value["set"]]
    return [str(value)]


def _matches_dev(value: Any, dev: str) -> bool:
    for name in _names(value):
        if name == dev or (name.endswith("*") and dev.startswith(name[:-1])):
            return True
    return False


def forward_verdict(
    chain: dict[str, Any], rules: list[dict[str, Any]], dev: str, direction: str
) -> str:
    """What a forward base chain does to traffic entering ("iif") or leaving ("oif") by
    `dev`: "accept" or "drop".  Rules matching other things (addresses, ports) are taken
    not to concern the tunnel; a drop rule with no match at all, or one naming `dev`, does.
    """
    for rule in rules:
        verdict, ifaces, other, established = _rule_facts(rule.get("expr", []))
        if verdict is None:
            continue
        mine = direction in ifaces and _matches_dev(ifaces[direction], dev)
        if verdict == "accept":
            if mine or (direction == "oif" and established and not ifaces):
                return "accept"
        elif mine or (not ifaces and not other):
            return "drop"
    return "drop" if chain.get("policy") == "drop" else "accept"


def check_forward_chain(ruleset: list[dict[str, Any]] | str, dev: str) -> Result:
    if isinstance(ruleset, str):
        return problem("forward", f"cannot read the nftables ruleset: {ruleset}", "run as root")
    chains = [o["chain"] for o in ruleset if "chain" in o and o["chain"].get("hook") == "forward"]
    bad = []
    for chain in chains:
        rules = [
            o["rule"]
            for o in ruleset
            if "rule" in o
            and o["rule"].get("family") == chain.get("family")
            and o["rule"].get("table") == chain.get("table")
            and o["rule"].get("chain") == chain.get("name")
        ]
        for direction in ("iif", "oif"):
            if forward_verdict(chain, rules, dev, direction) == "drop":
                bad.append((chain, direction))
    if not bad:
        return ok("forward", f"no forward chain drops traffic through {dev}")
    fixes = []
    for chain, direction in bad:
        ref = f"{chain['family']} {chain['table']} {chain['name']}"
        fixes.append(f'nft insert rule {ref} {direction}name "{dev}" accept')
    names = sorted({f"{c['family']} {c['table']} {c['name']}" for c, _ in bad})
    what = " and ".join(
        sorted({"from" if d == "iif" else "to" for _, d in bad}, key=lambda w: w != "from")
    )
    return problem(
        "forward",
        f"forward chain {', '.join(names)} drops traffic {what} {dev}",
        "; ".join(fixes),
    )


def check_nat(
    nat: bool, routes: Sequence[Network], network: IPv4Network, dev: str, ruleset: Any, path: Path
) -> Result:
    if isinstance(ruleset, str):
        return problem("nat", f"cannot read the nftables ruleset: {ruleset}", "run as root")
    table = table_name(dev)
    ours = any(
        "rule" in o
        and o["rule"].get("table") == table
        and o["rule"].get("family") == "inet"
        and any("masquerade" in e for e in o["rule"].get("expr", []))
        for o in ruleset
    )
    if nat:
        if ours:
            return ok("nat", f"{network} is masqueraded as it leaves (table inet {table})")
        return problem(
            "nat",
            f"nat = true but the masquerade table inet {table} is missing: clients' traffic "
            "leaves with addresses nobody routes back",
            f"restart the relay ({_fix_server(path)}), which installs it",
        )
    if routes:
        other = any(
            "rule" in o and any("masquerade" in e or "snat" in e for e in o["rule"].get("expr", []))
            for o in ruleset
        )
        if other:
            return ok("nat", "nat = false, but another nftables rule masquerades or SNATs")
        return problem(
            "nat",
            f"nat = false while routes {', '.join(str(r) for r in routes)} are pushed: hosts "
            f"there get packets from {network} and have no route back",
            f"set nat = true in [server] of {path} and restart, or route {network} to this "
            "relay on those networks' router",
        )
    return ok("nat", "nat = false and no routes are pushed")


def check_peer(key_text: str, status: dict[str, Any] | None, cfg: ServerConfig) -> Result:
    peers = (status or {}).get("peers")
    if peers is None:
        known = [(p.name, encode_key(p.public_key)) for p in cfg.peers]
        entries = [{"name": n, "public_key": k} for n, k in known]
    else:
        entries = peers
    for peer in entries:
        if peer.get("public_key") == key_text:
            detail = f"{key_text} is peer {peer['name']}"
            if peer.get("address"):
                detail += f" ({peer['address']})"
            if peer.get("last_handshake"):
                age = time.time() - float(peer["last_handshake"])
                detail += f", last handshake {age:.0f} s ago"
            return ok("peer", detail)
    return problem(
        "peer",
        f"{key_text} is not a peer of this relay",
        _add_peer_fix(key_text, str(cfg.path)),
    )


# ---------------------------------------------------------------------------
# The runs


def mtu_search(system: System, mtu: int, target: str) -> dict[int, bool]:
    """Rounds of parallel DF pings, each between the largest size that passed and the
    smallest that failed.  Returns size -> passed."""
    passed = system.ping_sizes(target, mtu_probe_sizes(MIN_PROBE, mtu))
    for _ in range(PROBE_ROUNDS - 1):
        good = [s for s, p in passed.items() if p]
        if passed.get(mtu) or not good:
            break
        low = max(good)
        high = min(s for s, p in passed.items() if not p and s > low)
        if high - low <= 1:
            break
        inner = [s for s in mtu_probe_sizes(low + 1, high - 1) if s not in passed]
        passed.update(system.ping_sizes(target, inner))
    return passed


def diagnose_client(cfg: ClientConfig, system: System) -> list[Result]:
    results: list[Result] = []
    status = system.status(cfg.control_socket)
    results.append(check_client_running(cfg, status))
    host, port = cfg.server
    refused = system.udp_refused(host, port) if status is not None else False
    udp: Probe | None = None
    tcp: Probe | None = None
    if status is None:
        if cfg.transport in ("udp", "auto"):
            udp = system.handshake(cfg, "udp")
        if not (udp and udp.answered) and not (udp and udp.refused):
            tcp = system.handshake(cfg, "tcp")
    host_pings = None
    running_ok = status is not None and status.get("connected")
    answered = (udp and udp.answered) or (tcp and tcp.answered)
    closed = refused or (udp and udp.error == "refused")
    if not running_ok and not answered and not closed:
        host_pings = system.ping_host(host)
    results.extend(check_path(cfg, status, refused, udp, tcp, host_pings))
    refused_reason = next((p.refused for p in (udp, tcp) if p and p.refused), None)
    link = system.link(cfg.device)
    mode = check_mode(
        cfg.mode, link if status is not None else None, cfg.device, refused_reason, cfg.path,
        "client",
    )  # fmt: skip
    if mode is not None:
        results.append(mode)
    # A full-tunnel client marks its packets to the relay so that they go around the
    # tunnel: look the endpoint up as those packets are routed.
    fwmark = status.get("fwmark") if status is not None else None
    via = system.route_dev(host, fwmark) if isinstance(fwmark, int) else system.route_dev(host)
    endpoint = check_endpoint(cfg.device, host, via)
    if endpoint is not None:
        results.append(endpoint)
    if status is None:
        return results
    results.append(check_device(cfg.device, link, f"restart the client: gtun client -c {cfg.path}"))
    address = status.get("address")
    want = IPv4Interface(address) if address else None
    addr = check_address(cfg.device, link, want)
    if addr is not None:
        results.append(addr)
    address6 = status.get("address6")
    addr6 = check_address(
        cfg.device, link, IPv6Interface(address6) if address6 else None, "address6"
    )
    if addr6 is not None:
        results.append(addr6)
    if link is None or not link.up or want is None:
        return results
    gateway = next((p.get("address") for p in status.get("peers", []) if p.get("address")), None)
    wanted: list[Network] = []
    if gateway:
        wanted.append(IPv4Network(f"{gateway}/32"))
    wanted.extend(ipaddress.ip_network(r) for r in status.get("routes", []))
    routes = check_routes(cfg.device, wanted, system.route_dev, system.routes())
    if routes is not None:
        results.append(routes)
    results.append(
        check_rp_filter(
            system.sysctl("net.ipv4.conf.all.rp_filter"),
            system.sysctl(f"net.ipv4.conf.{cfg.device}.rp_filter"),
            cfg.device,
        )
    )
    if gateway and status.get("connected") and (routes is None or routes.ok):
        mtu = int(status.get("mtu") or link.mtu)
        passed = mtu_search(system, mtu, gateway)
        results.append(check_mtu(cfg.device, mtu, gateway, passed))
    return results


def diagnose_relay(cfg: ServerConfig, system: System, key: str | None = None) -> list[Result]:
    results: list[Result] = []
    status = system.status(cfg.control_socket)
    results.append(check_relay_running(cfg, status))
    results.append(ok("key", f"this relay's public key is {encode_key(cfg.public_key)}"))
    if key is not None:
        results.append(check_peer(key, status, cfg))
    dev = cfg.device
    link = system.link(dev)
    results.append(check_device(dev, link, f"restart the relay: {_fix_server(cfg.path)}"))
    mode = check_mode(cfg.mode, link, dev, None, cfg.path, "server")
    if mode is not None:
        results.append(mode)
    want = IPv4Interface(f"{cfg.relay_address}/{cfg.network.prefixlen}")
    addr = check_address(dev, link, want)
    if addr is not None:
        results.append(addr)
    if cfg.network6 is not None and cfg.relay_address6 is not None:
        want6 = IPv6Interface(f"{cfg.relay_address6}/{cfg.network6.prefixlen}")
        addr6 = check_address(dev, link, want6, "address6")
        if addr6 is not None:
            results.append(addr6)
    if link is not None and link.up and status is not None:
        # Each peer's address and the LANs behind peers must leave by the device.
        wanted: list[Network] = []
        for peer in status.get("peers", []):
            if peer.get("address"):
                wanted.append(ipaddress.ip_network(f"{peer['address']}/32"))
            nets = (ipaddress.ip_network(s) for s in peer.get("subnets", []))
            wanted.extend(n for n in nets if n.version == 4)
        routes = check_routes(dev, wanted, system.route_dev, system.routes())
        if routes is not None:
            results.append(routes)
    results.append(
        check_forwarding(
            system.sysctl("net.ipv4.ip_forward"),
            system.sysctl(f"net.ipv4.conf.{dev}.forwarding") if link else None,
            dev,
        )
    )
    results.append(
        check_rp_filter(
            system.sysctl("net.ipv4.conf.all.rp_filter"),
            system.sysctl(f"net.ipv4.conf.{dev}.rp_filter") if link else None,
            dev,
        )
    )
    ruleset = system.nft_ruleset()
    results.append(check_forward_chain(ruleset, dev))
    results.append(check_nat(cfg.nat, cfg.routes, cfg.network, dev, ruleset, cfg.path))
    return results


def load_any(path: Path) -> ServerConfig | ClientConfig:
    """A relay's or a client's config, told apart by its section.  Raises ConfigError."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        doc = {}
    if "client" in doc and "server" not in doc:
        return load_client_config(path)
    # Anything else goes through the relay's loader, whose error names what is wrong.
    return load_server_config(path)


def run(path: Path, *, key: str | None = None, system: System | None = None) -> list[Result]:
    """Raises ConfigError for a bad config (or a bad --key)."""
    cfg = load_any(path)
    if key is not None:
        if isinstance(cfg, ClientConfig):
            raise ConfigError("--key is for a relay's config (it asks whether a key is a peer)")
        key = encode_key(decode_key(key, file="--key"))
    results: list[Result] = []
    if system is None:
        system = LiveSystem()
        if os.geteuid() != 0:
            # Control sockets are 0600 and nft needs CAP_NET_ADMIN: the answers below
            # would blame the wrong thing.
            results.append(
                problem(
                    "root",
                    "not run as root: the control socket and the firewall cannot be read",
                    f"sudo gtun doctor -c {path}",
                )
            )
    if isinstance(cfg, ClientConfig):
        return results + diagnose_client(cfg, system)
    return results + diagnose_relay(cfg, system, key)


# ---------------------------------------------------------------------------
# The handshake probe, sans-IO


class HandshakeProbe:
    """A WireGuard initiator that asks the relay for its configuration once.

    After start() and each receive()/handle_timer(), send datagrams_to_send().  Done when
    `done` (a CONFIG or REFUSED arrived); `answered` once the handshake completed."""

    RELAY = "relay"  # the one endpoint: the edge knows where it goes

    def __init__(self, private_key: bytes, server_key: bytes, mode: str | None) -> None:
        self.wg = WireGuard(private_key, wall_offset=time.time() - time.monotonic())
        self.peer = self.wg.add_peer(server_key, endpoint=self.RELAY)
        self.mode = mode
        self.answered = False
        self.config: dict[str, Any] | None = None
        self.refused: str | None = None

    @property
    def done(self) -> bool:
        return self.config is not None or self.refused is not None

    def start(self, now: float) -> None:
        self.wg.initiate_handshake(self.peer, now)
        self._drain(now)

    def receive(self, data: bytes, now: float) -> None:
        self.wg.receive_datagram(data, self.RELAY, now)
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        self._drain(now)

    def datagrams_to_send(self) -> list[bytes]:
        return [d for d, _ in self.wg.datagrams_to_send()]

    def _drain(self, now: float) -> None:
        while (event := self.wg.next_event()) is not None:
            if isinstance(event, HandshakeCompleted) and not self.answered:
                self.answered = True
                payload = {"mode": self.mode} if self.mode else {}
                self.wg.send(self.peer, tm.push_message(tm.CONFIG_REQUEST, payload), now)
            elif isinstance(event, PacketReceived) and tm.is_tunnel_message(event.data):
                try:
                    msg = tm.pull_message(event.data)
                except tm.TunnelMessageError:
                    continue
                if msg.type == tm.CONFIG:
                    self.config = msg.payload
                elif msg.type == tm.REFUSED:
                    self.refused = str(msg.payload.get("reason", "refused"))


async def _pump(
    probe: HandshakeProbe,
    recv: Callable[[float], Any],
    send: Callable[[bytes], Any],
    wait: float,
    result: Probe,
) -> None:
    """Drive `probe` until done or `wait` seconds; `recv(timeout)` returns bytes or None."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + wait
    probe.start(time.monotonic())
    for d in probe.datagrams_to_send():
        await send(d)
    while not probe.done:
        now = loop.time()
        limit = deadline + (CONFIG_WAIT if probe.answered else 0)
        if now >= limit:
            break
        timer = probe.wg.get_timer()
        mono = time.monotonic()
        timeout = limit - now
        if timer is not None:
            timeout = max(0.0, min(timeout, timer - mono))
        data = await recv(timeout)
        if data is not None:
            was = probe.answered
            probe.receive(data, time.monotonic())
            if probe.answered and not was:
                result.rtt = loop.time() - started
        else:
            probe.handle_timer(time.monotonic())
        for d in probe.datagrams_to_send():
            await send(d)
    result.answered = probe.answered
    result.config = probe.config
    result.refused = probe.refused


async def probe_udp(cfg: ClientConfig, wait: float = UDP_HANDSHAKE_WAIT) -> Probe:
    result = Probe("udp")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(*cfg.server, type=socket.SOCK_DGRAM)
    except OSError as exc:
        result.error = f"cannot resolve {cfg.server[0]}: {exc}"
        return result
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    probe = HandshakeProbe(cfg.private_key, cfg.server_public_key, cfg.mode)

    async def recv(timeout: float) -> bytes | None:
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except TimeoutError:
            return None

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    try:
        await loop.sock_connect(sock, addr)
        await _pump(probe, recv, send, wait, result)
    except ConnectionRefusedError:
        result.error = "refused"
    except OSError as exc:
        result.error = exc.strerror or str(exc)
    finally:
        sock.close()
    return result


async def probe_tcp(cfg: ClientConfig, wait: float = TCP_HANDSHAKE_WAIT) -> Probe:
    """The same handshake over gtun's TCP framing (framing.py)."""
    result = Probe("tcp")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*cfg.server), wait)
    except TimeoutError:
        result.error = "timed out"
        return result
    except ConnectionRefusedError:
        result.error = "refused"
        return result
    except OSError as exc:
        result.error = exc.strerror or str(exc)
        return result
    result.connected = True
    probe = HandshakeProbe(cfg.private_key, cfg.server_public_key, cfg.mode)

    async def recv(timeout: float) -> bytes | None:
        # A timeout while waiting for a header consumes nothing (readexactly takes its
        # bytes only once they are all there); once a header is read, its body must follow.
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER_SIZE), timeout)
        except TimeoutError:
            return None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Closed(str(exc) or "connection closed") from exc
        try:
            (length,) = LENGTH.unpack(header)
            check_length(length)
            return await asyncio.wait_for(reader.readexactly(length), CONFIG_WAIT)
        except (TimeoutError, asyncio.IncompleteReadError, FrameError, ConnectionError) as exc:
            raise _Closed(str(exc) or "truncated frame") from exc

    async def send(data: bytes) -> None:
        writer.write(push_frame(data))
        await writer.drain()

    try:
        await _pump(probe, recv, send, max(0.1, deadline - loop.time()), result)
    except _Closed as exc:
        result.answered = probe.answered
        result.error = f"the relay closed the connection ({exc})"
    except OSError as exc:
        result.error = exc.strerror or str(exc)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    return result


class _Closed(Exception):
    """The relay ended the TCP connection or broke the framing."""


# ---------------------------------------------------------------------------
# The live system


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

    def status(self, path: Path) -> dict[str, Any] | None:
        from gtun.app.control import query

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

    def handshake(self, cfg: ClientConfig, transport: str) -> Probe:
        probe = probe_udp if transport == "udp" else probe_tcp
        return asyncio.run(probe(cfg))
