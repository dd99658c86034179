"""Tier 3: real gtun processes and TUN devices in network namespaces.

A relay with a LAN host behind it (route pushed, NAT on) and two gtun clients, each in
its own namespace, joined by veth pairs.  Real ping, a checksummed TCP transfer, a
spoofing client, garbage datagrams, and a relay restart.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtun.lab.net import LAN_NET, PORT, GtunNet
from gtun.lab.netns import Lab
from labkit import gtun_stdout

pytestmark = pytest.mark.netns

UNDERLAY = 232  # 10.232.x.x inside this module's namespaces


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtt{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(lab, tmp_path_factory.mktemp("tunnel"), underlay=UNDERLAY)
        gnet.start_all()
        yield gnet


def relay_drops(net: GtunNet) -> dict[str, int]:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return dict(st["drops"])


def test_ping_client_to_client_relay_and_lan(net: GtunNet) -> None:
    c1, c2 = net.clients
    assert c1.extra["address"] != c2.extra["address"]
    net.ping(c1.ns, c2.extra["address"])
    net.ping(c2.ns, c1.extra["address"])
    net.ping(c1.ns, "10.66.0.1")
    # The LAN host has no route back to the virtual network: only NAT makes this work.
    assert net.lan is not None
    routes = net.lan.run(["ip", "route"]).stdout
    assert "10.66.0" not in routes and "default" not in routes
    net.ping(c1.ns, f"{LAN_NET}.10")


def test_client_configured_from_push(net: GtunNet) -> None:
    c1 = net.clients[0]
    st = net.status(c1)
    assert st is not None and st["connected"]
    assert st["address"].endswith("/24") and st["mtu"] == 1420
    assert f"{LAN_NET}.0/24" in st["routes"]
    link = json.loads(c1.ns.run(["ip", "-j", "addr", "show", "gtun0"]).stdout)[0]
    assert link["mtu"] == 1420 and "UP" in link["flags"]
    assert any(a["local"] == c1.extra["address"] for a in link["addr_info"])
    assert f"{LAN_NET}.0/24 dev gtun0" in c1.ns.run(["ip", "route"]).stdout


def test_transfer_checksum_matches(net: GtunNet) -> None:
    c1, c2 = net.clients
    sent, received, _ = net.transfer(c1.ns, c2.ns, c2.extra["address"], 8 * 1024 * 1024)
    assert sent and sent == received
    assert net.lan is not None
    sent, received, _ = net.transfer(c2.ns, net.lan, f"{LAN_NET}.10", 2 * 1024 * 1024)
    assert sent and sent == received


def test_status_lists_peers(net: GtunNet) -> None:
    st = json.loads(gtun_stdout(net.relay.ns, "status", "--json", "-s", str(net.relay.socket)))
    peers = {p["name"]: p for p in st["peers"]}
    assert set(peers) == {"c1", "c2"}
    for p in peers.values():
        assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0
        assert p["last_handshake"] is not None and p["endpoint"].startswith(f"10.{UNDERLAY}.")
        assert p["transport"] == "udp" and p["kind"] == "gtun"
    table = gtun_stdout(net.relay.ns, "status", "-s", str(net.relay.socket))
    assert "c1" in table and "HANDSHAKE" in table and "PUBLIC KEY" in table


_SPOOF = """
import socket, struct, sys
sys.path.insert(0, sys.argv[3])
from gtun.core.packet import build_icmp_echo
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_IP, socket.IP_HDRINCL, 1)
for i in range(5):
    s.sendto(build_icmp_echo(sys.argv[1], sys.argv[2], 99, i, b"spoofed"), (sys.argv[2], 0))
"""


def test_spoofed_inner_source_is_dropped_and_counted(net: GtunNet) -> None:
    c1, c2 = net.clients
    before = relay_drops(net)["spoofed"]
    src_dir = str(Path(__file__).resolve().parent.parent / "src")
    # c1 claims to be 10.66.0.250, a source it does not own.
    c1.ns.run([sys.executable, "-c", _SPOOF, "10.66.0.250", c2.extra["address"], src_dir])
    deadline = time.monotonic() + 10
    while relay_drops(net)["spoofed"] < before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert relay_drops(net)["spoofed"] == before + 5
    st = net.status(net.relay)
    assert st is not None
    c1_status = next(p for p in st["peers"] if p["name"] == "c1")
    assert c1_status["drops"].get("spoofed", 0) >= 5
    net.ping(c1.ns, c2.extra["address"])  # other traffic unaffected


_GARBAGE = """
import os, random, socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(1234)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sizes = [0, 1, 3, 4, 31, 32, 63, 64, 91, 92, 93, 147, 148, 149, 1500]
for i in range(n):
    size = rnd.choice(sizes + [rnd.randrange(0, 2000)])
    body = bytearray(os.urandom(size))
    if size >= 4 and i % 2:
        body[0] = rnd.randrange(1, 5)  # a plausible WireGuard type
        body[1:4] = b"\\0\\0\\0"
    s.sendto(bytes(body), (host, port))
    if i % 20 == 0:
        time.sleep(0.002)  # a flood, but one the socket buffer can hold: all must be counted
"""


def test_garbage_datagrams_do_not_hurt(net: GtunNet) -> None:
    c1, c2 = net.clients
    before = relay_drops(net)
    c1.ns.run(
        [sys.executable, "-c", _GARBAGE, c1.underlay, str(PORT), "3000"],
        timeout=60,
    )
    net.ping(c1.ns, c2.extra["address"])
    net.ping(c2.ns, "10.66.0.1")
    assert net.relay.proc is not None and net.relay.proc.poll() is None
    after = relay_drops(net)
    diff = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    counted = sum(diff.get(k, 0) for k in ("malformed", "mac1", "unknown_index"))
    assert counted >= 2950, diff  # a handful may be lost in the kernel under the flood


def test_relay_restart_clients_come_back_with_same_addresses(net: GtunNet) -> None:
    c1, c2 = net.clients
    addresses = (c1.extra["address"], c2.extra["address"])
    assert net.stop(net.relay) == 0
    # The relay removed its device and rules on exit.
    links = net.relay.ns.run(["ip", "-o", "link"]).stdout
    assert "gtun0" not in links
    assert "gtun_" not in net.relay.ns.run(["nft", "list", "tables"]).stdout
    net.start_relay()
    deadline = time.monotonic() + 60
    while True:
        try:
            net.ping(c1.ns, addresses[1], count=1, timeout=10)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    "clients did not come back within 60 s\n"
                    + net.log_tail(c1)
                    + "\n"
                    + net.log_tail(net.relay)
                ) from None
            time.sleep(1)
    net.ping(c2.ns, addresses[0])
    for node, address in zip(net.clients, addresses, strict=True):
        st = net.status(node)
        assert st is not None and st["address"].split("/")[0] == address


def test_client_exit_removes_its_configuration(net: GtunNet) -> None:
    c2 = net.clients[1]
    assert net.stop(c2) == 0
    assert "gtun0" not in c2.ns.run(["ip", "-o", "link"]).stdout
    assert f"{LAN_NET}.0/24" not in c2.ns.run(["ip", "route"]).stdout
    assert not c2.socket.exists()


def test_unreachable_relay_is_reported_and_retried(lab: Lab, tmp_path: Path) -> None:
    gnet = GtunNet(lab, tmp_path, clients=1, underlay=UNDERLAY + 1, lan=False)
    c1 = gnet.clients[0]
    gnet.start_client(c1)
    deadline = time.monotonic() + 30
    while "does not answer" not in c1.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, gnet.log_tail(c1)
        assert c1.proc is not None and c1.proc.poll() is None, gnet.log_tail(c1)
        time.sleep(0.2)
    st = gnet.status(c1)
    assert st is not None and not st["connected"] and st["address"] is None
    # The client keeps trying: once the relay is up, it joins without a restart.
    gnet.start_relay()
    assert gnet.wait_configured(c1, timeout=30) == "10.66.0.2"
    gnet.ping(c1.ns, "10.66.0.1")


def test_sighup_rereads_peers_without_dropping_others(lab: Lab, tmp_path: Path) -> None:
    gnet = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY + 2, lan=False)
    c1, c2 = gnet.clients
    full_config = gnet.relay.config.read_text()
    # Start with c2 (the last [[peers]] entry) missing from the relay's peers.
    head, found, _ = full_config.partition('[[peers]]\nname = "c2"')
    assert found
    gnet.relay.config.write_text(head)
    gnet.start_relay()
    gnet.start_client(c1)
    gnet.wait_configured(c1)
    before = gnet.status(gnet.relay)
    assert before is not None and [p["name"] for p in before["peers"]] == ["c1"]
    handshake = before["peers"][0]["last_handshake"]

    gnet.relay.config.write_text(full_config)
    assert gnet.relay.proc is not None
    gnet.relay.proc.send_signal(1)  # SIGHUP
    gnet.wait_status(
        gnet.relay, lambda s: len(s["peers"]) == 2, 10, "the relay to pick up c2 after SIGHUP"
    )
    gnet.start_client(c2)
    gnet.wait_configured(c2)
    gnet.ping(c2.ns, c1.extra["address"])
    gnet.ping(c1.ns, c2.extra["address"])
    after = gnet.status(gnet.relay)
    assert after is not None
    c1_after = next(p for p in after["peers"] if p["name"] == "c1")
    assert c1_after["last_handshake"] == handshake  # c1's session was kept

    # A broken config on SIGHUP keeps the running peers and says why in the log.
    gnet.relay.config.write_text(full_config + "\nthis is not toml\n")
    gnet.relay.proc.send_signal(1)
    deadline = time.monotonic() + 10
    while "reload failed" not in gnet.relay.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, gnet.log_tail(gnet.relay)
        time.sleep(0.2)
    gnet.ping(c1.ns, c2.extra["address"])
