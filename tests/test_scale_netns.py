"""Issue 11, 10,000 peers: a relay with thousands of configured peers starts quickly and
reloads without dropping a pinging client's packets; a full pool serves the peers that
fit.  Real relays and clients in namespaces "gtsc..." (underlay 10.233.x.x)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gtun.app.keys import encode_key
from gtun.lab.net import GtunNet
from gtun.lab.netns import Lab

PEERS = 3000  # configured besides the real client
START_BOUND = 60.0  # generous: the quadratic first start took minutes at this size
UNDERLAY = 233


@pytest.fixture
def lab_prefix() -> str:
    return "gtsc"


def _peers(names: list[str]) -> str:
    return "".join(
        f'\n[[peers]]\nname = "{n}"\npublic_key = "{encode_key(os.urandom(32))}"\n' for n in names
    )


def test_thousands_of_peers_start_and_reload_without_losing_pings(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(
        lab,
        tmp_path,
        clients=1,
        underlay=UNDERLAY,
        network="10.64.0.0/18",
        lan=False,
        extra_peers=_peers([f"load{i:05d}" for i in range(PEERS)]),
    )
    begun = time.monotonic()
    net.start_relay(timeout=START_BOUND)
    started = time.monotonic() - begun
    assert started < START_BOUND
    (c1,) = net.clients
    net.start_client(c1)
    net.wait_configured(c1, timeout=30)
    assert net.ping(c1.ns, "10.64.0.1", count=2) > 0

    # One more peer, then SIGHUP while c1 pings the relay every 20 ms.
    with net.relay.config.open("a") as f:
        f.write(_peers(["late-one"]))
    ping = subprocess.Popen(
        [*c1.ns.exec_prefix(), "ping", "-n", "-c", "150", "-i", "0.02", "-W", "2", "10.64.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.5)
        assert net.relay.proc is not None
        net.relay.proc.send_signal(signal.SIGHUP)
        out, _ = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait(5)
    net.wait_status(
        net.relay,
        lambda s: any(p["name"] == "late-one" for p in s["peers"]),
        20,
        "the reload to add late-one",
    )
    sent = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert sent is not None, out
    assert sent.group(1) == sent.group(2) == "150", out
    assert "reloaded server.toml: 3002 peers" in net.log_tail(net.relay, 200)
    status = net.status(net.relay)
    assert status is not None and len(status["peers"]) == PEERS + 2
    assert status["refused_peers"] == []


def test_a_full_pool_serves_the_peers_that_fit(lab: Lab, tmp_path: Path) -> None:
    # 10.66.0.0/29: .2-.6 for peers.  Sorted by name c1 takes .2, z0-z3 .3-.6, and
    # z4-z6 do not fit.
    net = GtunNet(
        lab,
        tmp_path,
        clients=1,
        underlay=UNDERLAY,
        network="10.66.0.0/29",
        lan=False,
        extra_peers=_peers([f"z{i}" for i in range(7)]),
    )
    net.start_relay(timeout=20)
    (c1,) = net.clients
    net.start_client(c1)
    assert net.wait_configured(c1, timeout=30) == "10.66.0.2"
    assert net.ping(c1.ns, "10.66.0.1", count=2) > 0
    status = net.status(net.relay)
    assert status is not None
    assert sorted(p["name"] for p in status["peers"]) == ["c1", "z0", "z1", "z2", "z3"]
    assert status["refused_peers"] == ["z4", "z5", "z6"]
    log = net.log_tail(net.relay, 100)
    for name in ("z4", "z5", "z6"):
        assert f"peer {name} refused: no free address left in 10.66.0.0/29" in log
    assert net.relay.proc is not None and net.relay.proc.poll() is None
