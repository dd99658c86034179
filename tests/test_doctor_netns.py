"""Tier 3: `gtun doctor` against real relay and client processes in namespaces.

One lab for the module; each test provokes one problem inside the namespaces, checks
that doctor names it (and the fix), and restores the setup.  The tests that stop
processes come last.  (UDP blocked but TCP answering is tested on loopback in
test_doctor.py until the relay's TCP listener lands.)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.lab.net import LAN_NET, PORT, GtunNet, Node, write_key
from gtun.lab.netns import Lab, Namespace
from gtun.system.nft import Nat
from labkit import doctor_results, set_config_keys

pytestmark = pytest.mark.netns

UNDERLAY = 238  # 10.238.x.x inside this module's namespaces


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtd{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(lab, tmp_path_factory.mktemp("doctor"), underlay=UNDERLAY)
        # The MTU test's black hole is an nft length rule at the relay.  Over a veth a
        # UDP GSO send arrives there as one aggregate, so batched probes would be
        # dropped together: the clients send one datagram per call.
        # Their own path MTU probing is off: it would heal the black hole doctor is to
        # find (tests/test_pmtu_netns.py tests the healing).
        for c in gnet.clients:
            set_config_keys(c.config, "client", {"offload": "false", "pmtu": "false"})
        gnet.start_all()
        yield gnet


def doctor(ns: Namespace, config: Path, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run `gtun doctor --json` in `ns`: (exit code, results by check name)."""
    started = time.monotonic()
    code, results = doctor_results(ns, config, *extra)
    # The run is bounded: a few seconds even when every probe waits its full time.
    assert time.monotonic() - started < 15, results
    return code, results


def assert_problem(results: dict[str, dict[str, Any]], check: str, *words: str) -> None:
    r = results.get(check)
    assert r is not None and not r["ok"], results
    text = r["detail"] + " " + r["fix"]
    for word in words:
        assert word in text, r


def assert_healthy(net: GtunNet, node: Node) -> None:
    code, results = doctor(node.ns, node.config)
    assert code == 0 and all(r["ok"] for r in results.values()), results


def client_config(net: GtunNet, name: str, **changes: str) -> Path:
    """A variant of c2's config (for a probe while c2 is stopped)."""
    c2 = net.clients[1]
    lines = []
    for line in c2.config.read_text().splitlines():
        key = line.split("=")[0].strip()
        if key in changes:
            line = f"{key} = {changes.pop(key)}"
        lines.append(line)
    lines += [f"{k} = {v}" for k, v in changes.items()]
    path = net.dir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_healthy_relay_and_client(net: GtunNet) -> None:
    assert_healthy(net, net.relay)
    assert_healthy(net, net.clients[0])
    code, results = doctor(net.clients[0].ns, net.clients[0].config)
    assert {"client", "relay", "handshake", "device", "address", "routes", "mtu"} <= set(results)


def test_device_down(net: GtunNet) -> None:
    c1 = net.clients[0]
    c1.ns.run(["ip", "link", "set", "gtun0", "down"])
    try:
        code, results = doctor(c1.ns, c1.config)
        assert code == 1
        assert_problem(results, "device", "gtun0 is down", "ip link set gtun0 up")
    finally:
        c1.ns.run(["ip", "link", "set", "gtun0", "up"])
        # Taking a link down removes its routes; put the pushed one back.
        c1.ns.run(["ip", "route", "replace", f"{LAN_NET}.0/24", "dev", "gtun0"])
    assert_healthy(net, c1)


def test_address_missing(net: GtunNet) -> None:
    c1 = net.clients[0]
    address = f"{c1.extra['address']}/24"
    c1.ns.run(["ip", "addr", "del", address, "dev", "gtun0"])
    try:
        code, results = doctor(c1.ns, c1.config)
        assert code == 1
        assert_problem(results, "address", address, f"ip addr add {address} dev gtun0")
    finally:
        c1.ns.run(["ip", "addr", "add", address, "dev", "gtun0"])
        c1.ns.run(["ip", "route", "replace", f"{LAN_NET}.0/24", "dev", "gtun0"])


def test_route_shadowed_and_missing(net: GtunNet) -> None:
    c1 = net.clients[0]
    shadow = f"{LAN_NET}.0/25"
    c1.ns.run(["ip", "route", "add", shadow, "dev", "up0"])
    try:
        code, results = doctor(c1.ns, c1.config)
        assert code == 1
        assert_problem(results, "routes", f"shadowed by {shadow} dev up0", f"ip route del {shadow}")
    finally:
        c1.ns.run(["ip", "route", "del", shadow, "dev", "up0"])
    c1.ns.run(["ip", "route", "del", f"{LAN_NET}.0/24", "dev", "gtun0"])
    try:
        code, results = doctor(c1.ns, c1.config)
        assert_problem(results, "routes", "no route", f"ip route add {LAN_NET}.0/24 dev gtun0")
    finally:
        c1.ns.run(["ip", "route", "replace", f"{LAN_NET}.0/24", "dev", "gtun0"])


def test_forwarding_off(net: GtunNet) -> None:
    net.relay.ns.sysctl("net.ipv4.ip_forward", 0)
    try:
        code, results = doctor(net.relay.ns, net.relay.config)
        assert code == 1
        assert_problem(results, "forwarding", "off", "sysctl -w net.ipv4.ip_forward=1")
    finally:
        net.relay.ns.sysctl("net.ipv4.ip_forward", 1)


def test_rp_filter_strict(net: GtunNet) -> None:
    ns = net.relay.ns
    before = ns.run(["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]).stdout.strip()
    ns.sysctl("net.ipv4.conf.all.rp_filter", 1)
    try:
        code, results = doctor(ns, net.relay.config)
        assert code == 1
        assert_problem(results, "rp_filter", "strict", "rp_filter=2")
    finally:
        ns.sysctl("net.ipv4.conf.all.rp_filter", before)
    # Loose mode does not drop: doctor is content.
    c1 = net.clients[0]
    c1.ns.sysctl("net.ipv4.conf.all.rp_filter", 2)
    try:
        _, results = doctor(c1.ns, c1.config)
        assert results["rp_filter"]["ok"], results
    finally:
        c1.ns.sysctl("net.ipv4.conf.all.rp_filter", 0)


def test_forward_chain_drops(net: GtunNet) -> None:
    ns = net.relay.ns
    ns.run(
        ["nft", "-f", "-"],
        input="table inet gtdfw {\n chain fw {\n"
        "  type filter hook forward priority 0; policy drop;\n"
        "  ct state established,related accept\n }\n}\n",
    )
    try:
        code, results = doctor(ns, net.relay.config)
        assert code == 1
        assert_problem(
            results, "forward", "inet gtdfw fw", 'nft insert rule inet gtdfw fw iifname "gtun0"'
        )
        # The fix doctor names makes it content.
        ns.run(["nft", "insert", "rule", "inet", "gtdfw", "fw", "iifname", "gtun0", "accept"])
        _, results = doctor(ns, net.relay.config)
        assert results["forward"]["ok"], results
    finally:
        ns.run(["nft", "delete", "table", "inet", "gtdfw"])


def test_nat_table_missing(net: GtunNet) -> None:
    ns = net.relay.ns
    nat = Nat("gtun0", [__import__("ipaddress").ip_network(net.network)])
    ns.run(["nft", "delete", "table", "inet", nat.table])
    try:
        code, results = doctor(ns, net.relay.config)
        assert code == 1
        assert_problem(results, "nat", nat.table, "gtun server -c")
    finally:
        ns.run(["nft", "-f", "-"], input=nat.ruleset())
    assert_healthy(net, net.relay)


def test_mtu_black_hole(net: GtunNet) -> None:
    """The relay drops tunnel datagrams over 1200 bytes: packets over 1140 bytes inside
    the tunnel (1200 - 20 IP - 8 UDP - 32 WireGuard) vanish."""
    ns = net.relay.ns
    ns.run(
        ["nft", "-f", "-"],
        input="table inet gtdmtu {\n chain input {\n"
        "  type filter hook input priority 0;\n"
        f"  udp dport {PORT} ip length > 1200 drop\n }}\n}}\n",
    )
    c1 = net.clients[0]
    try:
        code, results = doctor(c1.ns, c1.config)
        assert code == 1
        r = results["mtu"]
        assert not r["ok"] and "black hole" in r["detail"], r
        largest = int(r["fix"].split("mtu ")[1].split()[0])
        assert 1040 <= largest <= 1140, r
        assert f"ip link set gtun0 mtu {largest}" in r["fix"]
    finally:
        ns.run(["nft", "delete", "table", "inet", "gtdmtu"])


def test_mode_mismatch(net: GtunNet) -> None:
    c2 = net.clients[1]
    net.stop(c2)
    path = client_config(net, "c2-tap", mode='"tap"')
    code, results = doctor(c2.ns, path)
    assert code == 1
    assert results["handshake"]["ok"], results
    assert_problem(results, "mode", "tun mode", 'mode = "tun"')


def test_wrong_server_key(net: GtunNet) -> None:
    c2 = net.clients[1]
    net.stop(c2)
    wrong = encode_key(public_key(generate_private_key()))
    path = client_config(net, "c2-wrong", server_public_key=f'"{wrong}"')
    code, results = doctor(c2.ns, path)
    assert code == 1
    assert results["relay"]["ok"], results
    assert_problem(results, "handshake", "wrong server_public_key", "gtun pubkey < server.key")


def test_client_key_not_a_peer(net: GtunNet) -> None:
    c2 = net.clients[1]
    net.stop(c2)
    key = generate_private_key()
    write_key(net.dir / "stranger.key", key)
    path = client_config(net, "c2-stranger", private_key_file='"stranger.key"')
    code, results = doctor(c2.ns, path)
    assert code == 1
    assert_problem(results, "handshake", "not a peer", "gtun peer add")
    # On the relay, doctor says whether a key is a peer.
    stranger = encode_key(public_key(key))
    code, results = doctor(net.relay.ns, net.relay.config, "--key", stranger)
    assert_problem(results, "peer", stranger, "gtun peer add")
    _, results = doctor(net.relay.ns, net.relay.config, "--key", net.clients[0].public)
    assert results["peer"]["ok"] and "c1" in results["peer"]["detail"], results


def test_udp_blocked_but_tcp_answers(net: GtunNet) -> None:
    """The relay's real TCP listener answers the probe UDP cannot get through."""
    c2 = net.clients[1]
    net.stop(c2)
    block = (
        "table inet gtd_block {\n"
        "  chain out { type filter hook output priority 0; policy accept;\n"
        "    udp dport 9621 counter drop\n  }\n}\n"
    )
    c2.ns.run(["nft", "-f", "-"], input=block)
    try:
        code, results = doctor(c2.ns, c2.config)
        assert code == 1
        assert_problem(results, "relay", "TCP", 'transport = "auto"')
        rules = c2.ns.run(["nft", "-j", "list", "table", "inet", "gtd_block"]).stdout
        assert '"packets": 0' not in rules, rules  # the probe's UDP was indeed dropped
    finally:
        c2.ns.run(["nft", "delete", "table", "inet", "gtd_block"], check=False)
    # Unblocked, the same probe is answered over UDP.
    code, results = doctor(c2.ns, c2.config)
    assert results["relay"]["ok"] and results["handshake"]["ok"], results


def test_relay_not_running(net: GtunNet) -> None:
    net.stop(net.relay)
    c1, c2 = net.clients
    # A running client (its session not yet timed out) and a probe of our own.
    code, results = doctor(c1.ns, c1.config)
    assert code == 1
    assert_problem(results, "relay", "nothing listens on UDP", "gtun server -c")
    code, results = doctor(c2.ns, c2.config)
    assert_problem(results, "relay", "nothing listens on UDP", "gtun server -c")
    code, results = doctor(net.relay.ns, net.relay.config)
    assert code == 1
    assert_problem(results, "relay", "not running", f"gtun server -c {net.relay.config}")
    # What the relay sets up itself is no problem while it does not run.
    assert results["device"]["ok"] and "creates it at start" in results["device"]["detail"]
