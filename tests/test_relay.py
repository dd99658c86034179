"""Tier 1: the relay and client cores wired through an in-memory link (no I/O).

One relay, two gtun clients and one stock WireGuard peer (a bare `WireGuard` device,
as wireguard-go would be): configuration push, forwarding client to client in user
space, packets into the relay's TUN, cryptokey routing drops, mode mismatch, reload.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, ip_network

import pytest

from gtun.core import tunnel as tm
from gtun.core.client import ClientCore, ConfigReceived, Connected, Refused
from gtun.core.packet import build_icmp_echo, build_udp4, parse_addresses
from gtun.core.relay import PeerSetError, PeerSpec, Relay
from gtun.core.tunnel import parse_pushed_config
from gtun.core.wg import WireGuard
from gtun.testing.link import CoreLink, relay_settings


class Net(CoreLink):
    """Relay at "R", two gtun clients at their names, a stock peer at "S"."""

    def __init__(self, mode: str = "tun") -> None:
        self.relay_key = secrets.token_bytes(32)
        super().__init__(
            Relay(
                self.relay_key,
                relay_settings(
                    routes=(ip_network("192.168.77.0/24"),),
                    dns=(IPv4Address("10.66.0.1"),),
                    mode=mode,
                ),
            ),
            now=1000.0,
        )
        self.stock_key = secrets.token_bytes(32)
        self.stock = WireGuard(self.stock_key)
        self.stock_peer = self.stock.add_peer(self.relay.wg.public_key, endpoint="R")
        specs = [
            PeerSpec("c1", b"", IPv4Address("10.66.0.2"), (ip_network("192.168.88.0/24"),)),
            PeerSpec("c2", b"", IPv4Address("10.66.0.3")),
        ]
        for spec in specs:
            key = secrets.token_bytes(32)
            client = ClientCore(key, self.relay.wg.public_key, "R", mode="tun")
            spec.public_key = client.wg.public_key
            self.add_client(spec.name, client)
        specs.append(PeerSpec("stock", self.stock.public_key, IPv4Address("10.66.0.9")))
        self.specs = specs
        self.relay.set_peers(specs)


def test_clients_get_their_config_pushed() -> None:
    net = Net()
    net.start()
    c1 = net.clients["c1"]
    assert c1.connected and c1.config is not None
    assert c1.config.address == IPv4Address("10.66.0.2")
    assert c1.config.prefix == 24
    assert c1.config.gateway == IPv4Address("10.66.0.1")
    assert c1.config.mtu == 1420
    assert c1.config.dns == (IPv4Address("10.66.0.1"),)
    # Pushed routes: the relay's routes, and the subnets behind the other peers.
    assert ip_network("192.168.77.0/24") in c1.config.routes
    assert ip_network("192.168.88.0/24") not in c1.config.routes
    c2 = net.clients["c2"]
    assert c2.config is not None and ip_network("192.168.88.0/24") in c2.config.routes
    assert any(isinstance(e, Connected) for e in net.events["c1"])
    assert any(isinstance(e, ConfigReceived) for e in net.events["c1"])


def test_client_to_client_goes_directly_and_to_tun_otherwise() -> None:
    net = Net()
    net.start()
    ping = build_icmp_echo("10.66.0.2", "10.66.0.3", 7, 1, b"hello")
    net.clients["c1"].tun_packet(ping, net.now)
    net.pump()
    assert net.take("c2") == [ping]  # padding trimmed, unchanged
    assert net.tun_in == []
    to_lan = build_udp4("10.66.0.2", "192.168.77.10", 1000, 53, b"q")
    net.clients["c1"].tun_packet(to_lan, net.now)
    net.pump()
    assert net.tun_in == [to_lan]
    # From the relay's TUN to a peer's subnet (longest prefix) and to nobody.
    to_subnet = build_udp4("192.168.77.10", "192.168.88.5", 53, 1000, b"a")
    net.relay.tun_packet(to_subnet, net.now)
    net.pump()
    assert net.take("c1") == [to_subnet]
    net.relay.tun_packet(build_udp4("10.66.0.1", "10.66.0.200", 1, 2, b"x"), net.now)
    assert net.relay.drops["no_route"] == 1


def test_spoofed_source_is_dropped_and_counted() -> None:
    net = Net()
    net.start()
    spoof = build_icmp_echo("10.66.0.3", "10.66.0.9", 1, 1, b"spoof")  # c1 claims c2
    net.clients["c1"].tun_packet(spoof, net.now)
    net.pump()
    assert net.relay.drops["spoofed"] == 1
    c1_peer = net.relay.peer_by_name("c1")
    assert c1_peer is not None and c1_peer.data.drops == {"spoofed": 1}
    assert net.stock_got == []
    # From c1's own subnet is fine.
    ok = build_udp4("192.168.88.7", "10.66.0.3", 1, 2, b"lan")
    net.clients["c1"].tun_packet(ok, net.now)
    net.pump()
    assert net.take("c2") == [ok]
    # A peer sending to its own address is a loop, not forwarded.
    net.clients["c1"].tun_packet(build_udp4("10.66.0.2", "10.66.0.2", 1, 2, b"me"), net.now)
    net.pump()
    assert net.relay.drops["loop"] == 1


def test_stock_peer_gets_only_ip_packets() -> None:
    net = Net()
    net.start()
    net.stock.send(net.stock_peer, build_icmp_echo("10.66.0.9", "10.66.0.1", 1, 1, b"p"), 0)
    net.pump()
    assert len(net.tun_in) == 1  # the stock peer's ping reached the relay's TUN
    ping = build_icmp_echo("10.66.0.2", "10.66.0.9", 3, 3, b"to-stock")
    net.clients["c1"].tun_packet(ping, net.now)
    net.pump()
    assert [parse_addresses(p) for p in net.stock_got] == [parse_addresses(ping)]
    # No gtun message ever reached the stock peer (first byte 0 would be one).
    assert all(p[0] >> 4 in (4, 6) for p in net.stock_got)
    stock = net.relay.peer_by_name("stock")
    assert stock is not None and not stock.data.is_gtun


def test_mode_mismatch_is_refused() -> None:
    net = Net(mode="tap")
    net.start()
    refused = [e for e in net.events["c1"] if isinstance(e, Refused)]
    assert refused and "tap" in refused[0].reason
    assert net.clients["c1"].config is None


def test_malformed_tunnel_messages_are_counted() -> None:
    net = Net()
    net.start()
    c1 = net.clients["c1"]
    for junk in (b"\x00", b"\x00gt\x01\x63\x00\x01x", b"\x00gt\x01\x01\xff\xffxx", b"\x00zz"):
        c1.wg.send(c1.server, junk, net.now)
    net.pump()
    peer = net.relay.peer_by_name("c1")
    assert peer is not None and peer.data.drops.get("malformed") == 4


def test_reload_keeps_sessions_of_unchanged_peers() -> None:
    net = Net()
    net.start()
    c2_peer = net.relay.peer_by_name("c2")
    assert c2_peer is not None and c2_peer.current is not None
    session = c2_peer.current
    added, removed = net.relay.set_peers([s for s in net.specs if s.name != "c1"])
    assert removed == ["c1"] and added == []
    assert net.relay.peer_by_name("c2") is c2_peer and c2_peer.current is session
    # c1 is gone: its packets no longer authenticate at the relay.
    net.clients["c1"].tun_packet(build_udp4("10.66.0.2", "10.66.0.3", 1, 2, b"x"), net.now)
    net.pump()
    assert net.take("c2") == []


def _fresh_key() -> bytes:
    return WireGuard(secrets.token_bytes(32)).public_key


# Peer sets with one bad peer among good ones, each mistake set_peers must refuse whole:
# (what is wrong, a function of the good specs and the relay giving the bad peer set).
BAD_PEER_SETS: dict[str, Callable[[list[PeerSpec], Relay], list[PeerSpec]]] = {
    "low-order": lambda good, r: [*good, PeerSpec("evil", bytes(32), IPv4Address("10.66.0.20"))],
    "malformed key": lambda good, r: [*good, PeerSpec("evil", b"short", IPv4Address("10.66.0.20"))],
    "our own key": lambda good, r: [
        *good,
        PeerSpec("evil", r.wg.public_key, IPv4Address("10.66.0.20")),
    ],
    "name given to two": lambda good, r: [
        *good,
        PeerSpec("c2", _fresh_key(), IPv4Address("10.66.0.20")),
    ],
    "key also given": lambda good, r: [
        *good,
        PeerSpec("evil", good[0].public_key, IPv4Address("10.66.0.20")),
    ],
    "address of another": lambda good, r: [
        *good,
        PeerSpec("evil", _fresh_key(), IPv4Address("10.66.0.3")),
    ],
    "subnet of another": lambda good, r: [
        *good,
        PeerSpec("evil", _fresh_key(), IPv4Address("10.66.0.20"), (ip_network("192.168.88.0/24"),)),
    ],
    "the relay's address": lambda good, r: [
        *good,
        PeerSpec("evil", _fresh_key(), IPv4Address("10.66.0.1")),
    ],
    "subnet in the virtual network": lambda good, r: [
        *good,
        PeerSpec("evil", _fresh_key(), IPv4Address("10.66.0.20"), (ip_network("10.66.0.0/25"),)),
    ],
}


@pytest.mark.parametrize("mistake", list(BAD_PEER_SETS))
def test_a_reload_with_one_bad_peer_changes_nothing(mistake: str) -> None:
    net = Net()
    net.start()
    relay = net.relay
    peers = dict(relay.wg.peers)
    sessions = {key: (p.current, p.previous, p.next) for key, p in peers.items()}
    specs = {key: p.data.spec for key, p in peers.items()}
    routes = relay.table.routes()
    # The good part of the new set removes the stock peer and gives c1 a new address:
    # none of it may happen when one peer of the set is bad.
    c1, c2 = (PeerSpec(s.name, s.public_key, s.address, s.subnets) for s in net.specs[:2])
    c1.address = IPv4Address("10.66.0.50")
    good = [c1, c2, PeerSpec("new", _fresh_key(), IPv4Address("10.66.0.30"))]
    with pytest.raises(PeerSetError) as info:
        relay.set_peers(BAD_PEER_SETS[mistake](good, relay))
    assert info.value.peer in ("evil", "c2") and str(info.value).startswith("peer ")
    assert relay.wg.peers == peers
    assert {k: (p.current, p.previous, p.next) for k, p in relay.wg.peers.items()} == sessions
    assert {k: p.data.spec for k, p in relay.wg.peers.items()} == specs
    assert relay.table.routes() == routes
    # Every session still carries traffic, both ways through the relay.
    ping = build_icmp_echo("10.66.0.2", "10.66.0.3", 7, 1, b"still here")
    net.clients["c1"].tun_packet(ping, net.now)
    net.pump()
    assert net.take("c2") == [ping]
    back = build_icmp_echo("10.66.0.3", "10.66.0.2", 7, 2, b"and back")
    net.clients["c2"].tun_packet(back, net.now)
    net.pump()
    assert net.take("c1") == [back]
    # The good set alone applies.
    assert relay.set_peers(good) == (["new"], ["stock"])
    assert relay.table.lookup_ip(IPv4Address("10.66.0.50")) is peers[c1.public_key]
    assert relay.table.lookup_ip(IPv4Address("10.66.0.2")) is None


def test_any_exception_in_set_peers_changes_nothing() -> None:
    net = Net()
    net.start()
    relay = net.relay
    peers = dict(relay.wg.peers)
    routes = relay.table.routes()

    def specs() -> Iterator[PeerSpec]:
        yield from net.specs[:1]
        yield PeerSpec("new", _fresh_key(), IPv4Address("10.66.0.30"))
        raise RuntimeError("the caller's bug")

    with pytest.raises(RuntimeError):
        relay.set_peers(specs())
    assert relay.wg.peers == peers and relay.table.routes() == routes


def test_tunnel_message_codec() -> None:
    raw = tm.push_message(tm.CONFIG, {"a": 1})
    assert tm.pull_message(raw + bytes(7)) == tm.TunnelMessage(tm.CONFIG, {"a": 1})
    for bad in (
        b"",
        b"\x00gt",
        raw[:-1],
        b"\x00gt\x01\x02\x00\x02[]",
        b"\x00gt\x01\x02\x00\x02\xff\xfe",
    ):
        with pytest.raises(tm.TunnelMessageError):
            tm.pull_message(bad)
    with pytest.raises(ValueError):
        tm.push_message(tm.CONFIG, {"x": "y" * 9000})


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"address": "10.0.0.1", "prefix": 40, "mtu": 1400, "gateway": "10.0.0.1"},
        {"address": "nope", "prefix": 24, "mtu": 1400, "gateway": "10.0.0.1"},
        {"address": "10.0.0.2", "prefix": 24, "mtu": 10, "gateway": "10.0.0.1"},
        {"address": "10.0.0.2", "prefix": 24, "mtu": 1400, "gateway": "10.0.0.1", "routes": [1]},
    ],
)
def test_bad_pushed_config_is_rejected(payload: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_pushed_config(payload)


def test_link_scoped_traffic_is_not_routed() -> None:
    net = Net()
    net.start()
    c1 = net.clients["c1"]
    received = net.relay.wg.peers[c1.wg.public_key].rx_packets
    # An IPv6 router solicitation from a link-local source, as the kernel sends.
    rs = bytes([0x60, 0, 0, 0, 0, 8, 58, 255]) + bytes.fromhex("fe80" + "00" * 13 + "01")
    rs += bytes.fromhex("ff02" + "00" * 13 + "02") + bytes(8)
    c1.tun_packet(rs, net.now)
    c1.tun_packet(build_udp4("10.66.0.2", "224.0.0.251", 5353, 5353, b"mdns"), net.now)
    net.pump()
    assert c1.drops["link_scoped"] == 2
    assert net.relay.wg.peers[c1.wg.public_key].rx_packets == received
    net.relay.tun_packet(rs, net.now)
    assert net.relay.drops["link_scoped"] == 1 and net.relay.drops["no_route"] == 0


def test_oversized_configuration_is_refused_not_raised() -> None:
    net = Net()
    net.relay.settings.routes = tuple(
        ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(1000)
    )
    net.start()
    refused = [e for e in net.events["c1"] if isinstance(e, Refused)]
    assert refused and "too large" in refused[0].reason


def test_a_batch_of_datagrams_is_handled_as_one_by_one() -> None:
    # The edge hands the relay a wake-up's datagrams in one call (receive_datagrams):
    # data before and after a handshake in the same batch is forwarded in order, and the
    # handshake's events and a stock peer's claim are handled as if fed one by one.
    from gtun.core.relay import SessionHere
    from gtun.core.wg import HandshakeCompleted
    from gtun.testing.link import STOCK

    net = Net()
    net.start("c1", "c2")
    c1 = net.clients["c1"]
    pings = [build_icmp_echo("10.66.0.2", "10.66.0.1", 9, i, b"batch") for i in range(3)]
    c1.tun_packet(pings[0], net.now)
    first = c1.datagrams_to_send()
    net.stock.send(net.stock_peer, build_icmp_echo("10.66.0.9", "10.66.0.1", 3, 1, b"s"), net.now)
    initiation = net.stock.datagrams_to_send()
    for ping in pings[1:]:
        c1.tun_packet(ping, net.now)
    rest = c1.datagrams_to_send()
    assert len(first) == 1 and len(initiation) == 1 and len(rest) == 2
    batch = [(first[0][0], "c1"), (initiation[0][0], STOCK)] + [(d, "c1") for d, _ in rest]
    net.relay.receive_datagrams(batch, net.now)
    assert net.relay.tun_writes() == pings
    events = []
    while (ev := net.relay.next_event()) is not None:
        events.append(ev)
    assert [type(e) for e in events].count(HandshakeCompleted) == 1
    # The response reaches the stock peer, whose staged packet then comes in a batch of
    # its own: its data claims its session here (the relay's bookkeeping ran).
    for data, addr in net.relay.datagrams_to_send():
        assert addr == STOCK
        net.stock.receive_datagram(data, "R", net.now)
    data = net.stock.datagrams_to_send()
    assert data
    net.relay.receive_datagrams([(d, STOCK) for d, _ in data], net.now)
    assert net.relay.tun_writes()
    claimed = []
    while (ev := net.relay.next_event()) is not None:
        claimed.append(ev)
    assert any(isinstance(e, SessionHere) for e in claimed), claimed
