"""Ethernet frames inside the WireGuard tunnel, between gtun nodes (TAP mode).

A WireGuard transport plaintext is, to a stock peer, one IP packet: its first nibble is
the IP version, and the packet carries its own length, which is how WireGuard's zero
padding (to a multiple of 16 bytes) is stripped.  A bare Ethernet frame has neither
property: its first byte is a destination MAC, which may well read as 0x45 (IPv4) or
0x00 (gtun's own messages, tunnelmsg.py), and nothing in it says where it ends.  So a
frame travels behind a small header:

    magic(4) = 00 'g' 't' 02   length(2, big-endian)   Ethernet frame(length)   padding

The first byte 0x00 is no IP version, so a stock peer would drop such a plaintext (and the
relay never sends one to a stock peer: only gtun nodes are ports of its switch).  The
magic differs from the tunnel messages' (00 'g' 't' 01) in its last byte.  Bytes after the
frame are WireGuard's padding and are ignored.  The frame itself is the Ethernet header
(destination MAC, source MAC, EtherType, IEEE 802.3 section 3.1) and payload, without
preamble or frame check sequence, exactly as a TAP device reads and writes it.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from gtun.core.errors import LocalProtocolError, RemoteProtocolError
from gtun.core.packet import ipv6_upper
from gtun.core.tunnel import FRAME_MAGIC

MAGIC = FRAME_MAGIC
HEADER = struct.Struct(">4sH")
HEADER_SIZE = HEADER.size

# From IEEE 802.3 / 802.1Q.
ETH_ADDR_LEN = 6
ETH_HEADER_LEN = 14  # destination, source, EtherType
VLAN_TAG_LEN = 4  # an 802.1Q tag between source and EtherType

# EtherTypes (IEEE registry): IPv4 (RFC 894), ARP (RFC 826), and the VLAN tags of
# 802.1Q, 802.1ad and the older QinQ.
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
VLAN_ETHERTYPES = frozenset({0x8100, 0x88A8, 0x9100})
MAX_VLAN_TAGS = 2
UNSPECIFIED_IPV4 = bytes(4)

# IPv6 (RFC 8200 section 3) and neighbour discovery (RFC 4861 section 4.4).
IPV6_HEADER_LEN = 40
NEXT_HEADER_ICMPV6 = 58
ICMPV6_ROUTER_SOLICITATION = 133
ICMPV6_ROUTER_ADVERTISEMENT = 134
ICMPV6_NEIGHBOR_SOLICITATION = 135
ICMPV6_NEIGHBOR_ADVERTISEMENT = 136
ICMPV6_REDIRECT = 137
# The fixed part of each neighbour-discovery message, before its options (RFC 4861
# sections 4.1-4.5), and the options that carry a link-layer address (section 4.6.1).
ND_FIXED_LEN = {
    ICMPV6_ROUTER_SOLICITATION: 8,
    ICMPV6_ROUTER_ADVERTISEMENT: 16,
    ICMPV6_NEIGHBOR_SOLICITATION: 24,
    ICMPV6_NEIGHBOR_ADVERTISEMENT: 24,
    ICMPV6_REDIRECT: 40,
}
ND_OPT_SOURCE_LLADDR = 1
ND_OPT_TARGET_LLADDR = 2
MALFORMED = "malformed"

# Tuning knob: the largest frame the length field can describe; callers pass a tighter
# bound (the device MTU plus the Ethernet header and one VLAN tag).
MAX_FRAME = 0xFFFF


def max_frame_for(mtu: int) -> int:
    """The largest frame a TAP device with this MTU sends (a VLAN tag included)."""
    return mtu + ETH_HEADER_LEN + VLAN_TAG_LEN


class L2FrameError(RemoteProtocolError):
    """A peer sent a frame that cannot be carried; `reason` is the drop counter's name
    ("malformed", "runt" or "oversized")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_frame(plaintext: bytes) -> bool:
    return plaintext[:4] == MAGIC


def push_frame(frame: bytes) -> bytes:
    """The plaintext that carries `frame`.  Raises LocalProtocolError (the caller's misuse) for a
    frame shorter than an Ethernet header or longer than MAX_FRAME."""
    if not ETH_HEADER_LEN <= len(frame) <= MAX_FRAME:
        raise LocalProtocolError(f"an Ethernet frame of {len(frame)} bytes cannot be carried")
    return HEADER.pack(MAGIC, len(frame)) + frame


def pull_frame(plaintext: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """The Ethernet frame in a plaintext from a peer (padding removed).

    Raises L2FrameError: "malformed" for a truncated header, a wrong magic or a length
    beyond the plaintext; "runt" for a frame shorter than an Ethernet header;
    "oversized" for one longer than `max_frame`."""
    if len(plaintext) < HEADER_SIZE:
        raise L2FrameError("malformed", "truncated frame header")
    magic, length = HEADER.unpack_from(plaintext)
    if magic != MAGIC:
        raise L2FrameError("malformed", "bad frame magic")
    if length > max_frame:
        raise L2FrameError("oversized", f"frame of {length} bytes is over {max_frame}")
    if HEADER_SIZE + length > len(plaintext):
        raise L2FrameError("malformed", "frame length beyond the plaintext")
    if length < ETH_HEADER_LEN:
        raise L2FrameError("runt", f"frame of {length} bytes is shorter than its header")
    return plaintext[HEADER_SIZE : HEADER_SIZE + length]


def _payload(frame: bytes) -> tuple[int, int] | None:
    """(EtherType, offset of the payload) seen through up to MAX_VLAN_TAGS VLAN tags;
    None for a frame too short to have an EtherType; (-1, -1) when too deeply tagged."""
    offset = 2 * ETH_ADDR_LEN
    for _ in range(MAX_VLAN_TAGS + 1):
        if len(frame) < offset + 2:
            return None
        ethertype = (frame[offset] << 8) | frame[offset + 1]
        if ethertype not in VLAN_ETHERTYPES:
            return ethertype, offset + 2
        offset += VLAN_TAG_LEN
    return -1, -1  # more tags than anyone needs: let nothing hide behind them


class Ipv6Facts(NamedTuple):
    """What an IPv6 frame speaks for (ipv6_facts)."""

    source: bytes  # the IPv6 source address
    icmp: int  # the ICMPv6 type, -1 when the packet (or this fragment) carries none
    target: bytes  # a Neighbor Advertisement's target address, else b""
    lladdrs: tuple[bytes, ...]  # link-layer addresses in neighbour-discovery options
    fragment: bool  # it carries a fragment header
    redirected: bool  # a routing header with segments left, or a home address option


def ipv6_facts(frame: bytes) -> Ipv6Facts | str | None:
    """The claims of an IPv6 frame, seen through VLAN tags and IPv6 extension headers
    (packet.ipv6_upper): its source; for ICMPv6, its type; for a Neighbor Advertisement
    its target (the address whose MAC it announces); and the source/target link-layer
    address options of the neighbour-discovery messages (RFC 4861 sections 4.1-4.5,
    4.6.1).  None for a frame that is not IPv6; "malformed" for one too short, too deeply
    tagged, with a header chain or options that cannot be read.  Never raises."""
    found = _payload(frame)
    if found is None:
        return None
    ethertype, payload = found
    if ethertype == -1:
        return MALFORMED
    if ethertype != ETHERTYPE_IPV6:
        return None
    upper = ipv6_upper(frame, payload)
    if upper is None:
        return MALFORMED
    source = frame[payload + 8 : payload + 24]
    if upper.proto != NEXT_HEADER_ICMPV6 or not upper.first:
        return Ipv6Facts(source, -1, b"", (), upper.fragment, upper.redirected)
    icmp, end = upper.offset, upper.end
    if icmp + 4 > end:
        return MALFORMED
    kind = frame[icmp]
    fixed = ND_FIXED_LEN.get(kind)
    if fixed is None:
        return Ipv6Facts(source, kind, b"", (), upper.fragment, upper.redirected)
    if icmp + fixed > end:
        return MALFORMED
    # type(1) code(1) checksum(2) flags(4) target(16)
    target = frame[icmp + 8 : icmp + 24] if kind == ICMPV6_NEIGHBOR_ADVERTISEMENT else b""
    lladdrs: list[bytes] = []
    at = icmp + fixed
    while at < end:
        if at + 2 > end or frame[at + 1] == 0:
            return MALFORMED  # RFC 4861 section 4.6: a zero length is invalid
        size = frame[at + 1] * 8
        if at + size > end:
            return MALFORMED
        if frame[at] in (ND_OPT_SOURCE_LLADDR, ND_OPT_TARGET_LLADDR):
            lladdrs.append(frame[at + 2 : at + 2 + ETH_ADDR_LEN])
        at += size
    return Ipv6Facts(source, kind, target, tuple(lladdrs), upper.fragment, upper.redirected)


def ipv6_claims(frame: bytes) -> list[bytes] | None:
    """The IPv6 addresses a frame speaks for: an IPv6 packet's source address and, in a
    Neighbor Advertisement, its target address (the address whose MAC it announces).
    None for a frame that is not IPv6; [b""] for one too short (or too deeply tagged) to
    say.  Never raises."""
    facts = ipv6_facts(frame)
    if facts is None:
        return None
    if isinstance(facts, str):
        return [b""]
    return [facts.source, facts.target] if facts.target else [facts.source]


def arp_sender_mac(frame: bytes) -> bytes | None:
    """An Ethernet ARP packet's sender hardware address (RFC 826: hardware type 1,
    address length 6), seen through VLAN tags; None for any other frame, b"" for one
    too short to say.  Never raises."""
    found = _payload(frame)
    if found is None or found[0] != ETHERTYPE_ARP:
        return None
    payload = found[1]
    if len(frame) < payload + 8 + ETH_ADDR_LEN:
        return b""
    if frame[payload : payload + 2] != b"\x00\x01" or frame[payload + 4] != ETH_ADDR_LEN:
        return None  # not Ethernet's: an Ethernet device's ARP ignores it
    return frame[payload + 8 : payload + 8 + ETH_ADDR_LEN]


def ipv4_sender(frame: bytes) -> bytes | None:
    """The IPv4 address a frame speaks for: an IPv4 packet's source address (RFC 791
    section 3.1) or an ARP packet's sender protocol address (RFC 826), seen through up
    to MAX_VLAN_TAGS VLAN tags.  None for any other frame; b"" for an IPv4 or ARP frame
    too short (or too deeply tagged) to say.  Never raises."""
    found = _payload(frame)
    if found is None:
        return None
    ethertype, payload = found
    if ethertype == -1:
        return b""
    if ethertype == ETHERTYPE_IPV4:
        if len(frame) < payload + 20 or frame[payload] >> 4 != 4:
            return b""
        return frame[payload + 12 : payload + 16]
    if ethertype == ETHERTYPE_ARP:
        # htype(2) ptype(2) hlen(1) plen(1) oper(2) sha(hlen) spa(plen) ...
        if len(frame) < payload + 8:
            return b""
        ptype = (frame[payload + 2] << 8) | frame[payload + 3]
        hlen, plen = frame[payload + 4], frame[payload + 5]
        if ptype != ETHERTYPE_IPV4 or plen != 4:
            return None  # not about IPv4: the kernel ignores it for IPv4 too
        start = payload + 8 + hlen
        if len(frame) < start + 4:
            return b""
        return frame[start : start + 4]
    return None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_for_key(public_key: bytes) -> str:
    """A stable link-layer address for a node's TAP device, derived from its public key:
    a locally administered unicast address (IEEE 802 section 8.2), so a restarted node
    keeps its address and its neighbours' ARP caches (and the relay's MAC table) stay
    right.  The relay holds each peer to it (forward.py)."""
    return format_mac(mac_bytes_for_key(public_key))


def mac_bytes_for_key(public_key: bytes) -> bytes:
    """mac_for_key as the 6 bytes a frame carries."""
    digest = bytearray(hashlib.blake2s(b"gtun tap mac" + public_key, digest_size=6).digest())
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


def link_local_for_mac(mac: bytes) -> bytes:
    """The IPv6 link-local address (fe80::/64) a device with this MAC forms from it by
    modified EUI-64 (RFC 4291 section 2.5.1 and appendix A): the universal/local bit
    inverted, ff:fe in the middle.  Linux does so unless addr_gen_mode says otherwise."""
    return b"\xfe\x80" + bytes(6) + bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
