"""Tier 1: a relay mesh, one hop (issue 12, part 3): three relay cores A, B and C of one
network, each a WireGuard peer of the others, and gtun clients at each, wired in memory
(testing/mesh.py).  B has a LAN behind it (192.168.77.0/24)."""

from __future__ import annotations

import secrets
import struct
from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtun.core import tunnel as tm
from gtun.core.errors import LocalProtocolError
from gtun.core.packet import build_icmp_echo, build_udp4, parse_addresses
from gtun.core.relay import (
    MeshError,
    MeshRelay,
    PeerJoined,
    PeerSetError,
    PeerSpec,
    Relay,
    SessionHere,
)
from gtun.core.wg import WireGuard
from gtun.testing.link import relay_settings
from gtun.testing.mesh import MeshLink
from test_invariants import mutate  # the same edits as the invariants of one relay

LAN = ip_network("192.168.77.0/24")


def ipv6_echo(src: str, dst: str, payload: bytes = b"v6") -> bytes:
    body = bytes([128, 0, 0, 0, 0, 1, 0, 1]) + payload
    return (
        b"\x60\x00\x00\x00"
        + struct.pack("!HBB", len(body), 58, 64)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + body
    )


def mesh() -> MeshLink:
    """a1 at A (10.66.0.2), b1 at B (10.66.0.3), c1 at C (10.66.0.4), a2 at A (.5)."""
    net = MeshLink({"A": (), "B": (LAN,), "C": ()})
    net.add_client("a1", "A", "10.66.0.2", "fd66::2")
    net.add_client("b1", "B", "10.66.0.3", "fd66::3")
    net.add_client("c1", "C", "10.66.0.4", "fd66::4")
    net.add_client("a2", "A", "10.66.0.5", "fd66::5")
    net.configure()
    for name, client in net.clients.items():
        assert client.config is not None, name
    for name in net.relays:
        for other in net.relays:
            if other != name:
                peer = net.relays[name].mesh_peer(other)
                assert peer is not None and peer.has_session, (name, other)
    net.mesh_log.clear()
    return net


def hops(net: MeshLink) -> list[tuple[str, str]]:
    """(relay that took it, relay it came from) of every mesh arrival, then cleared."""
    out = [(at, came) for at, came, _ in net.mesh_log]
    net.mesh_log.clear()
    return out


def test_clients_of_two_relays_ping_both_ways_ipv4_and_ipv6() -> None:
    net = mesh()
    for src, dst, a, b in (
        ("a1", "b1", "10.66.0.2", "10.66.0.3"),
        ("b1", "a1", "10.66.0.3", "10.66.0.2"),
        ("c1", "a1", "10.66.0.4", "10.66.0.2"),
    ):
        ping = build_icmp_echo(a, b, 1, 1, b"across")
        net.clients[src].tun_packet(ping, net.now)
        net.pump()
        assert net.take(dst) == [ping]
        assert hops(net) == [(net.home[dst], net.home[src])]  # exactly one mesh hop
        ping6 = ipv6_echo(a.replace("10.66.0.", "fd66::"), b.replace("10.66.0.", "fd66::"))
        net.clients[src].tun_packet(ping6, net.now)
        net.pump()
        assert net.take(dst) == [ping6]
        assert hops(net) == [(net.home[dst], net.home[src])]
    # Two clients of one relay never touch the mesh.
    local = build_icmp_echo("10.66.0.2", "10.66.0.5", 1, 1, b"local")
    net.clients["a1"].tun_packet(local, net.now)
    net.pump()
    assert net.take("a2") == [local] and hops(net) == []
    assert all(not tun for tun in net.tun_in.values())


def test_a_packet_from_a_relay_is_never_sent_on_to_a_third() -> None:
    net = mesh()
    a = net.relays["A"]
    # B speaks for its own client b1, but to c1, whose session is at C: a second hop.
    net.send_as_relay("B", "A", build_icmp_echo("10.66.0.3", "10.66.0.4", 1, 1, b"hop"))
    # ... to B's own LAN (back to B), to the internet, to a client of B itself.
    net.send_as_relay("B", "A", build_udp4("10.66.0.3", "192.168.77.9", 1, 2, b"hop"))
    net.send_as_relay("B", "A", build_udp4("10.66.0.3", "192.0.2.1", 1, 2, b"hop"))
    net.send_as_relay("B", "A", build_icmp_echo("10.66.0.3", "10.66.0.3", 1, 1, b"hop"))
    net.send_as_relay("B", "A", ipv6_echo("fd66::3", "fd66::4"))
    assert a.drops["mesh_hop"] == 5
    b_peer = a.mesh_peer("B")
    assert b_peer is not None and b_peer.data.drops == {"mesh_hop": 5}
    assert [came for _, came, _ in net.mesh_log] == ["B"] * 5  # A sent none of them on
    assert net.take("c1") == [] and net.take("b1") == [] and net.tun_in["A"] == []
    # What A does take from B: for its own client, and for its own address (its TUN).
    ok = build_icmp_echo("10.66.0.3", "10.66.0.2", 1, 1, b"ok")
    net.send_as_relay("B", "A", ok)
    assert net.take("a1") == [ok]
    to_relay = build_icmp_echo("10.66.0.3", "10.66.0.1", 1, 1, b"ok")
    net.send_as_relay("B", "A", to_relay)
    assert net.tun_in["A"] == [to_relay]


def test_spoofed_sources_from_a_mesh_relay_are_dropped() -> None:
    net = mesh()
    a = net.relays["A"]
    for src in ("10.66.0.2", "10.66.0.4", "10.66.0.200", "10.66.0.1", "192.0.2.7"):
        # A's own client, C's client, nobody, a relay address, the internet.
        net.send_as_relay("B", "A", build_icmp_echo(src, "10.66.0.5", 1, 1, b"spoof"))
    net.send_as_relay("B", "A", ipv6_echo("fd66::4", "fd66::5"))
    assert a.drops["mesh_spoofed"] == 6
    assert net.take("a2") == []
    # From B's LAN (a route B owns) is B's to send.
    lan = build_udp4("192.168.77.9", "10.66.0.5", 53, 1000, b"lan")
    net.send_as_relay("B", "A", lan)
    assert net.take("a2") == [lan]


def test_a_lan_behind_one_relay_is_reached_from_a_client_of_another() -> None:
    net = mesh()
    for name in ("a1", "c1", "b1"):  # every relay pushes the shared route
        config = net.clients[name].config
        assert config is not None and LAN in config.routes, name
    query = build_udp4("10.66.0.2", "192.168.77.10", 1000, 53, b"q")
    net.clients["a1"].tun_packet(query, net.now)
    net.pump()
    assert net.tun_in["B"] == [query]  # B's TUN: NAT happens at B
    assert net.tun_in["A"] == [] and hops(net) == [("B", "A")]
    answer = build_udp4("192.168.77.10", "10.66.0.2", 53, 1000, b"a")
    net.relays["B"].tun_packet(answer, net.now)  # the answer comes back into B's TUN
    net.pump()
    assert net.take("a1") == [answer]
    assert hops(net) == [("A", "B")]


def test_a_route_every_relay_has_leaves_by_each_clients_own_relay() -> None:
    """CONTRACT.md's deployment: every relay's file has the same `routes`.  A client's
    packet to that LAN goes into its own relay's TUN (NAT there), never over the mesh,
    and each relay pushes the route once."""
    net = MeshLink({"A": (LAN,), "B": (LAN,)})
    net.add_client("a1", "A", "10.66.0.2", "fd66::2")
    net.add_client("b1", "B", "10.66.0.3", "fd66::3")
    net.configure()
    for name, src in (("a1", "10.66.0.2"), ("b1", "10.66.0.3")):
        config = net.clients[name].config
        assert config is not None and list(config.routes).count(LAN) == 1, name
        query = build_udp4(src, "192.168.77.10", 1000, 53, b"q")
        net.clients[name].tun_packet(query, net.now)
        net.pump()
        own = name[0].upper()
        assert net.tun_in[own] == [query] and hops(net) == [], name
        net.tun_in[own].clear()
    assert all(not v for v in net.tun_in.values())


def test_presence_change_reroutes_at_once() -> None:
    net = mesh()
    a = net.relays["A"]
    ping = build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"before")
    net.clients["a1"].tun_packet(ping, net.now)
    net.pump()
    assert net.take("b1") == [ping] and hops(net) == [("B", "A")]
    # b1 moves to C: a new session from the same key (its address kept).
    key = net.keys["b1"]  # the same client, now through C
    del net.clients["b1"], net.home["b1"], net.got["b1"]
    moved = net.add_client("b1", "C", "10.66.0.3", "fd66::3", key=key)
    net.specs.pop()  # the same peer: its spec is already everywhere
    moved.start(net.now)
    net.pump()
    assert moved.config is not None
    c = net.relays["C"]
    peer_at_c = c.peer_by_name("b1")
    assert peer_at_c is not None and c.presence_of(peer_at_c) is None  # held at C now
    # The store says so; A is told, and its very next packet goes to C, not B.
    a.update_presence({key_of(net, "b1"): "C"})
    net.relays["B"].update_presence({key_of(net, "b1"): "C"})
    after = build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 2, b"after")
    net.clients["a1"].tun_packet(after, net.now)
    net.pump()
    assert net.take("b1") == [after]
    assert hops(net) == [("C", "A")]
    # And B, no longer holding b1, no longer speaks for it.
    net.send_as_relay("B", "A", build_icmp_echo("10.66.0.3", "10.66.0.2", 1, 1, b"old"))
    assert a.drops["mesh_spoofed"] == 1 and net.take("a1") == []
    assert hops(net) == [("A", "B")]
    # A whole map set at once works as well: back to B (where it has no session now).
    net.home["b1"] = "B"
    a.set_presence(net.presence())
    net.clients["a1"].tun_packet(after, net.now)
    net.pump()
    assert hops(net) == [("B", "A")]


def key_of(net: MeshLink, name: str) -> bytes:
    return net.clients[name].wg.public_key


def test_a_pending_batch_leaves_by_the_presence_it_was_routed_under() -> None:
    net = mesh()
    a = net.relays["A"]
    ping = build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"batched")
    a1 = net.clients["a1"]
    a1.tun_packet(ping, net.now)
    for data, _ in a1.datagrams_to_send():
        a.receive_datagram(data, "a1", net.now)  # gathered for B, not yet flushed
    a.update_presence({key_of(net, "b1"): "C"})
    out = [addr for _, addr in a.datagrams_to_send()]
    assert out == ["B"]  # flushed under the old map before the change took effect
    a1.tun_packet(ping, net.now)
    for data, _ in a1.datagrams_to_send():
        a.receive_datagram(data, "a1", net.now)
    assert [addr for _, addr in a.datagrams_to_send()] == ["C"]


def test_relays_never_push_configuration_to_each_other() -> None:
    net = mesh()
    for name, relay in net.relays.items():
        assert not [
            e for e in net.events[name] if isinstance(e, PeerJoined) and relay.is_mesh(e.peer)
        ]
    a = net.relays["A"]
    b_at_a = a.mesh_peer("B")
    assert b_at_a is not None
    with pytest.raises(LocalProtocolError, match="mesh peer"):
        a.config_for(b_at_a)
    request = tm.push_config_request(tm.ConfigRequest(mode="tun", bulk=True, partial=True))
    before = net.relays["B"].wg.peers[a.wg.public_key].rx_packets
    net.send_as_relay("B", "A", request)
    net.send_as_relay("B", "A", tm.push_message(tm.PING))
    assert a.drops["mesh_message"] == 2
    assert not b_at_a.data.is_gtun and not b_at_a.data.caps.bulk
    assert net.relays["B"].wg.peers[a.wg.public_key].rx_packets == before  # no answer
    # Mesh peers are no clients: no routes, no name among the peers, kept by set_peers.
    assert a.peer_by_name("B") is None
    assert [net for net, p in a.table.routes() if p is b_at_a] == [LAN]  # its route only
    a.set_peers(net.specs[:1])
    assert a.mesh_peer("B") is b_at_a and b_at_a.has_session


def test_set_mesh_is_all_or_nothing_and_refused_in_tap_mode() -> None:
    net = mesh()
    a = net.relays["A"]
    good = net.mesh()
    before = (dict(a.wg.peers), a.table.routes())
    stranger = secrets.token_bytes(32)
    bad_meshes = [
        good + [MeshRelay("B", stranger, "X")],  # a name twice
        good + [MeshRelay("D", good[1].public_key, "X")],  # a key twice
        good + [MeshRelay("D", key_of(net, "c1"), "X")],  # a client's key
        good + [MeshRelay("D", stranger, "X", (LAN,))],  # B's route
        good + [MeshRelay("D", stranger, "X", (ip_network("10.66.0.0/25"),))],
        good + [MeshRelay("D", b"short", "X")],
    ]
    for bad in bad_meshes:
        with pytest.raises(MeshError):
            a.set_mesh(bad)
        assert (dict(a.wg.peers), a.table.routes()) == before
    with pytest.raises(PeerSetError):  # a client with a relay's key
        a.set_peers(net.specs + [PeerSpec("x", good[1].public_key, IPv4Address("10.66.0.9"))])
    with pytest.raises(PeerSetError):  # a client subnet equal to B's route
        a.set_peers(net.specs + [PeerSpec("x", stranger, IPv4Address("10.66.0.9"), (LAN,))])
    assert (dict(a.wg.peers), a.table.routes()) == before
    with pytest.raises(MeshError):
        a.set_presence({b"short": "B"})
    # A relay removed from the mesh takes its routes and its clients' reachability.
    added, removed = a.set_mesh([r for r in good if r.name != "B"])
    assert (added, removed) == ([], ["B"])
    assert a.table.lookup(IPv4Address("192.168.77.1").packed) is None
    b1 = a.peer_by_name("b1")
    assert b1 is not None and a.presence_of(b1) is None
    tap = Relay(secrets.token_bytes(32), relay_settings(mode="tap"))
    with pytest.raises(MeshError, match="tap mode"):
        tap.set_mesh(good)


# --- the invariants under a hostile client and a hostile relay -------------------------------

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def ipv6_ext(src: str, dst: str, next_header: int, ext: bytes) -> bytes:
    """An IPv6 echo request behind one 8-byte extension header of type `next_header`."""
    body = bytes([58, 0]) + ext + bytes([128, 0, 0, 0, 0, 1, 0, 1])
    return (
        b"\x60\x00\x00\x00"
        + struct.pack("!HBB", len(body), next_header, 64)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + body
    )


def templates(src: str, src6: str) -> list[bytes]:
    """Packets from `src` to everywhere a relay could send them (and from elsewhere)."""
    out: list[bytes] = []
    for dst in ("10.66.0.2", "10.66.0.3", "10.66.0.4", "10.66.0.1", "192.168.77.9", "192.0.2.1"):
        out.append(build_icmp_echo(src, dst, 1, 1, b"x"))
        out.append(build_udp4(src, dst, 1, 2, b"y" * 40))
    for dst6 in ("fd66::2", "fd66::3", "fd66::4", "fd66::1", "2001:db8::1"):
        out.append(ipv6_echo(src6, dst6))
        out.append(ipv6_ext(src6, dst6, 43, bytes([4, 1]) + bytes(4)))  # segments left
        out.append(ipv6_ext(src6, dst6, 0, bytes(6)))
    for spoof in ("10.66.0.2", "10.66.0.3", "10.66.0.4", "10.66.0.6", "192.168.77.5"):
        out.append(build_icmp_echo(spoof, "10.66.0.5", 1, 1, b"z"))
    out.append(ipv6_echo("fd66::4", "fd66::5"))
    out.append(tm.push_config_request(tm.ConfigRequest(mode="tun", bulk=True, partial=True)))
    out.append(tm.push_message(tm.PING))
    return out


def plaintexts(pool: list[bytes]) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, 100), st.integers(0, 255)), max_size=3)
    mutated = st.builds(mutate, st.sampled_from(pool), edits, st.integers(-16, 16))
    return st.one_of(st.binary(min_size=1, max_size=120), st.sampled_from(pool), mutated)


def sources(packet: bytes) -> bytes | None:
    addrs = parse_addresses(packet)
    return None if addrs is None else addrs[0]


def hostile_mesh() -> MeshLink:
    net = mesh()
    net.add_client("h", "A", "10.66.0.6", "fd66::6")
    for relay in net.relays.values():
        relay.set_peers(net.specs)
        relay.set_presence(net.presence())
    net.clients["h"].start(net.now)
    net.pump()
    assert net.clients["h"].config is not None
    net.mesh_log.clear()
    return net


def delivered(net: MeshLink, relays: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """What the clients of `relays` and those relays' TUNs were handed: (where, packet)."""
    out: list[tuple[str, bytes]] = []
    for name in net.clients:
        for item in net.take(name):
            assert isinstance(item, bytes)
            if net.home[name] in relays:
                out.append((name, item))
    for name in net.relays:
        for item in net.tun_in[name]:
            assert isinstance(item, bytes)
            if name in relays:
                out.append((name, item))
        net.tun_in[name].clear()
    return out


def test_a_hostile_client_makes_one_hop_at_most_and_speaks_only_for_itself() -> None:
    net = hostile_mesh()
    own = {IPv4Address("10.66.0.6").packed, IPv6Address("fd66::6").packed}
    h = net.clients["h"]

    @FAST
    @given(st.lists(plaintexts(templates("10.66.0.6", "fd66::6")), min_size=1, max_size=4))
    def run(batch: list[bytes]) -> None:
        for plaintext in batch:
            h.wg.send(h.server, plaintext, net.now)
        net.pump()
        for at, came, plaintext in net.mesh_log:
            assert came == "A" and at in ("B", "C"), (at, came)  # A's hop, and no other
            assert sources(plaintext) in own, plaintext.hex()
        net.mesh_log.clear()
        for where, packet in delivered(net, ("A", "B", "C")):
            assert sources(packet) in own, (where, packet.hex())

    run()
    ping = build_icmp_echo("10.66.0.4", "10.66.0.2", 1, 1, b"still")
    net.clients["c1"].tun_packet(ping, net.now)
    net.pump()
    assert net.take("a1") == [ping]


def test_a_hostile_relay_is_never_sent_on_and_speaks_only_for_its_own() -> None:
    net = hostile_mesh()
    # B holds b1's session and owns its LAN: that is all it may speak for.
    mine = {IPv4Address("10.66.0.3").packed, IPv6Address("fd66::3").packed}
    lan = ip_network("192.168.77.0/24")
    relay_addresses = {IPv4Address("10.66.0.1").packed, IPv6Address("fd66::1").packed}

    def b_may_send(src: bytes | None) -> bool:
        return src in mine or (src is not None and len(src) == 4 and IPv4Address(src) in lan)

    @FAST
    @given(
        st.lists(
            st.tuples(st.sampled_from(("A", "C")), plaintexts(templates("10.66.0.3", "fd66::3"))),
            min_size=1,
            max_size=4,
        )
    )
    def run(batch: list[tuple[str, bytes]]) -> None:
        for to, plaintext in batch:
            net.send_as_relay("B", to, plaintext)
        for at, came, _ in net.mesh_log:
            assert came == "B", (at, came)  # B's own sends: A and C sent nothing on
        net.mesh_log.clear()
        for where, packet in delivered(net, ("A", "C")):
            assert b_may_send(sources(packet)), (where, packet.hex())
            if where in net.relays:  # a relay's TUN: only for its own addresses
                addrs = parse_addresses(packet)
                assert addrs is not None and addrs[1] in relay_addresses, packet.hex()
        net.take("b1")

    run()
    ping = build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"still")
    net.clients["a1"].tun_packet(ping, net.now)
    net.pump()
    assert net.take("b1") == [ping]


def test_a_stock_peer_claims_its_session_with_data_not_with_a_handshake() -> None:
    """A stock WireGuard peer asks for no configuration: its first data packet claims
    its session at the relay it uses (SessionHere, so the edge writes the presence),
    and the other relays' map follows from there."""
    net = mesh()
    c = net.relays["C"]
    key = secrets.token_bytes(32)
    stock = WireGuard(key)
    net.specs.append(PeerSpec("s1", stock.public_key, IPv4Address("10.66.0.9")))
    for relay in net.relays.values():
        relay.set_peers(net.specs)
    server = stock.add_peer(c.wg.public_key, endpoint="C")
    stock.initiate_handshake(server, net.now)
    for _ in range(3):
        for data, _ in stock.datagrams_to_send():
            c.receive_datagram(data, "s1", net.now)
        for data, addr in c.datagrams_to_send():
            if addr == "s1":
                stock.receive_datagram(data, "C", net.now)
    peer = c.peer_by_name("s1")
    assert peer is not None and peer.has_session
    assert not peer.data.here and not claimed(c)
    c.update_presence({stock.public_key: "A"})  # a stale row: s1 was at A once
    stock.send(server, build_icmp_echo("10.66.0.9", "10.66.0.2", 1, 1, b"hi"), net.now)
    for data, _ in stock.datagrams_to_send():
        c.receive_datagram(data, "s1", net.now)
    to_a = [(data, addr) for data, addr in c.datagrams_to_send()]
    assert claimed(c) == [peer]
    assert peer.data.here and c.presence_of(peer) is None
    # The packet was for a1, at A, which has not heard from the store yet: A takes it
    # (s1 claimed nothing at A and no relay holds it in A's map) and learns s1 is at C,
    # so a1's answer goes straight back through C.
    a = net.relays["A"]
    assert [addr for _, addr in to_a] == ["A"]
    for data, _ in to_a:
        a.receive_datagram(data, "C", net.now)
    net.pump()
    assert len(net.take("a1")) == 1 and a.drops["mesh_spoofed"] == 0
    s1_at_a = a.peer_by_name("s1")
    assert s1_at_a is not None and a.presence_of(s1_at_a) == "C"
    a1 = net.clients["a1"]
    a1.tun_packet(build_icmp_echo("10.66.0.2", "10.66.0.9", 0, 1, b"hi"), net.now)
    for data, _ in a1.datagrams_to_send():
        a.receive_datagram(data, "a1", net.now)
    assert [addr for _, addr in a.datagrams_to_send()] == ["C"]
    # B cannot speak for s1 now (held at C in A's map), nor for a1 (claimed at A).
    net.send_as_relay("B", "A", build_icmp_echo("10.66.0.9", "10.66.0.2", 1, 2, b"spoof"))
    net.send_as_relay("B", "A", build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 2, b"spoof"))
    assert a.drops["mesh_spoofed"] == 2


def claimed(relay: Relay) -> list[object]:
    """The peers of the SessionHere events `relay` has said since last asked."""
    out = []
    while (event := relay.next_event()) is not None:
        if isinstance(event, SessionHere):
            out.append(event.peer)
    return out
