"""Tier 1: the cores' invariants under hostile input from an authenticated peer.

A gtun client "h" (hostile, but holding a valid key) sends random and mutated plaintexts
through its own WireGuard session: random bytes, IPv4/IPv6 packets (with extension
headers), bulk frames, gtun messages with odd JSON, Ethernet frames with ARP and
neighbour discovery.  Whatever it sends:

- nothing raises out of Relay.receive_datagram / datagrams_to_send / tun_writes;
- nothing delivered (to the relay's TUN/TAP or another peer) speaks for an address,
  MAC or link-local address that is not h's;
- the relay's state stays bounded;
- the other peers' sessions keep working.

The same for the client core under a hostile relay.  Each known hole also has its own
regression test.
"""

from __future__ import annotations

import json
import secrets
import struct
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtun.core import bulk, l2frame
from gtun.core import tunnel as tm
from gtun.core.client import ClientCore, ConfigReceived
from gtun.core.drops import REASONS
from gtun.core.forward import FLOW_CACHE_SIZE, IpForwarder
from gtun.core.offload import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, Gso, push_gso
from gtun.core.packet import build_icmp_echo, build_ipv4, ipv6_upper, parse_addresses
from gtun.core.relay import MAX_EVENTS, PeerJoined, PeerSpec, Relay
from gtun.testing.link import CoreLink, relay_settings

NAMES = {r.name for r in REASONS}
FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Stream(str):
    """A stream (TCP) endpoint's name: bulk frames may go there."""

    stream = True


# --- the network ---------------------------------------------------------------------------


class Net(CoreLink):
    """Relay "R" (TUN or TAP, IPv6 fd66::/64); clients h (hostile: 10.66.0.2, fd66::2),
    a (10.66.0.3, fd66::3) and b (10.66.0.4, fd66::4); h and a over streams (bulk
    frames), and in TUN mode h and a with partial checksums, b without."""

    def __init__(self, mode: str = "tun") -> None:
        settings_ = relay_settings(
            mode=mode, network6=IPv6Network("fd66::/64"), partial_ok=mode == "tun"
        )
        super().__init__(Relay(secrets.token_bytes(32), settings_), now=1000.0)
        specs = []
        for i, name in enumerate(("h", "a", "b"), start=2):
            stream = name != "b"
            relay_endpoint = Stream("R") if stream else "R"
            client = ClientCore(
                secrets.token_bytes(32),
                self.relay.wg.public_key,
                relay_endpoint,
                mode=mode,
                accept_partial=name != "b",
            )
            self.add_client(Stream(name) if stream else name, client)
            self.relay_addr[name] = relay_endpoint
            specs.append(
                PeerSpec(
                    name,
                    client.wg.public_key,
                    IPv4Address(f"10.66.0.{i}"),
                    address6=IPv6Address(f"fd66::{i}"),
                )
            )
        self.relay.set_peers(specs)
        self.start()
        for name in self.clients:
            assert self.clients[name].config is not None, name
            self.take(name)
        self.tun_in.clear()

    def mac(self, name: str) -> bytes:
        return l2frame.mac_bytes_for_key(self.clients[name].wg.public_key)

    def send_from_h(self, plaintext: bytes) -> None:
        h = self.clients["h"]
        h.wg.send(h.server, plaintext, self.now)
        self.pump()

    def still_works(self) -> None:
        """a and b reach each other (and the relay's device)."""
        a, b = self.clients["a"], self.clients["b"]
        packet = build_icmp_echo("10.66.0.3", "10.66.0.4", 7, 7, b"ok")
        if self.relay.forwarder.tap:
            packet = self.mac("b") + self.mac("a") + b"\x08\x00" + packet
        a.tun_packet(packet, self.now)
        self.pump()
        assert self.take("b") == [packet]
        if not self.relay.forwarder.tap:
            to_relay = build_icmp_echo("10.66.0.4", "10.66.0.1", 7, 7, b"ok")
            b.tun_packet(to_relay, self.now)
            self.pump()
            assert self.tun_in[-1] == to_relay
        self.tun_in.clear()

    def bounded(self) -> None:
        relay = self.relay
        fwd = relay.forwarder
        if isinstance(fwd, IpForwarder):
            assert len(fwd._flows) <= len(relay.wg.peers)
            assert all(len(flows) <= FLOW_CACHE_SIZE for flows in fwd._flows.values())
            assert not fwd._forward
        assert not fwd.tun_out
        for peer in relay.wg.peers.values():
            assert set(peer.data.drops) <= NAMES
        assert set(relay.drops) <= NAMES


LINK_LOCAL = IPv6Network("fe80::/10")


def check_tun_delivery(net: Net) -> None:
    """Everything h's plaintexts made the relay deliver speaks for h only, and what it
    made the relay send a peer is what that peer takes: packets within the tunnel MTU,
    super-packets only to a (over a stream, bulk frames)."""
    own = {IPv4Address("10.66.0.2").packed, IPv6Address("fd66::2").packed}
    delivered = list(net.tun_in)
    for name in ("a", "b"):
        got = net.take(name)
        for item in got:
            if isinstance(item, tuple):
                assert name == "a", item
            else:
                assert len(item) <= net.relay.settings.mtu, (name, len(item))
        delivered += got
    net.tun_in.clear()
    for item in delivered:
        packet = item[1] if isinstance(item, tuple) else item
        addrs = parse_addresses(packet)
        assert addrs is not None, packet.hex()
        assert addrs[0] in own, packet.hex()
        if packet[0] >> 4 == 6:
            upper = ipv6_upper(packet)
            assert upper is not None and not upper.redirected, packet.hex()


def check_tap_delivery(net: Net) -> None:
    """Every frame h's plaintexts had switched speaks for h only: its MAC, its ARP
    sender, its IPv4 and IPv6 addresses and link-local address, no router messages."""
    mac = net.mac("h")
    link_local = l2frame.link_local_for_mac(mac)
    own6 = {IPv6Address("fd66::2").packed, link_local}
    delivered = list(net.tun_in)
    for name in ("a", "b"):
        delivered += net.take(name)
    net.tun_in.clear()
    for frame in delivered:
        assert isinstance(frame, bytes)
        assert frame[6:12] == mac, frame.hex()
        sender = l2frame.ipv4_sender(frame)
        assert sender in (None, bytes(4), IPv4Address("10.66.0.2").packed), frame.hex()
        assert l2frame.arp_sender_mac(frame) in (None, mac), frame.hex()
        facts = l2frame.ipv6_facts(frame)
        if facts is None:
            continue
        assert not isinstance(facts, str), frame.hex()
        assert facts.source in own6 or (facts.source == bytes(16) and facts.icmp >= 0)
        assert not facts.target or facts.target in own6
        assert all(lladdr == mac for lladdr in facts.lladdrs)
        assert facts.icmp not in (134, 137) and not facts.redirected


# --- what h sends ---------------------------------------------------------------------------


def ipv6(src: str, dst: str, next_header: int, body: bytes, hop: int = 64) -> bytes:
    return (
        b"\x60\x00\x00\x00"
        + struct.pack("!HBB", len(body), next_header, hop)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + body
    )


def ext(next_header: int, body: bytes = bytes(6)) -> bytes:
    """An extension header (hop-by-hop, routing or destination options) of 8 bytes."""
    return bytes([next_header, 0]) + body


ROUTING = bytes([0, 0]) + bytes([4, 1]) + bytes(4)  # type 4 (SRH), segments left 1
HOME_ADDRESS = bytes([0xC9, 4]) + bytes(4)  # option 0xC9, 4 of its 16 bytes (truncated)
ECHO6 = bytes([128, 0, 0, 0, 0, 1, 0, 1]) + b"hi"
MLD_REPORT = bytes([143]) + bytes(7)  # an MLDv2 report with no records (RFC 3810)


def tcp4(src: str, dst: str, seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    header = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 0x50, flags, 512, 0, 0)
    return build_ipv4(src, dst, 6, header + payload)


def tun_templates() -> list[bytes]:
    h, a = "10.66.0.2", "10.66.0.3"
    tcp = tcp4(h, a, 1, b"x" * 200)
    tcp_b = tcp4(h, "10.66.0.4", 1, b"y" * 300)
    big_b = tcp4(h, "10.66.0.4", 1, b"w" * 6000)
    return [
        big_b,
        bulk.MAGIC + push_gso(Gso(F_NEEDS_CSUM, GSO_TCPV4, 40, 3000, 20, 16)) + big_b,
        bulk.MAGIC + push_gso(Gso(0, GSO_NONE, 0, 0, 0, 0)) + big_b,
        tcp_b,
        bulk.MAGIC + push_gso(Gso(F_NEEDS_CSUM, GSO_TCPV4, 40, 100, 20, 16)) + tcp_b,
        bulk.MAGIC + push_gso(Gso(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)) + tcp_b,
        build_icmp_echo(h, a, 1, 1, b"hello"),
        build_icmp_echo(h, "10.66.0.1", 1, 1, b"relay"),
        build_icmp_echo(h, "192.0.2.1", 1, 1, b"out"),
        build_icmp_echo("10.66.0.3", "10.66.0.4", 1, 1, b"spoof"),
        tcp,
        ipv6("fd66::2", "fd66::3", 58, ECHO6),
        ipv6("fd66::2", "fd66::1", 0, ext(58) + ECHO6),
        ipv6("fd66::2", "fd66::1", 43, ext(58, ROUTING[2:]) + ECHO6),
        ipv6("fd66::2", "fd66::3", 60, ext(58, HOME_ADDRESS) + ECHO6),
        ipv6("fd66::2", "fd66::3", 44, bytes([58, 0, 0, 0, 0, 0, 0, 1]) + ECHO6),
        bulk.MAGIC + push_gso(Gso(F_NEEDS_CSUM, GSO_TCPV4, 40, 100, 20, 16)) + tcp,
        bulk.MAGIC + push_gso(Gso(0, GSO_NONE, 0, 0, 0, 0)) + tcp,
        tm.push_config_request(tm.ConfigRequest(mode="tun", bulk=True, partial=True)),
        tm.push_message(tm.PING),
    ]


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def tap_templates(net: Net) -> list[bytes]:
    mac, other = net.mac("h"), net.mac("a")
    relay_mac = l2frame.mac_bytes_for_key(net.relay.wg.public_key)
    bcast = b"\xff" * 6
    ll = str(IPv6Address(l2frame.link_local_for_mac(mac)))
    slla = bytes([1, 1]) + mac
    na = bytes([136, 0, 0, 0, 0x60, 0, 0, 0]) + IPv6Address("fd66::2").packed
    ns = bytes([135, 0, 0, 0, 0, 0, 0, 0]) + IPv6Address("fd66::3").packed
    arp = bytes.fromhex("0001080006040002") + mac + IPv4Address("10.66.0.2").packed
    arp += bytes(6) + IPv4Address("10.66.0.3").packed
    frames = [
        eth(bcast, mac, 0x0806, arp),
        eth(other, mac, 0x0800, build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"hi")),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 58, na + bytes([2, 1]) + mac, 255)),
        eth(bcast, mac, 0x86DD, ipv6("::", "ff02::1:ff00:3", 58, ns, 255)),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1:ff00:3", 58, ns + slla, 255)),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::2", 58, bytes([133, 0, 0, 0, 0, 0, 0, 0]) + slla)),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 0, ext(58) + na, 255)),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 60, ext(58) + na, 255)),
        eth(bcast, mac, 0x86DD, ipv6("::", "ff02::16", 0, ext(58) + MLD_REPORT)),
        eth(other, mac, 0x86DD, ipv6("fd66::2", "fd66::3", 43, ext(58, ROUTING[2:]) + ECHO6)),
        eth(other, relay_mac, 0x0800, build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"x")),
    ]
    return [l2frame.push_frame(f) for f in frames] + [tm.push_message(tm.PING)]


def mutate(template: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(template)
    for at, value in edits:
        data[at % len(data)] = value
    if cut:
        data = data[: max(1, len(data) - cut)] if cut > 0 else data + bytes(-cut)
    return bytes(data)


def plaintexts(templates: list[bytes]) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4)
    mutated = st.builds(mutate, st.sampled_from(templates), edits, st.integers(-64, 64))
    return st.one_of(
        st.binary(min_size=1, max_size=300),
        st.sampled_from(templates),
        mutated,
        mutated,
    )


# --- the properties -------------------------------------------------------------------------


def test_relay_in_tun_mode_holds_its_invariants_whatever_a_peer_sends() -> None:
    net = Net("tun")

    @FAST
    @given(st.lists(plaintexts(tun_templates()), min_size=1, max_size=4))
    def run(batch: list[bytes]) -> None:
        h = net.clients["h"]
        for plaintext in batch:  # one batch: the forward gathering sees them together
            h.wg.send(h.server, plaintext, net.now)
        net.pump()
        check_tun_delivery(net)
        net.bounded()

    run()
    net.still_works()


def test_relay_in_tap_mode_switches_no_foreign_claims_whatever_a_peer_sends() -> None:
    net = Net("tap")

    @FAST
    @given(st.lists(plaintexts(tap_templates(net)), min_size=1, max_size=4))
    def run(batch: list[bytes]) -> None:
        for plaintext in batch:
            net.send_from_h(plaintext)
        check_tap_delivery(net)
        net.bounded()

    run()
    net.still_works()


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
CONFIG_KEYS = ("address", "prefix", "gateway", "routes", "mtu", "dns", "mode", "name")
CONFIG_KEYS += ("network", "address6", "prefix6", "gateway6", "bulk", "csum")


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    """A CONFIG message: a valid one with some values replaced by any JSON."""
    payload: dict[str, object] = {
        "name": "a",
        "address": "10.66.0.3",
        "prefix": 24,
        "gateway": "10.66.0.1",
        "routes": [],
        "mtu": 1420,
        "dns": [],
        "mode": "tun",
        "address6": "fd66::3",
        "prefix6": 64,
        "gateway6": "fd66::1",
    }
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=3)):
        payload[key] = draw(JSON)
    body = json.dumps(payload).encode()[: tm.MAX_PAYLOAD]
    return tm.HEADER.pack(tm.MAGIC, tm.CONFIG, len(body)) + body


@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_client_core_survives_whatever_the_relay_sends(mode: str) -> None:
    net = Net(mode)
    a = net.clients["a"]
    peer_a = net.relay.peer_by_name("a")
    assert peer_a is not None
    templates = tun_templates() + tap_templates(net)
    templates.append(tm.push_message(tm.REFUSED, {"reason": "x"}))

    @FAST
    @given(st.lists(plaintexts(templates) | configs(), min_size=1, max_size=3))
    def run(batch: list[bytes]) -> None:
        for plaintext in batch:
            net.relay.wg.send(peer_a, plaintext, net.now)
        net.pump()
        config = a.config
        assert config is not None
        assert type(config.mtu) is int and 576 <= config.mtu <= 9000
        assert type(config.prefix) is int and 1 <= config.prefix <= 32
        assert len(net.events["a"]) <= 10_000

    run()


# --- regression tests, one per hole ----------------------------------------------------------


def test_deeply_nested_or_huge_json_from_a_peer_is_malformed_not_an_exception() -> None:
    net = Net("tun")
    h = net.relay.peer_by_name("h")
    assert h is not None
    for body in (b"[" * 4000 + b"]" * 4000, b'{"n":' + b"1" * 5000 + b"}"):
        net.send_from_h(tm.HEADER.pack(tm.MAGIC, tm.PING, len(body)) + body)
    assert h.data.drops.get("malformed") == 2
    net.still_works()


def test_config_with_infinity_or_wrong_types_is_malformed() -> None:
    for key, value in (
        ("prefix", float("inf")),
        ("mtu", float("nan")),
        ("prefix", True),
        ("mtu", "1420"),
        ("prefix6", 10**30),
        ("routes", "10.0.0.0/8"),
        ("address", 167772161),
        ("name", ["x"]),
    ):
        payload = {"address": "10.66.0.3", "prefix": 24, "gateway": "10.66.0.1", "mtu": 1420}
        payload |= {"address6": "fd66::3", "prefix6": 64, "gateway6": "fd66::1", key: value}
        try:
            tm.parse_pushed_config(json.loads(json.dumps(payload)))
        except tm.TunnelMessageError:
            continue
        raise AssertionError(f"{key}={value!r} accepted")


def test_coalesced_run_larger_than_a_bulk_frame_is_split_not_raised() -> None:
    net = Net("tun")
    h = net.clients["h"]
    # 48 segments of 1364 bytes: one run of 65512 bytes, over what a bulk frame holds.
    size = 1364
    for i in range(48):
        h.wg.send(h.server, tcp4("10.66.0.2", "10.66.0.3", 1 + i * size, b"z" * size), net.now)
    assert 40 + 48 * size > bulk.MAX_PACKET
    net.pump()
    got = net.take("a")
    payload = sum(len(p[1]) - p[0].hdr_len if isinstance(p, tuple) else len(p) - 40 for p in got)
    assert payload == 48 * size and len(got) >= 2


def test_ipv6_routing_header_or_home_address_cannot_slip_past_the_source_check() -> None:
    net = Net("tun")
    h = net.relay.peer_by_name("h")
    assert h is not None
    for packet in (
        ipv6("fd66::2", "fd66::1", 43, ext(58, ROUTING[2:]) + ECHO6),
        ipv6("fd66::2", "fd66::3", 60, ext(58, HOME_ADDRESS) + ECHO6),
        ipv6("fd66::2", "fd66::3", 0, ext(43) + ext(58, ROUTING[2:]) + ECHO6),
    ):
        net.send_from_h(packet)
    net.send_from_h(ipv6("fd66::2", "fd66::3", 0, ext(0) * 20 + ECHO6))  # too long a chain
    assert net.tun_in == [] and net.take("a") == []
    assert h.data.drops == {"source_routed": 3, "malformed": 1}
    fine = ipv6("fd66::2", "fd66::3", 0, ext(58) + ECHO6)
    net.send_from_h(fine)
    assert net.take("a") == [fine]


def test_tap_peer_is_pinned_to_its_mac_and_link_local() -> None:
    net = Net("tap")
    h = net.relay.peer_by_name("h")
    assert h is not None
    mac, other = net.mac("h"), net.mac("a")
    relay_mac = l2frame.mac_bytes_for_key(net.relay.wg.public_key)
    ll = str(IPv6Address(l2frame.link_local_for_mac(mac)))
    other_ll = str(IPv6Address(l2frame.link_local_for_mac(other)))
    bcast = b"\xff" * 6
    na_relay = bytes([136, 0, 0, 0, 0x60, 0, 0, 0]) + IPv6Address("fd66::1").packed
    na_own = bytes([136, 0, 0, 0, 0x60, 0, 0, 0]) + IPv6Address("fd66::2").packed
    ns = bytes([135, 0, 0, 0, 0, 0, 0, 0]) + IPv6Address("fd66::3").packed
    arp = bytes.fromhex("0001080006040002") + other + IPv4Address("10.66.0.2").packed
    arp += bytes(6) + IPv4Address("10.66.0.3").packed
    echo = build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"hi")
    spoofs = [
        eth(other, relay_mac, 0x0800, echo),  # the relay's MAC
        eth(other, other, 0x0800, echo),  # a's MAC, whether or not the switch knows it
        eth(bcast, mac, 0x0806, arp),  # its own address at a's MAC
        eth(bcast, mac, 0x86DD, ipv6(other_ll, "ff02::1", 58, ECHO6)),  # a's link-local
        eth(bcast, mac, 0x86DD, ipv6("fe80::1", "ff02::1", 58, ECHO6)),  # any link-local
        # The relay's address behind a hop-by-hop / destination options header.
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 0, ext(58) + na_relay, 255)),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 60, ext(58) + na_relay, 255)),
        # Its own address, but at another MAC (target / source link-layer options).
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 58, na_own + bytes([2, 1]) + other, 255)),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1:ff00:3", 58, ns + bytes([1, 1]) + other, 255)),
        # Router advertisements and redirects are the relay's.
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 58, bytes([134]) + bytes(15), 255)),
        eth(other, mac, 0x86DD, ipv6(ll, other_ll, 58, bytes([137]) + bytes(39), 255)),
    ]
    for frame in spoofs:
        net.send_from_h(l2frame.push_frame(frame))
    assert net.take("a") == [] and net.tun_in == []
    assert h.data.drops == {"spoofed": len(spoofs)}
    ok = [
        eth(other, mac, 0x0800, echo),
        eth(bcast, mac, 0x86DD, ipv6(ll, "ff02::1", 0, ext(58) + na_own + bytes([2, 1]) + mac)),
        eth(bcast, mac, 0x86DD, ipv6("::", "ff02::1:ff00:3", 58, ns, 255)),  # DAD
    ]
    for frame in ok:
        net.send_from_h(l2frame.push_frame(frame))
    assert net.take("a") == ok


def test_tap_peer_cannot_take_a_mac_over_after_it_ages_out() -> None:
    net = Net("tap")
    switch = net.relay.switch
    assert switch is not None
    switch.aging = 1.0
    a_mac = net.mac("a")
    net.still_works()  # a's MAC is in the table
    net.now += 2.0  # ... and ages out
    assert switch.lookup(a_mac, net.now) is None
    for name in net.clients:
        net.take(name)
    frame = eth(b"\xff" * 6, a_mac, 0x0800, build_icmp_echo("10.66.0.2", "10.66.0.9", 1, 1, b""))
    net.send_from_h(l2frame.push_frame(frame))
    assert switch.lookup(a_mac, net.now) is None
    assert net.take("b") == [] and net.tun_in == []
    h = net.relay.peer_by_name("h")
    assert h is not None and h.data.drops == {"spoofed": 1}


def test_relay_events_are_bounded_when_nobody_drains_them() -> None:
    net = Net("tun")
    h = net.clients["h"]
    relay = net.relay
    request = tm.push_config_request(tm.ConfigRequest(mode="tun", bulk=True))
    for _ in range(MAX_EVENTS + 50):
        h.wg.send(h.server, request, net.now)
        for data, _ in h.datagrams_to_send():
            relay.receive_datagram(data, Stream("h"), net.now)
    relay.datagrams_to_send()
    events = []
    while (event := relay.next_event()) is not None:
        events.append(event)
    assert len(events) == MAX_EVENTS and all(isinstance(e, PeerJoined) for e in events)
    assert relay.drops["events_full"] == 50


def test_client_events_are_bounded_when_nobody_drains_them() -> None:
    net = Net("tun")
    a = net.clients["a"]
    peer_a = net.relay.peer_by_name("a")
    assert peer_a is not None
    config = tm.push_config(net.relay.config_for(peer_a))
    for _ in range(1100):
        net.relay.wg.send(peer_a, config, net.now)
    for data, _ in net.relay.datagrams_to_send():
        a.receive_datagram(data, Stream("R"), net.now)
    events = []
    while (event := a.next_event()) is not None:
        events.append(event)
    assert len(events) == MAX_EVENTS and all(isinstance(e, ConfigReceived) for e in events)
    assert a.drops["events_full"] > 0


def test_a_huge_requested_mode_is_refused_not_an_exception() -> None:
    net = Net("tun")
    h = net.clients["h"]
    # 4 KB of UTF-8 in, but a refusal naming it (\u00e9 escapes: 12 KB) would not fit
    # a message: push_message raised LocalProtocolError out of receive_datagram.
    body = json.dumps({"mode": "\u00e9" * 2000}, ensure_ascii=False).encode()
    net.send_from_h(tm.HEADER.pack(tm.MAGIC, tm.CONFIG_REQUEST, len(body)) + body)
    assert h.state == "REFUSED"
    net.still_works()


def test_a_peer_opening_flow_after_flow_clears_only_its_own_verdicts() -> None:
    net = Net("tun")
    net.still_works()  # a's flow to b has a verdict
    fwd = net.relay.forwarder
    assert isinstance(fwd, IpForwarder)
    a = net.relay.peer_by_name("a")
    h = net.relay.peer_by_name("h")
    assert a is not None and h is not None
    a_flows = dict(fwd._flows[a])
    client = net.clients["h"]
    for i in range(FLOW_CACHE_SIZE + 10):
        dst = IPv4Address("198.18.0.0") + i
        client.wg.send(client.server, build_icmp_echo("10.66.0.2", dst, 1, 1, b""), net.now)
        if i % 500 == 0:
            net.pump()
    net.pump()
    assert fwd._flows[a] == a_flows and len(fwd._flows[h]) <= FLOW_CACHE_SIZE
    assert len(net.tun_in) == FLOW_CACHE_SIZE + 10
