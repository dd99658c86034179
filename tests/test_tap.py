"""Tier 3: TAP mode (layer 2) with real gtun processes in network namespaces.

A relay with `mode = "tap"` and a LAN behind it; client c1 follows the relay's mode, c2
asks for "tap" (and has a subnet behind it), c3 asks for "tun" (and is refused).  ARP
between clients, IPv6 neighbour discovery, a broadcast ping reaching both clients, a
stolen MAC dropped and counted, routes through the relay's and a peer's address, stable
MACs across a client restart, and `gtun peer add` refused.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from gtun.app.keys import public_key
from gtun.core.l2frame import mac_for_key
from gtun.lab.net import LAN_NET, GtunNet, Node
from gtun.lab.netns import Lab, Namespace
from labkit import run_gtun, run_python

pytestmark = pytest.mark.netns

BROADCAST = b"\xff" * 6
UNDERLAY = 234  # 10.234.x.x inside this module's namespaces
SUBNET = "192.168.99"  # behind c2


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtp{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab, tmp_path_factory.mktemp("tap"), clients=3, underlay=UNDERLAY, mode="tap"
        )
        c1, c2, c3 = gnet.clients
        with c2.config.open("a") as f:
            f.write('mode = "tap"\n')
        # A LAN behind c2 (one address on its loopback), reached through c2's address.
        server = gnet.relay.config.read_text()
        entry = f'name = "c2"\npublic_key = "{c2.public}"\n'
        assert entry in server
        gnet.relay.config.write_text(
            server.replace(entry, entry + f'subnets = ["{SUBNET}.0/24"]\n')
        )
        c2.ns.run(["ip", "addr", "add", f"{SUBNET}.1/32", "dev", "lo"])
        with c3.config.open("a") as f:
            f.write('mode = "tun"\n')
        gnet.start_all([c1, c2])
        yield gnet


def link(ns: Namespace, ifname: str = "gtun0") -> dict[str, Any]:
    return dict(json.loads(ns.run(["ip", "-d", "-j", "link", "show", ifname]).stdout)[0])


def peer_drops(net: GtunNet, name: str) -> dict[str, int]:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return dict(next(p for p in st["peers"] if p["name"] == name)["drops"])


def test_tap_clients_resolve_each_other_by_arp_and_ping(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    for c in (c1, c2):
        info = link(c.ns)
        assert info["linkinfo"]["info_data"]["type"] == "tap"
        assert info["link_type"] == "ether" and info["mtu"] == 1420
        st = net.status(c)
        assert st is not None and st["mode"] == "tap"
    net.ping(c1.ns, c2.extra["address"])
    net.ping(c2.ns, c1.extra["address"])
    for me, other in ((c1, c2), (c2, c1)):
        neigh = json.loads(me.ns.run(["ip", "-j", "neigh", "show", "dev", "gtun0"]).stdout)
        learned = {n["dst"]: n.get("lladdr") for n in neigh}
        assert learned.get(other.extra["address"]) == link(other.ns)["address"], neigh
    relay_st = net.status(net.relay)
    assert relay_st is not None and relay_st["mode"] == "tap"
    assert {p["name"]: p["kind"] for p in relay_st["peers"]}["c1"] == "gtun"


def test_full_size_frames_carry_a_transfer(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    sent, received, _ = net.transfer(c1.ns, c2.ns, c2.extra["address"], 4 * 1024 * 1024)
    assert sent and sent == received
    # Full-MTU pings with DF: 1420-byte packets, 1434-byte frames, no fragmentation.
    out = c1.ns.run(
        ["ping", "-n", "-c", "2", "-M", "do", "-s", "1392", "-W", "2", c2.extra["address"]],
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    st = net.status(net.relay)
    assert st is not None and st["drops"]["oversized"] == 0


def test_pushed_routes_go_through_the_relay_address(net: GtunNet) -> None:
    c1 = net.clients[0]
    routes = c1.ns.run(["ip", "route"]).stdout
    assert f"{LAN_NET}.0/24 via 10.66.0.1 dev gtun0" in routes, routes
    net.ping(c1.ns, "10.66.0.1")
    net.ping(c1.ns, f"{LAN_NET}.10")  # routed by the relay's kernel, NAT on


def ready_link_local(ns: Namespace) -> list[str]:
    addr = json.loads(ns.run(["ip", "-6", "-j", "addr", "show", "dev", "gtun0"]).stdout)
    return [
        a["local"]
        for a in addr[0]["addr_info"]
        if a.get("scope") == "link" and not a.get("tentative")
    ]


def test_subnet_behind_a_peer_is_routed_through_its_address(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    relay_routes = net.relay.ns.run(["ip", "route"]).stdout
    assert f"{SUBNET}.0/24 via {c2.extra['address']} dev gtun0" in relay_routes, relay_routes
    assert f"{SUBNET}.0/24 via 10.66.0.1 dev gtun0" in c1.ns.run(["ip", "route"]).stdout
    net.ping(c1.ns, f"{SUBNET}.1")
    net.ping(net.relay.ns, f"{SUBNET}.1")


def test_ipv6_neighbour_discovery_works(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    deadline = time.monotonic() + 10
    while not (link_local := ready_link_local(c2.ns)):  # after duplicate address detection
        assert time.monotonic() < deadline, c2.ns.run(["ip", "-6", "addr"]).stdout
        time.sleep(0.2)
    deadline = time.monotonic() + 15
    while True:
        out = c1.ns.run(
            ["ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "2", f"{link_local[0]}%gtun0"],
            check=False,
        )
        if out.returncode == 0:
            break
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.5)
    neigh = json.loads(c1.ns.run(["ip", "-6", "-j", "neigh", "show", "dev", "gtun0"]).stdout)
    assert any(n["dst"] == link_local[0] and n.get("lladdr") for n in neigh), neigh
    # What real devices send (MLD, DAD, router solicitations, neighbour discovery from
    # the EUI-64 link-local address of the key's MAC) matches what the relay pins.
    for name in ("c1", "c2"):
        drops = peer_drops(net, name)
        assert drops.get("spoofed", 0) == drops.get("malformed", 0) == 0, (name, drops)


def test_broadcast_ping_reaches_both_clients(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    for c in (c1, c2):
        c.ns.sysctl("net.ipv4.icmp_echo_ignore_broadcasts", 0)
    out = net.relay.ns.run(
        ["ping", "-n", "-b", "-c", "3", "-i", "0.3", "-W", "2", "-I", "gtun0", "10.66.0.255"],
        check=False,
        timeout=30,
    )
    text = out.stdout + out.stderr
    for c in (c1, c2):
        assert f"from {c.extra['address']}:" in text, text


_INJECT = """
import socket, sys
frame, count = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("gtun0", 0))
for i in range(count):
    s.send(frame)
"""


def inject(node: Node, frame: bytes, count: int) -> None:
    """Send raw frames out of the node's TAP device, as its kernel would."""
    run_python(node.ns, _INJECT, frame.hex(), str(count))


def arp_reply(src: bytes, sender: str, dst: bytes, target: str) -> bytes:
    body = bytes.fromhex("0001080006040002") + src + IPv4Address(sender).packed
    body += dst + IPv4Address(target).packed
    return dst + src + b"\x08\x06" + body


def mac(node: Node) -> bytes:
    return bytes.fromhex(str(link(node.ns)["address"]).replace(":", ""))


def wait_drops(net: GtunNet, name: str, reason: str, at_least: int) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        drops = peer_drops(net, name)
        if drops.get(reason, 0) >= at_least:
            return drops
        assert time.monotonic() < deadline, (reason, at_least, drops)
        time.sleep(0.2)


def test_frame_with_another_peers_mac_is_dropped_and_counted(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    net.ping(c1.ns, "10.66.0.1", count=1)  # c1's MAC is live in the relay's table
    before = peer_drops(net, "c2")
    payload = b"\x88\xb5" + bytes(46)  # the local experimental EtherType
    inject(c2, BROADCAST + mac(c1) + payload, 5)  # c2 uses c1's MAC
    inject(c2, BROADCAST + BROADCAST + payload, 2)  # a broadcast source
    # A peer may use only the MAC its key derives (which its device has): any other
    # source is a spoof, whether or not the relay's switch knows it.
    after = wait_drops(net, "c2", "spoofed", before.get("spoofed", 0) + 7)
    assert after.get("spoofed", 0) == before.get("spoofed", 0) + 7
    assert peer_drops(net, "c1").get("spoofed", 0) == 0
    st = net.status(net.relay)
    assert st is not None and st["drops"]["spoofed"] >= 7
    # c1 keeps its address and c2 its own: traffic between them is unaffected.
    net.ping(c2.ns, c1.extra["address"])
    net.ping(c1.ns, c2.extra["address"])


def test_arp_claiming_another_address_is_dropped_and_counted(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    net.ping(c1.ns, "10.66.0.1", count=1)
    relay_mac = link(net.relay.ns)["address"]
    before = peer_drops(net, "c2").get("spoofed", 0)
    # c2 tells c1, from its own MAC, that it is the relay.
    inject(c2, arp_reply(mac(c2), "10.66.0.1", mac(c1), c1.extra["address"]), 3)
    wait_drops(net, "c2", "spoofed", before + 3)
    neigh = json.loads(c1.ns.run(["ip", "-j", "neigh", "show", "dev", "gtun0"]).stdout)
    assert {n["dst"]: n.get("lladdr") for n in neigh}.get("10.66.0.1") == relay_mac, neigh
    net.ping(c1.ns, "10.66.0.1", count=1)


def test_restarted_client_keeps_its_mac_and_neighbours_reach_it(net: GtunNet) -> None:
    c1, c2 = net.clients[:2]
    key_mac = mac_for_key(public_key(c1.key))
    assert link(c1.ns)["address"] == key_mac
    assert link(net.relay.ns)["address"] == mac_for_key(public_key(net.relay.key))
    assert net.stop(c1) == 0
    assert "gtun0" not in c1.ns.run(["ip", "-o", "link"]).stdout
    net.start_client(c1)
    net.wait_configured(c1)
    assert link(c1.ns)["address"] == key_mac
    # c2's ARP entry for c1 is still right, and the relay's table still has c1's MAC
    # on c1's port: no stolen-MAC drop for its own address.
    net.ping(c2.ns, c1.extra["address"], count=2)
    assert peer_drops(net, "c1").get("mac_stolen", 0) == 0
    assert peer_drops(net, "c1").get("spoofed", 0) == 0


def test_tun_client_against_tap_relay_is_refused_clearly(net: GtunNet) -> None:
    c3 = net.clients[2]
    net.start_client(c3)
    assert c3.proc is not None
    try:
        rc = c3.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the tun client was not refused:\n" + net.log_tail(c3)) from None
    c3.proc = None
    log = c3.log.read_text(errors="replace")
    assert rc == 1, log
    line = "the relay refused this client: this relay runs in tap mode; the client asked for tun"
    assert line in log and "Traceback" not in log
    deadline = time.monotonic() + 5
    while "refused peer c3" not in net.relay.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, net.log_tail(net.relay)
        time.sleep(0.1)
    relay_line = next(
        ln for ln in net.relay.log.read_text().splitlines() if "refused peer c3" in ln
    )
    assert "this relay runs in tap mode; the client asked for tun" in relay_line
    assert "gtun0" not in c3.ns.run(["ip", "-o", "link"]).stdout  # nothing left behind


def test_peer_add_on_a_tap_relay_is_refused(net: GtunNet) -> None:
    out = run_gtun(net.relay.ns, "peer", "add", "bob", "-c", str(net.relay.config))
    assert out.returncode == 2, out
    assert "tap mode" in out.stderr and "stock WireGuard peers" in out.stderr
    assert out.stdout == ""
    st = net.status(net.relay)
    assert st is not None and "bob" not in {p["name"] for p in st["peers"]}


@pytest.fixture
def lab_prefix() -> str:
    return "gtp"


def test_following_client_switches_device_when_the_relay_changes_mode(
    lab: Lab, tmp_path: Path
) -> None:
    gnet = GtunNet(lab, tmp_path, clients=1, underlay=UNDERLAY + 1, lan=False, mode="tap")
    c1 = gnet.clients[0]
    gnet.start_relay()
    gnet.start_client(c1)
    address = gnet.wait_configured(c1)
    assert link(c1.ns)["linkinfo"]["info_data"]["type"] == "tap"
    gnet.ping(c1.ns, "10.66.0.1", count=1)
    assert gnet.stop(gnet.relay) == 0
    config = gnet.relay.config.read_text()
    gnet.relay.config.write_text(config.replace('mode = "tap"', 'mode = "tun"'))
    gnet.start_relay()
    gnet.wait_status(c1, lambda s: s.get("mode") == "tun", 60, "c1 to follow to tun")
    deadline = time.monotonic() + 10
    while True:  # the device is replaced and configured just after the CONFIG arrives
        st = gnet.status(c1)
        links = c1.ns.run(["ip", "-d", "-j", "link"]).stdout
        if st and st["address"] and '"type":"tun"' in links.replace(" ", ""):
            break
        assert time.monotonic() < deadline, gnet.log_tail(c1)
        time.sleep(0.2)
    assert st["address"].split("/")[0] == address
    info = link(c1.ns)
    assert info["linkinfo"]["info_data"]["type"] == "tun" and info["mtu"] == 1420
    gnet.ping(c1.ns, "10.66.0.1", count=1)
    assert "replacing device gtun0" in c1.log.read_text()
