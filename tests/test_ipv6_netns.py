"""Tier 3: IPv6 inside the tunnel, with real gtun processes in network namespaces.

A relay with `network6 = "fd66:237::/64"`, NAT on and an IPv6 LAN host behind it
(fd77:237::/64 pushed as a route; the LAN host has no route back), and two gtun
clients.  Underlay addresses 10.237.x.x; namespaces start with "gt6".

The lab is built once per transport: TRANSPORTS lists the client transports to run the
module over (add "tcp" once the TCP transport is in).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.lab.net import LAN_NET, PORT, GtunNet, Node
from gtun.lab.netns import Lab, Namespace
from labkit import add_lan6, apply_wg_quick, doctor_results, gtun_stdout, run_gtun, split_wg_quick

pytestmark = pytest.mark.netns

UNDERLAY = 237
NETWORK6 = "fd66:237::/64"
RELAY6 = "fd66:237::1"
LAN6 = "fd77:237::/64"
LAN_HOST6 = "fd77:237::10"
SUBNET6 = "fd88:237::/64"  # an IPv6 LAN behind c1 (one address on its loopback)
SUBNET_HOST6 = "fd88:237::1"
TRANSPORTS = ["udp", "tcp"]


def set_keys(path: Any, section: str, keys: dict[str, str]) -> None:
    """Add `keys` (TOML values, already quoted) at the top of `[section]`."""
    text = path.read_text()
    head = f"[{section}]\n"
    assert head in text
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    path.write_text(text.replace(head, head + lines, 1))


@pytest.fixture(scope="module", params=TRANSPORTS)
def net(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GtunNet]:
    transport = request.param
    with Lab(f"gt6{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(lab, tmp_path_factory.mktemp(f"ipv6-{transport}"), underlay=UNDERLAY)
        cfg = gnet.relay.config
        text = cfg.read_text()
        routes = f'routes = ["{LAN_NET}.0/24"]\n'
        assert routes in text
        cfg.write_text(text.replace(routes, f'routes = ["{LAN_NET}.0/24", "{LAN6}"]\n'))
        set_keys(cfg, "server", {"network6": f'"{NETWORK6}"'})
        text = cfg.read_text()
        rep = 'name = "c1"\n'
        assert text.count(rep) == 1
        cfg.write_text(text.replace(rep, f'{rep}subnets = ["{SUBNET6}"]\n'))
        gnet.clients[0].ns.run(["ip", "-6", "addr", "add", f"{SUBNET_HOST6}/128", "dev", "lo"])
        for c in gnet.clients:
            set_keys(c.config, "client", {"transport": f'"{transport}"'})
        # The LAN behind the relay speaks IPv6 too; it has no route back to network6,
        # so only the relay's NAT (masquerade) lets its replies find the clients.
        add_lan6(gnet, "fd77:237::1", LAN_HOST6)
        gnet.start_all()
        for c in gnet.clients:
            st = gnet.status(c)
            assert st is not None and st["address6"], st
            c.extra["address6"] = st["address6"].split("/")[0]
        yield gnet


def ping6(net: GtunNet, ns: Namespace, address: str, *extra: str, count: int = 3) -> None:
    out = ns.run(
        ["ping", "-6", "-n", "-c", str(count), "-i", "0.2", "-W", "2", *extra, address],
        check=False,
        timeout=30,
    )
    if out.returncode != 0:
        logs = "\n".join(net.log_tail(n) for n in (net.relay, *net.clients))
        raise AssertionError(f"ping -6 {address} from {ns.name} failed:\n{out.stdout}{logs}")


def relay_status(net: GtunNet) -> dict[str, Any]:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return st


def test_clients_ping_each_other_and_the_relay_over_ipv6(net: GtunNet) -> None:
    c1, c2 = net.clients
    assert c1.extra["address6"] != c2.extra["address6"]
    # The same host number as the IPv4 lease.
    for c in (c1, c2):
        assert c.extra["address6"] == "fd66:237::" + c.extra["address"].split(".")[-1]
    ping6(net, c1.ns, c2.extra["address6"])
    ping6(net, c2.ns, c1.extra["address6"])
    ping6(net, c1.ns, RELAY6)
    ping6(net, c2.ns, RELAY6)


def test_ipv6_subnet_behind_a_client(net: GtunNet) -> None:
    c1, c2 = net.clients
    # The relay routes the subnet into its TUN, and pushes it to the other client.
    assert SUBNET6 in net.relay.ns.run(["ip", "-6", "route", "show", "dev", "gtun0"]).stdout
    st = net.status(c2)
    assert st is not None and SUBNET6 in st["routes"]
    ping6(net, c2.ns, SUBNET_HOST6)  # client to the LAN behind another client
    ping6(net, net.relay.ns, SUBNET_HOST6)  # the relay's host, by its kernel route


def test_ipv6_lan_behind_the_relay_through_nat(net: GtunNet) -> None:
    assert net.lan is not None
    routes = net.lan.run(["ip", "-6", "route"]).stdout
    assert "fd66" not in routes and "default" not in routes
    ping6(net, net.clients[0].ns, LAN_HOST6)
    # IPv4 still works beside it.
    net.ping(net.clients[0].ns, f"{LAN_NET}.10")


def test_client_device_has_ipv6_address_and_routes(net: GtunNet) -> None:
    c1 = net.clients[0]
    st = net.status(c1)
    assert st is not None
    assert st["address6"] == f"{c1.extra['address6']}/64"
    assert LAN6 in st["routes"]
    assert st["peers"][0]["address6"] == RELAY6
    link = json.loads(c1.ns.run(["ip", "-j", "-6", "addr", "show", "dev", "gtun0"]).stdout)[0]
    assert any(
        a["local"] == c1.extra["address6"] and a["prefixlen"] == 64 for a in link["addr_info"]
    )
    routes6 = c1.ns.run(["ip", "-6", "route", "show", "dev", "gtun0"]).stdout
    assert LAN6 in routes6 and "fd66:237::/64" in routes6
    relay_addrs = net.relay.ns.run(["ip", "-6", "addr", "show", "dev", "gtun0"]).stdout
    assert f"{RELAY6}/64" in relay_addrs
    nft = net.relay.ns.run(["nft", "list", "table", "inet", "gtun_gtun0"]).stdout
    assert "fd66:237::/64" in nft and "masquerade" in nft


def test_spoofed_ipv6_source_is_dropped_and_counted(net: GtunNet) -> None:
    c1, c2 = net.clients
    before = relay_status(net)["drops"]["spoofed"]
    # A second address on c1's device that the relay never gave it: the kernel sends
    # from it as asked, and the relay must refuse to forward what claims it.
    fake = "fd66:237::99"
    c1.ns.run(["ip", "-6", "addr", "add", f"{fake}/128", "dev", "gtun0", "nodad"])
    try:
        c1.ns.run(
            [
                "ping",
                "-6",
                "-n",
                "-c",
                "5",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                fake,
                c2.extra["address6"],
            ],
            check=False,
            timeout=30,
        )
    finally:
        c1.ns.run(["ip", "-6", "addr", "del", f"{fake}/128", "dev", "gtun0"])
    deadline = time.monotonic() + 10
    while relay_status(net)["drops"]["spoofed"] < before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    st = relay_status(net)
    assert st["drops"]["spoofed"] == before + 5
    c1_status = next(p for p in st["peers"] if p["name"] == "c1")
    assert c1_status["drops"].get("spoofed", 0) >= 5
    ping6(net, c1.ns, c2.extra["address6"])  # its real address still works


def test_status_shows_ipv6_addresses(net: GtunNet) -> None:
    def gtun_status(node: Node, *args: str) -> str:
        out = run_gtun(node.ns, "status", *args, "-s", str(node.socket))
        assert out.returncode == 0, out.stderr
        return out.stdout

    st = json.loads(gtun_status(net.relay, "--json"))
    assert st["address6"] == f"{RELAY6}/64"
    peers = {p["name"]: p for p in st["peers"]}
    for c in net.clients:
        assert peers[c.name]["address6"] == c.extra["address6"]
    table = gtun_status(net.relay)
    assert f"{RELAY6}/64" in table.splitlines()[0]
    for c in net.clients:
        assert f"{c.extra['address']}, {c.extra['address6']}" in table
    client_table = gtun_status(net.clients[0])
    assert f"{net.clients[0].extra['address6']}/64" in client_table.splitlines()[0]


def test_doctor_checks_the_ipv6_addresses(net: GtunNet) -> None:
    for node in (net.relay, net.clients[0]):
        _, checks = doctor_results(node.ns, node.config)
        assert checks["address6"]["ok"], checks
    # Take c1's IPv6 address away: doctor names it, with the command that puts it back.
    c1 = net.clients[0]
    want = f"{c1.extra['address6']}/64"
    c1.ns.run(["ip", "-6", "addr", "del", want, "dev", "gtun0"])
    try:
        code, checks = doctor_results(c1.ns, c1.config)
        assert code == 1
        assert not checks["address6"]["ok"]
        assert checks["address6"]["fix"] == f"ip addr add {want} dev gtun0"
    finally:
        c1.ns.run(["ip", "-6", "addr", "add", want, "dev", "gtun0", "nodad"], check=False)


STOCK_SOCKETS = Path("/var/run/wireguard")


def test_stock_wireguard_peer_gets_ipv6_from_peer_add(net: GtunNet, tmp_path: Path) -> None:
    """wireguard-go, configured from `gtun peer add` as wg-quick would, talks IPv6."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            pytest.fail(f"this test needs {tool} (apt install wireguard-go wireguard-tools)")
    ns = net.lab.add_ns("wg")
    net.lab.veth(
        net.relay.ns, "rwg", f"10.{UNDERLAY}.200.1/24", ns, "up0", f"10.{UNDERLAY}.200.2/24"
    )
    conf = gtun_stdout(
        net.relay.ns,
        *("peer", "add", "stock", "-c", str(net.relay.config)),
        *("--endpoint", f"10.{UNDERLAY}.200.1:{PORT}"),
    )
    _, iface, allowed = split_wg_quick(conf)
    addresses = iface["address"]
    assert len(addresses) == 2 and addresses[1].startswith("fd66:237::"), conf
    assert NETWORK6 in allowed and LAN6 in allowed, conf
    stock6 = addresses[1].split("/")[0]

    ifname = f"gt6{secrets.token_hex(2)}"
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    ns.spawn(["wireguard-go", "-f", ifname], log_path=tmp_path / "wireguard-go.log", env=env)
    sock = STOCK_SOCKETS / f"{ifname}.sock"
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, (tmp_path / "wireguard-go.log").read_text()
            time.sleep(0.05)
        apply_wg_quick(ns, ifname, conf, tmp_path / "stock.conf")

        st = relay_status(net)
        stock = next(p for p in st["peers"] if p["name"] == "stock")
        assert stock["address6"] == stock6
        c1 = net.clients[0]
        ping6(net, ns, RELAY6, count=2)
        ping6(net, ns, c1.extra["address6"], count=2)
        ping6(net, c1.ns, stock6, count=2)
    finally:
        sock.unlink(missing_ok=True)


def test_client_exit_removes_ipv6_configuration(net: GtunNet) -> None:
    c2: Node = net.clients[1]
    assert net.stop(c2) == 0
    assert "gtun0" not in c2.ns.run(["ip", "-o", "link"]).stdout
    assert "fd77:237" not in c2.ns.run(["ip", "-6", "route"]).stdout
    assert "fd66:237" not in c2.ns.run(["ip", "-6", "addr"]).stdout
