"""Conformance tier: what a WireGuard implementation must do, checked on real gtun
processes in network namespaces, in the spirit of WireGuard's own selftest
(tools/testing/selftests/wireguard/netns.sh): counters that match the traffic, roaming,
allowed-IPs source filtering, key rotation, a bounded routing loop, replayed datagrams.

One relay (no LAN, no NAT) and three clients share this module's lab:

    c1  UDP, the one that roams, spoofs and rotates its key
    c2  TCP transport
    c3  UDP, a subnet (LOOP_NET) routed to it, and the one whose datagrams are replayed

plus a stock wireguard-go peer added with `gtun peer add`.  Underlay 10.247.0.0/16,
tunnel 10.67.0.0/24, namespaces "gtk...".  Tests that need a lab of their own (low-order
keys) take the function-scoped `lab` fixture with the same prefix.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.core.wg.crypto import CryptoError, dh
from gtun.lab.net import PORT, GtunNet, Node, write_key
from gtun.lab.netns import Lab, Namespace
from labkit import (
    apply_wg_quick,
    gtun_stdout,
    missing_tools,
    move_address,
    ping_count,
    relay_peer,
    run_gtun,
    run_python,
    set_config_keys,
    start_udp_capture,
    start_wireguard_go,
    stop_capture,
    transport_size,
    wait_until,
)

pytestmark = pytest.mark.netns

UNDERLAY = 247  # 10.247.x.x inside this module's namespaces
NETWORK = "10.67.0.0/24"
RELAY = "10.67.0.1"
LOOP_NET = "192.168.247.0/24"  # routed by the relay to c3, and by c3 back to the relay
WG_RUN = Path("/var/run/wireguard")


@pytest.fixture
def lab_prefix() -> str:
    return "gtk"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtk{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab,
            tmp_path_factory.mktemp("conformance"),
            clients=3,
            underlay=UNDERLAY,
            network=NETWORK,
            lan=False,
            nat=False,
        )
        c1, c2, c3 = gnet.clients
        text = gnet.relay.config.read_text()
        entry = f'name = "c3"\npublic_key = "{c3.public}"\n'
        gnet.relay.config.write_text(text.replace(entry, entry + f'subnets = ["{LOOP_NET}"]\n'))
        gnet.set_transport(c1, "udp")
        gnet.set_transport(c2, "tcp")
        gnet.set_transport(c3, "udp")
        # The counters tests count exactly what ping and a transfer moved: no path MTU
        # probes in between (tests/test_pmtu*.py test those).
        for c in gnet.clients:
            set_config_keys(c.config, "client", {"pmtu": "false"})
        gnet.start_all(timeout=30)
        yield gnet


# --- helpers -----------------------------------------------------------------------------


def relay_status(net: GtunNet) -> dict[str, Any]:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return st


def client_peer(net: GtunNet, node: Node) -> dict[str, Any]:
    """The relay as `node`'s client sees it (its one peer)."""
    st = net.status(node)
    assert st is not None, net.log_tail(node)
    return dict(st["peers"][0])


def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


def wait(cond: Callable[[], Any], timeout: float, what: str, ctx: Callable[[], str]) -> Any:
    """labkit.wait_until, failing the test with `ctx()` (logs) when it times out."""
    try:
        return wait_until(cond, timeout, what)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{ctx()}", pytrace=False)


def logs(net: GtunNet, *nodes: Node) -> Callable[[], str]:
    def show() -> str:
        parts = [f"--- relay log\n{net.log_tail(net.relay)}"]
        parts += [f"--- {n.name} log\n{net.log_tail(n, 15)}" for n in nodes]
        st = net.status(net.relay)
        if st is not None:
            parts.append(f"--- relay drops { ({k: v for k, v in st['drops'].items() if v}) }")
        return "\n".join(parts)

    return show


def wait_quiet(net: GtunNet, names: list[str], timeout: float = 5) -> None:
    """Wait until the relay's counters for `names` stop moving for half a second."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        now = [(relay_peer(net, n)["rx_bytes"], relay_peer(net, n)["tx_bytes"]) for n in names]
        if now == last:
            return
        last = now
        time.sleep(0.5)


# --- counters ----------------------------------------------------------------------------

PINGS = 20
PING_SIZE = 1000  # ICMP payload: 1028-byte IP packets, 1072-byte datagrams


@pytest.mark.parametrize("name", ["c1", "c2"], ids=["udp", "tcp"])
def test_counters_match_what_ping_moved(net: GtunNet, name: str) -> None:
    """rx/tx bytes and packets, on the relay and on the client, grow by what PINGS
    echoes of PING_SIZE bytes moved, both ways: exactly the packets, and the bytes of
    their datagrams with room for a few keepalives and the client's IPv6 chatter."""
    node = next(c for c in net.clients if c.name == name)
    wait_quiet(net, [name])
    r0, c0 = relay_peer(net, name), client_peer(net, node)
    assert ping_count(node.ns, RELAY, PINGS, "-s", str(PING_SIZE)) == PINGS
    wait_quiet(net, [name])
    r1, c1 = relay_peer(net, name), client_peer(net, node)
    ctx = f"relay {r0} -> {r1}\nclient {c0} -> {c1}"
    per_ping = transport_size(20 + 8 + PING_SIZE)
    slack_packets, slack_bytes = 4, 4 * 128
    for side, before, after in (("relay", r0, r1), ("client", c0, c1)):
        for key in ("rx_packets", "tx_packets"):
            assert PINGS <= delta(after, before, key) <= PINGS + slack_packets, (side, key, ctx)
        for key in ("rx_bytes", "tx_bytes"):
            moved = delta(after, before, key)
            assert PINGS * per_ping <= moved <= PINGS * per_ping + slack_bytes, (side, key, ctx)
    # What one end sent is what the other received (but for one of the client's in-tunnel
    # PINGs, every 10 s, that may be in flight between the two snapshots).
    assert abs(delta(c1, c0, "tx_bytes") - delta(r1, r0, "rx_bytes")) <= 96, ctx
    assert abs(delta(r1, r0, "tx_bytes") - delta(c1, c0, "rx_bytes")) <= 96, ctx
    assert r1["transport"] == ("tcp" if name == "c2" else "udp"), r1


TRANSFER = 4 * 1024 * 1024


@pytest.mark.parametrize("name", ["c1", "c2"], ids=["udp", "tcp"])
def test_counters_match_a_transfer(net: GtunNet, name: str) -> None:
    """A 4 MiB TCP stream from the client to c3 through the relay: the sender's tx and
    the relay's rx for it, and the relay's tx to c3 and c3's rx, each carried at least the
    stream and at most the stream plus headers, ACKs and padding (25 %)."""
    node = next(c for c in net.clients if c.name == name)
    c3 = net.clients[2]
    wait_quiet(net, [name, "c3"])
    before = (client_peer(net, node), relay_peer(net, name), relay_peer(net, "c3"))
    before_c3 = client_peer(net, c3)
    sent, received, _ = net.transfer(node.ns, c3.ns, c3.extra["address"], TRANSFER)
    assert sent and sent == received
    wait_quiet(net, [name, "c3"])
    after = (client_peer(net, node), relay_peer(net, name), relay_peer(net, "c3"))
    after_c3 = client_peer(net, c3)
    moved = {
        "sender tx": delta(after[0], before[0], "tx_bytes"),
        "relay rx from sender": delta(after[1], before[1], "rx_bytes"),
        "relay tx to c3": delta(after[2], before[2], "tx_bytes"),
        "c3 rx": delta(after_c3, before_c3, "rx_bytes"),
    }
    for what, n in moved.items():
        assert TRANSFER <= n <= TRANSFER * 1.25, (what, moved)
    # Lost datagrams (UDP) make a receiver count less than its sender, never more.
    assert moved["relay rx from sender"] <= moved["sender tx"], moved
    assert moved["c3 rx"] <= moved["relay tx to c3"], moved


# --- allowed-IPs source filtering ----------------------------------------------------------

SPY = """
table ip gtkspy {
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        ip saddr { %s } counter
    }
}
"""


def spy_count(ns: Namespace) -> int:
    out = ns.run(["nft", "list", "table", "ip", "gtkspy"]).stdout
    got = re.search(r"counter packets (\d+)", out)
    assert got, out
    return int(got.group(1))


def test_foreign_source_is_dropped_as_spoofed(net: GtunNet) -> None:
    """c1 pings c3 from an address it does not own (an unleased one, then c2's own): the
    relay drops every packet as "spoofed", counted for c1, and c3 sees none of them."""
    c1, c2, c3 = net.clients
    foreign = ["10.67.0.200", c2.extra["address"]]
    c3.ns.run(["nft", "-f", "-"], input=SPY % ", ".join(foreign))
    try:
        before = relay_peer(net, "c1")["drops"].get("spoofed", 0)
        for address in foreign:
            c1.ns.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"])
            try:
                assert ping_count(c1.ns, c3.extra["address"], 5, "-I", address, deadline=2) == 0
            finally:
                c1.ns.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"])
        wait(
            lambda: relay_peer(net, "c1")["drops"].get("spoofed", 0) >= before + 10,
            5,
            "10 spoofed drops",
            logs(net, c1),
        )
        assert spy_count(c3.ns) == 0
    finally:
        c3.ns.run(["nft", "delete", "table", "ip", "gtkspy"], check=False)
    # c1's own address still works, and so does c2's.
    assert ping_count(c1.ns, c3.extra["address"], 2) == 2
    assert ping_count(c2.ns, c3.extra["address"], 2) == 2


# --- a bounded routing loop ----------------------------------------------------------------


def test_routing_loop_is_bounded(net: GtunNet) -> None:
    """The relay routes LOOP_NET to c3 (its `subnets`), and c3's kernel routes it back
    into the tunnel.  c3's own pings into LOOP_NET would go straight back to their
    sender: dropped as "loop"; c1's reach c3, which sends them back with c1's source:
    "spoofed".  Each echo bounces once, none once the pings stop, and the relay keeps
    serving the others."""
    c1, c2, c3 = net.clients
    c3.ns.sysctl("net.ipv4.ip_forward", 1)
    for c in (c1, c3):
        c.ns.run(["ip", "route", "replace", LOOP_NET, "dev", "gtun0"])
    target = LOOP_NET.replace("0/24", "5")
    wait_quiet(net, ["c1", "c3"])
    before = relay_status(net)["drops"]
    before_c3 = relay_peer(net, "c3")
    count = 5
    try:
        for c in (c3, c1):  # exactly `count` echoes each (no -w, which sends on until then)
            out = c.ns.run(["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", target],
                           check=False)  # fmt: skip
            assert f"{count} packets transmitted, 0 received" in out.stdout, out.stdout
    finally:
        for c in (c1, c3):
            c.ns.run(["ip", "route", "del", LOOP_NET, "dev", "gtun0"], check=False)
        c3.ns.sysctl("net.ipv4.ip_forward", 0)
    wait_quiet(net, ["c1", "c3"])
    after = relay_status(net)["drops"]
    after_c3 = relay_peer(net, "c3")
    dropped = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    bounces = delta(after_c3, before_c3, "rx_packets")
    # gtun stops each echo the first time it comes back, long before its TTL would: c3's
    # own at once ("loop"), c1's when c3 returns them ("spoofed").  Besides those, c3
    # sends c1 an ICMP redirect or two.
    assert dropped.get("loop", 0) == count and dropped.get("spoofed", 0) == count, dropped
    assert bounces <= 4 * count, (bounces, dropped)
    # Nothing keeps circulating once the pings stopped.
    time.sleep(1)
    still = relay_peer(net, "c3")
    assert still["rx_packets"] - after_c3["rx_packets"] <= 2, (after_c3, still)
    assert ping_count(c2.ns, RELAY, 3) == 3
    assert ping_count(c1.ns, c3.extra["address"], 3) == 3


# --- replayed datagrams --------------------------------------------------------------------


def test_replayed_initiations_and_data_are_dropped(net: GtunNet) -> None:
    """Record what c3 sends to the relay while it restarts (a handshake initiation) and
    pings, then send it all again from another socket: each initiation counts as
    "replayed_handshake", each transport message as "replay" (or "unknown_index" for one
    of the session before the restart); no new handshake, the relay keeps c3's real
    endpoint, and the session keeps working."""
    c3 = net.clients[2]
    out, log = net.dir / "capture.json", net.dir / "capture.log"
    cap = start_udp_capture(c3.ns, "up0", PORT, out, log)
    try:
        net.stop(c3)
        net.start_client(c3)
        net.wait_configured(c3, timeout=30)
        assert ping_count(c3.ns, RELAY, 5, "-i", "0.2") == 5
    finally:
        captured = stop_capture(cap, out)
    initiations = [d for d in captured if d[0] == 1 and len(d) == 148]
    transport = [d for d in captured if d[0] == 4 and len(d) >= 32]
    assert initiations and len(transport) >= 5, [(d[0], len(d)) for d in captured]
    wait_quiet(net, ["c3"])
    before, peer_before = relay_status(net)["drops"], relay_peer(net, "c3")
    replay = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for h in sys.stdin.read().split():\n"
        "    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))\n"
        "    time.sleep(0.005)\n"
    )
    run_python(
        c3.ns,
        replay,
        c3.underlay,
        str(PORT),
        input="\n".join(d.hex() for d in initiations + transport),
    )

    def counted() -> dict[str, int]:
        d = relay_status(net)["drops"]
        keys = ("replayed_handshake", "replay", "unknown_index")
        return {k: d.get(k, 0) - before.get(k, 0) for k in keys}

    expected = len(initiations) + len(transport)
    wait(lambda: sum(counted().values()) >= expected, 5, "the replays counted", logs(net))
    got = counted()
    assert got["replayed_handshake"] == len(initiations), got
    assert got["replay"] + got["unknown_index"] == len(transport) and got["replay"] >= 5, got
    peer_after = relay_peer(net, "c3")
    assert peer_after["last_handshake"] == peer_before["last_handshake"], (peer_before, peer_after)
    assert peer_after["endpoint"] == peer_before["endpoint"], (peer_before, peer_after)
    assert ping_count(c3.ns, RELAY, 3) == 3


# --- roaming -------------------------------------------------------------------------------


def test_client_roams_to_a_new_address(net: GtunNet) -> None:
    """c1's underlay address changes under the running client: traffic resumes both
    ways, and the relay's status shows the new endpoint."""
    c1, c2 = net.clients[:2]
    old, new = f"10.{UNDERLAY}.1.2", f"10.{UNDERLAY}.1.3"
    assert str(relay_peer(net, "c1")["endpoint"]).startswith(f"{old}:")
    move_address(c1.ns, "up0", f"{old}/24", f"{new}/24")
    ctx = logs(net, c1)
    wait(lambda: ping_count(c1.ns, RELAY, 1, deadline=2) == 1, 30, "c1 back", ctx)
    endpoint = str(relay_peer(net, "c1")["endpoint"])
    assert endpoint.startswith(f"{new}:"), (endpoint, ctx())
    assert ping_count(net.relay.ns, c1.extra["address"], 3) == 3
    assert ping_count(c2.ns, c1.extra["address"], 3) == 3


@pytest.fixture
def stock_ns(net: GtunNet) -> Iterator[tuple[Namespace, str]]:
    """A namespace for a stock peer linked to the relay (removed with the module's lab),
    and a wireguard-go interface name whose control socket is removed afterwards."""
    if missing := missing_tools("wireguard-go", "wg"):
        pytest.fail(f"needs {missing} (apt install wireguard-go wireguard-tools)")
    ns = net.lab.add_ns("wg")
    net.lab.veth(
        net.relay.ns, "rwg", f"10.{UNDERLAY}.200.1/24", ns, "up0", f"10.{UNDERLAY}.200.2/24"
    )
    ifname = f"wgk{secrets.token_hex(2)}"
    yield ns, ifname
    (WG_RUN / f"{ifname}.sock").unlink(missing_ok=True)


def test_stock_peer_roams(net: GtunNet, stock_ns: tuple[Namespace, str]) -> None:
    """A wireguard-go peer (PersistentKeepalive from `gtun peer add`) moves to another
    address: its pings resume, and the relay follows it to the new endpoint.  Then the
    relay's byte counters for it equal wireguard-go's own, both ways."""
    ns, ifname = stock_ns
    conf = gtun_stdout(
        net.relay.ns,
        *("peer", "add", "wgk", "-c", str(net.relay.config)),
        *("--endpoint", f"10.{UNDERLAY}.200.1:{PORT}"),
    )
    proc = start_wireguard_go(ns, ifname, net.dir / f"{ifname}.log")
    try:
        apply_wg_quick(ns, ifname, conf, net.dir / f"{ifname}.conf")
        ctx = logs(net)
        wait(lambda: ping_count(ns, RELAY, 1, deadline=2) == 1, 15, "the stock peer", ctx)
        assert str(relay_peer(net, "wgk")["endpoint"]).startswith(f"10.{UNDERLAY}.200.2:")
        move_address(ns, "up0", f"10.{UNDERLAY}.200.2/24", f"10.{UNDERLAY}.200.3/24")
        wait(lambda: ping_count(ns, RELAY, 1, deadline=2) == 1, 30, "it back", ctx)
        endpoint = str(relay_peer(net, "wgk")["endpoint"])
        assert endpoint.startswith(f"10.{UNDERLAY}.200.3:"), (endpoint, ctx())
        address = relay_peer(net, "wgk")["address"]
        assert ping_count(net.clients[1].ns, address, 3) == 3  # c2, over TCP, to it

        # The relay's counters and wireguard-go's (`wg show transfer`) agree on what
        # crossed between them, each end counting whole datagrams.
        def transfer() -> tuple[int, int, int, int]:
            wait_quiet(net, ["wgk"])
            rx, tx = (
                int(v) for v in ns.run(["wg", "show", ifname, "transfer"]).stdout.split()[1:3]
            )
            p = relay_peer(net, "wgk")
            return p["rx_bytes"], p["tx_bytes"], rx, tx

        r_rx0, r_tx0, w_rx0, w_tx0 = transfer()
        assert ping_count(ns, RELAY, 10, "-s", "500") == 10
        r_rx1, r_tx1, w_rx1, w_tx1 = transfer()
        counts = {"relay rx": r_rx1 - r_rx0, "wg tx": w_tx1 - w_tx0,
                  "relay tx": r_tx1 - r_tx0, "wg rx": w_rx1 - w_rx0}  # fmt: skip
        assert counts["relay rx"] >= 10 * transport_size(528), counts
        assert counts["relay rx"] == counts["wg tx"], counts
        assert counts["relay tx"] == counts["wg rx"], counts
    finally:
        proc.terminate()
        proc.wait(10)


# --- key rotation --------------------------------------------------------------------------


def test_key_rotation_on_sighup(net: GtunNet) -> None:
    """c1's key is replaced in the relay's config and the relay gets SIGHUP: the client
    still holding the old key is cut off, a client with the new key joins, and c2's and
    c3's sessions are not touched (same handshake, traffic flows throughout)."""
    c1, c2, c3 = net.clients
    others = {n: relay_peer(net, n)["last_handshake"] for n in ("c2", "c3")}
    new_key = generate_private_key()
    new_public = encode_key(public_key(new_key))
    text = net.relay.config.read_text()
    assert c1.public in text
    net.relay.config.write_text(text.replace(c1.public, new_public))
    assert net.relay.proc is not None
    net.relay.proc.send_signal(1)  # SIGHUP
    ctx = logs(net, c1)
    wait(lambda: relay_peer(net, "c1")["public_key"] == new_public, 10, "the new key", ctx)
    # The old key's session is gone: nothing c1 sends under it gets through.
    time.sleep(0.5)
    assert ping_count(c1.ns, RELAY, 3, deadline=3) == 0, ctx()
    net.stop(c1)
    write_key(net.dir / "c1.key", new_key)
    c1.key = new_key
    net.start_client(c1)
    net.wait_configured(c1, timeout=30)
    assert ping_count(c1.ns, RELAY, 3) == 3
    assert ping_count(c1.ns, c3.extra["address"], 3) == 3
    for name, handshake in others.items():
        assert relay_peer(net, name)["last_handshake"] == handshake, name
    assert ping_count(c2.ns, c3.extra["address"], 3) == 3


# --- low-order keys ------------------------------------------------------------------------

# Public keys of small order on Curve25519: X25519 with any of them gives the all-zero
# secret, which the Noise handshake must refuse (WireGuard rejects such peers).
LOW_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def _exit_of(ns: Namespace, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return run_gtun(ns, *cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gtun {' '.join(cmd)} was still running after {timeout:g} s")


@pytest.mark.parametrize("key", LOW_ORDER, ids=["zero", "one", "order8"])
def test_low_order_peer_key_is_refused(lab: Lab, tmp_path: Path, key: bytes) -> None:
    """A relay whose config names a peer with a low-order public key exits 2 with one
    line naming the key, not a traceback."""
    gnet = GtunNet(lab, tmp_path, clients=0, underlay=UNDERLAY, network=NETWORK, lan=False)
    gnet.relay.config.write_text(
        gnet.relay.config.read_text()
        + f'\n[[peers]]\nname = "bad"\npublic_key = "{encode_key(key)}"\n'
    )
    out = _exit_of(gnet.relay.ns, ["server", "-c", str(gnet.relay.config)], 8)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "public_key" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("key", LOW_ORDER, ids=["zero", "one", "order8"])
def test_low_order_server_key_is_refused(lab: Lab, tmp_path: Path, key: bytes) -> None:
    """A client whose server_public_key is of low order exits 2, naming the key."""
    gnet = GtunNet(lab, tmp_path, clients=1, underlay=UNDERLAY, network=NETWORK, lan=False)
    c1 = gnet.clients[0]
    c1.config.write_text(c1.config.read_text().replace(gnet.relay.public, encode_key(key)))
    out = _exit_of(c1.ns, ["client", "-c", str(c1.config)], 8)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "server_public_key" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("key", LOW_ORDER, ids=["zero", "one", "order8"])
def test_low_order_keys_are_what_x25519_refuses(key: bytes) -> None:
    """The points above really are of low order (no network needed)."""
    with pytest.raises(CryptoError):
        dh(X25519PrivateKey.generate(), key)
