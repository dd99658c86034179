"""A relay with two workers (app/workers.py), real `gtun` processes in namespaces:
clients held by different workers reach each other over UDP and TCP (SHA-256-checked
data as well as ping), in TUN and TAP mode; every client is configured whichever worker
answers it; status and metrics add up both workers; a reload reaches both; a worker
killed is started again and its clients handshake anew and flow.

    underlay: 10.238.i.0/24 between the relay and client i
    overlay:  10.66.0.0/24 on the relay's device (queues: one per worker)

Every address lives inside the lab's namespaces (prefix "gtwk")."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from gtun.app.keys import decode_key
from gtun.app.store import StateStore
from gtun.lab.net import METRICS_PORT, GtunNet, Node
from gtun.lab.netns import Lab

pytestmark = pytest.mark.netns

UNDERLAY = 238
SIZE = 4 * 1024 * 1024
BACK_BOUND = 20.0  # seconds for a killed worker's clients to answer again (generous)
SPREAD_TRIES = 8  # client restarts to get clients on both workers


@pytest.fixture
def lab_prefix() -> str:
    return "gtwk"


def holders(net: GtunNet) -> dict[str, int | None]:
    st = net.status(net.relay)
    assert st is not None
    return {p["name"]: p.get("worker") for p in st["peers"]}


def spread(net: GtunNet) -> dict[str, int | None]:
    """Start every client and wait until both workers hold at least one (a client's
    worker is the kernel's hash of its source port: a restarted client draws again)."""
    net.start_relay()
    for i, c in enumerate(net.clients):
        net.start_client(c, "tcp" if i % 2 else "udp")
    for c in net.clients:
        net.wait_configured(c)
    for _ in range(SPREAD_TRIES):
        for c in net.clients:
            net.ping(c.ns, "10.66.0.1", count=1)  # every session made, and announced
        held = holders(net)
        if {0, 1} <= set(held.values()):
            return held
        moved = net.clients[len(net.clients) // 2 :]
        for c in moved:
            net.stop(c)
            net.start_client(c)
        for c in moved:
            net.wait_configured(c)
    pytest.fail(f"clients never spread over both workers: {holders(net)}")


def pairs_fail(net: GtunNet) -> list[tuple[str, str]]:
    failed = []
    for a in net.clients:
        for b in net.clients:
            if a is not b:
                try:
                    net.ping(a.ns, b.extra["address"], count=2, timeout=15)
                except RuntimeError:
                    failed.append((a.name, b.name))
    return failed


def one_on_each(net: GtunNet, held: dict[str, int | None]) -> tuple[Node, Node]:
    a = next(c for c in net.clients if held[c.name] == 0)
    b = next(c for c in net.clients if held[c.name] == 1)
    return a, b


def scrape(net: GtunNet) -> str:
    out = net.relay.ns.run(
        [
            "python3",
            "-c",
            "import urllib.request,sys;"
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics',"
            "timeout=5).read().decode())",
        ],
        timeout=15,
    )
    return out.stdout


def metric(text: str, name: str, peer: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'peer="{peer}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {peer}")


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_clients_on_different_workers_reach_each_other(
    lab: Lab, tmp_path: Path, offload: bool
) -> None:
    device = f"gw{secrets.token_hex(3)}"  # its `wg` socket is shared by every namespace
    net = GtunNet(
        lab,
        tmp_path,
        clients=4,
        underlay=UNDERLAY,
        workers=2,
        metrics=True,
        devices={"relay": device},
        network6="fd66::/64",
    )
    if not offload:
        for node in (net.relay, *net.clients):
            text = node.config.read_text()
            head = "[server]\n" if node is net.relay else "[client]\n"
            node.config.write_text(text.replace(head, head + "offload = false\n", 1))
    held = spread(net)
    st = net.status(net.relay)
    assert st is not None
    assert [w["alive"] for w in st["workers"]] == [True, True]
    assert pairs_fail(net) == []
    a, b = one_on_each(net, held)
    for src, dst in ((a, b), (b, a)):
        for address in (dst.extra["address"], dst.extra["address6"]):
            sent, got, _ = net.transfer(src.ns, dst.ns, address, SIZE)
            assert sent == got and len(sent) == len(hashlib.sha256().hexdigest())
    st = net.status(net.relay)
    assert st is not None
    assert bool(st["datapath"]["tun_offload"]) is offload
    # The transfers crossed the workers' channels, every message well formed.
    dp = st["datapath"]
    assert 0 < dp["handed_in"] <= dp["handed_out"] and dp["handoff_malformed"] == 0, dp
    # Status and metrics add up both workers: each client's bytes are counted where
    # its session is, and the transfer's megabytes show on the worker-1 client.
    st = net.status(net.relay)
    assert st is not None
    peers = {p["name"]: p for p in st["peers"]}
    for c in net.clients:
        assert peers[c.name]["rx_bytes"] > 0, peers[c.name]
        assert peers[c.name]["endpoint"], peers[c.name]
    assert peers[b.name]["rx_bytes"] > 2 * SIZE and peers[b.name]["worker"] == 1
    assert peers[a.name]["rx_bytes"] > 2 * SIZE and peers[a.name]["worker"] == 0
    text = scrape(net)
    assert metric(text, "gtun_peer_rx_bytes_total", b.name) > SIZE
    assert metric(text, "gtun_peer_connected", b.name) == 1
    assert "gtun_peers_connected 4.0" in text


def test_a_killed_worker_is_restarted_and_its_clients_flow(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=4, underlay=UNDERLAY, workers=2)
    held = spread(net)
    a, _ = one_on_each(net, held)
    st = net.status(net.relay)
    assert st is not None
    before = {p["name"]: p["rx_bytes"] for p in st["peers"]}
    pid = next(w["pid"] for w in st["workers"] if w["worker"] == 1)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    for c in net.clients:
        if held[c.name] != 1:
            continue
        while True:
            try:
                net.ping(a.ns, c.extra["address"], count=1, timeout=5)
                break
            except RuntimeError:
                if time.monotonic() - started > BACK_BOUND:
                    raise AssertionError(
                        f"{c.name} unreachable after worker 1 was killed:\n"
                        + net.log_tail(net.relay)
                    ) from None
    assert pairs_fail(net) == []
    st = net.status(net.relay)
    assert st is not None
    w1 = next(w for w in st["workers"] if w["worker"] == 1)
    assert w1["alive"] and w1["restarts"] == 1 and w1["pid"] != pid
    after = {p["name"]: p["rx_bytes"] for p in st["peers"]}
    for name, count in before.items():
        assert after[name] >= count, (name, count, after[name])  # the dead one's kept
    assert "worker 1 exited (signal 9)" in (tmp_path / "server.log").read_text()
    # The endpoints of the sessions worker 1 holds are saved for the next start too.
    udp_on_1 = [
        p for p in st["peers"] if p["worker"] == 1 and p["transport"] == "udp" and p["endpoint"]
    ]
    if udp_on_1:
        peer = udp_on_1[0]
        relay_key = net.relay.public
        deadline = time.monotonic() + 10
        while True:
            with StateStore(tmp_path / "state" / "gtun.sqlite") as store:
                saved = store.endpoints(relay_key).get(peer["public_key"])
            host, port = peer["endpoint"].rsplit(":", 1)
            if saved == json.dumps([host, int(port)]):
                break
            assert time.monotonic() < deadline, (saved, peer["endpoint"])
            time.sleep(0.5)


def test_tap_mode_with_two_workers(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=4, underlay=UNDERLAY, workers=2, mode="tap", lan=False)
    spread(net)
    assert pairs_fail(net) == []


def test_a_reload_reaches_every_worker(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=4, underlay=UNDERLAY, workers=2)
    held = spread(net)
    a, b = one_on_each(net, held)
    # b's peer leaves the file: after SIGHUP no worker forwards for it.
    config = net.relay.config
    text = config.read_text()
    entry = f'\n[[peers]]\nname = "{b.name}"\npublic_key = "{b.public}"\n'
    assert entry in text
    config.write_text(text.replace(entry, ""))
    assert net.relay.proc is not None
    net.relay.proc.send_signal(signal.SIGHUP)
    net.wait_status(
        net.relay,
        lambda s: b.name not in {p["name"] for p in s["peers"]},
        10,
        "the reload",
    )
    with pytest.raises(RuntimeError):
        net.ping(a.ns, b.extra["address"], count=2, timeout=10)
    others = [c for c in net.clients if c is not b]
    for c in others:
        net.ping(c.ns, "10.66.0.1", count=1)
    # Worker 0 killed outright: the kernel ends the other workers with it.
    st = net.status(net.relay)
    assert st is not None
    worker_pid = next(w["pid"] for w in st["workers"] if w["worker"] == 1)
    net.relay.proc.kill()
    net.relay.proc.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker_pid}").exists():
        assert time.monotonic() < deadline, "worker 1 outlived its relay"
        time.sleep(0.1)


def test_a_restarted_relay_rejoins_its_clients_through_every_worker(
    lab: Lab, tmp_path: Path
) -> None:
    """The relay stopped and started again: each worker handshakes with its share of
    the clients (by key) at their saved endpoints, and every client flows at once."""
    net = GtunNet(lab, tmp_path, clients=4, underlay=UNDERLAY, workers=2)
    net.start_all()
    for c in net.clients:
        net.ping(c.ns, "10.66.0.1", count=1)
    time.sleep(2.5)  # the endpoints saved (every second, once the counters are read)
    net.stop(net.relay)
    net.start_relay()
    shares = {int.from_bytes(decode_key(c.public)[:4], "little") % 2 for c in net.clients}
    started = time.monotonic()
    for c in net.clients:
        net.ping(c.ns, "10.66.0.1", count=1, timeout=10)
    assert time.monotonic() - started < 5  # a round trip each, not a client timer
    log = (tmp_path / "server.log").read_text()
    if 1 in shares:
        assert "worker 1: handshaking with" in log, net.log_tail(net.relay)
    assert pairs_fail(net) == []
