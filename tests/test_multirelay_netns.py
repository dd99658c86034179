"""Three relays on one shared store (PostgreSQL), each in a namespace of its own, real
`gtun` processes: clients of different relays reach each other across the relay mesh
(one hop) over UDP and over TCP, IPv4 and IPv6 inside the tunnel; a client of r1
reaches the LAN behind r3; a stock WireGuard peer (wireguard-go) made by
`gtun peer add --relay r2` joins through r2 and reaches clients of r1 and r3.

    underlay: gtun.lab.mesh's (every node routed through a "wan" namespace), 10.244.x.x
    overlay:  10.66.0.0/24 (and fd66::/64) on every relay's TUN; the leases are the
              store's, so unique; the LAN 192.168.77.0/24 behind r3, NATed there.

Every address lives inside the lab's namespaces (prefix "gtmd"); wireguard-go's
interface is "wgmd" + 4 random hex digits (its control socket,
/var/run/wireguard/NAME.sock, is shared by every namespace)."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gtun.app.pgstore import migrate
from gtun.lab.mesh import MeshNet
from gtun.lab.net import LAN_NET, PORT, Node
from gtun.lab.netns import Lab, Namespace
from labkit import apply_wg_quick, run_gtun, split_wg_quick, start_wireguard_go

pytestmark = pytest.mark.netns

UNDERLAY = 244  # 10.244.x.x
NETWORK6 = "fd66::/64"
LAN_HOST = f"{LAN_NET}.10"
FIRST_PING_BOUND = 20.0  # seconds for the first answer across the mesh (generous)
JOIN_BOUND = 10.0  # seconds from `gtun peer add` to the stock peer's session at r2
SIZE = 4 * 1024 * 1024  # bytes per checked transfer
DIGEST = len(hashlib.sha256().hexdigest())
WG_RUN = Path("/var/run/wireguard")


@pytest.fixture
def lab_prefix() -> str:
    return "gtmd"


def three_relays(lab: Lab, tmp_path: Path, dsn: str, clients: dict[str, str], **kw: Any) -> MeshNet:
    migrate(dsn)
    return MeshNet(lab, tmp_path / "mesh", dsn, relays=3, clients=clients, underlay=UNDERLAY, **kw)


def first_ping(net: MeshNet, ns: Namespace, address: str) -> float:
    """Ping `address` until it answers (the presence map may still be on its way to a
    relay); seconds it took.  Raises RuntimeError after FIRST_PING_BOUND."""
    started = time.monotonic()
    while True:
        try:
            net.ping(ns, address, count=1, timeout=10)
            return time.monotonic() - started
        except RuntimeError:
            if time.monotonic() - started > FIRST_PING_BOUND:
                raise


def checked_transfer(
    net: MeshNet, src: Node | Namespace, dst: Node | Namespace, address: str, port: int
) -> float:
    """SIZE random bytes from `src` to `address` in `dst`, their SHA-256 compared at
    both ends; MB/s (printed)."""
    src_ns = src.ns if isinstance(src, Node) else src
    dst_ns = dst.ns if isinstance(dst, Node) else dst
    sent, received, seconds = net.transfer(src_ns, dst_ns, address, SIZE, port=port)
    assert len(sent) == DIGEST, sent
    assert sent == received, f"{src_ns.name} -> {address}: sent {sent}, received {received}"
    speed = SIZE / seconds / 1e6
    print(f"transfer {src_ns.name} -> {address}: {SIZE} bytes in {seconds:.2f} s, {speed:.1f} MB/s")
    return speed


def mesh_rx(net: MeshNet, relay: Node) -> dict[str, int]:
    """The bytes `relay` took from each other relay over the mesh."""
    st = net.status(relay)
    assert st is not None, f"{relay.name} does not answer status"
    return {m["name"]: m["rx_bytes"] for m in st["mesh"]}


def peer_at(net: MeshNet, relay: Node, name: str) -> dict[str, Any] | None:
    st = net.status(relay)
    return next((p for p in st["peers"] if p["name"] == name), None) if st else None


def start_c2c(net: MeshNet) -> tuple[Node, Node, str, str]:
    """Start the relays and both clients (c1 at r1, c2 at r3); wait until each relay
    knows where each client's session is.  (c1, c2, c1's address, c2's address)."""
    c1, c2 = net.clients
    r1, r3 = net.relay_named("r1"), net.relay_named("r3")
    net.start_relays()
    for c in (c1, c2):
        net.start_client(c)
    a1, a2 = net.wait_configured(c1), net.wait_configured(c2)
    assert a1 != a2
    net.wait_presence(c1, r1)
    net.wait_presence(c2, r3)
    return c1, c2, a1, a2


def assert_one_hop(net: MeshNet, carried: int) -> None:
    """r1 and r3 each took more than `carried` bytes from the other; r2, on no path,
    took little from either and gave little to them (handshakes and keepalives)."""
    r1, r2, r3 = net.relays
    rx1, rx2, rx3 = mesh_rx(net, r1), mesh_rx(net, r2), mesh_rx(net, r3)
    assert rx1["r3"] > carried and rx3["r1"] > carried, (rx1, rx3)
    assert max(rx1["r2"], rx3["r2"], *rx2.values()) < SIZE // 8, (rx1, rx2, rx3)


# --- a: clients of r1 and r3, UDP, IPv4 and IPv6 ---------------------------------------


def test_clients_of_r1_and_r3_over_udp_ipv4_and_ipv6(lab: Lab, tmp_path: Path, pg_dsn: str) -> None:
    net = three_relays(lab, tmp_path, pg_dsn, {"c1": "r1", "c2": "r3"}, network6=NETWORK6)
    try:
        c1, c2, a1, a2 = start_c2c(net)
        b1, b2 = c1.extra.get("address6"), c2.extra.get("address6")
        assert b1 and b2 and b1 != b2, (b1, b2)
        print(f"first ping c1 -> c2 across the mesh: {first_ping(net, c1.ns, a2):.2f} s")
        for src, dst in ((c1, a2), (c2, a1), (c1, b2), (c2, b1)):
            assert net.ping(src.ns, dst, count=3) > 0
        checked_transfer(net, c1, c2, a2, 5201)
        checked_transfer(net, c2, c1, a1, 5202)
        checked_transfer(net, c1, c2, b2, 5203)
        checked_transfer(net, c2, c1, b1, 5204)
        for r, name in ((net.relay_named("r1"), "c1"), (net.relay_named("r3"), "c2")):
            p = peer_at(net, r, name)
            assert p is not None and p["transport"] == "udp", p
        assert_one_hop(net, 2 * SIZE)  # each way: IPv4 and IPv6
    except BaseException:
        print(net.logs())
        raise
    finally:
        net.stop_all()


# --- b: the same over TCP ----------------------------------------------------------------


def test_clients_of_r1_and_r3_over_tcp(lab: Lab, tmp_path: Path, pg_dsn: str) -> None:
    net = three_relays(lab, tmp_path, pg_dsn, {"c1": "r1", "c2": "r3"})
    for c in net.clients:
        net.set_transport(c, "tcp")
    # MeshNet writes a client's configuration again when it names another relay: the
    # transport stays.
    c1 = net.clients[0]
    net.write_client_config(c1, net.relay_named("r1"))
    assert 'transport = "tcp"' in c1.config.read_text()
    try:
        c1, c2, a1, a2 = start_c2c(net)
        print(f"first ping c1 -> c2 across the mesh (TCP): {first_ping(net, c1.ns, a2):.2f} s")
        assert net.ping(c1.ns, a2, count=3) > 0
        assert net.ping(c2.ns, a1, count=3) > 0
        checked_transfer(net, c1, c2, a2, 5201)
        checked_transfer(net, c2, c1, a1, 5202)
        for r, name in ((net.relay_named("r1"), "c1"), (net.relay_named("r3"), "c2")):
            p = peer_at(net, r, name)
            assert p is not None and p["transport"] == "tcp", p
        assert_one_hop(net, SIZE)
    except BaseException:
        print(net.logs())
        raise
    finally:
        net.stop_all()


# --- c: the LAN behind r3, from a client of r1 --------------------------------------------


def test_lan_behind_r3_from_a_client_of_r1(lab: Lab, tmp_path: Path, pg_dsn: str) -> None:
    net = three_relays(lab, tmp_path, pg_dsn, {"c1": "r1"}, lan_at="r3")
    assert net.lan is not None
    (c1,) = net.clients
    r1, r3 = net.relay_named("r1"), net.relay_named("r3")
    # The LAN host has no way back to the overlay: only r3's NAT brings replies home.
    no_route = net.lan.run(["ip", "route", "get", "10.66.0.2"], check=False)
    assert no_route.returncode != 0, no_route.stdout
    try:
        net.start_relays()
        net.start_client(c1)
        net.wait_configured(c1)
        net.wait_presence(c1, r1)
        # r1 pushed r3's route (learned from the store) to its client.
        routes = c1.ns.run(["ip", "route", "show", f"{LAN_NET}.0/24"]).stdout
        assert "dev gtun0" in routes, routes
        print(f"first ping c1 -> LAN behind r3: {first_ping(net, c1.ns, LAN_HOST):.2f} s")
        assert net.ping(c1.ns, LAN_HOST, count=3) > 0
        checked_transfer(net, c1, net.lan, LAN_HOST, 5201)
        assert mesh_rx(net, r3)["r1"] > SIZE  # c1's data reached r3 over the mesh
        assert mesh_rx(net, r1)["r2"] < SIZE // 8
    except BaseException:
        print(net.logs())
        raise
    finally:
        net.stop_all()


# --- d: a stock WireGuard peer of r2, from `gtun peer add --relay r2` ---------------------


def test_stock_peer_added_at_r1_joins_through_r2(lab: Lab, tmp_path: Path, pg_dsn: str) -> None:
    missing = [t for t in ("wireguard-go", "wg") if shutil.which(t) is None]
    assert not missing, f"needs {missing} (apt install wireguard-go wireguard-tools)"
    net = three_relays(lab, tmp_path, pg_dsn, {"c1": "r1", "c3": "r3"})
    c1, c3 = net.clients
    r1, r2, r3 = net.relays
    phone = lab.add_ns("phone")
    lab.veth(net.wan, "wp", f"10.{UNDERLAY}.200.1/24", phone, "up0", f"10.{UNDERLAY}.200.2/24")
    phone.add_route("default", f"10.{UNDERLAY}.200.1")
    ifname = f"wgmd{secrets.token_hex(2)}"
    wg: subprocess.Popen[bytes] | None = None
    wg_log = tmp_path / "wireguard-go.log"
    try:
        net.start_relays()
        for c in (c1, c3):
            net.start_client(c)
        a1, a3 = net.wait_configured(c1), net.wait_configured(c3)
        net.wait_presence(c1, r1)
        net.wait_presence(c3, r3)

        conf = tmp_path / "phone.conf"
        started = time.monotonic()
        added = run_gtun(
            r1.ns, "peer", "add", "phone", "-c", str(r1.config), "--relay", "r2", "-o", str(conf)
        )
        assert added.returncode == 0, added.stderr
        print(f"gtun peer add --relay r2 took {time.monotonic() - started:.2f} s")
        text = conf.read_text()
        _, iface, allowed = split_wg_quick(text)
        assert f"PublicKey = {r2.public}" in text, text
        assert f"Endpoint = {r2.underlay}:{PORT}" in text, text
        assert "10.66.0.0/24" in allowed, text

        wg = start_wireguard_go(phone, ifname, wg_log)
        apply_wg_quick(phone, ifname, text, tmp_path / "phone.setconf")

        def joined() -> bool:
            p = peer_at(net, r2, "phone")
            return bool(p and p["relay"] is None and p["last_handshake"] and p["rx_bytes"])

        # r2 heard of the phone through the store (NOTIFY), not from `peer add` (which
        # asked r1 to reload); the phone's PersistentKeepalive starts its handshake.
        deadline = started + JOIN_BOUND
        while not joined():
            assert time.monotonic() < deadline, f"phone did not join r2 in {JOIN_BOUND:g} s"
            time.sleep(0.05)
        join = time.monotonic() - started
        print(f"stock peer joined through r2 {join:.2f} s after `gtun peer add` started")
        assert join < JOIN_BOUND

        for address in (a1, a3):  # across the mesh: r2 -> r1, r2 -> r3
            print(f"first ping phone -> {address}: {first_ping(net, phone, address):.2f} s")
            assert net.ping(phone, address, count=3) > 0
        # r1 and r3 see the phone's session at r2; r2 holds it.
        for r in (r1, r3):
            net.wait_status(
                r,
                lambda s: any(p["name"] == "phone" and p["relay"] == "r2" for p in s["peers"]),
                5.0,
                f"{r.name} to see the phone at r2",
            )
        p = peer_at(net, r2, "phone")
        assert p is not None and p["kind"] == "wireguard" and p["relay"] is None, p
        assert str(p["endpoint"]).startswith(f"10.{UNDERLAY}.200.2:"), p
        assert iface["address"][0].split("/")[0] == p["address"], (iface, p)
        assert mesh_rx(net, r1)["r2"] > 0 and mesh_rx(net, r3)["r2"] > 0
        # Not even the phone's first packet was refused: r1 and r3 learnt where it is
        # from r2 speaking for it before the store's NOTIFY came.
        for r in (r1, r3):
            st = net.status(r)
            assert st is not None and st["drops"].get("mesh_spoofed", 0) == 0, st["drops"]
    except BaseException:
        print(net.logs())
        if wg_log.exists():
            print("--- wireguard-go\n" + "\n".join(wg_log.read_text().splitlines()[-30:]))
        raise
    finally:
        if wg is not None:
            wg.terminate()
            try:
                wg.wait(10)
            except subprocess.TimeoutExpired:
                wg.kill()
                wg.wait(5)
        (WG_RUN / f"{ifname}.sock").unlink(missing_ok=True)
        net.stop_all()
