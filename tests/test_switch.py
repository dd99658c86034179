"""Tier 1: the learning switch and the frame encapsulation of TAP mode (no I/O)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from gtun.core import l2frame
from gtun.core.l2frame import L2FrameError, max_frame_for, pull_frame, push_frame
from gtun.core.packet import build_icmp_echo
from gtun.core.switch import Decision, Switch

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")
BROADCAST = b"\xff" * 6
MULTICAST = bytes.fromhex("333300000001")  # IPv6 all-nodes
ARP = b"\x08\x06"


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 28, ethertype: bytes = ARP) -> bytes:
    return dst + src + ethertype + payload


def make_switch(**kw: float) -> Switch[str]:
    sw: Switch[str] = Switch(max_frame_for(1420), **kw)  # type: ignore[arg-type]
    for port in ("relay", "p1", "p2", "p3"):
        sw.add_port(port)
    return sw


# --- the switch ---------------------------------------------------------------------


def test_learns_then_forwards_to_one_port() -> None:
    sw = make_switch()
    # Unknown unicast is flooded to every other port.
    d = sw.receive("p1", eth(B, A), 0.0)
    assert d.flooded and set(d.ports) == {"relay", "p2", "p3"}
    assert sw.lookup(A, 0.0) == "p1"
    # B answers: A is known, so only p1 gets it; B is learned on p2.
    assert sw.receive("p2", eth(A, B), 1.0) == Decision(ports=("p1",))
    assert sw.receive("p1", eth(B, A), 2.0) == Decision(ports=("p2",))
    assert {(mac, port) for mac, port, _ in sw.entries(2.0)} == {(A, "p1"), (B, "p2")}


def test_broadcast_and_multicast_are_flooded_to_the_other_ports() -> None:
    sw = make_switch()
    sw.receive("p2", eth(A, B), 0.0)
    for dst in (BROADCAST, MULTICAST):
        d = sw.receive("p1", eth(dst, A), 1.0)
        assert d.flooded and d.ports == ("relay", "p2", "p3")  # never back to p1


def test_frame_to_the_senders_own_port_is_dropped() -> None:
    sw = make_switch()
    sw.receive("p1", eth(BROADCAST, A), 0.0)
    sw.receive("p1", eth(BROADCAST, C), 0.0)  # two addresses behind p1
    assert sw.receive("p1", eth(C, A), 1.0).drop == "loop"


def test_no_mac_stealing_while_the_entry_is_live() -> None:
    sw = make_switch(aging=300.0)
    sw.receive("p1", eth(BROADCAST, A), 0.0)
    stolen = sw.receive("p2", eth(BROADCAST, A), 10.0)
    assert stolen.drop == "mac_stolen" and stolen.ports == ()
    assert sw.lookup(A, 10.0) == "p1"
    # p1 keeps using A, which keeps it live well past the first aging period.
    sw.receive("p1", eth(BROADCAST, A), 250.0)
    assert sw.receive("p2", eth(BROADCAST, A), 400.0).drop == "mac_stolen"
    # Once p1 has been silent for the aging time the address may move.
    assert sw.receive("p2", eth(BROADCAST, A), 550.0).drop is None
    assert sw.lookup(A, 550.0) == "p2"
    assert sw.receive("p1", eth(BROADCAST, A), 551.0).drop == "mac_stolen"


def test_entries_age_out_and_unknown_destinations_flood_again() -> None:
    sw = make_switch(aging=300.0)
    sw.receive("p2", eth(BROADCAST, B), 0.0)
    sw.receive("p1", eth(BROADCAST, A), 100.0)
    assert sw.receive("p1", eth(B, A), 299.0).ports == ("p2",)
    assert sw.lookup(B, 300.0) is None  # exactly the aging time: gone
    d = sw.receive("p1", eth(B, A), 301.0)
    assert d.flooded and "p2" in d.ports
    assert [mac for mac, _, _ in sw.entries(301.0)] == [A]
    assert len(sw) == 1
    assert sw.lookup(A, 1000.0) is None and len(sw) == 0


def test_bad_source_addresses_and_sizes_are_dropped() -> None:
    sw = make_switch()
    assert sw.receive("p1", eth(B, BROADCAST), 0.0).drop == "bad_mac"
    assert sw.receive("p1", eth(B, MULTICAST), 0.0).drop == "bad_mac"
    assert sw.receive("p1", eth(B, bytes(6)), 0.0).drop == "bad_mac"
    assert sw.receive("p1", eth(B, A)[:13], 0.0).drop == "runt"
    assert sw.receive("p1", eth(B, A, b""), 0.0).drop is None  # a bare header is a frame
    big = eth(B, A, bytes(max_frame_for(1420) - 14))
    assert sw.receive("p1", big, 0.0).drop is None
    assert sw.receive("p1", big + b"\x00", 0.0).drop == "oversized"
    # Nothing was learned from the dropped frames.
    assert {mac for mac, _, _ in sw.entries(0.0)} == {A}


def test_table_is_bounded_per_port_and_in_total() -> None:
    sw: Switch[str] = Switch(1500, max_entries=6, max_per_port=4)
    for port in ("p1", "p2", "p3"):
        sw.add_port(port)
    macs = [bytes([2, 0, 0, 0, 1, i]) for i in range(10)]
    results = [sw.receive("p1", eth(BROADCAST, m), 0.0).drop for m in macs[:6]]
    assert results == [None] * 4 + ["mac_limit"] * 2  # one port cannot fill the table
    assert sw.receive("p1", eth(BROADCAST, macs[0]), 1.0).drop is None  # known: fine
    other = [bytes([2, 0, 0, 0, 2, i]) for i in range(4)]
    results = [sw.receive("p2", eth(BROADCAST, m), 1.0).drop for m in other]
    assert results == [None, None, "mac_limit", "mac_limit"]  # the table is full
    assert len(sw) == 6
    # Aging frees room: p1's entries last seen at 0 (all but macs[0]) expire first.
    assert sw.receive("p3", eth(BROADCAST, C), 300.5).drop is None
    assert len(sw) == 4


def test_removing_a_port_forgets_its_addresses() -> None:
    sw = make_switch()
    sw.receive("p1", eth(BROADCAST, A), 0.0)
    sw.receive("p2", eth(BROADCAST, B), 0.0)
    sw.remove_port("p1")
    assert sw.lookup(A, 1.0) is None and sw.lookup(B, 1.0) == "p2"
    d = sw.receive("p2", eth(BROADCAST, B), 1.0)
    assert "p1" not in d.ports
    # A may now be used by another port at once, and its count was released.
    assert sw.receive("p3", eth(BROADCAST, A), 2.0).drop is None
    sw.remove_port("p1")  # absent: no effect
    with pytest.raises(ValueError):
        sw.receive("p1", eth(BROADCAST, A), 3.0)


# --- the frame encapsulation -----------------------------------------------------------


def test_frame_round_trip_strips_padding() -> None:
    frame = eth(B, A, b"x" * 29)
    wrapped = push_frame(frame)
    assert wrapped[:4] == b"\x00gt\x02" and wrapped[4:6] == len(frame).to_bytes(2, "big")
    assert l2frame.is_frame(wrapped)
    # WireGuard pads the plaintext with zeros to a multiple of 16.
    padded = wrapped + bytes(-len(wrapped) % 16)
    assert len(padded) > len(wrapped)
    assert pull_frame(padded) == frame
    # A frame that ends in zero bytes keeps them: the length, not the padding, decides.
    zeros = eth(B, A, b"\x01" + bytes(20))
    assert pull_frame(push_frame(zeros) + bytes(9)) == zeros


@pytest.mark.parametrize(
    ("plaintext", "reason"),
    [
        (b"", "malformed"),
        (b"\x00gt\x02\x00", "malformed"),  # truncated header
        (b"\x00gt\x01\x00\x0e" + bytes(14), "malformed"),  # a tunnel message's magic
        (b"\x00gt\x02\x00\x40" + bytes(20), "malformed"),  # length beyond the plaintext
        (b"\x00gt\x02\x00\x0d" + bytes(13), "runt"),
        (b"\x00gt\x02\x00\x00", "runt"),
        (b"\x00gt\x02\x05\xc1" + bytes(1473), "oversized"),  # over max_frame_for(1420)
        (b"\x00gt\x02\xff\xff", "oversized"),  # and a lie about it
    ],
)
def test_bad_frames_are_rejected_with_a_reason(plaintext: bytes, reason: str) -> None:
    with pytest.raises(L2FrameError) as info:
        pull_frame(plaintext, max_frame_for(1420))
    assert info.value.reason == reason


def test_push_frame_refuses_what_cannot_be_carried() -> None:
    with pytest.raises(ValueError):
        push_frame(b"short")
    with pytest.raises(ValueError):
        push_frame(bytes(0x10000))
    assert pull_frame(push_frame(bytes(0xFFFF))) == bytes(0xFFFF)


def test_frame_plaintexts_are_neither_ip_nor_tunnel_messages() -> None:
    from gtun.core import tunnel as tm
    from gtun.core.packet import parse_addresses

    # A frame whose first byte reads as IPv4 still travels unmistakably.
    frame = bytes.fromhex("45000054") + A[:2] + A + b"\x08\x00" + bytes(40)
    wrapped = push_frame(frame)
    assert parse_addresses(wrapped) is None
    with pytest.raises(tm.TunnelMessageError):
        tm.pull_message(wrapped)


def test_mac_for_key_is_stable_local_and_unicast() -> None:
    a, b = l2frame.mac_for_key(bytes(32)), l2frame.mac_for_key(b"\x01" * 32)
    assert a == l2frame.mac_for_key(bytes(32)) and a != b
    for mac in (a, b):
        first = int(mac[:2], 16)
        assert len(mac) == 17 and first & 0x02 and not first & 0x01


def arp_frame(src: bytes, sender: str, target: str, *, tags: int = 0) -> bytes:
    body = bytes.fromhex("0001080006040001") + src + IPv4Address(sender).packed
    body += bytes(6) + IPv4Address(target).packed
    tag = b"\x81\x00\x00\x07" * tags
    return BROADCAST + src + tag + ARP + body


def test_ipv4_sender_of_ip_and_arp_frames() -> None:
    ip = build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"x")
    assert l2frame.ipv4_sender(B + A + b"\x08\x00" + ip) == IPv4Address("10.66.0.2").packed
    request = arp_frame(A, "10.66.0.2", "10.66.0.1")
    assert l2frame.ipv4_sender(request) == IPv4Address("10.66.0.2").packed
    probe = arp_frame(A, "0.0.0.0", "10.66.0.2")
    assert l2frame.ipv4_sender(probe) == l2frame.UNSPECIFIED_IPV4
    # Seen through VLAN tags, but not through too many of them.
    assert l2frame.ipv4_sender(arp_frame(A, "10.66.0.9", "10.66.0.1", tags=2)) == (
        IPv4Address("10.66.0.9").packed
    )
    assert l2frame.ipv4_sender(arp_frame(A, "10.66.0.9", "10.66.0.1", tags=3)) == b""
    # Too short to say: b"", never an exception.
    assert l2frame.ipv4_sender(B + A + b"\x08\x00" + ip[:19]) == b""
    assert l2frame.ipv4_sender(B + A + b"\x08\x00" + b"\x60" + ip[1:]) == b""
    assert l2frame.ipv4_sender(request[:27]) == b""
    assert l2frame.ipv4_sender(request[:30]) == b""
    # Other protocols say nothing about IPv4.
    assert l2frame.ipv4_sender(eth(B, A, ethertype=b"\x86\xdd")) is None
    assert l2frame.ipv4_sender(eth(B, A, b"\x00\x01\x86\xdd\x06\x10" + bytes(40))) is None
    assert l2frame.ipv4_sender(B + A) is None
    for n in range(len(request)):
        l2frame.ipv4_sender(request[:n])  # no exception at any length


def test_ipv6_claims_of_packets_and_neighbor_advertisements() -> None:
    def frame(src: str, nh: int, icmp: bytes, tags: int = 0) -> bytes:
        header = b"\x60\x00\x00\x00" + len(icmp).to_bytes(2, "big") + bytes([nh, 64])
        header += IPv6Address(src).packed + IPv6Address("fe80::2").packed
        return B + A + b"\x81\x00\x00\x01" * tags + b"\x86\xdd" + header + icmp

    na = bytes([136, 0, 0, 0, 0x60, 0, 0, 0]) + IPv6Address("fd66::7").packed
    src = IPv6Address("fe80::1").packed
    assert l2frame.ipv6_claims(frame("fe80::1", 58, na)) == [src, IPv6Address("fd66::7").packed]
    # A neighbour solicitation (135) or a UDP datagram speaks only for its source.
    assert l2frame.ipv6_claims(frame("fe80::1", 58, bytes([135]) + na[1:])) == [src]
    assert l2frame.ipv6_claims(frame("fe80::1", 17, na)) == [src]
    assert l2frame.ipv6_claims(frame("fe80::1", 58, na, tags=2)) == [src, na[8:]]
    # Too short or too deeply tagged to say: [b""], never an exception.
    assert l2frame.ipv6_claims(frame("fe80::1", 58, na, tags=3)) == [b""]
    assert l2frame.ipv6_claims(frame("fe80::1", 58, na)[:50]) == [b""]
    assert l2frame.ipv6_claims(frame("fe80::1", 58, na)[:70]) == [b""]
    # Not IPv6: nothing to say.
    assert l2frame.ipv6_claims(arp_frame(A, "10.66.0.2", "10.66.0.1")) is None
    assert l2frame.ipv6_claims(B + A) is None
    whole = frame("fe80::1", 58, na)
    for n in range(len(whole)):
        l2frame.ipv6_claims(whole[:n])  # no exception at any length
