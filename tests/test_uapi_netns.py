"""`wg show` against real gtun processes (tier 3): wireguard-tools' own `wg show DEVICE
dump`, `wg show` and `wg showconf` read a running relay and running clients (one over
UDP, one over TCP) through app/uapi.py's socket, and what they print agrees with
`gtun status --json`: keys, endpoints, allowed IPs, the listen port, and the handshake
time and transfer counters (read between two status calls, so within what moved
meanwhile).  Then the socket's safety: a client SIGKILLed leaves its socket, and the
restarted client replaces it; a device name whose socket a wireguard-go owns is left to
it, with one warning, and gtun runs on without.  And two relays on one store (MeshNet):
each lists the other, and a client that learnt both lists both.

    underlay: client i <-- veth 10.248.<i>.0/24 --> relay <-- veth --> lan
    overlay:  10.66.0.0/24, the LAN 192.168.77.0/24 pushed as a route

MeshNet's underlay is 10.248.x.x too, behind its "wan" namespace.  Every address lives
inside the lab's namespaces (prefix "gtu"); the device names ("gtuR0", "gtuC1", ...) are
this module's own: /var/run/wireguard is shared by every namespace and every test on the
machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.app.keys import encode_key, public_key
from gtun.app.pgstore import migrate
from gtun.lab.mesh import MeshNet
from gtun.lab.net import LAN_NET, PORT, GtunNet, Node
from gtun.lab.netns import Lab, Namespace
from labkit import gtun_stdout, missing_tools, ping_count, start_wireguard_go, wait_until

pytestmark = pytest.mark.netns

UNDERLAY = 248  # 10.248.x.x
WG_RUN = Path("/var/run/wireguard")
NETWORK = "10.66.0.0/24"


@pytest.fixture
def lab_prefix() -> str:
    return "gtu"


@pytest.fixture(autouse=True)
def tools() -> None:
    if missing := missing_tools("wg"):
        pytest.skip(f"needs {', '.join(missing)}")


@contextlib.contextmanager
def our_sockets(*devices: str) -> Iterator[None]:
    """Fail on a socket of these device names that answers before the test (another
    run uses them); remove any left dead after it (a process this test killed)."""
    for device in devices:
        path = WG_RUN / f"{device}.sock"
        if path.exists() and answers(path):
            pytest.fail(f"{path} is in use by another process: is another run going on?")
    try:
        yield
    finally:
        for device in devices:
            path = WG_RUN / f"{device}.sock"
            if path.exists() and not answers(path):
                path.unlink()


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def wg(ns: Namespace, *args: str) -> str:
    return ns.run(["wg", *args]).stdout


def dump(ns: Namespace, device: str) -> tuple[list[str], dict[str, list[str]]]:
    """`wg show DEVICE dump`: the interface's fields, and each peer's by public key."""
    head, *rows = [line.split("\t") for line in wg(ns, "show", device, "dump").splitlines()]
    return head, {row[0]: row for row in rows}


def status(node: Node) -> dict[str, Any]:
    """`gtun status --json` of a running relay or client."""
    return dict(json.loads(gtun_stdout(node.ns, "status", "--json", "-s", str(node.socket))))


def check_peer(row: list[str], before: dict[str, Any], after: dict[str, Any]) -> None:
    """A peer's dump row agrees with its status before and after: the same endpoint,
    a handshake and counters between the two (they only grow)."""
    _, psk, endpoint, _, handshake, rx, tx, _ = row
    assert psk == "(none)"
    assert endpoint == after["endpoint"] == before["endpoint"]
    assert before["last_handshake"] is not None
    # wg prints whole seconds; a handshake between the two calls would move it forward.
    assert int(before["last_handshake"]) <= int(handshake) <= after["last_handshake"]
    assert before["rx_bytes"] <= int(rx) <= after["rx_bytes"], (rx, before, after)
    assert before["tx_bytes"] <= int(tx) <= after["tx_bytes"], (tx, before, after)
    assert int(rx) > 0 and int(tx) > 0


def peers_by_key(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["public_key"]: p for p in st["peers"]}


def test_wg_show_reads_a_running_relay_and_its_clients(lab: Lab, tmp_path: Path) -> None:
    devices = {"relay": "gtuR0", "c1": "gtuC1", "c2": "gtuC2"}
    net = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, devices=devices)
    relay, c1, c2 = net.relay, *net.clients
    with our_sockets(*devices.values()):
        net.start_relay()
        net.start_client(c1, "udp")
        net.start_client(c2, "tcp")
        for c in (c1, c2):
            net.wait_configured(c)
            assert ping_count(c.ns, "10.66.0.1", 3) == 3, net.log_tail(c)

        # The relay: every peer, over UDP and over TCP.
        before = peers_by_key(status(relay))
        head, rows = dump(relay.ns, "gtuR0")
        after = peers_by_key(status(relay))
        assert head == [encode_key(relay.key), relay.public, str(PORT), "off"]
        assert set(rows) == {c1.public, c2.public}
        for c in (c1, c2):
            row = rows[c.public]
            check_peer(row, before[c.public], after[c.public])
            assert row[3] == f"{c.extra['address']}/32"  # allowed IPs
            assert row[7] == "off"  # no persistent keepalive
        assert after[c1.public]["transport"] == "udp"
        assert rows[c1.public][2].startswith(f"10.{UNDERLAY}.1.2:")
        # A TCP peer: the address and port its connection comes from.
        assert after[c2.public]["transport"] == "tcp"
        assert rows[c2.public][2].startswith(f"10.{UNDERLAY}.2.2:")

        conf = wg(relay.ns, "showconf", "gtuR0")
        assert f"PrivateKey = {encode_key(relay.key)}" in conf
        assert f"ListenPort = {PORT}" in conf
        for c in (c1, c2):
            assert f"PublicKey = {c.public}\nAllowedIPs = {c.extra['address']}/32\n" in conf
        shown = wg(relay.ns, "show", "gtuR0")
        assert "latest handshake:" in shown and "transfer:" in shown

        # The clients: the relay as their one peer, its endpoint the configured one.
        lan = f"{LAN_NET}.0/24"
        for c, device, endpoint, port in (
            (c1, "gtuC1", f"10.{UNDERLAY}.1.1:{PORT}", "udp"),
            (c2, "gtuC2", f"10.{UNDERLAY}.2.1:{PORT}", "tcp"),
        ):
            st_before = status(c)
            head, rows = dump(c.ns, device)
            st_after = status(c)
            assert head[:2] == [encode_key(c.key), encode_key(public_key(c.key))]
            # Over UDP its socket's port; over TCP it has none.
            assert (int(head[2]) > 0) if port == "udp" else head[2] == "0"
            [row] = rows.values()
            assert row[0] == relay.public
            check_peer(row, st_before["peers"][0], st_after["peers"][0])
            assert row[2] == endpoint
            assert row[3] == f"{NETWORK},{lan}"  # what the client routes into the tunnel
            conf = wg(c.ns, "showconf", device)
            assert f"Endpoint = {endpoint}" in conf and f"AllowedIPs = {NETWORK}, {lan}" in conf

        # What Prometheus WireGuard exporters read: `wg show all dump`.
        every = wg(relay.ns, "show", "all", "dump").splitlines()
        for device in devices.values():
            assert any(line.startswith(f"{device}\t") for line in every), device

        # `wg set` is refused with one clear line, and the relay serves on.
        out = relay.ns.run(["wg", "set", "gtuR0", "listen-port", "1"], check=False)
        assert out.returncode != 0
        assert out.stderr.strip() == "Unable to modify interface: Operation not supported"
        assert dump(relay.ns, "gtuR0")[0][2] == str(PORT)

        for node in (c1, c2, relay):
            assert net.stop(node) == 0, net.log_tail(node)
        for device in devices.values():
            assert not (WG_RUN / f"{device}.sock").exists(), device


def test_a_stale_socket_is_replaced_and_someone_elses_left_alone(lab: Lab, tmp_path: Path) -> None:
    if missing := missing_tools("wireguard-go"):
        pytest.skip(f"needs {', '.join(missing)}")
    devices = {"relay": "gtuR1", "c1": "gtuC3", "c2": "gtuC4"}
    net = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, devices=devices)
    relay, c1, c2 = net.relay, *net.clients
    stale = WG_RUN / "gtuC3.sock"
    theirs = WG_RUN / "gtuC4.sock"
    with our_sockets(*devices.values()):
        net.start_relay()
        net.start_client(c1)
        net.wait_configured(c1)
        assert answers(stale)

        # SIGKILL: the socket stays, and nobody answers it.
        assert c1.proc is not None
        os.killpg(c1.proc.pid, signal.SIGKILL)
        c1.proc.wait(10)
        c1.proc = None
        assert stale.exists() and not answers(stale)
        net.start_client(c1)
        net.wait_configured(c1)
        assert "a socket nobody answered" in c1.log.read_text()
        _, rows = dump(c1.ns, "gtuC3")
        assert list(rows) == [relay.public]

        # Someone else's: a wireguard-go (in another namespace) owns gtuC4's socket.
        assert net.lan is not None
        wggo = start_wireguard_go(net.lan, "gtuC4", tmp_path / "wireguard-go.log")
        try:
            inode = theirs.stat().st_ino
            net.start_client(c2)
            net.wait_configured(c2)
            assert ping_count(c2.ns, "10.66.0.1", 3) == 3, net.log_tail(c2)
            warnings = [line for line in c2.log.read_text().splitlines() if "gtuC4.sock" in line]
            assert len(warnings) == 1 and "another process" in warnings[0], warnings
            # `wg show gtuC4` is wireguard-go's device: no key, no peers; not gtun's.
            head, rows = dump(c2.ns, "gtuC4")
            assert head[0] == "(none)" and rows == {}
            assert net.stop(c2) == 0, net.log_tail(c2)
            assert theirs.stat().st_ino == inode and answers(theirs)
        finally:
            wggo.terminate()
            wggo.wait(10)
        wait_until(lambda: not theirs.exists(), 10, "wireguard-go to remove its socket")

        # The relay saw both clients; its socket, like c1's, goes when it stops.
        _, rows = dump(relay.ns, "gtuR1")
        assert set(rows) == {c1.public, c2.public}
        for node in (c1, relay):
            assert net.stop(node) == 0, net.log_tail(node)
        assert not stale.exists() and not (WG_RUN / "gtuR1.sock").exists()


def test_wg_show_lists_the_other_relays_of_a_mesh(lab: Lab, tmp_path: Path, pg_dsn: str) -> None:
    """Two relays on one store: each lists the other as a WireGuard peer (its routes as
    allowed IPs), and a client that learnt both lists both, only the one in use with
    allowed IPs."""
    migrate(pg_dsn)
    net = MeshNet(lab, tmp_path / "mesh", pg_dsn, relays=2, underlay=UNDERLAY, lan_at="r2")
    r1, r2 = net.relays
    c1, c2 = net.clients
    devices = {"r1": "gtuR2", "r2": "gtuR3", "c1": "gtuC5", "c2": "gtuC6"}
    for node in (*net.relays, *net.clients):
        text = node.config.read_text()
        node.config.write_text(text.replace('device = "gtun0"', f'device = "{devices[node.name]}"'))
    with our_sockets(*devices.values()):
        try:
            net.start_relays()
            for c in (c1, c2):
                net.start_client(c)
                net.wait_configured(c)
            net.wait_presence(c2, r2)
            net.wait_learnt(c1)
            wait_until(
                lambda: ping_count(c1.ns, f"{LAN_NET}.10", 1) == 1, 20, "c1 to reach r2's LAN"
            )

            before = {m["public_key"]: m for m in status(r1)["mesh"]}
            head, rows = dump(r1.ns, "gtuR2")
            after = {m["public_key"]: m for m in status(r1)["mesh"]}
            assert head[1] == r1.public
            assert set(rows) == {c1.public, c2.public, r2.public}
            row = rows[r2.public]
            check_peer(row, before[r2.public], after[r2.public])
            assert row[2] == f"{r2.underlay}:{PORT}"
            assert row[3] == f"{LAN_NET}.0/24"  # the route behind r2
            assert row[7] != "off"  # the mesh keeps its sessions alive
            # r2 has no route behind r1: no allowed IPs.
            assert dump(r2.ns, "gtuR3")[1][r1.public][3] == "(none)"

            _, rows = dump(c1.ns, "gtuC5")
            assert set(rows) == {r1.public, r2.public}
            assert rows[r1.public][3] == f"{NETWORK},{LAN_NET}.0/24"  # in use
            assert rows[r2.public][3] == "(none)"  # known, for failover
            assert rows[r2.public][2] == f"{r2.underlay}:{PORT}"
        except BaseException:
            print(net.logs())
            raise
        finally:
            net.stop_all()
        for device in devices.values():
            assert not (WG_RUN / f"{device}.sock").exists(), device
