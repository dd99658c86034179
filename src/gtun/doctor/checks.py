"""The checks of `gtun doctor`, pure: facts in, `Result`s out, and nothing else.

Each check is a small function from facts to a `Result` (OK, or a problem with its fix),
so the tests give each check its facts directly.  `diagnose_client` and `diagnose_relay`
ask a `System` for the facts (the real one is probes.LiveSystem) and run the checks that
apply; nothing here touches the machine itself.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any, Protocol

from gtun.app.config import ClientConfig, ServerConfig
from gtun.app.keys import encode_key
from gtun.core.relay import PushedConfig
from gtun.core.tunnel import RelayHealth
from gtun.system.nft import table_name

Network = IPv4Network | IPv6Network

# Tuning knobs: the bounds of the handshake probes (handshake.py), in seconds, which
# the checks name when nothing answered.
UDP_HANDSHAKE_WAIT = 3.0
TCP_HANDSHAKE_WAIT = 2.0
MIN_PROBE = 576  # the smallest packet the MTU probe tries (RFC 791)
PROBE_STEPS = 12  # packet sizes tried in parallel per round of the MTU probe
PROBE_ROUNDS = 3  # each round narrows the gap between the best pass and the next fail

# The relay mesh (shared store): a relay whose heartbeat (every 10 s) is older than this
# is taken for down, and clocks further apart than CLOCK_SKEW_LIMIT are a problem.
RELAY_QUIET = 35.0
CLOCK_SKEW_LIMIT = 2.0
SESSION_STALE = 180.0  # WireGuard's REJECT_AFTER_TIME: a session older is gone

IFF_TUN = 0x0001  # <linux/if_tun.h>
IFF_TAP = 0x0002

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
    """What a handshake probe (handshake.py) learned from the relay."""

    transport: str
    answered: bool = False
    error: str | None = None  # why it could not even talk: "refused", "timed out", ...
    connected: bool = False  # TCP only: the connection was accepted
    config: PushedConfig | None = None  # the relay's CONFIG, as the client core read it
    refused: str | None = None  # the relay's REFUSED reason
    rtt: float | None = None
    health: RelayHealth | None = None  # the relay's answer to a health request, if any


@dataclass(frozen=True)
class RelayFacts:
    """Another relay (or this one) as the shared store lists it."""

    name: str
    public_key: str
    endpoint: str | None
    seen_ago: float | None  # seconds since its last heartbeat, by the store's clock
    clock_offset: float | None  # its clock minus the store's, at that heartbeat


@dataclass(frozen=True)
class StoreFacts:
    """What doctor learned from a relay's shared store (PostgreSQL)."""

    where: str  # the store's URI, without its password
    error: str | None = None  # why it could not be read (then nothing below is known)
    schema: int | None = None  # the database's gtun schema version
    wanted_schema: int | None = None  # this gtun's
    clock_offset: float | None = None  # this machine's clock minus the store's
    relays: tuple[RelayFacts, ...] = ()


class System(Protocol):
    """The facts doctor gathers; the real one is probes.LiveSystem, tests inject their own."""

    def now(self) -> float:
        """The time now, in Unix seconds (the clock of a status's last_handshake)."""
        ...

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
    def relay_health(self, path: Path) -> RelayHealth | str:
        """Ask the client running on control socket `path` for its relay's health; a
        str says why there is none (not connected, an older relay, no answer)."""
        ...

    def store(self, cfg: ServerConfig) -> StoreFacts | None:
        """The relay's shared store, read; None when it has none (SQLite)."""
        ...


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
    *,
    now: float,
) -> list[Result]:
    """The relay's reachability and the handshake.

    `status` is the running client's (None: none runs, so `udp`/`tcp` are our own probes);
    `udp_refused`: an ICMP port unreachable came back from the relay's UDP port; `now`:
    Unix time, against which the status's last handshake is told."""
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
            silent += f" (last handshake {now - last:.0f} s ago)"
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


AT_START = "the relay turns it on at start"


def check_forwarding(
    ip_forward: str | None, dev_forwarding: str | None, dev: str, *, running: bool = True
) -> Result:
    """IPv4 forwarding, globally and on the device (the kernel forwards what enters by a
    device whose forwarding is on).  `running`: whether the relay runs; before its
    start, forwarding off is what the relay itself changes, not a problem."""
    if ip_forward != "1":
        if not running:
            return ok(
                "forwarding",
                f"IPv4 forwarding is off now (net.ipv4.ip_forward = {ip_forward}); {AT_START}",
            )
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


def check_forwarding6(value: str | None, *, running: bool = True) -> Result:
    """IPv6 forwarding, for a relay with network6.  Only net.ipv6.conf.all.forwarding
    gates it (the kernel's ip6_forward() reads no per-device switch)."""
    if value == "1":
        return ok("forwarding6", "IPv6 forwarding is on")
    if value is None:
        return problem(
            "forwarding6",
            "net.ipv6.conf.all.forwarding cannot be read: IPv6 is off in the kernel, so "
            "network6 cannot work",
            "boot without ipv6.disable=1, or remove network6 from the relay's config",
        )
    if not running:
        return ok(
            "forwarding6",
            f"IPv6 forwarding is off now (net.ipv6.conf.all.forwarding = {value}); {AT_START}",
        )
    return problem(
        "forwarding6",
        f"IPv6 forwarding is off (net.ipv6.conf.all.forwarding = {value}): clients' IPv6 "
        "(network6) goes no further than the relay (client to client still works: the "
        "relay forwards that itself)",
        "sysctl -w net.ipv6.conf.all.forwarding=1",
    )


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
    nat: bool,
    routes: Sequence[Network],
    network: IPv4Network,
    dev: str,
    ruleset: Any,
    path: Path,
    *,
    running: bool = True,
) -> Result:
    """`running`: whether the relay runs; before its start, its own masquerade table
    missing is what the relay installs itself, not a problem."""
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
        if not running:
            return ok("nat", f"nat = true: the relay installs table inet {table} at start")
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


def check_peer(
    key_text: str, status: dict[str, Any] | None, cfg: ServerConfig, *, now: float
) -> Result:
    """Whether `key_text` is a peer of the relay (its running peers, else its config's),
    and when it last shook hands, told against `now` (Unix time)."""
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
                age = now - float(peer["last_handshake"])
                detail += f", last handshake {age:.0f} s ago"
            return ok("peer", detail)
    return problem(
        "peer",
        f"{key_text} is not a peer of this relay",
        _add_peer_fix(key_text, str(cfg.path)),
    )


# ---------------------------------------------------------------------------
# A client's relay, as the relay says (a health answer over the tunnel)

HEALTH_STALE = 60.0  # a relay looks every 5 s: an older look is said to be old


def _on_relay(cmd: str) -> str:
    return f"run `gtun doctor -c server.toml` on the relay, which names the fix ({cmd})"


def check_relay_health(answer: RelayHealth | str, *, whose: str = "the relay") -> list[Result]:
    """What the relay's edge saw of its own machine (forwarding, its NAT table, its
    device and routes, its store), asked through the client: one PROBLEM per relay-side
    fault, each fixed on the relay; an OK line when it is all well.  `answer` as a str:
    why there is none (not connected, an older relay, no answer), which the path checks
    already explain: a note, not a problem."""
    if isinstance(answer, str):
        return [ok("relay-health", f"{whose} was not asked: {answer}")]
    if not answer.known:
        return [ok("relay-health", f"{whose} has not looked at its machine yet (just started)")]
    dev = answer.device or "its device"
    when = ""
    if answer.age is not None:
        when = f" ({answer.age:.0f} s ago)"
        if answer.age > HEALTH_STALE:
            when = f" (an old look, {answer.age:.0f} s ago: is the relay stuck?)"
    results: list[Result] = []
    if answer.forwarding is False or answer.dev_forwarding is False:
        if answer.forwarding is False:
            what, cmd = "IPv4 forwarding is off", "sysctl -w net.ipv4.ip_forward=1"
        else:
            what = f"forwarding is off on {dev}"
            cmd = f"sysctl -w net.ipv4.conf.{answer.device or 'DEV'}.forwarding=1"
        results.append(
            problem(
                "relay-forwarding",
                f"{whose} says {what} there{when}: traffic from the tunnel to its routes "
                "and beyond goes no further than the relay",
                _on_relay(cmd),
            )
        )
    if answer.forwarding6 is False:
        results.append(
            problem(
                "relay-forwarding6",
                f"{whose} says IPv6 forwarding is off there{when}: clients' IPv6 goes no "
                "further than the relay",
                _on_relay("sysctl -w net.ipv6.conf.all.forwarding=1"),
            )
        )
    if answer.nat is False:
        results.append(
            problem(
                "relay-nat",
                f"{whose} says its masquerade table is missing (nat = true){when}: traffic "
                "to its routes leaves with tunnel addresses nobody routes back",
                _on_relay("restart the relay, which installs it"),
            )
        )
    if answer.device_up is False:
        results.append(
            problem(
                "relay-device",
                f"{whose} says {dev} is down or gone{when}",
                _on_relay(f"ip link set {answer.device} up" if answer.device else "restart it"),
            )
        )
    if answer.missing_routes:
        nets = ", ".join(str(n) for n in answer.missing_routes)
        results.append(
            problem(
                "relay-routes",
                f"{whose} says these no longer leave by {dev}{when}: {nets}",
                _on_relay("restart the relay, or `ip route add NET dev DEV` for each"),
            )
        )
    if answer.store is False:
        results.append(
            problem(
                "relay-store",
                f"{whose} says its shared store does not answer{when}: sessions flow, but "
                "new peers and leases are refused",
                _on_relay("start PostgreSQL, or correct `store` in the relay's config"),
            )
        )
    if results:
        return results
    said = []
    if answer.forwarding:
        said.append("IPv4 forwarding on")
    if answer.forwarding6:
        said.append("IPv6 forwarding on")
    if answer.nat:
        said.append("its NAT table in place")
    if answer.device_up:
        said.append(f"{dev} up")
    if answer.store:
        said.append("its store answering")
    return [ok("relay-health", f"{whose} says: {', '.join(said) or 'nothing wrong'}{when}")]


# ---------------------------------------------------------------------------
# A client running with another configuration than its file's


def config_differences(cfg: ClientConfig, status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, the running client's, the file's) for each setting the running client
    was started with that the file now says otherwise.  A status without a field (an
    older gtun) compares nothing for it."""
    fields = (
        ("server", status.get("server"), _hostport(cfg)),
        ("server_public_key", status.get("server_public_key"), encode_key(cfg.server_public_key)),
        ("transport", status.get("transport_configured"), cfg.transport),
        ("device", status.get("device"), cfg.device),
        ("public key (private_key_file)", status.get("public_key"), encode_key(cfg.public_key)),
    )
    return [(name, str(r), f) for name, r, f in fields if r is not None and r != f]


# What makes the running client's relay another than the file's.
RELAY_FIELDS = ("server", "server_public_key", "public key (private_key_file)")


def check_running_config(
    cfg: ClientConfig, status: dict[str, Any], differences: list[tuple[str, str, str]]
) -> Result:
    running = ", ".join(f"{name} {value}" for name, value, _ in differences)
    wanted = ", ".join(f"{name} {value}" for name, _, value in differences)
    started = status.get("config_file")
    source = f" (started from {started})" if started and started != str(cfg.path) else ""
    return problem(
        "config",
        f"the running client{source} uses {running}; the file says {wanted}",
        f"restart it: systemctl restart gtun-client@{cfg.path.stem} "
        f"(or stop it and run gtun client -c {cfg.path})",
    )


def probe_unsafe(cfg: ClientConfig, status: dict[str, Any]) -> str | None:
    """Why doctor must not handshake with the file's relay while this client runs, or
    None when it may.  A handshake under the running client's key with a relay where
    that client has (or may soon have) a session would take the session over: the relay
    would send to doctor's socket, and with a shared store the configuration request
    would claim the client's presence there.  So doctor probes only under another key
    than the running client's, or a relay the running client does not know (neither
    the one it was started with, nor the one it uses, nor one it learnt)."""
    if status.get("public_key") != encode_key(cfg.public_key):
        return None  # another key: to every relay, another peer
    relay = encode_key(cfg.server_public_key)
    known = {status.get("server_public_key"), *status.get("relays", [])}
    known.update(p.get("public_key") for p in status.get("peers", []))
    if relay in known:
        return (
            "the running client holds a session with that relay under the same key, which "
            "a probe would take over"
        )
    return None


def check_unprobed(
    cfg: ClientConfig, refused: bool, host_pings: bool | None, why: str
) -> list[Result]:
    """The file's relay, when no handshake may be made with it: its UDP port and ping."""
    where = _hostport(cfg)
    if refused:
        return [
            problem(
                "relay",
                f"nothing listens on UDP {where} (ICMP port unreachable): "
                "the relay is not running there",
                f'on the relay: gtun server -c server.toml (listen = "0.0.0.0:{cfg.server[1]}")',
            )
        ]
    seen = "its host answers ping" if host_pings else "its host does not answer ping"
    return [ok("relay", f"{where}: {seen}; no handshake tried: {why}")]


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


def check_store(facts: StoreFacts, path: Path) -> Result:
    """The shared store answers and has this gtun's schema."""
    if facts.error is not None:
        return problem(
            "store",
            f"{facts.error}: the relays forward the sessions they have, but refuse new "
            "peers and leases until it is back",
            f"start PostgreSQL, or correct `store` in {path}",
        )
    if facts.schema != facts.wanted_schema:
        return problem(
            "store",
            f"{facts.where}: the schema is version {facts.schema}, this gtun's is "
            f"{facts.wanted_schema}",
            f"gtun store migrate -c {path}"
            if (facts.schema or 0) < (facts.wanted_schema or 0)
            else "upgrade gtun on this relay",
        )
    return ok("store", f"{facts.where} answers (schema {facts.schema})")


def _relay_line(relay: RelayFacts) -> str:
    return f"{relay.name} at {relay.endpoint or '(no endpoint)'}"


def check_mesh(
    own_key: str, status: dict[str, Any] | None, facts: StoreFacts, now: float
) -> Result | None:
    """This relay has a live WireGuard session with every other relay of the store that
    is alive; None when the store could not be read or the network has one relay."""
    if facts.error is not None:
        return None
    others = [r for r in facts.relays if r.public_key != own_key]
    if not others:
        return ok("mesh", "this relay is the network's only one")
    if status is None:
        return None  # "relay" already says it is not running
    sessions = {m.get("public_key"): m for m in status.get("mesh", [])}
    bad: list[str] = []
    fine: list[str] = []
    for relay in others:
        down = relay.seen_ago is None or relay.seen_ago > RELAY_QUIET
        session = sessions.get(relay.public_key)
        last = None if session is None else session.get("last_handshake")
        if down:
            when = "never" if relay.seen_ago is None else f"{relay.seen_ago:.0f} s ago"
            bad.append(f"{_relay_line(relay)} looks down (its last heartbeat: {when})")
        elif session is None:
            why = "it has no endpoint in the store" if not relay.endpoint else "refused"
            bad.append(f"{_relay_line(relay)} is not in this relay's mesh ({why})")
        elif last is None or now - float(last) > SESSION_STALE:
            bad.append(f"no session with {_relay_line(relay)} (no handshake answered)")
        else:
            fine.append(f"{relay.name} (handshake {now - float(last):.0f} s ago)")
    if bad:
        return problem(
            "mesh",
            "; ".join(bad),
            "start the relay that is down; between relays that run, UDP to each "
            "other's endpoint must pass (`endpoint` in each relay's config, firewalls); "
            "`gtun doctor` on the other relay says more",
        )
    return ok("mesh", "sessions with " + ", ".join(fine))


def check_clock_skew(own_key: str, facts: StoreFacts) -> Result | None:
    """The relays' clocks (and this machine's) agree with the store's within
    CLOCK_SKEW_LIMIT.  Presence uses the store's clock alone, but logs and status
    disagree across relays, and a clock stepped back to fix a skew makes the other
    relays refuse its handshakes (WireGuard's replay protection on the timestamp)."""
    if facts.error is not None:
        return None
    offsets: dict[str, float] = {}
    if facts.clock_offset is not None:
        offsets["this machine"] = facts.clock_offset
    for relay in facts.relays:
        alive = relay.seen_ago is not None and relay.seen_ago <= RELAY_QUIET
        if relay.public_key != own_key and alive and relay.clock_offset is not None:
            offsets[relay.name] = relay.clock_offset
    if not offsets:
        return None
    skewed = {n: o for n, o in offsets.items() if abs(o) > CLOCK_SKEW_LIMIT}
    if skewed:
        said = ", ".join(f"{n} {o:+.1f} s" for n, o in sorted(skewed.items()))
        return problem(
            "clock",
            f"clocks differ from the store's: {said} (more than {CLOCK_SKEW_LIMIT:g} s)",
            "keep every relay's clock in sync (systemd-timesyncd or chrony)",
        )
    spread = max(abs(o) for o in offsets.values())
    return ok("clock", f"relay clocks within {spread * 1000:.0f} ms of the store's")


def diagnose_client(cfg: ClientConfig, system: System) -> list[Result]:
    """The file's client: the running one (trusted, never probed under its own key)
    when it runs with this file's relay, else the file's relay probed by doctor itself
    (probe_unsafe() says when it may not be); then the relay's own health and the
    running client's device, addresses, routes and MTU."""
    results: list[Result] = []
    now = system.now()
    status = system.status(cfg.control_socket)
    results.append(check_client_running(cfg, status))
    differences = config_differences(cfg, status) if status is not None else []
    if differences:
        results.append(check_running_config(cfg, status or {}, differences))
    # The path is the file's relay's: the running client's session tells about it only
    # when that client runs with the same relay and key.
    other_relay = any(name in RELAY_FIELDS for name, _, _ in differences)
    session = status if not other_relay else None
    unsafe = probe_unsafe(cfg, status) if status is not None and other_relay else None
    host, port = cfg.server
    refused = system.udp_refused(host, port) if status is not None else False
    udp: Probe | None = None
    tcp: Probe | None = None
    if session is None and unsafe is None:
        if cfg.transport in ("udp", "auto"):
            udp = system.handshake(cfg, "udp")
        if not (udp and udp.answered) and not (udp and udp.refused):
            tcp = system.handshake(cfg, "tcp")
    host_pings = None
    running_ok = session is not None and session.get("connected")
    answered = (udp and udp.answered) or (tcp and tcp.answered)
    closed = refused or (udp and udp.error == "refused")
    if not running_ok and not answered and not closed:
        host_pings = system.ping_host(host)
    if unsafe is not None:
        results.extend(check_unprobed(cfg, refused, host_pings, unsafe))
    else:
        results.extend(check_path(cfg, session, refused, udp, tcp, host_pings, now=now))
    # The running client's device is the one that exists, whatever the file says now.
    dev = str(status.get("device") or cfg.device) if status is not None else cfg.device
    refused_reason = next((p.refused for p in (udp, tcp) if p and p.refused), None)
    link = system.link(dev)
    mode = check_mode(
        cfg.mode, link if status is not None else None, dev, refused_reason, cfg.path,
        "client",
    )  # fmt: skip
    if mode is not None:
        results.append(mode)
    # A full-tunnel client marks its packets to the relay so that they go around the
    # tunnel: look the endpoint up as those packets are routed.
    fwmark = status.get("fwmark") if status is not None else None
    via = system.route_dev(host, fwmark) if isinstance(fwmark, int) else system.route_dev(host)
    endpoint = check_endpoint(dev, host, via)
    if endpoint is not None:
        results.append(endpoint)
    # The relay's own health: from doctor's probe of the file's relay, else asked of
    # the running client's relay through that client.
    probed = next((p.health for p in (udp, tcp) if p is not None and p.health is not None), None)
    if probed is not None:
        results.extend(check_relay_health(probed))
    elif status is not None and status.get("connected"):
        whose = "the running client's relay" if other_relay else "the relay"
        results.extend(check_relay_health(system.relay_health(cfg.control_socket), whose=whose))
    if status is None:
        return results
    results.append(check_device(dev, link, f"restart the client: gtun client -c {cfg.path}"))
    address = status.get("address")
    want = IPv4Interface(address) if address else None
    addr = check_address(dev, link, want)
    if addr is not None:
        results.append(addr)
    address6 = status.get("address6")
    addr6 = check_address(dev, link, IPv6Interface(address6) if address6 else None, "address6")
    if addr6 is not None:
        results.append(addr6)
    if link is None or not link.up or want is None:
        return results
    gateway = next((p.get("address") for p in status.get("peers", []) if p.get("address")), None)
    wanted: list[Network] = []
    if gateway:
        wanted.append(IPv4Network(f"{gateway}/32"))
    wanted.extend(ipaddress.ip_network(r) for r in status.get("routes", []))
    routes = check_routes(dev, wanted, system.route_dev, system.routes())
    if routes is not None:
        results.append(routes)
    results.append(
        check_rp_filter(
            system.sysctl("net.ipv4.conf.all.rp_filter"),
            system.sysctl(f"net.ipv4.conf.{dev}.rp_filter"),
            dev,
        )
    )
    if gateway and status.get("connected") and (routes is None or routes.ok):
        mtu = int(status.get("mtu") or link.mtu)
        passed = mtu_search(system, mtu, gateway)
        results.append(check_mtu(dev, mtu, gateway, passed))
    return results


def diagnose_relay(cfg: ServerConfig, system: System, key: str | None = None) -> list[Result]:
    results: list[Result] = []
    now = system.now()
    status = system.status(cfg.control_socket)
    results.append(check_relay_running(cfg, status))
    results.append(ok("key", f"this relay's public key is {encode_key(cfg.public_key)}"))
    if key is not None:
        results.append(check_peer(key, status, cfg, now=now))
    dev = cfg.device
    link = system.link(dev)
    # Before its start, what the relay sets up itself (its device, forwarding, its NAT
    # table) is said as a note; the "relay" line is the problem to fix.
    running = status is not None
    if link is None and not running:
        results.append(ok("device", f"{dev} does not exist now; the relay creates it at start"))
    else:
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
            running=running,
        )
    )
    if cfg.network6 is not None:
        results.append(
            check_forwarding6(system.sysctl("net.ipv6.conf.all.forwarding"), running=running)
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
    results.append(
        check_nat(cfg.nat, cfg.routes, cfg.network, dev, ruleset, cfg.path, running=running)
    )
    facts = system.store(cfg)
    if facts is not None:
        own = encode_key(cfg.public_key)
        results.append(check_store(facts, cfg.path))
        for result in (check_mesh(own, status, facts, now), check_clock_skew(own, facts)):
            if result is not None:
                results.append(result)
    return results
