"""Tier 3: `gtun doctor` on a client reports what is off at the relay, asked over the
tunnel; IPv6 forwarding on a relay with network6; the file checked against the running
client; and what the relay sets up itself, before it runs.  Real relay and client
processes in namespaces (prefix gtd, underlay 10.251.x.x); every sysctl changed is the
relay's namespace's, never the root namespace's.

One lab for the module; each test provokes one fault, checks doctor's words for it and
restores the setup; the test that stops the relay comes last.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.lab.net import PORT, GtunNet
from gtun.lab.netns import Lab
from gtun.system.nft import Nat
from labkit import doctor_results, relay_peer, wait_until

pytestmark = pytest.mark.netns

UNDERLAY = 251  # 10.251.x.x inside this module's namespaces
NETWORK6 = "fd66:251::/64"
WAIT = 30.0  # the relay looks at itself every 5 s; doctor runs take a few seconds each


@dataclass
class Lab6:
    net: GtunNet
    before_start: dict[str, dict[str, Any]]  # the relay's doctor before its first start


@pytest.fixture(scope="module")
def lab6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab6]:
    with Lab(f"gtd{secrets.token_hex(2)}") as lab:
        net = GtunNet(lab, tmp_path_factory.mktemp("dhealth"), underlay=UNDERLAY, network6=NETWORK6)
        _, before = doctor_results(net.relay.ns, net.relay.config)
        net.start_all()
        yield Lab6(net, before)


def doctor(lab6: Lab6, node: str = "c1", config: Path | None = None) -> dict[str, dict[str, Any]]:
    net = lab6.net
    where = net.relay if node == "relay" else next(c for c in net.clients if c.name == node)
    started = time.monotonic()
    _, results = doctor_results(where.ns, config or where.config)
    assert time.monotonic() - started < 20, results  # bounded, even when probes wait
    return results


def problem(results: dict[str, dict[str, Any]], check: str, *words: str) -> dict[str, Any]:
    r = results.get(check)
    assert r is not None and not r["ok"], results
    for word in words:
        assert word in r["detail"] + " " + r["fix"], r
    return r


def test_healthy_relay_seen_from_the_client(lab6: Lab6) -> None:
    results = doctor(lab6)
    assert all(r["ok"] for r in results.values()), results
    health = results["relay-health"]["detail"]
    assert "IPv4 forwarding on" in health and "IPv6 forwarding on" in health
    assert "its NAT table in place" in health and "gtun0 up" in health
    relay = doctor(lab6, "relay")
    assert relay["forwarding6"]["ok"] and relay["forwarding"]["ok"], relay


def test_forwarding_off_at_the_relay_is_reported_by_the_client(lab6: Lab6) -> None:
    """Turned off inside the relay's namespace: the client's doctor says so, within the
    relay's next look at itself, with the fix to be made on the relay."""
    relay_ns = lab6.net.relay.ns
    relay_ns.sysctl("net.ipv4.ip_forward", 0)
    try:
        started = time.monotonic()
        results = wait_until(
            lambda: (r := doctor(lab6)).get("relay-forwarding") and r, WAIT, "relay-forwarding"
        )
        seen = time.monotonic() - started
        r = problem(results, "relay-forwarding", "IPv4 forwarding is off", "gtun doctor -c")
        assert "server.toml" in r["fix"] and "net.ipv4.ip_forward=1" in r["fix"], r
        print(f"client doctor saw the relay's forwarding off after {seen:.1f} s")
        # The relay's own doctor agrees.
        problem(doctor(lab6, "relay"), "forwarding", "sysctl -w net.ipv4.ip_forward=1")
    finally:
        relay_ns.sysctl("net.ipv4.ip_forward", 1)
    wait_until(lambda: "relay-forwarding" not in doctor(lab6), WAIT, "forwarding back on")


def test_ipv6_forwarding_off_with_network6(lab6: Lab6) -> None:
    relay_ns = lab6.net.relay.ns
    relay_ns.sysctl("net.ipv6.conf.all.forwarding", 0)
    try:
        problem(doctor(lab6, "relay"), "forwarding6", "net.ipv6.conf.all.forwarding=1")
        results = wait_until(
            lambda: (r := doctor(lab6)).get("relay-forwarding6") and r, WAIT, "relay-forwarding6"
        )
        problem(results, "relay-forwarding6", "IPv6 forwarding is off", "gtun doctor -c")
        assert "relay-forwarding" not in results, results  # IPv4 is fine
    finally:
        relay_ns.sysctl("net.ipv6.conf.all.forwarding", 1)
    wait_until(lambda: "relay-forwarding6" not in doctor(lab6), WAIT, "IPv6 forwarding on")


def test_nat_table_and_route_gone_at_the_relay(lab6: Lab6) -> None:
    """The relay's NAT table deleted and its network's route gone from its device (in
    its namespace): the client's doctor names both, read by the relay through nft and
    netlink."""
    net = lab6.net
    ns = net.relay.ns
    nat = Nat("gtun0", [ip_network(net.network), ip_network(NETWORK6)])
    ns.run(["nft", "delete", "table", "inet", nat.table])
    ns.run(["ip", "route", "del", net.network, "dev", "gtun0"])
    try:

        def both_seen() -> dict[str, dict[str, Any]] | None:
            r = doctor(lab6)
            return r if "relay-nat" in r and "relay-routes" in r else None

        results = wait_until(both_seen, WAIT, "relay-nat and relay-routes")
        problem(results, "relay-nat", "masquerade table is missing", "gtun doctor -c")
        problem(results, "relay-routes", net.network, "gtun doctor -c")
    finally:
        ns.run(["nft", "-f", "-"], input=nat.ruleset())
        ns.run(["ip", "route", "replace", net.network, "dev", "gtun0", "src", "10.66.0.1"])
    wait_until(lambda: "relay-routes" not in doctor(lab6), WAIT, "the route back")


def edited(lab6: Lab6, name: str, **changes: str) -> Path:
    """A copy of c1's config with `changes` (TOML values), the same control socket."""
    c1 = lab6.net.clients[0]
    lines = []
    for line in c1.config.read_text().splitlines():
        key = line.split("=")[0].strip()
        lines.append(f"{key} = {changes.pop(key)}" if key in changes else line)
    lines += [f"{k} = {v}" for k, v in changes.items()]  # [client] is its only section
    path = lab6.net.dir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_edited_server_key_while_the_old_client_runs(lab6: Lab6) -> None:
    """The file names another relay key than the running client uses: doctor says to
    restart, and probes the file's relay itself (no session of the running client there
    to take over): nothing answers that key."""
    net = lab6.net
    c1 = net.clients[0]
    before = relay_peer(net, "c1")
    wrong = encode_key(public_key(generate_private_key()))
    path = edited(lab6, "c1-newkey", server_public_key=f'"{wrong}"')
    results = doctor(lab6, config=path)
    r = problem(results, "config", "systemctl restart gtun-client@c1-newkey", str(path))
    assert f"uses server_public_key {net.relay.public}" in r["detail"], r
    assert f"the file says server_public_key {wrong}" in r["detail"], r
    problem(results, "handshake", "does not answer this client's handshake", "wrong server_public")
    # The running client is untouched: the same session, the same endpoint at the relay.
    after = relay_peer(net, "c1")
    assert after["endpoint"] == before["endpoint"], (before, after)
    assert after["last_handshake"] == before["last_handshake"], (before, after)
    net.ping(c1.ns, "10.66.0.1", count=2)


def test_no_handshake_with_the_running_clients_relay(lab6: Lab6) -> None:
    """The same relay key, another port in the file: a handshake under c1's key would
    take its session over, so doctor only pokes the port, which is closed."""
    net = lab6.net
    before = relay_peer(net, "c1")
    path = edited(lab6, "c1-port", server=f'"10.{UNDERLAY}.1.1:{PORT + 1}"')
    results = doctor(lab6, config=path)
    problem(results, "config", f"uses server 10.{UNDERLAY}.1.1:{PORT}")
    problem(results, "relay", f"nothing listens on UDP 10.{UNDERLAY}.1.1:{PORT + 1}")
    # Only the transport changed: the running session answers for the path.
    path = edited(lab6, "c1-tcp", transport='"tcp"')
    results = doctor(lab6, config=path)
    problem(results, "config", "uses transport udp", "file says transport tcp")
    assert results["handshake"]["ok"] and "running client" in results["handshake"]["detail"]
    after = relay_peer(net, "c1")
    assert after["endpoint"] == before["endpoint"] and after["transport"] == "udp"
    assert after["last_handshake"] == before["last_handshake"], (before, after)


def test_before_the_relay_runs_what_it_sets_up_is_a_note(lab6: Lab6) -> None:
    """Before the first start (from the fixture) and after a stop: forwarding off, no
    NAT table and no device are what the relay does itself, not problems."""
    net = lab6.net
    for results in (lab6.before_start, None):
        if results is None:
            net.stop(net.relay)
            results = doctor(lab6, "relay")
        assert [c for c, r in results.items() if not r["ok"]] == ["relay"], results
        for check in ("forwarding", "forwarding6", "nat", "device"):
            assert "at start" in results[check]["detail"], results[check]
