"""`gtun doctor`: output, exit codes, each check's decisions over given facts (tier 1),
the handshake probe against an in-memory relay, and the TCP probe on loopback (tier 2).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun.app.config import ClientConfig, load_client_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.cli import main
from gtun.core.client import ClientCore
from gtun.core.relay import PeerSpec, Relay
from gtun.core.tunnel import RelayHealth
from gtun.core.wg.constants import TAI64N_WHITENING_NS
from gtun.doctor import checks as d
from gtun.doctor import handshake as hs
from gtun.doctor import load_any
from gtun.doctor.probes import LiveSystem
from gtun.io.framing import push_frame, read_frame
from gtun.lab.net import write_key
from gtun.testing.link import relay_settings

NET = IPv4Network("10.66.0.0/24")


# --- configs ---------------------------------------------------------------------------


@pytest.fixture
def keys() -> dict[str, bytes]:
    return {"relay": generate_private_key(), "client": generate_private_key()}


def write_client(tmp_path: Path, keys: dict[str, bytes], port: int = 9621, **extra: str) -> Path:
    write_key(tmp_path / "client.key", keys["client"])
    lines = [
        "[client]",
        f'server = "127.0.0.1:{port}"',
        f'server_public_key = "{encode_key(public_key(keys["relay"]))}"',
        'private_key_file = "client.key"',
        f'control_socket = "{tmp_path / "client.sock"}"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    path = tmp_path / "client.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_server(tmp_path: Path, keys: dict[str, bytes], nat: bool = True) -> Path:
    write_key(tmp_path / "server.key", keys["relay"])
    path = tmp_path / "server.toml"
    path.write_text(
        "[server]\n"
        'private_key_file = "server.key"\n'
        f'network = "{NET}"\n'
        'routes = ["192.168.77.0/24"]\n'
        f"nat = {'true' if nat else 'false'}\n"
        f'control_socket = "{tmp_path / "server.sock"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[[peers]]\nname = "alice"\npublic_key = "{encode_key(public_key(keys["client"]))}"\n'
    )
    return path


@pytest.fixture
def ccfg(tmp_path: Path, keys: dict[str, bytes]) -> ClientConfig:
    return load_client_config(write_client(tmp_path, keys))


# --- output and exit codes ---------------------------------------------------------------


def test_text_and_json_output() -> None:
    results = [d.ok("device", "gtun0 is up"), d.problem("nat", "missing", "gtun server -c x")]
    text = d.format_text(results).splitlines()
    assert text == [
        "OK    device: gtun0 is up",
        "PROBLEM nat: missing — fix: gtun server -c x",
    ]
    parsed = json.loads(d.format_json(results))
    assert parsed[1] == {
        "check": "nat",
        "ok": False,
        "detail": "missing",
        "fix": "gtun server -c x",
    }
    assert d.exit_code(results) == 1
    assert d.exit_code(results[:1]) == 0


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[client]\nserver = 5\n")
    assert main(["doctor", "-c", str(bad)]) == 2
    assert "client.server" in capsys.readouterr().err
    neither = tmp_path / "neither.toml"
    neither.write_text("[other]\n")
    assert main(["doctor", "-c", str(neither)]) == 2


def test_key_option_is_checked(tmp_path: Path, keys: dict[str, bytes]) -> None:
    client = write_client(tmp_path, keys)
    assert main(["doctor", "-c", str(client), "--key", "AAAA"]) == 2
    server = write_server(tmp_path, keys)
    assert main(["doctor", "-c", str(server), "--key", "not a key"]) == 2


def test_config_kind_is_told_by_section(tmp_path: Path, keys: dict[str, bytes]) -> None:
    assert isinstance(load_any(write_client(tmp_path, keys)), ClientConfig)
    assert not isinstance(load_any(write_server(tmp_path, keys)), ClientConfig)


# --- the path: reachability and handshake -----------------------------------------------


# The time the checks are told it is (Unix seconds): they read no clock of their own.
NOW = 1_790_000_000.0


def probe(transport: str, **kw: Any) -> d.Probe:
    return d.Probe(transport, **kw)


def names(results: list[d.Result]) -> dict[str, d.Result]:
    return {r.check: r for r in results}


def test_path_nothing_listens(ccfg: ClientConfig) -> None:
    r = names(d.check_path(ccfg, None, False, probe("udp", error="refused"), None, None, now=NOW))
    assert not r["relay"].ok and "nothing listens on UDP" in r["relay"].detail
    assert "gtun server -c" in (r["relay"].fix or "")
    # The running client's session looks alive, but the port is closed now.
    running = {"connected": True, "peers": []}
    r = names(d.check_path(ccfg, running, True, None, None, None, now=NOW))
    assert not r["relay"].ok and "nothing listens" in r["relay"].detail


def test_path_udp_blocked_tcp_answers(ccfg: ClientConfig) -> None:
    udp = probe("udp")
    tcp = probe("tcp", answered=True, connected=True)
    r = names(d.check_path(ccfg, None, False, udp, tcp, None, now=NOW))
    assert not r["relay"].ok and 'transport = "auto"' in (r["relay"].fix or "")
    assert r["handshake"].ok


def test_path_tcp_client_over_tcp_is_fine(tmp_path: Path, keys: dict[str, bytes]) -> None:
    cfg = load_client_config(write_client(tmp_path, keys, transport='"tcp"'))
    tcp = probe("tcp", answered=True, connected=True)
    results = d.check_path(cfg, None, False, None, tcp, None, now=NOW)
    assert all(r.ok for r in results)


def test_path_silent_relay_names_both_key_causes(ccfg: ClientConfig) -> None:
    udp = probe("udp")
    tcp = probe("tcp", error="refused")
    r = names(d.check_path(ccfg, None, False, udp, tcp, True, now=NOW))
    assert r["relay"].ok
    h = r["handshake"]
    assert not h.ok and "wrong server_public_key" in h.detail and "not a peer" in h.detail
    assert "gtun pubkey < server.key" in (h.fix or "") and "gtun peer add" in (h.fix or "")
    assert encode_key(ccfg.public_key) in (h.fix or "")
    # A running client without a session: the same diagnosis, no probe of our own.
    r = names(
        d.check_path(ccfg, {"connected": False, "peers": []}, False, None, None, True, now=NOW)
    )
    assert not r["handshake"].ok and "running client" in r["handshake"].detail


def test_path_unreachable(ccfg: ClientConfig) -> None:
    udp = probe("udp")
    tcp = probe("tcp", error="timed out")
    r = names(d.check_path(ccfg, None, False, udp, tcp, False, now=NOW))
    assert not r["relay"].ok and "unreachable" in r["relay"].detail
    assert "handshake" not in r


def test_path_local_firewall(ccfg: ClientConfig) -> None:
    udp = probe("udp", error="Operation not permitted")
    r = names(d.check_path(ccfg, None, False, udp, probe("tcp", error="refused"), None, now=NOW))
    assert not r["relay"].ok and "Operation not permitted" in r["relay"].detail


def test_path_healthy(ccfg: ClientConfig) -> None:
    answered = probe("udp", answered=True)
    assert all(r.ok for r in d.check_path(ccfg, None, False, answered, None, None, now=NOW))
    running = {"connected": True, "peers": []}
    assert all(r.ok for r in d.check_path(ccfg, running, False, None, None, None, now=NOW))


# --- the machine ----------------------------------------------------------------------


def link(up: bool = True, addrs: Sequence[str] = (), flags: int | None = 0x1001) -> d.Link:
    return d.Link("gtun0", up, 1420, tuple(IPv4Interface(a) for a in addrs), flags)


def test_mode() -> None:
    refused = d.check_mode("tap", None, "gtun0", "this relay runs in tun mode", Path("c"), "client")
    assert refused is not None and not refused.ok and 'mode = "tun"' in (refused.fix or "")
    wrong = d.check_mode("tap", link(flags=0x1001), "gtun0", None, Path("c"), "client")
    assert wrong is not None and not wrong.ok and "TUN device" in wrong.detail
    right = d.check_mode("tap", link(flags=0x1002), "gtun0", None, Path("c"), "client")
    assert right is not None and right.ok
    assert d.check_mode(None, link(), "gtun0", None, Path("c"), "client") is None


def test_device_and_address() -> None:
    assert not d.check_device("gtun0", None, "restart").ok
    down = d.check_device("gtun0", link(up=False), "restart")
    assert not down.ok and down.fix == "ip link set gtun0 up"
    assert d.check_device("gtun0", link(), "restart").ok
    want = IPv4Interface("10.66.0.2/24")
    missing = d.check_address("gtun0", link(addrs=["10.66.0.9/24"]), want)
    assert missing is not None and not missing.ok
    assert missing.fix == "ip addr add 10.66.0.2/24 dev gtun0"
    present = d.check_address("gtun0", link(addrs=["10.66.0.2/24"]), want)
    assert present is not None and present.ok


def route(net: str, dev: str | None) -> d.Route:
    return d.Route(ip_network(net), dev)


def test_routes() -> None:
    lan = ip_network("192.168.77.0/24")
    ours = [route("192.168.77.0/24", "gtun0"), route("10.66.0.0/24", "gtun0")]
    assert (r := d.check_routes("gtun0", [lan], lambda a: "gtun0", ours)) is not None and r.ok
    shadowed = d.check_routes(
        "gtun0", [lan], lambda a: "eth0", [*ours, route("192.168.77.128/25", "eth0")]
    )
    assert shadowed is not None and not shadowed.ok
    assert "shadowed by 192.168.77.128/25 dev eth0" in shadowed.detail
    assert shadowed.fix == "ip route del 192.168.77.128/25 dev eth0"
    missing = d.check_routes("gtun0", [lan], lambda a: "eth0", ours[1:])
    assert missing is not None and missing.fix == "ip route add 192.168.77.0/24 dev gtun0"
    policy = d.check_routes("gtun0", [lan], lambda a: "eth0", ours)
    assert policy is not None and not policy.ok and "ip rule" in (policy.fix or "")
    assert d.check_routes("gtun0", [], lambda a: None, []) is None


def test_endpoint_loop() -> None:
    loop = d.check_endpoint("gtun0", "203.0.113.5", "gtun0")
    assert loop is not None and not loop.ok
    assert d.check_endpoint("gtun0", "203.0.113.5", "eth0") is None


def test_forwarding_and_rp_filter() -> None:
    assert not d.check_forwarding("0", "1", "gtun0").ok
    assert d.check_forwarding("1", "0", "gtun0").fix == "sysctl -w net.ipv4.conf.gtun0.forwarding=1"
    assert d.check_forwarding("1", "1", "gtun0").ok
    # The kernel uses the larger of all and the device's value.
    assert not d.check_rp_filter("1", "0", "gtun0").ok
    assert not d.check_rp_filter("0", "1", "gtun0").ok
    assert d.check_rp_filter("1", "2", "gtun0").ok
    assert d.check_rp_filter("0", None, "gtun0").ok


# --- MTU ------------------------------------------------------------------------------


class PingOnly:
    """A System whose path passes packets up to `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rounds: list[list[int]] = []

    def ping_sizes(self, address: str, sizes: Sequence[int]) -> dict[int, bool]:
        self.rounds.append(list(sizes))
        return {s: s <= self.limit for s in sizes}


@pytest.mark.parametrize("limit", [1136, 1300, 600, 1419])
def test_mtu_search_finds_the_largest_size(limit: int) -> None:
    system = PingOnly(limit)
    passed = d.mtu_search(system, 1420, "10.66.0.1")  # type: ignore[arg-type]
    assert len(system.rounds) <= d.PROBE_ROUNDS
    assert all(len(r) <= d.PROBE_STEPS for r in system.rounds)
    largest = max(s for s, p in passed.items() if p)
    assert limit - 2 <= largest <= limit
    r = d.check_mtu("gtun0", 1420, "10.66.0.1", passed)
    assert not r.ok and f"mtu {largest}" in (r.fix or "")


def test_mtu_ok_and_no_reply() -> None:
    system = PingOnly(1420)
    passed = d.mtu_search(system, 1420, "10.66.0.1")  # type: ignore[arg-type]
    assert len(system.rounds) == 1 and d.check_mtu("gtun0", 1420, "x", passed).ok
    none = d.check_mtu("gtun0", 1420, "10.66.0.1", {1420: False, 576: False})
    assert not none.ok and none.check == "tunnel"


def test_probe_sizes() -> None:
    sizes = d.mtu_probe_sizes(576, 1420)
    assert sizes[0] == 1420 and sizes[-1] == 576 and len(sizes) <= d.PROBE_STEPS
    assert sizes == sorted(sizes, reverse=True)
    assert d.mtu_probe_sizes(1000, 1000) == [1000]


# --- nftables ---------------------------------------------------------------------------


def chain(policy: str = "accept", hook: str = "forward") -> dict[str, Any]:
    c = {"family": "inet", "table": "f", "name": "fw", "hook": hook, "policy": policy}
    return {"chain": {**c, "type": "filter", "prio": 0}}


def rule(*expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "inet", "table": "f", "chain": "fw", "expr": list(expr)}}


def meta(key: str, value: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}
ESTABLISHED = {
    "match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}
}


def test_forward_chain_policy_drop() -> None:
    r = d.check_forward_chain([chain("drop")], "gtun0")
    assert not r.ok and "from and to gtun0" in r.detail
    assert 'nft insert rule inet f fw iifname "gtun0" accept' in (r.fix or "")


def test_forward_chain_accepting_the_device() -> None:
    ruleset = [chain("drop"), rule(meta("iifname", "gtun0"), ACCEPT), rule(ESTABLISHED, ACCEPT)]
    assert d.check_forward_chain(ruleset, "gtun0").ok
    wildcard = [
        chain("drop"),
        rule(meta("iifname", "gtun*"), ACCEPT),
        rule(meta("oifname", {"set": ["gtun0"]}), ACCEPT),
    ]
    assert d.check_forward_chain(wildcard, "gtun0").ok
    only_in = [chain("drop"), rule(meta("iifname", "gtun0"), ACCEPT)]
    r = d.check_forward_chain(only_in, "gtun0")
    assert not r.ok and "to gtun0" in r.detail and "from" not in r.detail


def test_forward_chain_drop_rules() -> None:
    unconditional = [chain(), rule({"counter": {}}, DROP)]
    assert not d.check_forward_chain(unconditional, "gtun0").ok
    named = [chain(), rule(meta("iifname", "gtun0"), DROP)]
    assert not d.check_forward_chain(named, "gtun0").ok
    # A drop of something else (an address) does not concern the tunnel as a whole.
    other = {"match": {"op": "==", "left": {"payload": {"field": "saddr"}}, "right": "1.2.3.4"}}
    assert d.check_forward_chain([chain(), rule(other, DROP)], "gtun0").ok
    # Accepted before the drop: fine.
    ordered = [
        chain(),
        rule(meta("iifname", "gtun0"), ACCEPT),
        rule(meta("oifname", "gtun0"), ACCEPT),
        rule(DROP),
    ]
    assert d.check_forward_chain(ordered, "gtun0").ok
    # Input chains are not the forward path.
    assert d.check_forward_chain([chain("drop", hook="input")], "gtun0").ok


def test_forward_chain_unreadable() -> None:
    r = d.check_forward_chain("Operation not permitted", "gtun0")
    assert not r.ok and r.fix == "run as root"


def test_nat() -> None:
    table = {"rule": {"family": "inet", "table": "gtun_gtun0", "expr": [{"masquerade": None}]}}
    routes = [ip_network("192.168.77.0/24")]
    p = Path("server.toml")
    assert d.check_nat(True, routes, NET, "gtun0", [table], p).ok
    missing = d.check_nat(True, routes, NET, "gtun0", [], p)
    assert not missing.ok and "gtun server -c server.toml" in (missing.fix or "")
    off = d.check_nat(False, routes, NET, "gtun0", [], p)
    assert not off.ok and "nat = true" in (off.fix or "")
    masq = {"rule": {"expr": [{"masquerade": None}]}}
    assert d.check_nat(False, routes, NET, "gtun0", [masq], p).ok
    assert d.check_nat(False, [], NET, "gtun0", [], p).ok


def test_peer(tmp_path: Path, keys: dict[str, bytes]) -> None:
    from gtun.app.config import load_server_config

    cfg = load_server_config(write_server(tmp_path, keys))
    alice = encode_key(public_key(keys["client"]))
    stranger = encode_key(public_key(generate_private_key()))
    # The relay is not running: its config's peers.
    assert d.check_peer(alice, None, cfg, now=NOW).ok
    status = {"peers": [{"name": "bob", "public_key": stranger, "address": "10.66.0.3"}]}
    r = d.check_peer(stranger, status, cfg, now=NOW)
    assert r.ok and "bob" in r.detail and "10.66.0.3" in r.detail
    r = d.check_peer(alice, status, cfg, now=NOW)
    assert not r.ok and "gtun peer add" in (r.fix or "")


def test_peer_tells_the_last_handshake_against_the_time_it_is_given(
    tmp_path: Path, keys: dict[str, bytes]
) -> None:
    from gtun.app.config import load_server_config

    cfg = load_server_config(write_server(tmp_path, keys))
    alice = encode_key(public_key(keys["client"]))
    status = {"peers": [{"name": "alice", "public_key": alice, "last_handshake": NOW - 42}]}
    assert "last handshake 42 s ago" in d.check_peer(alice, status, cfg, now=NOW).detail
    later = d.check_peer(alice, status, cfg, now=NOW + 100).detail
    assert "last handshake 142 s ago" in later


def test_path_tells_the_last_handshake_against_the_time_it_is_given(ccfg: ClientConfig) -> None:
    status = {"connected": False, "peers": [{"name": "relay", "last_handshake": NOW - 75}]}
    r = names(d.check_path(ccfg, status, False, None, None, True, now=NOW))
    assert not r["handshake"].ok and "(last handshake 75 s ago)" in r["handshake"].detail


def test_the_checks_read_no_clock() -> None:
    """Time comes from the caller (System.now() in a run), so the checks are testable."""
    tree = ast.parse(Path(d.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"time", "datetime"}


# --- whole runs over a fake system ------------------------------------------------------

HEALTHY_RELAY = RelayHealth(
    device="gtun0", forwarding=True, dev_forwarding=True, nat=True, device_up=True, age=2.0
)


class FakeSystem:
    def __init__(self, **facts: Any) -> None:
        self.facts = facts
        self.handshakes: list[str] = []
        self.probed: list[ClientConfig] = []  # the config of each handshake probe
        self.health_asked: list[Path] = []

    def now(self) -> float:
        return float(self.facts.get("now", NOW))

    def status(self, path: Path) -> dict[str, Any] | None:
        return self.facts.get("status")

    def link(self, dev: str) -> d.Link | None:
        return self.facts.get("link")

    def route_dev(self, address: str, mark: int | None = None) -> str | None:
        if mark is not None:
            return self.facts.get("route_dev_marked", {}).get(address, "eth0")
        return self.facts.get("route_dev", {}).get(address, "gtun0")

    def routes(self) -> list[d.Route]:
        return self.facts.get("routes", [])

    def sysctl(self, key: str) -> str | None:
        return self.facts.get("sysctl", {}).get(key, "1" if "forward" in key else "0")

    def nft_ruleset(self) -> list[dict[str, Any]] | str:
        masquerade = {"family": "inet", "table": "gtun_gtun0", "expr": [{"masquerade": None}]}
        return self.facts.get("nft", [{"rule": masquerade}])

    def ping_sizes(self, address: str, sizes: Sequence[int]) -> dict[int, bool]:
        return {s: s <= self.facts.get("path_mtu", 9000) for s in sizes}

    def ping_host(self, host: str) -> bool:
        return bool(self.facts.get("pings", True))

    def udp_refused(self, host: str, port: int) -> bool:
        return bool(self.facts.get("udp_refused", False))

    def handshake(self, cfg: ClientConfig, transport: str) -> d.Probe:
        self.handshakes.append(transport)
        self.probed.append(cfg)
        return self.facts.get(transport) or d.Probe(transport)

    def relay_health(self, path: Path) -> RelayHealth | str:
        self.health_asked.append(path)
        return self.facts.get("relay_health", HEALTHY_RELAY)

    def store(self, cfg: Any) -> d.StoreFacts | None:
        return self.facts.get("store")


RUNNING = {
    "connected": True,
    "address": "10.66.0.2/24",
    "routes": ["192.168.77.0/24"],
    "mtu": 1420,
    "peers": [{"name": "relay", "address": "10.66.0.1", "last_handshake": NOW - 3}],
}


def test_running_client_is_trusted_and_never_probed(ccfg: ClientConfig) -> None:
    system = FakeSystem(
        status=RUNNING, link=link(addrs=["10.66.0.2/24"]), route_dev={"127.0.0.1": "lo"}
    )
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.handshakes == []
    assert d.exit_code(results) == 0, d.format_text(results)
    assert {"client", "relay", "handshake", "device", "address", "routes", "mtu"} <= {
        r.check for r in results
    }
    system = FakeSystem(status={**RUNNING, "connected": False}, link=link(addrs=["10.66.0.2/24"]))
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.handshakes == []
    assert not names(results)["handshake"].ok


def test_running_client_ipv6_address_checked(ccfg: ClientConfig) -> None:
    status = {**RUNNING, "address6": "fd66::2/64"}
    facts: dict[str, Any] = {"route_dev": {"127.0.0.1": "lo"}}
    have = d.Link("gtun0", True, 1420, (IPv4Interface("10.66.0.2/24"),), 0x1001)
    results = names(d.diagnose_client(ccfg, FakeSystem(status=status, link=have, **facts)))  # type: ignore[arg-type]
    assert not results["address6"].ok
    assert results["address6"].fix == "ip addr add fd66::2/64 dev gtun0"
    both = d.Link(
        "gtun0", True, 1420, (IPv4Interface("10.66.0.2/24"), IPv6Interface("fd66::2/64")), 0x1001
    )
    results = names(d.diagnose_client(ccfg, FakeSystem(status=status, link=both, **facts)))  # type: ignore[arg-type]
    assert results["address6"].ok and results["address"].ok


def test_full_tunnel_endpoint_is_looked_up_with_the_clients_mark(ccfg: ClientConfig) -> None:
    # Everything unmarked goes into the tunnel; the client's marked packets do not.
    facts: dict[str, Any] = {
        "link": link(addrs=["10.66.0.2/24"]),
        "route_dev": {"127.0.0.1": "gtun0"},
        "route_dev_marked": {"127.0.0.1": "lo"},
    }
    results = d.diagnose_client(ccfg, FakeSystem(status={**RUNNING, "fwmark": 51820}, **facts))  # type: ignore[arg-type]
    assert "endpoint" not in names(results), d.format_text(results)
    # Without the mark (not a full tunnel), the same routes are a loop.
    results = d.diagnose_client(ccfg, FakeSystem(status=RUNNING, **facts))  # type: ignore[arg-type]
    assert not names(results)["endpoint"].ok


def test_stopped_client_probes_udp_then_tcp(ccfg: ClientConfig) -> None:
    system = FakeSystem(udp=d.Probe("udp", answered=True))
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.handshakes == ["udp"]
    assert not names(results)["client"].ok and names(results)["handshake"].ok
    system = FakeSystem(tcp=d.Probe("tcp", answered=True, connected=True))
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.handshakes == ["udp", "tcp"]
    assert 'transport = "auto"' in (names(results)["relay"].fix or "")
    refused = FakeSystem(udp=d.Probe("udp", answered=True, refused="this relay runs in tun mode"))
    results = d.diagnose_client(ccfg, refused)  # type: ignore[arg-type]
    assert refused.handshakes == ["udp"] and not names(results)["mode"].ok


def test_runs_take_the_time_from_the_system(
    tmp_path: Path, keys: dict[str, bytes], ccfg: ClientConfig
) -> None:
    from gtun.app.config import load_server_config

    cfg = load_server_config(write_server(tmp_path, keys))
    alice = encode_key(public_key(keys["client"]))
    status = {"peers": [{"name": "alice", "public_key": alice, "last_handshake": NOW - 9}]}
    system = FakeSystem(status=status, link=link(addrs=["10.66.0.1/24"]), now=NOW)
    r = names(d.diagnose_relay(cfg, system, key=alice))  # type: ignore[arg-type]
    assert "last handshake 9 s ago" in r["peer"].detail
    silent = {**RUNNING, "connected": False}
    system = FakeSystem(status=silent, link=link(addrs=["10.66.0.2/24"]), now=NOW + 60)
    r = names(d.diagnose_client(ccfg, system))  # type: ignore[arg-type]
    assert "(last handshake 63 s ago)" in r["handshake"].detail


def test_relay_run_over_facts(tmp_path: Path, keys: dict[str, bytes]) -> None:
    from gtun.app.config import load_server_config

    cfg = load_server_config(write_server(tmp_path, keys))
    status = {"peers": [{"name": "alice", "address": "10.66.0.2", "subnets": []}]}
    healthy = FakeSystem(status=status, link=link(addrs=["10.66.0.1/24"]))
    results = d.diagnose_relay(cfg, healthy)  # type: ignore[arg-type]
    assert d.exit_code(results) == 0, d.format_text(results)
    sick = FakeSystem(
        status=status,
        link=link(addrs=["10.66.0.1/24"]),
        sysctl={"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.rp_filter": "1"},
        nft=[chain("drop")],
    )
    r = names(d.diagnose_relay(cfg, sick))  # type: ignore[arg-type]
    assert not r["forwarding"].ok and not r["rp_filter"].ok
    assert not r["forward"].ok and not r["nat"].ok


# --- the relay's health, asked over the tunnel -------------------------------------


def test_relay_health_one_problem_each_fixed_on_the_relay() -> None:
    sick = RelayHealth(
        device="gtun0",
        forwarding=False,
        forwarding6=False,
        nat=False,
        device_up=False,
        missing_routes=(ip_network("192.168.88.0/24"),),
        store=False,
        age=4.0,
    )
    r = names(d.check_relay_health(sick))
    assert set(r) == {
        "relay-forwarding",
        "relay-forwarding6",
        "relay-nat",
        "relay-device",
        "relay-routes",
        "relay-store",
    }
    for result in r.values():
        assert not result.ok and "gtun doctor -c server.toml" in (result.fix or "")
        assert "(4 s ago)" in result.detail
    assert "net.ipv4.ip_forward=1" in (r["relay-forwarding"].fix or "")
    assert "net.ipv6.conf.all.forwarding=1" in (r["relay-forwarding6"].fix or "")
    assert "192.168.88.0/24" in r["relay-routes"].detail
    # Forwarding off on the relay's device alone names the device's switch.
    dev_off = d.check_relay_health(replace(HEALTHY_RELAY, dev_forwarding=False))
    assert [x.check for x in dev_off] == ["relay-forwarding"]
    assert "net.ipv4.conf.gtun0.forwarding=1" in (dev_off[0].fix or "")
    # All well: one OK line; unknown or unasked: a note, never a problem.
    [good] = d.check_relay_health(HEALTHY_RELAY)
    assert good.ok and "IPv4 forwarding on" in good.detail and "gtun0 up" in good.detail
    [fresh] = d.check_relay_health(RelayHealth())
    assert fresh.ok and "not looked" in fresh.detail
    [old] = d.check_relay_health("the relay does not answer health requests (an older gtun)")
    assert old.ok and "older gtun" in old.detail
    [stale] = d.check_relay_health(replace(HEALTHY_RELAY, age=600.0))
    assert stale.ok and "stuck" in stale.detail


def test_a_running_client_reports_what_is_off_at_its_relay(ccfg: ClientConfig) -> None:
    facts: dict[str, Any] = {"link": link(addrs=["10.66.0.2/24"]), "route_dev": {"127.0.0.1": "lo"}}
    off = replace(HEALTHY_RELAY, forwarding=False)
    system = FakeSystem(status=RUNNING, relay_health=off, **facts)
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.handshakes == [] and system.health_asked == [ccfg.control_socket]
    r = names(results)
    assert not r["relay-forwarding"].ok and "IPv4 forwarding is off" in r["relay-forwarding"].detail
    assert d.exit_code(results) == 1
    # A healthy relay: all OK, as before.
    results = d.diagnose_client(ccfg, FakeSystem(status=RUNNING, **facts))  # type: ignore[arg-type]
    assert d.exit_code(results) == 0 and names(results)["relay-health"].ok
    # A client that is not connected is not asked (the path lines say why).
    system = FakeSystem(status={**RUNNING, "connected": False}, **facts)
    d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.health_asked == []


def test_a_stopped_clients_probe_brings_the_relays_health(ccfg: ClientConfig) -> None:
    answered = d.Probe("udp", answered=True, health=replace(HEALTHY_RELAY, nat=False))
    r = names(d.diagnose_client(ccfg, FakeSystem(udp=answered)))  # type: ignore[arg-type]
    assert not r["relay-nat"].ok and "gtun doctor -c server.toml" in (r["relay-nat"].fix or "")


def relay_cfg(tmp_path: Path, keys: dict[str, bytes], **extra: str) -> Any:
    from gtun.app.config import load_server_config

    path = write_server(tmp_path, keys)
    text = path.read_text().replace(
        "[server]\n", "[server]\n" + "".join(f"{k} = {v}\n" for k, v in extra.items()), 1
    )
    path.write_text(text)
    return load_server_config(path)


def test_ipv6_forwarding_is_checked_with_network6(tmp_path: Path, keys: dict[str, bytes]) -> None:
    status = {"peers": []}
    up = link(addrs=["10.66.0.1/24"])
    off = {"net.ipv6.conf.all.forwarding": "0"}
    without = relay_cfg(tmp_path, keys)
    r = names(d.diagnose_relay(without, FakeSystem(status=status, link=up, sysctl=off)))  # type: ignore[arg-type]
    assert "forwarding6" not in r
    cfg = relay_cfg(tmp_path, keys, network6='"fd66::/64"')
    r = names(d.diagnose_relay(cfg, FakeSystem(status=status, link=up, sysctl=off)))  # type: ignore[arg-type]
    assert not r["forwarding6"].ok and "net.ipv6.conf.all.forwarding=1" in (
        r["forwarding6"].fix or ""
    )
    r = names(d.diagnose_relay(cfg, FakeSystem(status=status, link=up)))  # type: ignore[arg-type]
    assert r["forwarding6"].ok
    # A kernel without IPv6: network6 cannot work.
    r = names(
        d.diagnose_relay(
            cfg,
            FakeSystem(status=status, link=up, sysctl={"net.ipv6.conf.all.forwarding": None}),  # type: ignore[arg-type]
        )
    )
    assert not r["forwarding6"].ok and "IPv6 is off in the kernel" in r["forwarding6"].detail


def test_what_the_relay_sets_up_itself_is_no_problem_before_it_starts(
    tmp_path: Path, keys: dict[str, bytes]
) -> None:
    cfg = relay_cfg(tmp_path, keys, network6='"fd66::/64"')
    fresh = {
        "sysctl": {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0"},
        "nft": [],
    }
    results = d.diagnose_relay(cfg, FakeSystem(**fresh))  # type: ignore[arg-type]
    r = names(results)
    assert [x.check for x in results if not x.ok] == ["relay"], d.format_text(results)
    for check in ("forwarding", "forwarding6", "nat", "device"):
        assert r[check].ok and "at start" in r[check].detail, r[check]
    # While it runs, the same facts are problems.
    running = FakeSystem(status={"peers": []}, link=link(addrs=["10.66.0.1/24"]), **fresh)
    r = names(d.diagnose_relay(cfg, running))  # type: ignore[arg-type]
    assert not r["forwarding"].ok and not r["forwarding6"].ok and not r["nat"].ok


# --- doctor checks the file it was given ------------------------------------------------


def running_from(cfg: ClientConfig, **changes: Any) -> dict[str, Any]:
    """RUNNING as a client started from `cfg` reports it, with `changes`."""
    relay = encode_key(cfg.server_public_key)
    status = {
        **RUNNING,
        "device": cfg.device,
        "public_key": encode_key(cfg.public_key),
        "config_file": str(cfg.path),
        "server": "{}:{}".format(*cfg.server),
        "server_public_key": relay,
        "transport_configured": cfg.transport,
        "relays": [relay],
        "peers": [{**RUNNING["peers"][0], "public_key": relay}],  # type: ignore[index]
    }
    status.update(changes)
    return status


FACTS: dict[str, Any] = {"link": link(addrs=["10.66.0.2/24"]), "route_dev": {"127.0.0.1": "lo"}}


def test_the_same_file_is_no_problem(ccfg: ClientConfig) -> None:
    system = FakeSystem(status=running_from(ccfg), **FACTS)
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert d.exit_code(results) == 0 and system.handshakes == [], d.format_text(results)
    assert "config" not in names(results)


def test_an_edited_server_key_is_probed_with_the_files_key(
    ccfg: ClientConfig, tmp_path: Path, keys: dict[str, bytes]
) -> None:
    """The running client uses the old relay key; the file names a relay the running
    client does not know: doctor may probe it under the client's key."""
    old = encode_key(public_key(generate_private_key()))
    status = running_from(ccfg, server_public_key=old, relays=[old])
    status["peers"] = [{**status["peers"][0], "public_key": old}]
    system = FakeSystem(
        status=status, udp=d.Probe("udp"), tcp=d.Probe("tcp", error="refused"), **FACTS
    )
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    r = names(results)
    new = encode_key(ccfg.server_public_key)
    assert not r["config"].ok
    assert f"uses server_public_key {old}" in r["config"].detail
    assert f"the file says server_public_key {new}" in r["config"].detail
    assert "systemctl restart gtun-client@client" in (r["config"].fix or "")
    assert f"gtun client -c {ccfg.path}" in (r["config"].fix or "")
    # The probe ran with the file's relay key; it found the relay silent.
    assert system.handshakes == ["udp", "tcp"]
    assert all(c.server_public_key == ccfg.server_public_key for c in system.probed)
    assert not r["handshake"].ok and "wrong server_public_key" in r["handshake"].detail
    # The running client's own relay is still asked how it is, and said to be its.
    assert "the running client's relay" in r["relay-health"].detail


def test_no_handshake_under_the_same_key_with_a_relay_the_client_knows(
    ccfg: ClientConfig,
) -> None:
    """Only the address changed: the relay (its key) is the running client's, whose
    session a probe would take over.  Doctor only pokes the port and pings."""
    status = running_from(ccfg, server="192.0.2.7:9621")
    system = FakeSystem(status=status, **FACTS)
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    r = names(results)
    assert system.handshakes == []
    assert not r["config"].ok and "uses server 192.0.2.7:9621" in r["config"].detail
    assert r["relay"].ok and "no handshake tried" in r["relay"].detail
    assert "take over" in r["relay"].detail
    # A relay it learnt from a mesh counts as known too.
    learnt = encode_key(ccfg.server_public_key)
    status = running_from(ccfg, server_public_key="other", relays=["other", learnt])
    system = FakeSystem(status=status, **FACTS)
    d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert system.handshakes == []
    # A closed port is still said.
    system = FakeSystem(
        status=running_from(ccfg, server="192.0.2.7:9621"), udp_refused=True, **FACTS
    )
    r = names(d.diagnose_client(ccfg, system))  # type: ignore[arg-type]
    assert not r["relay"].ok and "nothing listens on UDP" in r["relay"].detail


def test_another_client_key_may_be_probed(ccfg: ClientConfig) -> None:
    """The file's private_key_file changed: to the relay, the probe is another peer."""
    status = running_from(ccfg, public_key=encode_key(public_key(generate_private_key())))
    system = FakeSystem(status=status, udp=d.Probe("udp", answered=True), **FACTS)
    r = names(d.diagnose_client(ccfg, system))  # type: ignore[arg-type]
    assert system.handshakes == ["udp"]
    assert not r["config"].ok and "public key (private_key_file)" in r["config"].detail
    assert r["handshake"].ok


def test_transport_and_device_changes_keep_the_running_session(ccfg: ClientConfig) -> None:
    status = running_from(ccfg, transport_configured="tcp", device="gtun9")
    system = FakeSystem(status=status, **FACTS)
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    r = names(results)
    assert system.handshakes == []  # the same relay and key: the session tells
    assert "uses transport tcp, device gtun9" in r["config"].detail
    assert r["handshake"].ok and "running client has a session" in r["handshake"].detail
    # The device checked is the running client's, the one that exists.
    assert "gtun9" in r["device"].detail


def test_an_older_running_client_is_compared_on_what_it_says(ccfg: ClientConfig) -> None:
    system = FakeSystem(status=RUNNING, **FACTS)  # no server, key, transport or device
    results = d.diagnose_client(ccfg, system)  # type: ignore[arg-type]
    assert "config" not in names(results) and system.handshakes == []


# --- several relays: the store, the mesh sessions, the clocks -------------------------

OWN, R2, R3 = "own-key", "r2-key", "r3-key"


def store_facts(**changes: Any) -> d.StoreFacts:
    relays = (
        d.RelayFacts("r1", OWN, "10.0.0.1:9621", 3.0, 0.01),
        d.RelayFacts("r2", R2, "10.0.0.2:9621", 4.0, -0.2),
        d.RelayFacts("r3", R3, "10.0.0.3:9621", 1.0, 0.3),
    )
    facts: dict[str, Any] = {
        "where": "postgresql:///gtun",
        "schema": 3,
        "wanted_schema": 3,
        "clock_offset": 0.05,
        "relays": relays,
    }
    facts.update(changes)
    return d.StoreFacts(**facts)


MESH_STATUS = {
    "peers": [],
    "mesh": [
        {"name": "r2", "public_key": R2, "last_handshake": NOW - 20},
        {"name": "r3", "public_key": R3, "last_handshake": NOW - 100},
    ],
}


def test_store_check_names_unreachable_and_old_schema(tmp_path: Path) -> None:
    path = tmp_path / "r1.toml"
    assert d.check_store(store_facts(), path).ok
    down = d.check_store(store_facts(error="store postgresql:///gtun is unavailable: x"), path)
    assert not down.ok and "refuse new peers and leases" in down.detail
    assert "start PostgreSQL" in (down.fix or "")
    old = d.check_store(store_facts(schema=2), path)
    assert not old.ok and old.fix == f"gtun store migrate -c {path}"
    new = d.check_store(store_facts(schema=4), path)
    assert not new.ok and "upgrade gtun" in (new.fix or "")


def test_mesh_check_sessions_with_every_live_relay() -> None:
    good = d.check_mesh(OWN, MESH_STATUS, store_facts(), NOW)
    assert good is not None and good.ok and "r2 (handshake 20 s ago)" in good.detail
    # r3's session went stale; r2 left the mesh; a relay never seen.
    stale = {**MESH_STATUS, "mesh": [{**MESH_STATUS["mesh"][0]}, {"name": "r3", "public_key": R3}]}
    r = d.check_mesh(OWN, stale, store_facts(), NOW)
    assert r is not None and not r.ok and "no session with r3 at 10.0.0.3:9621" in r.detail
    gone = {**MESH_STATUS, "mesh": MESH_STATUS["mesh"][1:]}
    r = d.check_mesh(OWN, gone, store_facts(), NOW)
    assert (
        r is not None and not r.ok and "r2 at 10.0.0.2:9621 is not in this relay's mesh" in r.detail
    )
    quiet = store_facts(
        relays=(d.RelayFacts("r1", OWN, None, 1, 0), d.RelayFacts("r2", R2, "e:1", 90.0, 0))
    )
    r = d.check_mesh(OWN, MESH_STATUS, quiet, NOW)
    assert r is not None and not r.ok and "looks down (its last heartbeat: 90 s ago)" in r.detail
    alone = d.check_mesh(OWN, MESH_STATUS, store_facts(relays=store_facts().relays[:1]), NOW)
    assert alone is not None and alone.ok and "only one" in alone.detail
    assert d.check_mesh(OWN, MESH_STATUS, store_facts(error="down"), NOW) is None


def test_clock_check_names_the_relay_whose_clock_is_off() -> None:
    good = d.check_clock_skew(OWN, store_facts())
    assert good is not None and good.ok and "within 300 ms" in good.detail
    r2_off = store_facts(relays=(d.RelayFacts("r2", R2, "e:1", 2.0, 7.5),))
    r = d.check_clock_skew(OWN, r2_off)
    assert r is not None and not r.ok and "r2 +7.5 s" in r.detail and "chrony" in (r.fix or "")
    mine_off = d.check_clock_skew(OWN, store_facts(clock_offset=-3.0))
    assert mine_off is not None and not mine_off.ok and "this machine -3.0 s" in mine_off.detail
    # A relay that is down does not count (its last offset is old news).
    dead = store_facts(relays=(d.RelayFacts("r2", R2, "e:1", 500.0, 99.0),))
    r = d.check_clock_skew(OWN, dead)
    assert r is not None and r.ok


def test_relay_with_a_store_runs_the_three_checks(tmp_path: Path, keys: dict[str, bytes]) -> None:
    from gtun.app.config import load_server_config

    cfg = load_server_config(write_server(tmp_path, keys))
    own = encode_key(cfg.public_key)
    relays = tuple(
        d.RelayFacts(r.name, own if r.public_key == OWN else r.public_key, r.endpoint, 1.0, 0.1)
        for r in store_facts().relays
    )
    system = FakeSystem(
        status={**MESH_STATUS, "peers": []},
        link=link(addrs=["10.66.0.1/24"]),
        store=store_facts(relays=relays),
    )
    r = names(d.diagnose_relay(cfg, system))  # type: ignore[arg-type]
    assert r["store"].ok and r["mesh"].ok and r["clock"].ok
    without = names(d.diagnose_relay(cfg, FakeSystem(link=link(addrs=["10.66.0.1/24"]))))  # type: ignore[arg-type]
    assert "store" not in without and "mesh" not in without


# --- the handshake probe's reading of the client core, against an in-memory relay -------


def make_relay(keys: dict[str, bytes], mode: str = "tun") -> Relay:
    relay = Relay(keys["relay"], relay_settings(mode=mode))
    relay.set_peers([PeerSpec("alice", public_key(keys["client"]), IPv4Address("10.66.0.2"))])
    return relay


def run_probe(
    private_key: bytes, server_key: bytes, mode: str | None, relay: Relay
) -> tuple[d.Probe, bool]:
    """A client core wired to `relay`: what the probe noted, and whether it is over."""
    core = ClientCore(private_key, server_key, hs.RELAY, mode=mode)
    result = d.Probe("udp")
    now = time.monotonic()
    core.start(now)
    over = hs.take_events(core, result, 0.0)
    for _ in range(4):
        for data, _addr in core.datagrams_to_send():
            relay.receive_datagram(data, "client", now)
        for data, _addr in relay.datagrams_to_send():
            core.receive_datagram(data, hs.RELAY, now)
        over = hs.take_events(core, result, 0.01) or over
    return result, over


def test_probe_gets_the_config(keys: dict[str, bytes]) -> None:
    got, over = run_probe(keys["client"], public_key(keys["relay"]), None, make_relay(keys))
    assert over and got.answered and got.rtt == 0.01 and got.refused is None
    assert got.config is not None and got.config.address == IPv4Address("10.66.0.2")


def test_probe_mode_refused(keys: dict[str, bytes]) -> None:
    got, over = run_probe(keys["client"], public_key(keys["relay"]), "tap", make_relay(keys))
    assert over and got.answered and got.config is None
    assert got.refused is not None and "tun mode" in got.refused


def test_probe_wrong_key_or_stranger_is_silent(keys: dict[str, bytes]) -> None:
    relay_key, other_key = public_key(keys["relay"]), public_key(generate_private_key())
    wrong, over = run_probe(keys["client"], other_key, None, make_relay(keys))
    assert not over and not wrong.answered and wrong.rtt is None
    stranger, over = run_probe(generate_private_key(), relay_key, None, make_relay(keys))
    assert not over and not stranger.answered


# --- tier 2: UDP silent, TCP answering, on loopback ---------------------------------------


class TcpRelay:
    """A relay core behind gtun's TCP framing on 127.0.0.1, with a silent UDP socket on
    the same port (so UDP gets neither an answer nor a port unreachable)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = asyncio.new_event_loop()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.server: asyncio.Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = ("tcp", id(writer))
        try:
            while True:
                data = await read_frame(reader)
                self.relay.receive_datagram(data, addr, time.monotonic())
                for out, to in self.relay.datagrams_to_send():
                    if to == addr:
                        writer.write(push_frame(out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> TcpRelay:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.udp.close()


@pytest.fixture
def tcp_relay(keys: dict[str, bytes]) -> Iterator[TcpRelay]:
    with TcpRelay(make_relay(keys)) as server:
        yield server


def test_udp_silent_but_tcp_answers(
    tmp_path: Path, keys: dict[str, bytes], tcp_relay: TcpRelay
) -> None:
    cfg = load_client_config(write_client(tmp_path, keys, port=tcp_relay.port))
    started = time.monotonic()
    results = names(d.diagnose_client(cfg, LiveSystem()))
    assert time.monotonic() - started < d.UDP_HANDSHAKE_WAIT + d.TCP_HANDSHAKE_WAIT + 3
    relay = results["relay"]
    assert not relay.ok and "TCP does" in relay.detail, results
    assert 'set transport = "auto" (or "tcp")' in (relay.fix or "")
    assert results["handshake"].ok


def test_tcp_probe_gets_config_and_refusal(
    tmp_path: Path, keys: dict[str, bytes], tcp_relay: TcpRelay
) -> None:
    cfg = load_client_config(write_client(tmp_path, keys, port=tcp_relay.port))
    got = asyncio.run(hs.probe_tcp(cfg))
    assert got.connected and got.answered and got.config is not None and got.rtt is not None
    tap = load_client_config(write_client(tmp_path, keys, port=tcp_relay.port, mode='"tap"'))
    # WireGuard refuses a second initiation within its timestamp granularity (a replay).
    time.sleep(2 * TAI64N_WHITENING_NS / 1e9)
    got = asyncio.run(hs.probe_tcp(tap))
    assert got.refused is not None and "tun mode" in got.refused


def test_the_probe_asks_the_relays_health(
    tmp_path: Path, keys: dict[str, bytes], tcp_relay: TcpRelay
) -> None:
    """Once the relay's CONFIG grants it, the probe asks how the relay is, and a whole
    run over the live system names what is off there, to be fixed on the relay."""
    tcp_relay.relay.set_health(replace(HEALTHY_RELAY, forwarding=False), time.monotonic())
    cfg = load_client_config(write_client(tmp_path, keys, port=tcp_relay.port))
    got = asyncio.run(hs.probe_tcp(cfg))
    assert got.config is not None and got.config.health
    assert got.health is not None and got.health.forwarding is False
    assert got.health.device == "gtun0" and got.health.age is not None and got.health.age < 5
    time.sleep(2 * TAI64N_WHITENING_NS / 1e9)
    results = names(d.diagnose_client(cfg, LiveSystem()))
    assert not results["relay-forwarding"].ok, results
    assert "gtun doctor -c server.toml" in (results["relay-forwarding"].fix or "")


def test_tcp_probe_refused_port(tmp_path: Path, keys: dict[str, bytes]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        cfg = load_client_config(write_client(tmp_path, keys, port=port))
        got = asyncio.run(hs.probe_tcp(cfg))
        assert not got.connected and got.error == "refused"
        udp = asyncio.run(hs.probe_udp(cfg, wait=1.0))
        assert not udp.answered and udp.error == "refused"  # ICMP port unreachable


@pytest.mark.parametrize("garbage", [b"\xff\xff" + b"\x00" * 16, b"\x00\x94\x02", b""])
def test_tcp_probe_survives_a_bad_peer(
    tmp_path: Path, keys: dict[str, bytes], garbage: bytes
) -> None:
    """An oversized frame, a truncated one, or a closed connection: an error, no hang."""

    async def main() -> d.Probe:
        done = asyncio.Event()
        handlers: list[asyncio.Task[Any]] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.append(task)
            writer.write(garbage)
            await writer.drain()
            if garbage:
                await done.wait()  # keep the connection open until the probe gave up
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = load_client_config(write_client(tmp_path, keys, port=port))
        started = time.monotonic()
        got = await hs.probe_tcp(cfg)
        assert time.monotonic() - started < d.TCP_HANDSHAKE_WAIT + hs.CONFIG_WAIT + 0.5
        done.set()
        await asyncio.gather(*handlers)
        server.close()
        await server.wait_closed()
        return got

    got = asyncio.run(main())
    assert got.connected and not got.answered
    assert got.error is not None and "closed the connection" in got.error
