"""Tier 1: TCP super-packets through the relay and client cores (no I/O).

A super-packet read from an offloading TUN travels whole (one bulk frame) between gtun
nodes over a stream (TCP) endpoint, and as the MTU-sized packets it stands for
everywhere else: over UDP, and to a stock WireGuard peer.  The packets are checked
against scapy's own dissection (lengths, sequence numbers, checksums).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from gtun.core import bulk
from gtun.core import tunnel as tm
from gtun.core.client import ClientCore
from gtun.core.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    PLAIN,
    Gso,
    finish_tcp_checksum,
    segment,
)
from gtun.core.relay import PeerSpec, Relay
from gtun.core.wg import WireGuard
from gtun.testing.link import CoreLink, relay_settings

MSS = 1380


class Stream(str):
    """A stream (TCP) endpoint's name: bulk frames may go there."""

    stream = True


def super_packet(
    src: str, dst: str, size: int, *, seq: int = 1000, v6: bool = False
) -> tuple[Gso, bytes]:
    """A TCP super-packet as an offloading TUN hands it over: header + one packet
    carrying `size` payload bytes (checksum field left as the kernel leaves it)."""
    payload = bytes((i * 7 + 3) & 0xFF for i in range(size))
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, id=77, flags="DF")
    raw = bytes(ip / TCP(sport=40000, dport=5201, seq=seq, ack=1, flags="PA") / payload)
    ip_len = 40 if v6 else 20
    hdr = Gso(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, ip_len + 20, MSS, ip_len, 16)
    return hdr, raw


def check_segments(
    packets: list[bytes], src: str, dst: str, size: int, seq: int = 1000, *, mss: int = MSS
) -> None:
    """`packets` are the segments of super_packet(...), `mss` payload bytes each but
    the last: in order, valid checksums, the whole payload exactly once."""
    payload = b""
    for i, padded in enumerate(packets):
        v6 = padded[0] >> 4 == 6
        length = 40 + int.from_bytes(padded[4:6]) if v6 else int.from_bytes(padded[2:4])
        raw = padded[:length]  # a stock peer's plaintext keeps WireGuard's padding
        pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
        tcp = pkt[TCP]
        assert pkt.src == src and pkt.dst == dst
        assert tcp.seq == seq + len(payload)
        data = bytes(tcp.payload)
        assert len(data) == (mss if i < len(packets) - 1 else size - mss * i)
        payload += data
        rebuilt = pkt.__class__(raw)
        del rebuilt[TCP].chksum
        if isinstance(rebuilt, IP):
            del rebuilt[IP].chksum
            assert IP(bytes(rebuilt))[IP].chksum == pkt[IP].chksum
        assert pkt.__class__(bytes(rebuilt))[TCP].chksum == tcp.chksum
    assert payload == bytes((i * 7 + 3) & 0xFF for i in range(size))


class Net(CoreLink):
    """Relay "R"; clients c1 (10.66.0.2) and c2 (10.66.0.3) whose endpoints are streams
    or datagram addresses; a stock peer (10.66.0.9)."""

    def __init__(
        self,
        *,
        c1_stream: bool = True,
        c2_stream: bool = True,
        partial_ok: bool = False,
        accept_partial: tuple[str, ...] = (),
    ) -> None:
        """`partial_ok`: the relay's TUN completes checksums; `accept_partial`: the
        clients that do too."""
        relay = Relay(secrets.token_bytes(32), relay_settings(partial_ok=partial_ok))
        super().__init__(relay, now=1000.0)
        self.stock = WireGuard(secrets.token_bytes(32))
        self.stock.add_peer(self.relay.wg.public_key, endpoint="R")
        specs = [PeerSpec("stock", self.stock.public_key, IPv4Address("10.66.0.9"))]
        for name, address, stream in (
            ("c1", "10.66.0.2", c1_stream),
            ("c2", "10.66.0.3", c2_stream),
        ):
            relay_endpoint = Stream("R") if stream else "R"
            client = ClientCore(
                secrets.token_bytes(32),
                self.relay.wg.public_key,
                relay_endpoint,
                accept_partial=name in accept_partial,
            )
            self.add_client(Stream(name) if stream else name, client)
            self.relay_addr[name] = relay_endpoint
            specs.append(PeerSpec(name, client.wg.public_key, IPv4Address(address)))
        self.relay.set_peers(specs)

    def client(self, name: str) -> ClientCore:
        return self.clients[name]


def test_bulk_is_negotiated_by_gtun_nodes() -> None:
    net = Net()
    net.start()
    c1 = net.client("c1")
    assert c1.config is not None and c1.config.bulk and c1.relay.caps.bulk
    assert all(p.data.caps.bulk for p in net.relay.wg.peers.values() if p.data.spec.name != "stock")


def test_super_packet_crosses_whole_between_gtun_nodes_over_tcp() -> None:
    net = Net()
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 40 * MSS + 17)
    before = net.relay.wg.peers[net.client("c2").wg.public_key].tx_packets
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    got = net.take("c2")
    assert len(got) == 1 and isinstance(got[0], tuple)
    got_hdr, got_packet = got[0]
    assert got_packet == packet and got_hdr == hdr
    # One transport message relay -> c2, not 41.
    assert net.relay.wg.peers[net.client("c2").wg.public_key].tx_packets == before + 1


def test_udp_segments_to_a_tcp_client_travel_as_one_bulk_frame() -> None:
    """c1 over UDP sends segments; the relay coalesces them for c2 over TCP, which gets
    one super-packet standing for exactly those segments."""
    net = Net(c1_stream=False)
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 20 * MSS + 11)
    before = net.relay.wg.peers[net.client("c2").wg.public_key].tx_packets
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    got = net.take("c2")
    assert len(got) == 1 and isinstance(got[0], tuple)
    assert segment(*got[0]) == segment(hdr, packet)
    assert net.relay.wg.peers[net.client("c2").wg.public_key].tx_packets == before + 1


def test_super_packet_to_the_relay_is_one_tun_write() -> None:
    net = Net()
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 30 * MSS)
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    assert net.tun_in == [(hdr, packet)]


def test_super_packet_is_cut_into_valid_packets_for_a_udp_peer() -> None:
    net = Net(c2_stream=False)
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 12 * MSS + 5)
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    got = net.take("c2")
    assert all(isinstance(p, bytes) for p in got) and len(got) == 13
    check_segments(got, "10.66.0.2", "10.66.0.3", 12 * MSS + 5)  # type: ignore[arg-type]


def test_udp_client_sends_packets_not_bulk() -> None:
    net = Net(c1_stream=False)
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 5 * MSS)
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    assert len(net.tun_in) == 5 and all(isinstance(p, bytes) for p in net.tun_in)
    check_segments(net.tun_in, "10.66.0.2", "10.66.0.1", 5 * MSS)  # type: ignore[arg-type]


def test_stock_peer_gets_valid_packets_from_a_relay_super_packet() -> None:
    net = Net()
    net.start()
    net.stock.send_keepalive(next(iter(net.stock.peers.values())), net.now)
    net.pump()
    hdr, packet = super_packet("10.66.0.1", "10.66.0.9", 8 * MSS + 100)
    net.relay.tun_super(hdr, packet, net.now)
    net.pump()
    check_segments(net.stock_got, "10.66.0.1", "10.66.0.9", 8 * MSS + 100)


def test_partial_checksums_between_gtun_nodes_only() -> None:
    """With the relay's TUN completing checksums, gtun clients over UDP leave TCP
    checksums partial (the pseudo-header sum) both ways; the relay completes them for
    a peer that does not take them (a stock peer, or a client that did not offer)."""
    net = Net(c1_stream=False, c2_stream=False, partial_ok=True, accept_partial=("c1",))
    net.start()
    c1, c2 = net.client("c1"), net.client("c2")
    assert c1.relay.caps.partial and c1.config is not None and c1.config.partial
    assert not c2.relay.caps.partial
    # c1 -> relay: partial segments, which finish into exactly the full ones.
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 4 * MSS)
    c1.tun_super(hdr, packet, net.now)
    net.pump()
    full = segment(hdr, packet)
    assert net.tun_in != full and [finish_tcp_checksum(p) for p in net.tun_in] == full  # type: ignore[arg-type]
    # c1 -> c2 (which did not offer): the relay completes them; c2 gets valid packets.
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 5 * MSS + 9)
    c1.tun_super(hdr, packet, net.now)
    net.pump()
    check_segments(net.take("c2"), "10.66.0.2", "10.66.0.3", 5 * MSS + 9)  # type: ignore[arg-type]
    # c1 -> stock peer: likewise.
    net.stock.send_keepalive(next(iter(net.stock.peers.values())), net.now)
    net.pump()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.9", 3 * MSS)
    c1.tun_super(hdr, packet, net.now)
    net.pump()
    check_segments(net.stock_got, "10.66.0.2", "10.66.0.9", 3 * MSS)
    # relay -> c1: partial; relay -> c2: full.
    for name, address in (("c1", "10.66.0.2"), ("c2", "10.66.0.3")):
        hdr, packet = super_packet("10.66.0.1", address, 2 * MSS)
        net.relay.tun_super(hdr, packet, net.now)
        net.pump()
        got = net.take(name)
        if name == "c1":
            assert got != segment(hdr, packet)
            assert [finish_tcp_checksum(p) for p in got] == segment(hdr, packet)  # type: ignore[arg-type]
        else:
            assert got == segment(hdr, packet)


def test_no_partial_checksums_without_the_relays_offloads() -> None:
    net = Net(c1_stream=False, accept_partial=("c1",))  # the relay's partial_ok stays False
    net.start()
    assert not net.client("c1").relay.caps.partial
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 2 * MSS)
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    assert net.tun_in == segment(hdr, packet)


def test_ipv6_super_packet_segments() -> None:
    hdr, packet = super_packet("fd00::2", "fd00::1", 9 * MSS + 1, v6=True)
    check_segments(segment(hdr, packet), "fd00::2", "fd00::1", 9 * MSS + 1)


def test_spoofed_super_packet_is_counted() -> None:
    net = Net()
    net.start()
    hdr, packet = super_packet("10.66.0.3", "10.66.0.1", 4 * MSS)  # c1 claims c2's address
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    assert net.tun_in == [] and net.relay.drops["spoofed"] == 1


def test_old_client_without_bulk_gets_packets() -> None:
    """A client whose configuration request does not offer bulk frames (an older gtun)
    never gets one, even over TCP."""
    net = Net()
    net.start()
    peer = net.relay.wg.peers[net.client("c2").wg.public_key]
    peer.data.caps = replace(peer.data.caps, bulk=False)
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 6 * MSS)
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    got = net.take("c2")
    assert len(got) == 6
    check_segments(got, "10.66.0.2", "10.66.0.3", 6 * MSS)  # type: ignore[arg-type]


def test_tap_relay_does_not_offer_bulk() -> None:
    relay = Relay(secrets.token_bytes(32), relay_settings(mode="tap"))
    net = CoreLink(relay, now=1000.0)
    client = ClientCore(secrets.token_bytes(32), relay.wg.public_key, Stream("R"), mode=None)
    net.add_client(Stream("c1"), client)
    net.relay_addr["c1"] = Stream("R")
    relay.set_peers([PeerSpec("c1", client.wg.public_key, IPv4Address("10.66.0.2"))])
    net.start()
    assert client.config is not None and client.config.mode == "tap"
    assert not client.config.bulk and not client.relay.caps.bulk
    # and takes none: a bulk frame is dropped as not negotiated (it was "malformed").
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 3 * MSS)
    client.wg.send(client.server, bulk.push_bulk(hdr, packet), net.now)
    net.pump()
    assert net.tun_in == [] and relay.drops["not_negotiated"] == 1


# --- the bulk frame codec: a peer's header is checked before it reaches the kernel -------


def frame(hdr: Gso, packet: bytes, padding: int = 0) -> bytes:
    return bulk.MAGIC + bulk.push_gso(hdr) + packet + bytes(padding)


def test_pull_bulk_round_trip_trims_padding_and_fixes_hdr_len() -> None:
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 3 * MSS)
    got_hdr, got = bulk.pull_bulk(frame(hdr._replace(hdr_len=7), packet, padding=11))
    assert got == packet and got_hdr == hdr
    assert bulk.pull_bulk(bulk.push_bulk(hdr, packet)) == (hdr, packet)


@pytest.mark.parametrize(
    "change",
    [
        {"gso_type": GSO_TCPV6},  # IPv4 packet called IPv6
        {"gso_type": 3},  # UDP fragmentation offload
        {"csum_offset": 6},
        {"csum_start": 24},
        {"flags": 0},  # GSO without the checksum to finish
        {"flags": 0x80},
        {"gso_size": 0},
        {"gso_size": 87},  # below Linux's smallest MSS
    ],
)
def test_pull_bulk_refuses_impossible_headers(change: dict[str, int]) -> None:
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 3 * MSS)
    with pytest.raises(bulk.BulkError):
        bulk.pull_bulk(frame(hdr._replace(**change), packet))


@pytest.mark.parametrize(
    "plaintext",
    [
        bulk.MAGIC + bytes(12),
        bulk.MAGIC + bytes(10) + b"\x45" + bytes(30),  # IPv4 total length 0
        bulk.MAGIC + bytes(10) + b"\x60" + bytes(30),  # IPv6 shorter than its header
        bulk.MAGIC + bytes(10) + b"\x15" + bytes(40),  # not IP
    ],
)
def test_pull_bulk_refuses_garbage(plaintext: bytes) -> None:
    with pytest.raises(bulk.BulkError):
        bulk.pull_bulk(plaintext)


def test_pull_bulk_refuses_data_after_the_packet() -> None:
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 3 * MSS)
    with pytest.raises(bulk.BulkError):
        bulk.pull_bulk(frame(hdr, packet) + b"\x01")


def test_bad_bulk_from_a_peer_is_counted_not_forwarded() -> None:
    net = Net()
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 3 * MSS)
    c1 = net.client("c1")
    c1.wg.send(c1.server, frame(hdr._replace(csum_offset=2), packet), net.now)
    net.pump()
    assert net.tun_in == [] and net.relay.drops["bad_bulk"] == 1


def test_plain_non_gso_packet_with_checksum_to_finish() -> None:
    """A packet the kernel left its checksum to us (NEEDS_CSUM, no GSO) goes out with
    the checksum finished."""
    net = Net(c1_stream=False)
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.1", 600)
    # As the kernel leaves it: the pseudo-header sum (not complemented) in the field.
    pseudo = packet[12:20] + bytes([0, 6]) + (len(packet) - 20).to_bytes(2)
    partial = sum(int.from_bytes(pseudo[i : i + 2]) for i in range(0, 12, 2))
    while partial > 0xFFFF:
        partial = (partial & 0xFFFF) + (partial >> 16)
    packet = packet[:36] + partial.to_bytes(2) + packet[38:]
    net.client("c1").tun_super(hdr._replace(gso_type=GSO_NONE, gso_size=0), packet, net.now)
    net.pump()
    assert len(net.tun_in) == 1 and isinstance(net.tun_in[0], bytes)
    check_segments(net.tun_in, "10.66.0.2", "10.66.0.1", 600)  # type: ignore[arg-type]


# --- what a peer may make the relay send (issue 10, hostile peers) -----------------------


def udp4(src: str, dst: str, size: int) -> bytes:
    """A plain IPv4 UDP packet of `size` bytes in all: no GSO could cut it."""
    return bytes(IP(src=src, dst=dst) / UDP(sport=5000, dport=5001) / bytes(size - 28))


def test_bulk_frame_from_a_stock_peer_is_dropped() -> None:
    """A stock WireGuard peer never negotiated bulk frames: its bulk frames are not
    written to the relay's TUN nor sent on, but dropped and counted against it."""
    net = Net()
    net.start()
    assert net.stock is not None
    relay_peer = net.stock.peers[net.relay.wg.public_key]
    hdr, packet = super_packet("10.66.0.9", "10.66.0.1", 3 * MSS)
    net.stock.send(relay_peer, bulk.push_bulk(hdr, packet), net.now)
    hdr, packet = super_packet("10.66.0.9", "10.66.0.2", 3 * MSS)
    net.stock.send(relay_peer, bulk.push_bulk(hdr, packet), net.now)
    net.pump()
    assert net.tun_in == [] and net.take("c1") == []
    assert net.relay.drops["not_negotiated"] == 2
    stock = net.relay.wg.peers[net.stock.public_key]
    assert stock.data.drops["not_negotiated"] == 2


def test_bulk_frame_from_a_client_that_did_not_offer_bulk_is_dropped() -> None:
    """A client whose (latest) configuration request did not offer bulk frames may not
    send any either."""
    net = Net()
    net.start()
    c1 = net.client("c1")
    c1.wg.send(c1.server, tm.push_config_request(tm.ConfigRequest(mode="tun")), net.now)
    net.pump()
    assert not net.relay.wg.peers[c1.wg.public_key].data.caps.bulk
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 3 * MSS)
    c1.wg.send(c1.server, bulk.push_bulk(hdr, packet), net.now)
    net.pump()
    assert net.take("c2") == [] and net.relay.drops["not_negotiated"] == 1


def test_client_drops_bulk_frames_its_relay_did_not_grant() -> None:
    """The client's side of the same: bulk frames from a relay whose configuration did
    not grant them are dropped."""
    net = Net()
    net.start()
    c2 = net.client("c2")
    c2.relay.caps = replace(c2.relay.caps, bulk=False)  # as if the relay said "bulk": false
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 3 * MSS)
    net.client("c1").tun_super(hdr, packet, net.now)
    net.pump()
    assert net.take("c2") == [] and c2.drops["not_negotiated"] == 1


@pytest.mark.parametrize("c2_stream", [False, True])
def test_plain_packet_over_the_mtu_in_a_bulk_frame_is_not_sent_on(c2_stream: bool) -> None:
    """A bulk frame's packet without GSO cannot be cut to a peer's MTU: one larger than
    the tunnel MTU reaches no peer, over UDP nor TCP (only a super-packet is a bulk
    peer's to take whole); the relay's own TUN takes it (its kernel applies the MTU of
    the route it leaves by, as it does for any packet it receives)."""
    net = Net(c2_stream=c2_stream)
    net.start()
    c1 = net.client("c1")
    big = udp4("10.66.0.2", "10.66.0.3", 60000)
    c1.wg.send(c1.server, bulk.push_bulk(PLAIN, big), net.now)
    c1.wg.send(c1.server, bulk.push_bulk(PLAIN, udp4("10.66.0.2", "10.66.0.9", 1421)), net.now)
    net.pump()
    assert net.take("c2") == [] and net.stock_got == []
    assert net.relay.drops["too_big"] == 2
    assert net.relay.wg.peers[c1.wg.public_key].data.drops["too_big"] == 2
    fits = udp4("10.66.0.2", "10.66.0.3", 1420)
    c1.wg.send(c1.server, bulk.push_bulk(PLAIN, fits), net.now)
    to_relay = udp4("10.66.0.2", "10.66.0.1", 60000)
    c1.wg.send(c1.server, bulk.push_bulk(PLAIN, to_relay), net.now)
    net.pump()
    assert net.take("c2") == [fits] and net.tun_in == [(PLAIN, to_relay)]


def test_plain_packet_over_the_mtu_is_not_sent_on() -> None:
    """The same without bulk frames: a peer's plain packet over the tunnel MTU (one
    transport message holds up to 64 KB) goes to no other peer."""
    net = Net(c1_stream=False, c2_stream=False)
    net.start()
    c1 = net.client("c1")
    c1.wg.send(c1.server, udp4("10.66.0.2", "10.66.0.3", 9000), net.now)
    c1.wg.send(c1.server, udp4("10.66.0.2", "10.66.0.9", 1421), net.now)
    net.pump()
    assert net.take("c2") == [] and net.stock_got == []
    assert net.relay.drops["too_big"] == 2
    c1.wg.send(c1.server, udp4("10.66.0.2", "10.66.0.3", 1420), net.now)
    net.pump()
    assert len(net.take("c2")) == 1


@pytest.mark.parametrize("v6", [False, True])
def test_super_packet_with_segments_over_the_mtu_is_cut_to_the_mtu(v6: bool) -> None:
    """A bulk frame's super-packet whose segment size is larger than the tunnel MTU
    allows reaches a peer that does not take bulk frames (UDP, stock) as segments of the
    MTU, the payload whole and in order."""
    net = Net(c2_stream=False)
    if v6:
        net.relay.settings.network6 = IPv6Network("fd66::/64")
        specs = [
            PeerSpec(p.data.spec.name, p.public_key, p.data.spec.address, address6=a6)
            for p, a6 in zip(
                net.relay.wg.peers.values(),
                (IPv6Address("fd66::9"), IPv6Address("fd66::2"), IPv6Address("fd66::3")),
                strict=True,
            )
        ]
        net.relay.set_peers(specs)
    net.start()
    src, dst = ("fd66::2", "fd66::3") if v6 else ("10.66.0.2", "10.66.0.3")
    hdr, packet = super_packet(src, dst, 40000, v6=v6)
    c1 = net.client("c1")
    c1.wg.send(c1.server, bulk.push_bulk(hdr._replace(gso_size=9000), packet), net.now)
    net.pump()
    got = net.take("c2")
    assert got and all(isinstance(p, bytes) and len(p) <= 1420 for p in got)
    size = 1420 - hdr.hdr_len
    check_segments(got, src, dst, 40000, mss=size)  # type: ignore[arg-type]


def test_super_packet_within_the_mtu_is_cut_at_its_own_segment_size() -> None:
    net = Net(c2_stream=False)
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 10 * 1000)
    c1 = net.client("c1")
    c1.wg.send(c1.server, bulk.push_bulk(hdr._replace(gso_size=1000), packet), net.now)
    net.pump()
    check_segments(net.take("c2"), "10.66.0.2", "10.66.0.3", 10000, mss=1000)  # type: ignore[arg-type]


def test_bulk_peer_takes_a_super_packet_whole_whatever_its_segment_size() -> None:
    """A gtun node over TCP that took bulk frames gets the super-packet as it came: its
    own kernel cuts it."""
    net = Net()
    net.start()
    hdr, packet = super_packet("10.66.0.2", "10.66.0.3", 40000)
    big = hdr._replace(gso_size=9000)
    c1 = net.client("c1")
    c1.wg.send(c1.server, bulk.push_bulk(big, packet), net.now)
    net.pump()
    assert net.take("c2") == [(big, packet)]


@pytest.mark.parametrize("sender", ["relay", "c1"])
def test_small_segments_travel_as_packets_not_a_refused_bulk_frame(sender: str) -> None:
    """Found by fuzz/tun_super.py: a super-packet of 48-byte segments (Linux sends them,
    net.ipv4.tcp_min_snd_mss; GRO merges a remote sender's) went as a bulk frame that
    the receiver refuses (segment size under bulk's minimum) and was lost.  A frame the
    receiver would refuse is not sent: its segments go instead."""
    net = Net()
    net.start()
    src = "10.66.0.1" if sender == "relay" else "10.66.0.2"
    hdr, packet = super_packet(src, "10.66.0.3", 30 * 48 + 7)
    hdr = hdr._replace(gso_size=48)
    core = net.relay if sender == "relay" else net.client("c1")
    core.tun_super(hdr, packet, net.now)
    net.pump()
    got = net.take("c2")
    assert net.client("c2").drops["bad_bulk"] == 0
    assert sum(p.data.drops.get("bad_bulk", 0) for p in net.relay.wg.peers.values()) == 0
    if len(got) == 1 and isinstance(got[0], tuple):  # coalesced again at the relay
        got = segment(*got[0])
    assert got == segment(hdr, packet)


def test_a_checksum_over_the_ip_header_is_refused_not_delivered() -> None:
    """Found by fuzz/tun_super.py: a read whose header asked for a checksum at offset 0
    (no kernel writes one) had it written over the IPv4 header after routing: the
    client got a packet that now read as IPv6 to an address not its own.  The read is
    dropped and counted."""
    net = Net(c2_stream=False)
    net.start()
    _, packet = super_packet("10.66.0.1", "10.66.0.3", 500)
    net.relay.tun_super(Gso(F_NEEDS_CSUM, GSO_NONE, 0, 0, 0, 0), packet, net.now)
    net.pump()
    assert net.take("c2") == []
    assert net.relay.drops["bad_gso"] == 1
