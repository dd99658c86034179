"""Conformance tier, gtun's own additions and the paths a real network puts in the way:

    test_tap_*            a TAP relay: the pushed configuration (address, routes, MTU,
                          DNS) applied, ARP and ping across, counters per frame
    test_nat_keepalive_*  a gtun client and stock wireguard-go peers behind one
                          masquerading router whose UDP conntrack entries expire after
                          CONNTRACK_TIMEOUT s: those that keep the mapping alive stay
                          reachable from the relay's side, the one without keepalives not
    test_full_tunnel_*    default_route = true: an outside address is reached through the
                          relay, and nothing leaks on the underlay once the relay is gone

Underlay 10.248.0.0/16 (TAP) and 10.249.0.0/16 (the others, each its own lab), tunnels
10.68.0.0/24 and 10.69.0.0/24, namespaces "gtk...".
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtun.lab.net import PORT, GtunNet
from gtun.lab.netns import Lab, Namespace
from labkit import (
    apply_wg_quick,
    gtun_stdout,
    missing_tools,
    ping_count,
    relay_peer,
    set_config_keys,
    start_wireguard_go,
    transport_size,
)

pytestmark = pytest.mark.netns

WG_RUN = Path("/var/run/wireguard")


@pytest.fixture
def lab_prefix() -> str:
    return "gtk"


# --- TAP and the configuration push ----------------------------------------------------------

TAP_NET = "10.68.0.0/24"
TAP_ROUTE = "192.168.248.0/24"
TAP_DNS = "10.68.0.53"
TAP_MTU = 1380


@pytest.fixture(scope="module")
def tapnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtk{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab,
            tmp_path_factory.mktemp("tap"),
            clients=2,
            underlay=248,
            network=TAP_NET,
            lan=False,
            nat=False,
            mode="tap",
        )
        set_config_keys(
            gnet.relay.config,
            "server",
            {"mtu": str(TAP_MTU), "dns": f'["{TAP_DNS}"]', "routes": f'["{TAP_ROUTE}"]'},
        )
        # GtunNet wrote its own `routes = []`: a key twice is an error in TOML.
        text = gnet.relay.config.read_text().replace("routes = []\n", "", 1)
        gnet.relay.config.write_text(text)
        # The counters test counts exactly the echoes: no path MTU probes in between.
        for c in gnet.clients:
            set_config_keys(c.config, "client", {"pmtu": "false"})
        gnet.start_all(timeout=30)
        yield gnet


def test_tap_pushed_configuration_is_applied(tapnet: GtunNet) -> None:
    """Each client's device is a TAP with the pushed address and MTU, the pushed route
    goes through the relay's address, and status reports the pushed DNS."""
    for c in tapnet.clients:
        st = tapnet.status(c)
        assert st is not None and st["mode"] == "tap", st
        assert st["mtu"] == TAP_MTU and st["dns"] == [TAP_DNS], st
        assert st["routes"] == [TAP_ROUTE], st
        link = json.loads(c.ns.run(["ip", "-d", "-j", "addr", "show", "gtun0"]).stdout)[0]
        assert link["linkinfo"]["info_data"]["type"] == "tap", link
        assert link["mtu"] == TAP_MTU, link
        assert f"{c.extra['address']}/24" in [
            f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]
        ], link
        routes = c.ns.run(["ip", "route"]).stdout
        assert f"{TAP_ROUTE} via 10.68.0.1 dev gtun0" in routes, routes


def test_tap_arp_ping_and_counters(tapnet: GtunNet) -> None:
    """c1 resolves c2 by ARP and pings it; the relay counts for c1 exactly the echoes,
    each a frame (14-byte Ethernet header) in one datagram."""
    c1, c2 = tapnet.clients
    assert ping_count(c1.ns, c2.extra["address"], 2) == 2
    neigh = json.loads(c1.ns.run(["ip", "-j", "neigh", "show", "dev", "gtun0"]).stdout)
    mac = json.loads(c2.ns.run(["ip", "-j", "link", "show", "gtun0"]).stdout)[0]["address"]
    assert {n["dst"]: n.get("lladdr") for n in neigh}.get(c2.extra["address"]) == mac, neigh
    before = relay_peer(tapnet, "c1")
    pings, size = 20, 1000
    assert ping_count(c1.ns, c2.extra["address"], pings, "-s", str(size)) == pings
    time.sleep(0.5)
    after = relay_peer(tapnet, "c1")
    per_ping = transport_size(14 + 20 + 8 + size)
    rx_packets = int(after["rx_packets"]) - int(before["rx_packets"])
    rx_bytes = int(after["rx_bytes"]) - int(before["rx_bytes"])
    assert pings <= rx_packets <= pings + 4, (before, after)
    assert pings * per_ping <= rx_bytes <= pings * per_ping + 4 * 128, (before, after)


# --- NAT with keepalives against conntrack expiry --------------------------------------------

NAT_UNDERLAY = 249
CONNTRACK_TIMEOUT = 12  # s; the gtun client pings every 10 s (core.client.PING_INTERVAL)
STOCK_KEEPALIVE = 5  # s, the stock peer's PersistentKeepalive here
PASSIVE_KEEPALIVE = 10  # s: WireGuard's answer to data when it has nothing to send
MASQUERADE = """
table ip gtknat {
    chain post {
        type nat hook postrouting priority 100; policy accept;
        oifname "wan0" masquerade
    }
}
"""


def test_nat_keepalive_keeps_peers_reachable(lab: Lab, tmp_path: Path) -> None:
    """A gtun client and two wireguard-go peers sit behind a masquerading router whose
    UDP mappings expire after CONNTRACK_TIMEOUT s; one stock peer has PersistentKeepalive,
    the other none.  After a silence longer than WireGuard's passive keepalive plus the
    timeout, the relay's side still reaches the gtun client (its in-tunnel pings) and the
    keepalive peer, and no longer the other: without keepalives the mapping is gone, so
    the expiry the first two survived was real."""
    if missing := missing_tools("wireguard-go", "wg"):
        pytest.fail(f"needs {missing} (apt install wireguard-go wireguard-tools)")
    u = NAT_UNDERLAY
    net = GtunNet(lab, tmp_path, clients=1, underlay=u, network="10.69.0.0/24", lan=False)
    relay, c1 = net.relay, net.clients[0]
    router = lab.add_ns("nat")
    lab.veth(relay.ns, "rnat", f"10.{u}.50.1/24", router, "wan0", f"10.{u}.50.2/24")
    # c1 leaves its direct link and goes through the router; so do the stock peers.
    c1.ns.run(["ip", "link", "del", "up0"])
    lab.veth(router, "lan0", f"10.{u}.60.1/24", c1.ns, "up0", f"10.{u}.60.2/24")
    c1.ns.add_route("default", f"10.{u}.60.1")
    stock: dict[str, Namespace] = {}
    for i, name in enumerate(("wgk", "wgn"), start=1):
        stock[name] = lab.add_ns(name)
        lab.veth(router, f"lan{i}", f"10.{u}.6{i}.1/24", stock[name], "up0", f"10.{u}.6{i}.2/24")
        stock[name].add_route("default", f"10.{u}.6{i}.1")
    router.sysctl("net.ipv4.ip_forward", 1)
    router.run(["nft", "-f", "-"], input=MASQUERADE)
    router.run(["ip", "route", "add", "default", "via", f"10.{u}.50.1"])
    router.sysctl("net.netfilter.nf_conntrack_udp_timeout", CONNTRACK_TIMEOUT)
    router.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", CONNTRACK_TIMEOUT)
    endpoint = f"10.{u}.50.1:{PORT}"
    c1.config.write_text(c1.config.read_text().replace(f"{c1.underlay}:{PORT}", endpoint))

    net.start_relay()
    net.start_client(c1)
    address = net.wait_configured(c1, timeout=30)
    procs, ifnames, addresses = [], [], {"c1": address}
    try:
        for name, ns in stock.items():
            conf = gtun_stdout(
                relay.ns, "peer", "add", name, "-c", str(relay.config), "--endpoint", endpoint
            )
            keepalive = f"PersistentKeepalive = {STOCK_KEEPALIVE}\n" if name == "wgk" else ""
            conf = re.sub(r"PersistentKeepalive = \d+\n", keepalive, conf)
            ifnames.append(f"{name}{secrets.token_hex(2)}")
            procs.append(start_wireguard_go(ns, ifnames[-1], tmp_path / f"{name}.log"))
            apply_wg_quick(ns, ifnames[-1], conf, tmp_path / f"{name}.conf")
            assert ping_count(ns, "10.69.0.1", 1, deadline=10) == 1, name
            addresses[name] = str(relay_peer(net, name)["address"])
        assert ping_count(c1.ns, "10.69.0.1", 1) == 1
        for name in addresses:  # all seen from the router's outside address
            assert str(relay_peer(net, name)["endpoint"]).startswith(f"10.{u}.50.2:"), name
        time.sleep(PASSIVE_KEEPALIVE + CONNTRACK_TIMEOUT + 4)
        # From the relay's side first: only a live mapping brings these back.
        assert ping_count(relay.ns, addresses["c1"], 2, deadline=3) == 2, net.log_tail(c1)
        assert ping_count(relay.ns, addresses["wgk"], 2, deadline=3) == 2
        assert ping_count(relay.ns, addresses["wgn"], 2, deadline=3) == 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for ifname in ifnames:
            (WG_RUN / f"{ifname}.sock").unlink(missing_ok=True)


# --- the full tunnel ------------------------------------------------------------------------

OUTSIDE = "198.51.100.10"  # on the LAN host's loopback: "the internet" behind the relay
LEAK = """
table ip gtkleak {
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname "rc1" ip daddr %s counter
    }
}
"""


def leak_count(ns: Namespace) -> int:
    out = ns.run(["nft", "list", "table", "ip", "gtkleak"]).stdout
    got = re.search(r"counter packets (\d+)", out)
    assert got, out
    return int(got.group(1))


def test_full_tunnel_goes_through_the_relay_and_does_not_leak(lab: Lab, tmp_path: Path) -> None:
    """With default_route = true, c1 reaches an outside address through the tunnel
    (none of it crosses the underlay in the clear); once the relay is gone, c1's pings
    to it fail and still nothing goes out on the underlay."""
    net = GtunNet(lab, tmp_path, clients=1, underlay=NAT_UNDERLAY, network="10.69.0.0/24")
    relay, c1 = net.relay, net.clients[0]
    assert net.lan is not None
    net.lan.run(["ip", "addr", "add", f"{OUTSIDE}/32", "dev", "lo"])
    relay.ns.run(["ip", "route", "add", f"{OUTSIDE}/32", "via", "192.168.77.10"])
    # The client's own way out is the underlay: what the full tunnel must override.
    c1.ns.add_route("default", c1.underlay)
    relay.ns.run(["nft", "-f", "-"], input=LEAK % OUTSIDE)
    with c1.config.open("a") as f:
        f.write("default_route = true\n")
    net.start_all([c1], timeout=30)
    ctx = lambda: net.log_tail(c1) + "\n" + net.log_tail(relay)  # noqa: E731
    st = net.status(c1)
    assert st is not None and st["full_tunnel"], st
    assert ping_count(c1.ns, OUTSIDE, 3) == 3, ctx()
    assert leak_count(relay.ns) == 0
    assert int(relay_peer(net, "c1")["rx_packets"]) >= 3

    assert net.stop(relay) == 0
    assert ping_count(c1.ns, OUTSIDE, 3, deadline=3) == 0, ctx()
    assert leak_count(relay.ns) == 0, ctx()
    assert c1.proc is not None and c1.proc.poll() is None, ctx()
