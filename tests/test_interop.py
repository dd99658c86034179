"""Interop tier: gtun against a WireGuard implementation someone else wrote.

The stock peer is `wireguard-go` (userspace, a TUN inside a lab namespace) configured
with `wg setconf`, exactly as a user would with the configuration `gtun peer add` prints
(wg-quick's own keys -- Address, DNS, MTU -- applied with `ip`, as wg-quick does).

    test_stock_peer_initiates_to_relay     wireguard-go dials the relay; ping 10.66.0.1
    test_gtun_core_initiates_to_wireguard_go  gtun.core.wg.WireGuard over a real UDP socket
                                           initiates to wireguard-go; ICMP echo through it
    test_stock_peer_and_client_via_relay   stock peer <-> gtun client through the relay,
                                           then the relay initiates toward the stock peer

Underlay addresses come from 10.231.0.0/16; namespaces start with "gti"; wireguard-go
interface names are "wgi" + 4 random hex digits, because wireguard-go's control sockets
(/var/run/wireguard/NAME.sock) are shared by every namespace.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.lab.net import PORT, GtunNet
from gtun.lab.netns import Lab, Namespace, list_namespaces
from labkit import apply_wg_quick, gtun_stdout, run_python, split_wg_quick, wait_until

WG_RUN = Path("/var/run/wireguard")
RELAY_TUNNEL_ADDRESS = "10.66.0.1"
STOCK_LISTEN_PORT = 51820


@pytest.fixture
def lab_prefix() -> str:
    return "gti"


@dataclass
class StockPeer:
    """One wireguard-go process and the interface it made."""

    ns: Namespace
    ifname: str
    proc: subprocess.Popen[bytes]
    log: Path
    allowed: list[str] = field(default_factory=list)

    def wg(self, *args: str) -> str:
        return self.ns.run(["wg", *args]).stdout

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no wireguard-go log)"
        return "\n".join(text.splitlines()[-lines:])

    def show(self) -> str:
        out = self.ns.run(["wg", "show", self.ifname], check=False)
        return out.stdout + out.stderr


class StockPeers:
    """Starts wireguard-go in lab namespaces under unique interface names."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    def new_name(self) -> str:
        while True:
            name = f"wgi{secrets.token_hex(2)}"
            if name not in self.names and not (WG_RUN / f"{name}.sock").exists():
                self.names.append(name)
                return name

    def start(self, ns: Namespace) -> StockPeer:
        ifname = self.new_name()
        log = self.dir / f"{ifname}.log"
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
        proc = ns.spawn(["wireguard-go", "-f", ifname], log_path=log, env=env)
        peer = StockPeer(ns, ifname, proc, log)
        sock = WG_RUN / f"{ifname}.sock"
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"wireguard-go {ifname} exited ({proc.returncode}):\n{peer.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"wireguard-go made no {sock} in 10 s:\n{peer.log_tail()}")
            time.sleep(0.05)
        return peer

    def configure(self, peer: StockPeer, wg_quick: str) -> None:
        """Apply a wg-quick configuration the way wg-quick does: `wg setconf` with the
        wg-quick-only keys stripped, then address, MTU, link up and AllowedIPs routes."""
        peer.allowed = apply_wg_quick(
            peer.ns, peer.ifname, wg_quick, self.dir / f"{peer.ifname}.conf"
        )


@pytest.fixture
def stock(lab: Lab, tmp_path: Path) -> Iterator[StockPeers]:
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            pytest.fail(f"the interop tests need {tool} (apt install wireguard-go wireguard-tools)")
    peers = StockPeers(lab, tmp_path / "stock")
    yield peers
    # The lab's own cleanup, run now so the leftovers can be checked after it.
    lab.cleanup()
    for name in peers.names:
        (WG_RUN / f"{name}.sock").unlink(missing_ok=True)
    left = [n for n in list_namespaces() if n.startswith(lab.prefix)]
    assert not left, f"namespaces left behind: {left}"


# --- helpers ---------------------------------------------------------------------------


def relay_status(net: GtunNet) -> dict[str, Any]:
    """`gtun status --json` of the relay, through the command line as a user runs it."""
    return json.loads(gtun_stdout(net.relay.ns, "status", "--json", "-s", str(net.relay.socket)))


def context(net: GtunNet | None, *peers: StockPeer) -> str:
    parts = []
    if net is not None:
        parts.append(f"--- relay log\n{net.log_tail(net.relay)}")
        for c in net.clients:
            parts.append(f"--- {c.name} log\n{net.log_tail(c, 10)}")
        st = net.status(net.relay)
        if st is not None:
            drops = {k: v for k, v in st["drops"].items() if v}
            parts.append(f"--- relay status (drops {drops})\n{json.dumps(st['peers'], indent=1)}")
    for p in peers:
        parts.append(f"--- wg show {p.ifname}\n{p.show()}--- wireguard-go log\n{p.log_tail()}")
    return "\n".join(parts)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, ctx: Callable[[], str]) -> Any:
    """labkit.wait_until, failing the test with `ctx()` (the peers' state) on time-out."""
    try:
        return wait_until(cond, timeout, what)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{ctx()}", pytrace=False)


def ping(
    ns: Namespace, address: str, *, count: int, deadline: float, ctx: Callable[[], str]
) -> str:
    """Ping until `count` replies came or `deadline` seconds passed; fail without them."""
    out = ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.2", "-w", f"{deadline:g}", address],
        check=False,
        timeout=deadline + 10,
    )
    received = re.search(r"(\d+) (?:packets )?received", out.stdout)
    got = int(received.group(1)) if received else 0
    if out.returncode != 0 or got < count:
        pytest.fail(
            f"ping {address} from {ns.name}: {got}/{count} replies in {deadline:g} s\n"
            f"{out.stdout}{out.stderr}\n{ctx()}",
            pytrace=False,
        )
    return out.stdout


def peer_add(net: GtunNet, name: str, endpoint: str) -> str:
    """`gtun peer add` against the running relay; the printed wg-quick configuration."""
    text = gtun_stdout(
        net.relay.ns, "peer", "add", name, "-c", str(net.relay.config), "--endpoint", endpoint
    )
    assert "[Interface]" in text and "[Peer]" in text, text
    return text


def relay_peer(st: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in st["peers"] if p["name"] == name), None)


def handshaken(net: GtunNet, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        st = net.status(net.relay)
        p = relay_peer(st, name) if st else None
        return p if p and p.get("last_handshake") and p["rx_bytes"] and p["tx_bytes"] else None

    return check


def tun_packets(net: GtunNet) -> tuple[int, int]:
    """(rx, tx) packet counters of the relay's TUN."""
    out = net.relay.ns.run(["ip", "-j", "-s", "link", "show", "gtun0"]).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["packets"], stats["tx"]["packets"]


def add_stock_ns(lab: Lab, net: GtunNet, subnet: int) -> tuple[Namespace, str, str]:
    """A namespace for the stock peer, linked to the relay: (ns, relay ip, stock ip)."""
    ns = lab.add_ns("wg")
    relay_ip, stock_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    lab.veth(net.relay.ns, "rwg", f"{relay_ip}/24", ns, "up0", f"{stock_ip}/24")
    return ns, relay_ip, stock_ip


# --- 1a: wireguard-go initiates to the relay ---------------------------------------------


def test_stock_peer_initiates_to_relay(lab: Lab, stock: StockPeers, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path / "net", clients=0, underlay=231, lan=False, nat=False)
    ns, relay_ip, stock_ip = add_stock_ns(lab, net, 200)
    net.start_relay()

    conf = peer_add(net, "wg1", f"{relay_ip}:{PORT}")
    _, iface, allowed = split_wg_quick(conf)
    (address,) = iface["address"]
    assert "10.66.0.0/24" in allowed, conf

    wg = stock.start(ns)
    stock.configure(wg, conf)
    ctx = lambda: context(net, wg)  # noqa: E731

    ping(ns, RELAY_TUNNEL_ADDRESS, count=3, deadline=10, ctx=ctx)

    # The relay as a user sees it: the stock peer, handshaken, with traffic both ways.
    st = relay_status(net)
    p = relay_peer(st, "wg1")
    assert p is not None, f"wg1 missing from gtun status:\n{json.dumps(st, indent=1)}"
    assert p["kind"] == "wireguard", p
    assert p["address"] == address.split("/")[0], (p, address)
    assert str(p["endpoint"]).startswith(f"{stock_ip}:"), p
    assert p["last_handshake"] is not None and abs(p["last_handshake"] - time.time()) < 60, p
    assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0 and p["rx_packets"] >= 3, p
    assert not any(p["drops"].values()), p

    # And as wireguard-go sees it.
    handshakes = wg.wg("show", wg.ifname, "latest-handshakes").split()
    assert len(handshakes) == 2 and int(handshakes[1]) > 0, ctx()
    assert handshakes[0] == st["public_key"], (handshakes, st["public_key"])
    rx, tx = (int(v) for v in wg.wg("show", wg.ifname, "transfer").split()[1:3])
    assert rx > 0 and tx > 0, ctx()


# --- 1b: gtun's core initiates to wireguard-go -------------------------------------------

_DRIVER = r"""
import json, os, socket, struct, sys, time
from gtun.app.keys import decode_key
from gtun.core.packet import build_icmp_echo, ipv4_checksum
from gtun.core.wg import HandshakeCompleted, PacketReceived, WireGuard

private = decode_key(sys.stdin.readline())
their_key = decode_key(sys.argv[1])
endpoint = (sys.argv[2], int(sys.argv[3]))
me, them, count = sys.argv[4], sys.argv[5], int(sys.argv[6])

wg = WireGuard(private, wall_offset=time.time() - time.monotonic())
peer = wg.add_peer(their_key, endpoint=endpoint)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
ident = os.getpid() & 0xFFFF
payload = os.urandom(40)
handshakes, replies, other = [], [], []

def pump():
    for data, addr in wg.datagrams_to_send():
        sock.sendto(data, addr)
    while (event := wg.next_event()) is not None:
        if isinstance(event, HandshakeCompleted):
            handshakes.append("initiator" if event.initiator else "responder")
        elif isinstance(event, PacketReceived):
            packet = event.data
            total = struct.unpack_from("!H", packet, 2)[0]
            packet, ihl = packet[:total], (packet[0] & 0x0F) * 4
            icmp = packet[ihl:]
            if packet[9] != 1 or len(icmp) < 8:
                other.append(packet.hex())
                continue
            kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", icmp)
            replies.append({
                "src": socket.inet_ntoa(packet[12:16]), "dst": socket.inet_ntoa(packet[16:20]),
                "type": kind, "ident": rid == ident, "seq": rseq,
                "payload": icmp[8:] == payload, "ip_checksum": ipv4_checksum(packet[:ihl]) == 0,
                "icmp_checksum": ipv4_checksum(icmp) == 0,
            })

def echo(seq):
    wg.send(peer, build_icmp_echo(me, them, ident, seq, payload), time.monotonic())
    pump()

# The first echo is staged while the core initiates; the rest go over the session.
echo(0)
sent = 1
deadline = time.monotonic() + float(sys.argv[7])
while time.monotonic() < deadline and len(replies) < count:
    now = time.monotonic()
    timer = wg.get_timer()
    wake = min(deadline, timer) if timer is not None else deadline
    sock.settimeout(min(max(wake - now, 0.01), 0.5))
    try:
        data, addr = sock.recvfrom(65535)
    except TimeoutError:
        pass
    else:
        wg.receive_datagram(data, addr, time.monotonic())
    now = time.monotonic()
    timer = wg.get_timer()
    if timer is not None and timer <= now:
        wg.handle_timer(now)
    pump()
    while replies and sent < count and len(replies) == sent:
        echo(sent)
        sent += 1
print(json.dumps({
    "handshakes": handshakes, "replies": replies, "other": other,
    "drops": {k: v for k, v in wg.drops.items() if v},
    "rx_packets": peer.rx_packets, "tx_packets": peer.tx_packets,
}))
"""


def test_gtun_core_initiates_to_wireguard_go(lab: Lab, stock: StockPeers, tmp_path: Path) -> None:
    server_ns, driver_ns = lab.add_ns("wgs"), lab.add_ns("drv")
    lab.veth(server_ns, "up0", "10.231.50.1/24", driver_ns, "up0", "10.231.50.2/24")
    server_key, driver_key = generate_private_key(), generate_private_key()
    wg = stock.start(server_ns)
    # wireguard-go as a "server": a listen port, and a peer with no endpoint.
    stock.configure(
        wg,
        "[Interface]\n"
        f"PrivateKey = {encode_key(server_key)}\n"
        f"ListenPort = {STOCK_LISTEN_PORT}\n"
        "Address = 10.77.0.1/24\n"
        "[Peer]\n"
        f"PublicKey = {encode_key(public_key(driver_key))}\n"
        "AllowedIPs = 10.77.0.2/32\n",
    )
    count = 3
    out = run_python(
        driver_ns,
        _DRIVER,
        encode_key(public_key(server_key)),
        "10.231.50.1",
        str(STOCK_LISTEN_PORT),
        "10.77.0.2",
        "10.77.0.1",
        str(count),
        "10",
        input=encode_key(driver_key) + "\n",
        timeout=30,
    )
    result = json.loads(out.stdout)
    ctx = f"driver: {json.dumps(result, indent=1)}\n{out.stderr}\n{context(None, wg)}"
    assert result["handshakes"] == ["initiator"], ctx
    assert len(result["replies"]) == count, ctx
    for seq, reply in enumerate(result["replies"]):
        assert reply == {
            "src": "10.77.0.1",
            "dst": "10.77.0.2",
            "type": 0,  # echo reply
            "ident": True,
            "seq": seq,
            "payload": True,
            "ip_checksum": True,
            "icmp_checksum": True,
        }, ctx
    assert result["tx_packets"] == count and result["rx_packets"] == count, ctx
    assert not result["drops"], ctx
    # wireguard-go learned the driver's endpoint from the handshake the driver started.
    endpoints = wg.wg("show", wg.ifname, "endpoints").split()
    assert endpoints[1].startswith("10.231.50.2:"), ctx


# --- client <-> stock peer through the relay; the relay initiates -------------------------


def test_stock_peer_and_client_via_relay(lab: Lab, stock: StockPeers, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path / "net", clients=1, underlay=231, lan=False, nat=False)
    ns, relay_ip, _ = add_stock_ns(lab, net, 200)
    net.start_relay()
    client = net.clients[0]
    net.start_client(client)
    client_addr = net.wait_configured(client)

    conf = peer_add(net, "wg1", f"{relay_ip}:{PORT}")
    _, iface, _ = split_wg_quick(conf)
    stock_addr = iface["address"][0].split("/")[0]
    # A fixed listen port, so a later wireguard-go is found where the relay last saw one.
    conf = conf.replace("[Interface]\n", f"[Interface]\nListenPort = {STOCK_LISTEN_PORT}\n")
    assert "PersistentKeepalive" in conf, conf

    wg1 = stock.start(ns)
    stock.configure(wg1, conf)
    ctx = lambda: context(net, wg1)  # noqa: E731
    # The printed PersistentKeepalive makes wireguard-go speak first: the relay learns
    # its endpoint without any traffic from us.
    wait_for(handshaken(net, "wg1"), 10, "the stock peer's handshake with the relay", ctx)

    tun_before = tun_packets(net)
    ping(client.ns, stock_addr, count=3, deadline=10, ctx=ctx)
    ping(ns, client_addr, count=3, deadline=10, ctx=ctx)
    tun_after = tun_packets(net)
    st = relay_status(net)
    # Forwarded in user space, peer to peer: 12 packets crossed the relay, and (bar the
    # kernel's own IPv6 chatter) none of them through its TUN.
    moved = [tun_after[i] - tun_before[i] for i in range(2)]
    assert max(moved) < 6, f"relay TUN rx/tx grew by {moved} packets\n{ctx()}"
    for name in ("wg1", "c1"):
        p = relay_peer(st, name)
        assert p is not None and p["rx_packets"] >= 6 and p["tx_packets"] >= 6, (name, st)
    # Not for c1: a gtun client forwards its TUN's IPv6 link-local chatter, counted spoofed.
    before = relay_peer(st, "wg1")
    assert before is not None and not before["drops"], st

    # The relay initiates: a new wireguard-go with the same key and port but no Endpoint
    # and no keepalive cannot start a handshake, and holds none of the relay's sessions.
    # The client's traffic goes out under the relay's stale session until the relay gives
    # up on it (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, ~15 s) and initiates itself.
    wg1.proc.terminate()
    wg1.proc.wait(10)
    responder_conf = "\n".join(
        line
        for line in conf.splitlines()
        if not line.startswith(("Endpoint", "PersistentKeepalive"))
    )
    wg2 = stock.start(ns)
    stock.configure(wg2, responder_conf)
    assert wg2.wg("show", wg2.ifname, "endpoints").split()[1] == "(none)", wg2.show()
    ctx = lambda: context(net, wg2)  # noqa: E731
    started = time.monotonic()
    ping(client.ns, stock_addr, count=1, deadline=30, ctx=ctx)
    waited = time.monotonic() - started

    endpoints = wg2.wg("show", wg2.ifname, "endpoints").split()
    assert endpoints[1] == f"{relay_ip}:{PORT}", f"waited {waited:.1f} s\n{ctx()}"
    p = relay_peer(relay_status(net), "wg1")
    assert p is not None and p["last_handshake"] > before["last_handshake"], ctx()
    ping(ns, client_addr, count=2, deadline=10, ctx=ctx)
