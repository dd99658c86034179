"""Tier 3: the data path as a whole moves every byte, unchanged (issue 4's CI tests).

One lab for the module: a relay with `network6`, NAT and a LAN host behind it (IPv4 and
IPv6), three gtun clients -- c1 and c2 over UDP, c3 over TCP; c2 runs with
`offload = false`, so every path to and from it takes the fallback of a device without
offloads -- and a stock wireguard-go peer configured from `gtun peer add`.  Every
namespace runs a labkit XferServer; each TCP stream carries random bytes and is
checked end to end with SHA-256 and its length, in both directions, over IPv4 and IPv6
inside the tunnel:

    client -> relay over UDP (c1) and over TCP (c3)
    client -> client through the relay, UDP <-> UDP (c1, c2) and UDP <-> TCP (c1, c3)
    client -> the LAN host behind the relay, through its NAT (c1, c3)
    several streams at once through the relay, interleaved
    wireguard-go -> the relay and -> a gtun client

Beside them: pings across the MTU boundary (DF set) and far past it (fragmented), and UDP
datagrams from 1 byte to 60000 echoed back byte for byte.  Last, the drop counters of the
relay and the clients: none of the reasons that mean a packet was lost or damaged.

Namespaces start with "gtx"; underlay 10.242.x.x, overlay 10.242.66.0/24 and
fd66:242::/64; wireguard-go interfaces are "gtx" + 4 random hex digits.

Each stream is 16 MiB (8 MiB when six run at once); GTUN_DATAPATH_MIB sets another size.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.lab.net import LAN_NET, PORT, GtunNet, Node
from gtun.lab.netns import Lab, Namespace
from labkit import (
    XferJob,
    XferResult,
    add_lan6,
    apply_wg_quick,
    gtun_stdout,
    ping_sizes,
    run_xfers,
    set_config_keys,
    split_wg_quick,
    start_xfer_server,
    udp_echo,
)

pytestmark = pytest.mark.netns

UNDERLAY = 242
NETWORK = "10.242.66.0/24"
RELAY4 = "10.242.66.1"
NETWORK6 = "fd66:242::/64"
RELAY6 = "fd66:242::1"
LAN6 = "fd77:242::/64"
LAN_HOST4 = f"{LAN_NET}.10"
LAN_HOST6 = "fd77:242::10"
WG_RUN = Path("/var/run/wireguard")

MiB = 1 << 20
# Per stream on each path, and with the stock peer; GTUN_DATAPATH_MIB=1024 runs the
# issue's 1 GB check with these same tests (minutes, not seconds).
SIZE = int(os.environ.get("GTUN_DATAPATH_MIB", "16")) * MiB
STOCK_SIZE = SIZE
PARALLEL_SIZE = SIZE // 2  # per stream when several run at once, and TCP client <-> stock
FAMILIES = ["ipv4", "ipv6"]

# Drop reasons that mean a packet was lost or damaged on a path that should carry all of
# it: wrong keys, corruption, replays or reordering past the window, packets misrouted or
# refused, TCP frames out of step.  Not in the list: "queue_full" (a bounded queue under
# a burst: TCP resends, and the checksums show nothing was lost) and "link_scoped" (the
# kernel's own IPv6 link-local chatter on a TUN, never routed).
INTEGRITY_DROPS = (
    "malformed",
    "mac1",
    "handshake",
    "unknown_index",
    "decrypt",
    "replay",
    "expired",
    "no_endpoint",
    "staged_overflow",
    "bad_bulk",
    "bad_gso",
    "spoofed",
    "no_route",
    "loop",
    "not_ip",
    "not_configured",
    "not_frame",
    "tcp_bad_frame",
    "tcp_stalled",
    "tcp_timeout",
)


class Stock:
    """The wireguard-go peer: its namespace, interface and tunnel addresses."""

    def __init__(self, ns: Namespace, ifname: str, address4: str, address6: str) -> None:
        self.ns, self.ifname = ns, ifname
        self.address = {"ipv4": address4, "ipv6": address6}


def start_stock_peer(net: GtunNet, workdir: Path, ifname: str) -> Stock:
    """wireguard-go (interface `ifname`) in its own namespace, configured from `gtun peer
    add` the way wg-quick would apply it (as in test_interop)."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            pytest.fail(f"this test needs {tool} (apt install wireguard-go wireguard-tools)")
    ns = net.lab.add_ns("wg")
    relay_ip = f"10.{UNDERLAY}.200.1"
    net.lab.veth(net.relay.ns, "rwg", f"{relay_ip}/24", ns, "up0", f"10.{UNDERLAY}.200.2/24")
    conf = gtun_stdout(
        net.relay.ns,
        *("peer", "add", "stock", "-c", str(net.relay.config)),
        *("--endpoint", f"{relay_ip}:{PORT}"),
    )
    addresses = split_wg_quick(conf)[1]["address"]
    assert len(addresses) == 2 and addresses[1].startswith("fd66:242::"), conf
    log = workdir / "wireguard-go.log"
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    proc = ns.spawn(["wireguard-go", "-f", ifname], log_path=log, env=env)
    sock = WG_RUN / f"{ifname}.sock"
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    apply_wg_quick(ns, ifname, conf, workdir / "stock.conf")
    return Stock(ns, ifname, addresses[0].split("/")[0], addresses[1].split("/")[0])


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    workdir = tmp_path_factory.mktemp("datapath")
    stock_ifname = f"gtx{secrets.token_hex(2)}"
    with Lab(f"gtx{secrets.token_hex(2)}") as lab:
        try:
            yield build_net(lab, workdir, stock_ifname)
        finally:
            lab.cleanup()
            (WG_RUN / f"{stock_ifname}.sock").unlink(missing_ok=True)


def build_net(lab: Lab, workdir: Path, stock_ifname: str) -> GtunNet:
    """The module's lab, running, with an XferServer in every namespace."""
    gnet = GtunNet(lab, workdir, clients=3, underlay=UNDERLAY, network=NETWORK)
    cfg = gnet.relay.config
    routes = f'routes = ["{LAN_NET}.0/24"]\n'
    assert routes in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(routes, f'routes = ["{LAN_NET}.0/24", "{LAN6}"]\n'))
    set_config_keys(cfg, "server", {"network6": f'"{NETWORK6}"'})
    c1, c2, c3 = gnet.clients
    for c, transport in ((c1, "udp"), (c2, "udp"), (c3, "tcp")):
        gnet.set_transport(c, transport)
    set_config_keys(c2.config, "client", {"offload": "false"})
    # The LAN host has no route back to the virtual networks: its replies find the
    # clients only through the relay's NAT (masquerade), IPv4 and IPv6.
    add_lan6(gnet, "fd77:242::1", LAN_HOST6)
    gnet.start_all()
    for c in gnet.clients:
        st = gnet.status(c)
        assert st is not None and st["address6"], st
        c.extra["ipv4"] = c.extra["address"]
        c.extra["ipv6"] = st["address6"].split("/")[0]
    # Each client on the transport its paths are named for.
    relay_st = gnet.status(gnet.relay)
    assert relay_st is not None
    transports = {p["name"]: p["transport"] for p in relay_st["peers"]}
    assert transports == {"c1": "udp", "c2": "udp", "c3": "tcp"}, transports
    stock = start_stock_peer(gnet, workdir, stock_ifname)
    gnet.relay.extra["stock"] = stock
    for ns in (gnet.relay.ns, gnet.lan, stock.ns, *(c.ns for c in gnet.clients)):
        start_xfer_server(ns, workdir / f"xfer-{ns.name}.log")
    return gnet


# --- helpers -------------------------------------------------------------------------


def context(net: GtunNet) -> str:
    parts = []
    for node in (net.relay, *net.clients):
        st = net.status(node)
        drops = {k: v for k, v in st["drops"].items() if v} if st else "no status"
        parts.append(f"--- {node.name} (drops {drops})\n{net.log_tail(node, 10)}")
    return "\n".join(parts)


def client_address(node: Node, family: str) -> str:
    return str(node.extra[family])


def relay_address(family: str) -> str:
    return RELAY4 if family == "ipv4" else RELAY6


def check(net: GtunNet, results: list[XferResult], what: str) -> None:
    report = "\n".join(f"  {r}" for r in results)
    print(f"{what}:\n{report}")
    assert all(r.ok for r in results), f"{what}:\n{report}\n{context(net)}"


def both_ways(net: GtunNet, ns: Namespace, address: str, size: int, what: str) -> None:
    """One stream up, then one down, from `ns` to the XferServer at `address`."""
    started = time.monotonic()
    results = [
        *run_xfers(ns, [XferJob(address, "up", size)]),
        *run_xfers(ns, [XferJob(address, "down", size)]),
    ]
    check(net, results, f"{what} ({time.monotonic() - started:.2f} s)")


def drops_of(st: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in st["drops"].items() if v}


# --- checked transfers over each path ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_client_to_relay_over_udp(net: GtunNet, family: str) -> None:
    c1 = net.clients[0]
    both_ways(net, c1.ns, relay_address(family), SIZE, f"c1 (udp) <-> relay, {family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_client_to_relay_over_tcp(net: GtunNet, family: str) -> None:
    c3 = net.clients[2]
    both_ways(net, c3.ns, relay_address(family), SIZE, f"c3 (tcp) <-> relay, {family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_client_to_client_udp_udp(net: GtunNet, family: str) -> None:
    c1, c2, _ = net.clients
    both_ways(net, c1.ns, client_address(c2, family), SIZE, f"c1 (udp) <-> c2 (udp), {family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_client_to_client_udp_tcp(net: GtunNet, family: str) -> None:
    c1, _, c3 = net.clients
    both_ways(net, c1.ns, client_address(c3, family), SIZE, f"c1 (udp) <-> c3 (tcp), {family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_client_to_lan_through_nat(net: GtunNet, family: str) -> None:
    assert net.lan is not None
    lan = LAN_HOST4 if family == "ipv4" else LAN_HOST6
    routes = net.lan.run(["ip", "-6" if family == "ipv6" else "-4", "route"]).stdout
    assert "fd66" not in routes and "10.242.66" not in routes and "default" not in routes
    c1 = net.clients[0]
    both_ways(net, c1.ns, lan, SIZE, f"c1 (udp) <-> LAN host, {family}")


def test_parallel_streams_through_the_relay(net: GtunNet) -> None:
    """Four streams at once from c1, interleaved in the relay: to c2 and c3, up and down,
    IPv4 and IPv6; and two more from c3 (TCP) to the LAN host through NAT at the same
    time."""
    c1, c2, c3 = net.clients
    jobs = [
        XferJob(client_address(c2, "ipv4"), "up", PARALLEL_SIZE),
        XferJob(client_address(c2, "ipv6"), "down", PARALLEL_SIZE),
        XferJob(client_address(c3, "ipv6"), "up", PARALLEL_SIZE),
        XferJob(client_address(c3, "ipv4"), "down", PARALLEL_SIZE),
    ]
    assert net.lan is not None
    started = time.monotonic()
    side: list[XferResult] = []
    lan_jobs = [XferJob(LAN_HOST4, "up", PARALLEL_SIZE), XferJob(LAN_HOST6, "down", PARALLEL_SIZE)]
    t = threading.Thread(target=lambda: side.extend(run_xfers(c3.ns, lan_jobs)))
    t.start()
    results = run_xfers(c1.ns, jobs)
    t.join(150)
    check(net, results + side, f"6 parallel streams ({time.monotonic() - started:.2f} s)")
    assert len(side) == len(lan_jobs)


# --- small and odd packets -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pings_across_the_mtu(net: GtunNet, family: str) -> None:
    """DF pings up to the tunnel MTU exactly, and pings far past it that fragment, to the
    relay, to another client (each transport) and to the LAN host."""
    c1, c2, c3 = net.clients
    mtu = int(json.loads(c1.ns.run(["ip", "-j", "link", "show", "gtun0"]).stdout)[0]["mtu"])
    header = 28 if family == "ipv4" else 48  # IP + ICMP headers
    fits = mtu - header
    df_sizes = [0, 1, 56, fits - 100, fits - 1, fits]
    frag_sizes = [fits + 1, 1500, 3000, 9000, 30000]
    lan = LAN_HOST4 if family == "ipv4" else LAN_HOST6
    started = time.monotonic()
    bad: dict[str, Any] = {}
    for src, dst in (
        (c1, relay_address(family)),
        (c1, client_address(c2, family)),
        (c1, client_address(c3, family)),
        (c3, client_address(c2, family)),
        (c2, lan),
    ):
        # Prime path MTU discovery first: a reply bigger than the tunnel MTU, sent by a
        # host beyond the relay (the LAN host's link has MTU 1500), is refused with ICMP
        # "too big" (IPv6 routers never fragment) and lost, as on any router.
        ping_sizes(src.ns, dst, [fits + 30, frag_sizes[-1]], df=False, count=1, deadline=1)
        for df, sizes in ((True, df_sizes), (False, frag_sizes)):
            got = ping_sizes(src.ns, dst, sizes, df=df)
            missing = [s for s, line in got.items() if not line]
            if missing:
                bad[f"{src.name} -> {dst} df={df}"] = missing
    print(f"pings {family}: {time.monotonic() - started:.2f} s")
    assert not bad, f"no (or wrong) replies for ICMP payload sizes {bad}\n{context(net)}"
    # Past the MTU with DF set, the sender itself refuses: the tunnel never sees it.
    over = ping_sizes(c1.ns, relay_address(family), [fits + 1], df=True, count=1, deadline=1)
    assert over[fits + 1] == ""


UDP_SIZES = [1, 2, 15, 16, 17, 100, 512, 1000, 1300, 1371, 1372, 1373, 1392, 1393, 1420,
             1472, 1500, 2000, 4000, 8192, 16384, 32768, 60000]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_datagrams_echo_unchanged(net: GtunNet, family: str) -> None:
    c1, c2, c3 = net.clients
    assert net.lan is not None
    lan = LAN_HOST4 if family == "ipv4" else LAN_HOST6
    started = time.monotonic()
    failed: dict[str, Any] = {}
    retried: dict[str, Any] = {}
    for src, dst in (
        (c1, relay_address(family)),
        (c1, client_address(c2, family)),
        (c3, client_address(c1, family)),
        (c2, lan),
    ):
        # Prime path MTU discovery (see the pings above): a reply past the tunnel MTU
        # but within the LAN's, sent with DF, is refused once with ICMP "too big".
        udp_echo(src.ns, dst, [1450], tries=1)
        attempts, wrong = udp_echo(src.ns, dst, UDP_SIZES)
        key = f"{src.name} -> {dst}"
        if wrong or not all(attempts.values()):
            failed[key] = {"no echo": [s for s, a in attempts.items() if not a], "wrong": wrong}
        if any(a > 1 for a in attempts.values()):
            retried[key] = {s: a for s, a in attempts.items() if a > 1}
    print(f"udp echo {family}: {time.monotonic() - started:.2f} s, retried {retried}")
    assert not failed, f"UDP datagrams not echoed unchanged: {failed}\n{context(net)}"


# --- a stock wireguard-go peer --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_wireguard_go_transfers(net: GtunNet, family: str) -> None:
    stock: Stock = net.relay.extra["stock"]
    c1, _, c3 = net.clients
    relay, to_c1 = relay_address(family), client_address(c1, family)
    both_ways(net, stock.ns, relay, STOCK_SIZE, f"wireguard-go <-> relay, {family}")
    both_ways(net, stock.ns, to_c1, STOCK_SIZE, f"wireguard-go <-> c1 (udp), {family}")
    # From a TCP client: whatever the relay gets over TCP (bulk frames between gtun nodes)
    # must reach the stock peer as packets it accepts.
    to_stock = stock.address[family]
    both_ways(net, c3.ns, to_stock, PARALLEL_SIZE, f"c3 (tcp) <-> wireguard-go, {family}")
    # The relay saw the stock peer as a stock peer, with no drops of its own.
    st = net.status(net.relay)
    assert st is not None
    peer = next(p for p in st["peers"] if p["name"] == "stock")
    assert peer["kind"] == "wireguard" and peer["rx_bytes"] > 2 * STOCK_SIZE + PARALLEL_SIZE, peer
    assert not any(peer["drops"].values()), peer


# --- the batching was really at work ---------------------------------------------------


def test_offloads_and_batches_were_used(net: GtunNet) -> None:
    """The transfers above went through the fast path where it was granted: TCP
    super-packets read from the TUNs and written to them, UDP GSO sends and GRO reads,
    bulk frames over TCP (the TCP client writes super-packets that came whole); and
    through the fallback on c2 (offload = false), which used none of them."""
    dp = {}
    for node in (net.relay, *net.clients):
        st = net.status(node)
        assert st is not None and st["datapath"] is not None, st
        dp[node.name] = st["datapath"]
    relay, c1, c2, c3 = dp["relay"], dp["c1"], dp["c2"], dp["c3"]
    for d in (relay, c1, c3):
        assert d["tun_offload"] and d["tun_super_reads"] > 0 and d["tun_super_writes"] > 0, dp
    assert not c2["tun_offload"] and c2["tun_offload_error"] is None, dp
    assert c2["tun_super_reads"] == c2["tun_super_writes"] == 0, dp
    for d in (relay, c1):
        assert d["udp_gso"] and d["udp_gso_sends"] > 0 and d["udp_gro_reads"] > 0, dp
    # offload = false: one datagram per system call as well.
    assert c2["udp_gso"] is False and c2["udp_gro"] is False, dp
    assert c2["udp_gso_sends"] == c2["udp_gro_reads"] == 0, dp
    assert c3["udp_gso"] is None, dp  # the TCP client has no UDP socket


# --- last: nothing was dropped that should not be ------------------------------------


def test_no_integrity_drops_anywhere(net: GtunNet) -> None:
    """After everything above: the relay's and each client's drop counters (gtun status:
    WireGuard, relay or client core, TCP transport), and the relay's per-peer counters,
    show none of INTEGRITY_DROPS."""
    seen: dict[str, dict[str, int]] = {}
    bad: dict[str, dict[str, int]] = {}
    for node in (net.relay, *net.clients):
        st = json.loads(gtun_stdout(node.ns, "status", "--json", "-s", str(node.socket)))
        seen[node.name] = drops_of(st)
        # The WireGuard reasons are in every node's counters: the right structure is read.
        assert {"decrypt", "replay", "malformed", "unknown_index"} <= st["drops"].keys(), st
        bad[node.name] = {k: v for k, v in st["drops"].items() if v and k in INTEGRITY_DROPS}
        for p in st["peers"]:
            if p.get("drops"):
                per_peer = {k: v for k, v in p["drops"].items() if v and k in INTEGRITY_DROPS}
                if per_peer:
                    bad[f"{node.name}/{p['name']}"] = per_peer
    print(f"drop counters after the transfers: {seen}")
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"integrity drops {bad} (all drops: {seen})\n{context(net)}"
