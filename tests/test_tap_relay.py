"""Tier 1: the relay in TAP mode with gtun clients and a stock peer, through an
in-memory link (no I/O): frames switched between clients and the relay's TAP,
flooding, MAC stealing, mode negotiation, and what stock peers get."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address, IPv6Address

from gtun.core import l2frame
from gtun.core.client import ClientCore, Refused
from gtun.core.forward import LOCAL_PORT
from gtun.core.packet import build_icmp_echo
from gtun.core.relay import PeerRefused, PeerSpec, Relay
from gtun.core.wg import WireGuard
from gtun.testing.link import CoreLink, relay_settings

# c1's and c2's keys, and the MACs the relay holds them to (l2frame.mac_for_key).
KEY1, KEY2 = bytes([1]) * 32, bytes([2]) * 32
MAC1 = l2frame.mac_bytes_for_key(WireGuard(KEY1).public_key)
MAC2 = l2frame.mac_bytes_for_key(WireGuard(KEY2).public_key)
LL1 = str(IPv6Address(l2frame.link_local_for_mac(MAC1)))  # c1's link-local address
MAC_RELAY = bytes.fromhex("02aa000000ff")
BROADCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, payload: bytes = b"p" * 46) -> bytes:
    return dst + src + b"\x08\x06" + payload


class Net(CoreLink):
    """Relay at "R" in TAP mode; clients c1 (follows the relay's mode), c2 ("tap"),
    c3 ("tun"); a stock WireGuard peer at "S"."""

    def __init__(self) -> None:
        super().__init__(
            Relay(
                secrets.token_bytes(32),
                relay_settings(mode="tap"),
            ),
            now=1000.0,
        )
        relay_pub = self.relay.wg.public_key
        keys = {"c1": KEY1, "c2": KEY2, "c3": secrets.token_bytes(32)}
        for name, mode in (("c1", None), ("c2", "tap"), ("c3", "tun")):
            self.add_client(name, ClientCore(keys[name], relay_pub, "R", mode=mode))
        self.stock = WireGuard(secrets.token_bytes(32))
        self.stock_peer = self.stock.add_peer(relay_pub, endpoint="R")
        specs = [
            PeerSpec(name, c.wg.public_key, IPv4Address(f"10.66.0.{i}"))
            for i, (name, c) in enumerate(self.clients.items(), start=2)
        ]
        specs.append(PeerSpec("stock", self.stock.public_key, IPv4Address("10.66.0.9")))
        self.relay.set_peers(specs)

    def peer(self, name: str):  # type: ignore[no-untyped-def]
        peer = self.relay.peer_by_name(name)
        assert peer is not None
        return peer


def test_clients_follow_or_choose_tap_and_a_tun_client_is_refused() -> None:
    net = Net()
    net.start("c1", "c2", "c3")
    c1, c2, c3 = net.clients["c1"], net.clients["c2"], net.clients["c3"]
    assert c1.config is not None and c1.config.mode == "tap" and c1.device_mode == "tap"
    assert c2.config is not None and c2.device_mode == "tap"
    assert c3.config is None
    refused = [e for e in net.events["c3"] if isinstance(e, Refused)]
    assert refused and refused[0].reason == (
        "this relay runs in tap mode; the client asked for tun"
    )
    on_relay = [e for e in net.relay_events if isinstance(e, PeerRefused)]
    assert on_relay and on_relay[0].peer is net.peer("c3") and "tun" in on_relay[0].reason
    sw = net.relay.switch
    assert sw is not None
    assert set(sw.ports) == {LOCAL_PORT, net.peer("c1"), net.peer("c2")}


def test_frames_are_switched_between_clients_and_the_relay_tap() -> None:
    net = Net()
    net.start("c1", "c2")
    c1, c2 = net.clients["c1"], net.clients["c2"]
    # An ARP request from c1 is flooded: to c2 and into the relay's TAP.
    request = eth(BROADCAST, MAC1)
    c1.tun_packet(request, net.now)
    net.pump()
    assert net.got["c2"] == [request] and net.tun_in == [request]
    assert net.got["c1"] == []
    # c2's answer goes to c1 only: MAC1 was learned.
    reply = eth(MAC1, MAC2)
    c2.tun_packet(reply, net.now)
    net.pump()
    assert net.got["c1"] == [reply] and net.tun_in == [request]
    # From the relay's TAP to c2 only, and c2 to the relay only.
    net.relay.tun_packet(eth(BROADCAST, MAC_RELAY), net.now)
    net.pump()
    to_c2 = eth(MAC2, MAC_RELAY, b"ip" * 40)
    net.relay.tun_packet(to_c2, net.now)
    net.pump()
    assert net.got["c2"][-1] == to_c2 and len(net.got["c1"]) == 2
    c2.tun_packet(eth(MAC_RELAY, MAC2), net.now)
    net.pump()
    assert net.tun_in[-1] == eth(MAC_RELAY, MAC2) and len(net.got["c1"]) == 2


def test_stolen_mac_is_dropped_and_counted_per_peer() -> None:
    net = Net()
    net.start("c1", "c2")
    c1, c2 = net.clients["c1"], net.clients["c2"]
    c1.tun_packet(eth(BROADCAST, MAC1), net.now)
    net.pump()
    for _ in range(3):
        c2.tun_packet(eth(BROADCAST, MAC1), net.now)  # c2 claims c1's address
    c2.tun_packet(eth(BROADCAST, BROADCAST), net.now)  # and a group source
    net.pump()
    # A peer may use only the MAC its key derives: anything else is a spoof.
    assert net.peer("c2").data.drops == {"spoofed": 4}
    assert net.relay.drops["spoofed"] == 4
    assert net.got["c1"] == [] and len(net.tun_in) == 1
    # The relay's own TAP cannot use a live peer address either.
    net.relay.tun_packet(eth(BROADCAST, MAC1), net.now)
    net.pump()
    assert net.relay.drops["mac_stolen"] == 1 and net.got["c2"] == [eth(BROADCAST, MAC1)]


def test_stock_peer_packets_are_dropped_and_it_gets_no_frames() -> None:
    net = Net()
    net.start("c1")
    net.stock.send(net.stock_peer, build_icmp_echo("10.66.0.9", "10.66.0.1", 1, 1, b"p"), 0)
    net.pump()
    net.stock.send(net.stock_peer, build_icmp_echo("10.66.0.9", "10.66.0.1", 1, 2, b"p"), 0)
    net.pump()
    stock = net.peer("stock")
    assert stock.data.drops == {"not_frame": 2} and not stock.data.is_gtun
    said = [e for e in net.relay_events if isinstance(e, PeerRefused) and e.peer is stock]
    assert len(said) == 1 and "stock WireGuard peers" in said[0].reason  # once only
    assert net.tun_in == []
    net.clients["c1"].tun_packet(eth(BROADCAST, MAC1), net.now)
    net.relay.tun_packet(eth(BROADCAST, MAC_RELAY), net.now)
    net.pump()
    assert net.stock_got == []  # floods reach gtun peers only


def test_bad_frames_from_a_peer_are_counted() -> None:
    net = Net()
    net.start("c1")
    c1 = net.clients["c1"]
    for junk in (
        b"\x00gt\x02\x00\x0d" + bytes(13),  # runt
        b"\x00gt\x02\x06\x00" + bytes(1536),  # oversized for mtu 1420
        b"\x00gt\x02\x00\x50" + bytes(30),  # truncated
        build_icmp_echo("10.66.0.2", "10.66.0.1", 1, 1, b"ip"),  # IP, not a frame
    ):
        c1.wg.send(c1.server, junk, net.now)
    net.pump()
    assert net.peer("c1").data.drops == {
        "runt": 1,
        "oversized": 1,
        "malformed": 1,
        "not_frame": 1,
    }
    assert net.tun_in == []
    # The client bounds what it reads from its own TAP, too.
    c1.tun_packet(b"\x02" * 13, net.now)
    c1.tun_packet(bytes(l2frame.max_frame_for(1420) + 1), net.now)
    assert c1.drops["runt"] == 1 and c1.drops["oversized"] == 1


def test_tap_client_drops_ip_packets_and_unconfigured_frames() -> None:
    net = Net()
    c1 = net.clients["c1"]
    c1.tun_packet(eth(BROADCAST, MAC1), net.now)
    assert c1.drops["not_configured"] == 1
    net.start("c1")
    peer = net.peer("c1")
    net.relay.wg.send(peer, build_icmp_echo("10.66.0.1", "10.66.0.2", 1, 1, b"ip"), net.now)
    net.pump()
    assert c1.drops["not_frame"] == 1 and net.got["c1"] == []


def test_removed_peer_leaves_the_switch() -> None:
    net = Net()
    net.start("c1", "c2")
    net.clients["c1"].tun_packet(eth(BROADCAST, MAC1), net.now)
    net.pump()
    sw = net.relay.switch
    assert sw is not None and sw.lookup(MAC1, net.now) is net.peer("c1")
    c1_peer = net.peer("c1")
    net.relay.set_peers([p.data.spec for p in net.relay.wg.peers.values() if p is not c1_peer])
    assert not sw.has_port(c1_peer) and sw.lookup(MAC1, net.now) is None


def test_tun_relay_treats_frames_as_malformed() -> None:
    relay = Relay(
        secrets.token_bytes(32),
        relay_settings(),
    )
    assert relay.switch is None
    client = ClientCore(secrets.token_bytes(32), relay.wg.public_key, "R", mode=None)
    relay.set_peers([PeerSpec("c1", client.wg.public_key, IPv4Address("10.66.0.2"))])
    client.start(0.0)
    for _ in range(10):
        for data, _ in client.datagrams_to_send():
            relay.receive_datagram(data, "C", 0.0)
        for data, _ in relay.datagrams_to_send():
            client.receive_datagram(data, "R", 0.0)
    assert client.config is not None and client.device_mode == "tun"
    client.wg.send(client.server, l2frame.push_frame(eth(BROADCAST, MAC1)), 0.0)
    for data, _ in client.datagrams_to_send():
        relay.receive_datagram(data, "C", 0.0)
    assert relay.drops["malformed"] == 1 and relay.tun_writes() == []


def arp(src: bytes, sender: str, target: str, *, vlan: bool = False) -> bytes:
    body = bytes.fromhex("0001080006040002") + src + IPv4Address(sender).packed
    body += bytes(6) + IPv4Address(target).packed
    return BROADCAST + src + (b"\x81\x00\x00\x05" if vlan else b"") + b"\x08\x06" + body


def test_peer_speaks_only_for_its_own_ipv4_addresses() -> None:
    net = Net()
    net.start("c1", "c2")
    c1 = net.clients["c1"]
    ok = [
        arp(MAC1, "10.66.0.2", "10.66.0.1"),  # its own address
        arp(MAC1, "0.0.0.0", "10.66.0.2"),  # an address probe (RFC 5227)
        MAC2 + MAC1 + b"\x08\x00" + build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"hi"),
    ]
    spoofs = [
        arp(MAC1, "10.66.0.1", "10.66.0.3"),  # "I am the relay"
        arp(MAC1, "10.66.0.3", "10.66.0.3"),  # "I am c2"
        arp(MAC1, "10.66.0.1", "10.66.0.3", vlan=True),  # the same behind a VLAN tag
        MAC2 + MAC1 + b"\x08\x00" + build_icmp_echo("10.66.0.50", "10.66.0.3", 1, 1, b"x"),
    ]
    for frame in ok + spoofs + [MAC2 + MAC1 + b"\x08\x00" + b"\x45" + bytes(10)]:
        c1.tun_packet(frame, net.now)
    net.pump()
    assert net.got["c2"] == ok
    assert net.peer("c1").data.drops == {"spoofed": 4, "malformed": 1}
    # The relay's own TAP is not held to this (it may route for anyone).
    relay_arp = arp(MAC_RELAY, "192.168.77.1", "10.66.0.2")
    net.relay.tun_packet(relay_arp, net.now)
    net.pump()
    assert net.got["c2"][-1] == relay_arp


def ipv6_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, icmp: bytes) -> bytes:
    """An Ethernet frame with an IPv6 header (RFC 8200) around an ICMPv6 message."""
    header = (
        b"\x60\x00\x00\x00"
        + len(icmp).to_bytes(2, "big")
        + bytes([58, 255])  # next header ICMPv6, hop limit
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
    )
    return dst_mac + src_mac + b"\x86\xdd" + header + icmp


def neighbor_advertisement(target: str) -> bytes:
    # type 136, code, checksum (not checked by the relay), flags (S|O), target (RFC 4861)
    return bytes([136, 0, 0, 0, 0x60, 0, 0, 0]) + IPv6Address(target).packed


def test_peer_speaks_only_for_its_own_ipv6_addresses() -> None:
    net = Net()
    net.relay.set_peers(
        [
            PeerSpec(
                name, c.wg.public_key, IPv4Address(f"10.66.0.{i}"), (), IPv6Address(f"fd66::{i}")
            )
            for i, (name, c) in enumerate(net.clients.items(), start=2)
        ]
    )
    net.start("c1", "c2")
    c1 = net.clients["c1"]
    echo = bytes([128, 0, 0, 0, 0, 1, 0, 1]) + b"hi"
    ok = [
        ipv6_frame(MAC2, MAC1, "fd66::2", "fd66::3", echo),  # its own address
        ipv6_frame(MAC2, MAC1, LL1, "fd66::3", echo),  # its own link-local
        ipv6_frame(MAC2, MAC1, "::", "ff02::1:ff00:2", echo),  # DAD from the unspecified
        ipv6_frame(MAC2, MAC1, LL1, "fe80::2", neighbor_advertisement("fd66::2")),
    ]
    spoofs = [
        ipv6_frame(MAC2, MAC1, "fd66::3", "fd66::3", echo),  # "I am c2"
        ipv6_frame(MAC2, MAC1, "fd66::99", "fd66::3", echo),  # nobody's
        # "fd66::1 (the relay) is at my MAC", from a link-local source.
        ipv6_frame(MAC2, MAC1, LL1, "fe80::2", neighbor_advertisement("fd66::1")),
    ]
    short = [
        ipv6_frame(MAC2, MAC1, "fd66::2", "fd66::3", echo)[:40],
        ipv6_frame(MAC2, MAC1, LL1, "fe80::2", neighbor_advertisement("fd66::2"))[:70],
    ]
    for frame in ok + spoofs + short:
        c1.tun_packet(frame, net.now)
    net.pump()
    assert net.got["c2"] == ok
    assert net.peer("c1").data.drops == {"spoofed": 3, "malformed": 2}
