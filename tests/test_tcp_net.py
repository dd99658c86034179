"""Tier 3: the TCP transport with real gtun processes in network namespaces.

One relay (UDP and TCP on port 9621, a LAN host behind it) and three clients: c1 over
UDP, c2 over TCP, and c3 with transport "auto" in a namespace whose nftables rules drop
UDP to the relay, so it has to fall back to TCP.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtun.app.keys import encode_key, generate_private_key
from gtun.lab.net import LAN_NET, PORT, GtunNet
from gtun.lab.netns import Lab
from labkit import hold_port, run_gtun, run_python

pytestmark = pytest.mark.netns

UNDERLAY = 233  # 10.233.x.x inside this module's namespaces

BLOCK_UDP = f"""
table inet gtc_block {{
    chain out {{
        type filter hook output priority 0; policy accept;
        udp dport {PORT} counter drop
    }}
}}
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtc{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(lab, tmp_path_factory.mktemp("tcp"), clients=3, underlay=UNDERLAY)
        c1, c2, c3 = gnet.clients
        c3.ns.run(["nft", "-f", "-"], input=BLOCK_UDP)
        gnet.start_relay()
        gnet.start_client(c1, "udp")
        gnet.start_client(c2, "tcp")
        gnet.start_client(c3, "auto")
        for c in gnet.clients:
            gnet.wait_configured(c, timeout=30)
        yield gnet


def relay_status(net: GtunNet) -> dict[str, object]:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return st


def relay_peer(net: GtunNet, name: str) -> dict[str, object]:
    peers = relay_status(net)["peers"]
    assert isinstance(peers, list)
    return next(p for p in peers if p["name"] == name)


def relay_drops(net: GtunNet) -> dict[str, int]:
    drops = relay_status(net)["drops"]
    assert isinstance(drops, dict)
    return drops


def wait_for(cond: object, what: str, timeout: float, net: GtunNet) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n" + net.log_tail(
            net.relay
        )
        time.sleep(0.2)


def test_udp_and_tcp_clients_ping_and_transfer(net: GtunNet) -> None:
    c1, c2, _ = net.clients
    net.ping(c1.ns, c2.extra["address"])
    net.ping(c2.ns, c1.extra["address"])
    net.ping(c2.ns, f"{LAN_NET}.10")  # through the relay's NAT, over TCP
    sent, received, _ = net.transfer(c1.ns, c2.ns, c2.extra["address"], 4 * 1024 * 1024)
    assert sent and sent == received
    sent, received, _ = net.transfer(c2.ns, c1.ns, c1.extra["address"], 4 * 1024 * 1024)
    assert sent and sent == received
    # Status says which transport each peer uses, on both sides.
    assert relay_peer(net, "c1")["transport"] == "udp"
    assert relay_status(net)["tcp_connections"] == 2  # c2's and c3's
    tcp_peer = relay_peer(net, "c2")
    assert tcp_peer["transport"] == "tcp"
    assert str(tcp_peer["endpoint"]).startswith(f"10.{UNDERLAY}.2.2:")
    c2_status = net.status(c2)
    assert c2_status is not None and c2_status["connected"]
    assert c2_status["peers"][0]["transport"] == "tcp"
    assert c2_status["peers"][0]["endpoint"] == f"{c2.underlay}:{PORT}"
    # Nothing of c2's went over UDP: the relay's UDP socket never heard from it.
    c2_udp = c2.ns.run(["ss", "-u", "-a", "-n"]).stdout
    assert f":{PORT}" not in c2_udp
    assert "connected to relay" in c2.log.read_text()


def test_auto_falls_back_to_tcp_when_udp_is_blocked(net: GtunNet) -> None:
    c1, _, c3 = net.clients
    log = c3.log.read_text(errors="replace")
    assert f"no answer over UDP from relay {c3.underlay}:{PORT} in 5s; falling back to TCP" in log
    # The nftables rule in c3's own namespace did drop its UDP handshakes.
    rules = json.loads(c3.ns.run(["nft", "-j", "list", "table", "inet", "gtc_block"]).stdout)
    counters = [e["rule"]["expr"] for e in rules["nftables"] if "rule" in e]
    dropped = [x["counter"]["packets"] for expr in counters for x in expr if "counter" in x]
    assert dropped and dropped[0] >= 1
    assert relay_peer(net, "c3")["transport"] == "tcp"
    st = net.status(c3)
    assert st is not None and st["peers"][0]["transport"] == "tcp"
    net.ping(c3.ns, c1.extra["address"])


_BAD_FRAMES = """
import json, socket, struct, sys, time
host, port = sys.argv[1], int(sys.argv[2])

def ended(s, bound):
    s.settimeout(bound)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True

cases = {
    "max_length": (struct.pack(">H", 0xFFFF) + b"\\x09" + bytes(0xFFFE), False),
    "too_short": (struct.pack(">H", 2) + bytes(2), False),
    "not_wireguard": (struct.pack(">H", 40) + b"\\x09" + bytes(39), False),
    "truncated": (struct.pack(">H", 148) + b"\\x01\\0\\0\\0" + bytes(46), True),
}
result = {}
for name, (data, half_close) in cases.items():
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    result[name] = ended(s, 5)
    s.close()
# A well-formed (if unauthentic) initiation in three pieces is read whole, dropped by
# WireGuard (mac1), and leaves its connection open.
s = socket.create_connection((host, port), timeout=5)
frame = struct.pack(">H", 148) + b"\\x01\\0\\0\\0" + bytes(144)
for piece in (frame[:1], frame[1:90], frame[90:]):
    s.sendall(piece)
    time.sleep(0.1)
result["split_initiation_open"] = not ended(s, 1.5)
s.close()
print(json.dumps(result))
"""


def test_bad_frames_close_only_their_connection(net: GtunNet) -> None:
    c1, c2, _ = net.clients
    before = relay_drops(net)
    endpoint = relay_peer(net, "c2")["endpoint"]
    out = run_python(c1.ns, _BAD_FRAMES, c1.underlay, str(PORT), timeout=60)
    result = json.loads(out.stdout)
    assert result == {
        "max_length": True,
        "too_short": True,
        "not_wireguard": True,
        "truncated": True,
        "split_initiation_open": True,
    }
    wait_for(
        lambda: relay_drops(net)["tcp_bad_frame"] == before["tcp_bad_frame"] + 4,
        "the four bad frames to be counted",
        10,
        net,
    )
    after = relay_drops(net)
    assert after["mac1"] == before["mac1"] + 1  # the split initiation, read whole
    # The established TCP client kept its connection (same endpoint) and keeps pinging.
    assert relay_peer(net, "c2")["endpoint"] == endpoint
    net.ping(c2.ns, c1.extra["address"], count=5)
    assert net.relay.proc is not None and net.relay.proc.poll() is None


_FLOOD = """
import socket, sys, time
dst, burst = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(1200)
for i in range(burst):
    try:
        s.sendto(payload, (dst, 9))
    except OSError:
        pass
    if i % 20 == 0:
        time.sleep(0.001)
while True:  # then a trickle, so the relay keeps having something for the stalled peer
    s.sendto(payload, (dst, 9))
    time.sleep(0.02)
"""

TRANSFER = 4 * 1024 * 1024


def test_tcp_client_that_stops_reading_does_not_slow_a_udp_client(net: GtunNet) -> None:
    c1, c2, _ = net.clients
    assert net.lan is not None and c2.proc is not None
    lan = f"{LAN_NET}.10"
    sent, received, baseline = net.transfer(c1.ns, net.lan, lan, TRANSFER)
    assert sent and sent == received
    before = relay_drops(net)
    os.kill(c2.proc.pid, signal.SIGSTOP)  # c2 (TCP) stops reading, its connection stays
    flood = net.relay.ns.spawn(
        [sys.executable, "-c", _FLOOD, c2.extra["address"], "20000"],
        log_path=net.dir / "flood.log",
    )
    try:
        # Toward c2 the kernel buffers fill, then the relay's own bounded buffer: drops.
        wait_for(
            lambda: relay_drops(net)["queue_full"] > before["queue_full"],
            "the relay to refuse sends to the stalled connection",
            20,
            net,
        )
        assert relay_peer(net, "c2")["transport"] == "tcp"  # not closed yet: still stalled
        sent, received, stalled = net.transfer(c1.ns, net.lan, lan, TRANSFER)
        assert sent and sent == received
        # Generous: the point is that nothing waits for the stalled connection.
        assert stalled < 3 * baseline + 2, (baseline, stalled)
        # The stalled connection is closed within the stall timeout, and counted.
        wait_for(
            lambda: relay_drops(net)["tcp_stalled"] == before["tcp_stalled"] + 1,
            "the stalled connection to be closed",
            20,
            net,
        )
        assert relay_peer(net, "c2")["transport"] is None  # c2 has no endpoint now
    finally:
        flood.kill()
        flood.wait(5)
        os.kill(c2.proc.pid, signal.SIGCONT)
    # c2 finds its connection gone, says so, reconnects and works again.
    wait_for(
        lambda: relay_peer(net, "c2")["transport"] == "tcp",
        "c2 to reconnect over TCP",
        30,
        net,
    )
    net.ping(c2.ns, c1.extra["address"], timeout=30)
    assert "TCP connection to relay" in c2.log.read_text(errors="replace")


def test_tcp_clients_come_back_after_a_relay_restart(net: GtunNet) -> None:
    _, c2, c3 = net.clients

    def losses() -> int:
        return c2.log.read_text(errors="replace").count("TCP connection to relay")

    before = losses()
    assert net.stop(net.relay) == 0
    wait_for(lambda: losses() > before, "c2 to notice its connection is gone", 10, net)
    net.start_relay()
    # Both TCP clients reconnect (bounded backoff) and handshake with the new relay, which
    # knows no session: a few seconds, where UDP clients wait for WireGuard's timers.
    deadline = time.monotonic() + 30
    for client, address in ((c2, c3.extra["address"]), (c3, c2.extra["address"])):
        while True:
            try:
                net.ping(client.ns, address, count=1, timeout=10)
                break
            except RuntimeError:
                assert time.monotonic() < deadline, net.log_tail(client)
                time.sleep(0.5)
    assert relay_peer(net, "c2")["transport"] == "tcp"
    assert relay_peer(net, "c3")["transport"] == "tcp"


@pytest.fixture
def lab_prefix() -> str:
    return "gtc"


def test_tcp_port_in_use_is_a_clear_config_error(lab: Lab, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text(encode_key(generate_private_key()) + "\n")
    key.chmod(0o600)
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        "[server]\n"
        'listen = "127.0.0.1:9621"\n'
        'private_key_file = "server.key"\n'
        'network = "10.66.0.0/24"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'control_socket = "{tmp_path / "server.sock"}"\n'
    )
    ns = lab.add_ns("a")
    hold_port(ns, "tcp", 9621, tmp_path / "holder.log")
    result = run_gtun(ns, "server", "-c", str(cfg))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "server.listen" in lines[0] and "cannot listen on TCP 127.0.0.1:9621" in lines[0]
    assert "in use" in lines[0]
    assert not (tmp_path / "server.sock").exists()
