"""Conformance tier over gtun's TCP transport: replayed messages, as test_conformance.py
checks them over UDP.  A replay needs no keys, only a copy of what a client sent; over
TCP it comes on a connection of the attacker's own (it cannot write into the client's),
which the relay must treat as any other endpoint: each replayed initiation and
transport message dropped and counted, the connection never the peer's endpoint, the
session undisturbed.

One relay (no LAN, no NAT) and one client over TCP.  Underlay 10.231.1.0/24, tunnel
10.231.200.0/24, namespaces "gtfz...".
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from gtun.io.framing import FrameDecoder
from gtun.lab.net import PORT, GtunNet
from gtun.lab.netns import Lab
from labkit import (
    ping_count,
    relay_peer,
    run_python,
    start_tcp_capture,
    stop_capture,
    wait_until,
)

pytestmark = pytest.mark.netns

UNDERLAY = 231  # 10.231.x.x inside this module's namespaces
NETWORK = "10.231.200.0/24"
RELAY = "10.231.200.1"
DROPS = ("replayed_handshake", "replay", "unknown_index")

# Open a connection of its own to the relay and write the frames (hex, one per line, on
# stdin) into it, as an attacker with a copy of a client's stream would.
REPLAY = """\
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
for h in sys.stdin.read().split():
    m = bytes.fromhex(h)
    s.sendall(len(m).to_bytes(2, "big") + m)
    time.sleep(0.005)
time.sleep(1)
s.close()
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtfz{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab,
            tmp_path_factory.mktemp("conformance_tcp"),
            clients=1,
            underlay=UNDERLAY,
            network=NETWORK,
            lan=False,
            nat=False,
        )
        gnet.set_transport(gnet.clients[0], "tcp")
        gnet.start_all(timeout=30)
        yield gnet


def drops(net: GtunNet) -> dict[str, int]:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return {k: int(st["drops"].get(k, 0)) for k in DROPS}


def test_replayed_initiations_and_data_over_tcp_are_dropped(net: GtunNet) -> None:
    """Record the stream of the connection c1 opens when it restarts (its handshake
    initiation, then pings), then write those frames again into a new connection from
    c1's address: each initiation counts as "replayed_handshake", each transport
    message as "replay"; no new handshake, the relay keeps c1's real connection as its
    endpoint, and the session keeps working."""
    (c1,) = net.clients
    out, log = net.dir / "capture.json", net.dir / "capture.log"
    cap = start_tcp_capture(c1.ns, "up0", PORT, out, log)
    try:
        net.stop(c1)
        net.start_client(c1)
        net.wait_configured(c1, timeout=30)
        assert ping_count(c1.ns, RELAY, 5, "-i", "0.2") == 5
    finally:
        streams = stop_capture(cap, out)
    assert len(streams) == 1, [len(s) for s in streams]  # the connection made on restart
    decoder = FrameDecoder()
    messages = decoder.feed(streams[0])
    initiations = [m for m in messages if m[0] == 1 and len(m) == 148]
    transport = [m for m in messages if m[0] == 4 and len(m) >= 32]
    assert initiations and len(transport) >= 5, [(m[0], len(m)) for m in messages]
    assert messages[0] == initiations[0]  # the stream was read from its start
    wait_until(
        lambda: ping_count(c1.ns, RELAY, 1) == 1 and relay_peer(net, "c1")["endpoint"],
        10,
        "c1 settled",
    )
    before, peer_before = drops(net), relay_peer(net, "c1")

    run_python(
        c1.ns,
        REPLAY,
        c1.underlay,
        str(PORT),
        input="\n".join(m.hex() for m in initiations + transport),
    )

    def counted() -> dict[str, int]:
        now = drops(net)
        return {k: now[k] - before[k] for k in DROPS}

    expected = len(initiations) + len(transport)
    try:
        wait_until(lambda: sum(counted().values()) >= expected, 5, "the replays counted")
    except TimeoutError as exc:
        pytest.fail(f"{exc}: {counted()}\n{net.log_tail(net.relay)}", pytrace=False)
    got = counted()
    assert got["replayed_handshake"] == len(initiations), got
    assert got["replay"] + got["unknown_index"] == len(transport) and got["replay"] >= 5, got
    peer_after = relay_peer(net, "c1")
    assert peer_after["last_handshake"] == peer_before["last_handshake"], (peer_before, peer_after)
    assert peer_after["endpoint"] == peer_before["endpoint"], (peer_before, peer_after)
    assert ping_count(c1.ns, RELAY, 3) == 3
    # The replaying connection is closed by now; c1's own still carries the session.
    assert relay_peer(net, "c1")["endpoint"] == peer_before["endpoint"]
