"""Just enough of IPv4 and IPv6 headers to route a packet, plus builders for tests.

The parsers run on every packet and on bytes from the network: they check sizes before
reading and answer None rather than raise.  Layouts: IPv4 RFC 791 section 3.1, IPv6
RFC 8200 section 3, ICMP RFC 792, UDP RFC 768, the checksum RFC 1071.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from typing import NamedTuple

__all__ = [
    "IPPROTO_ICMP",
    "IPPROTO_UDP",
    "build_icmp_echo",
    "build_ipv4",
    "build_udp4",
    "ip_version",
    "ipv4_checksum",
    "ipv6_upper",
    "packet_length",
    "parse_addresses",
]

# From the specifications.
IPV4_HEADER_MIN = 20  # RFC 791: IHL >= 5 words
IPV6_HEADER_LEN = 40  # RFC 8200: fixed header
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8

# IPv6 extension headers (RFC 8200 section 4) the walk steps over, and the Home Address
# destination option (RFC 6275 section 6.3), which names a source other than the header's.
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_DSTOPTS = 60
IPV6_EXTENSIONS = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS})
OPT_PAD1 = 0
OPT_HOME_ADDRESS = 0xC9

# Tuning knob: extension headers walked before a packet is judged malformed (real
# traffic has one or two: hop-by-hop for MLD, a fragment header).
MAX_EXTENSION_HEADERS = 8

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ECHO = struct.Struct("!BBHHH")
_UDP = struct.Struct("!HHHH")

Address4 = bytes | str | IPv4Address
# What the parsers read (typed for mypyc, which checks the type of every argument).
Buffer = bytes | bytearray | memoryview


def ip_version(packet: Buffer) -> int:
    """The version nibble of an IP packet: 4, 6, something else, or 0 if empty."""
    return packet[0] >> 4 if packet else 0


def parse_addresses(packet: Buffer) -> tuple[bytes, bytes] | None:
    """The raw (source, destination) addresses of a well-formed IPv4 or IPv6 packet.

    Returns None, never raises, for anything else: empty, truncated, another version,
    a header length below the minimum, or a length field beyond the buffer.
    """
    if packet_length(packet) is None:
        return None
    if packet[0] >> 4 == 4:
        return bytes(packet[12:16]), bytes(packet[16:20])
    return bytes(packet[8:24]), bytes(packet[24:40])


def is_link_scoped(src: bytes, dst: bytes) -> bool:
    """True for traffic that must not cross a layer-3 tunnel: IPv6 link-local sources
    (router solicitations, MLD reports the kernel sends on any new device), multicast
    and limited broadcast destinations.  `src`, `dst` as parse_addresses returns them."""
    if len(dst) == 16:
        return dst[0] == 0xFF or (src[0] == 0xFE and src[1] & 0xC0 == 0x80)
    return dst[0] & 0xF0 == 0xE0 or dst == b"\xff\xff\xff\xff"


def packet_length(packet: Buffer) -> int | None:
    """The length the IP header claims for the packet (IPv4 total length, IPv6 40 +
    payload length), or None if the packet is malformed as parse_addresses judges it.

    Used to trim the zero padding WireGuard adds before encryption.
    """
    n = len(packet)
    if not n:
        return None
    version = packet[0] >> 4
    if version == 4:
        if n < IPV4_HEADER_MIN:
            return None
        header_len = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if header_len < IPV4_HEADER_MIN or total < header_len or total > n:
            return None
        return total
    if version == 6:
        if n < IPV6_HEADER_LEN:
            return None
        total = IPV6_HEADER_LEN + ((packet[4] << 8) | packet[5])
        return total if total <= n else None
    return None


def ipv4_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`: summing data that carries it gives 0."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr4(address: Address4) -> bytes:
    if isinstance(address, bytes):
        if len(address) != 4:
            raise ValueError(f"an IPv4 address is 4 bytes, not {len(address)}")
        return address
    return IPv4Address(address).packed


def build_ipv4(
    src: Address4, dst: Address4, proto: int, payload: bytes, ttl: int = 64, ident: int = 0
) -> bytes:
    """An IPv4 packet (20-byte header, Don't Fragment unset) with a correct checksum.

    Raises ValueError on a bad address or a payload too long for one packet.
    """
    total = IPV4_HEADER_MIN + len(payload)
    if total > 0xFFFF:
        raise ValueError(
            f"an IPv4 packet holds at most {0xFFFF - IPV4_HEADER_MIN} bytes of payload, "
            f"not {len(payload)}"
        )
    header = bytearray(
        _IPV4_HEADER.pack(
            0x45, 0, total, ident & 0xFFFF, 0, ttl, proto, 0, _addr4(src), _addr4(dst)
        )
    )
    struct.pack_into("!H", header, 10, ipv4_checksum(bytes(header)))
    return bytes(header) + payload


def build_icmp_echo(
    src: Address4, dst: Address4, ident: int, seq: int, payload: bytes, reply: bool = False
) -> bytes:
    """An IPv4 ICMP echo request (or reply) with correct IP and ICMP checksums."""
    kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    message = bytearray(_ICMP_ECHO.pack(kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload)
    struct.pack_into("!H", message, 2, ipv4_checksum(bytes(message)))
    return build_ipv4(src, dst, IPPROTO_ICMP, bytes(message))


def build_udp4(src: Address4, dst: Address4, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP datagram with correct IP and UDP checksums (RFC 768 pseudo-header)."""
    src_b, dst_b = _addr4(src), _addr4(dst)
    length = _UDP.size + len(payload)
    datagram = _UDP.pack(sport, dport, length, 0) + payload
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    # A computed 0 is sent as 0xFFFF: 0 on the wire means "no checksum".
    checksum = ipv4_checksum(pseudo + datagram) or 0xFFFF
    datagram = datagram[:6] + struct.pack("!H", checksum) + datagram[8:]
    return build_ipv4(src_b, dst_b, IPPROTO_UDP, datagram)


def tunnel_addresses(packet: bytes, drops: dict[str, int]) -> tuple[bytes, bytes] | None:
    """(source, destination) of a packet read from a TUN that may enter the tunnel, or
    None after counting it in `drops` as "not_ip" or "link_scoped".  Shared by the
    relay's and the client's TUN paths."""
    addrs = parse_addresses(packet)
    if addrs is None:
        drops["not_ip"] += 1
        return None
    if is_link_scoped(*addrs):
        drops["link_scoped"] += 1
        return None
    return addrs


class Ipv6Upper(NamedTuple):
    """What follows an IPv6 packet's extension headers (ipv6_upper)."""

    proto: int  # the upper-layer protocol (next header after the last extension header)
    offset: int  # where its header starts
    end: int  # where the packet ends, as its payload length says
    first: bool  # not a fragment, or the first one: the upper-layer header is here
    fragment: bool  # a fragment header was seen
    redirected: bool  # a routing header with segments left, or a home address option


def ipv6_upper(buf: bytes, start: int = 0) -> Ipv6Upper | None:
    """Walk the extension headers of the IPv6 packet at `buf[start:]` (RFC 8200 section
    4).  None, never an exception, for a packet whose header chain is cut short, runs past
    its payload length or is longer than MAX_EXTENSION_HEADERS.  After a fragment header
    with a non-zero offset the rest is data, not headers: `first` is then False."""
    n = len(buf)
    if n < start + IPV6_HEADER_LEN or buf[start] >> 4 != 6:
        return None
    end = start + IPV6_HEADER_LEN + ((buf[start + 4] << 8) | buf[start + 5])
    if end > n:
        return None
    nh = buf[start + 6]
    off = start + IPV6_HEADER_LEN
    fragment = redirected = False
    for _ in range(MAX_EXTENSION_HEADERS + 1):
        if nh not in IPV6_EXTENSIONS:
            return Ipv6Upper(nh, off, end, True, fragment, redirected)
        if off + 8 > end:
            return None
        if nh == IPPROTO_FRAGMENT:
            fragment = True
            nh = buf[off]
            off += 8
            if ((buf[off - 6] << 8) | buf[off - 5]) >> 3:
                return Ipv6Upper(nh, off, end, False, True, redirected)
            continue
        size = (buf[off + 1] + 1) * 8
        if off + size > end:
            return None
        if nh == IPPROTO_ROUTING:
            redirected = redirected or buf[off + 3] != 0  # segments left
        elif nh == IPPROTO_DSTOPTS:
            redirected = redirected or _has_option(buf, off + 2, off + size, OPT_HOME_ADDRESS)
        nh = buf[off]
        off += size
    return None


def _has_option(buf: bytes, at: int, end: int, wanted: int) -> bool:
    """An option of type `wanted` among the TLV options in buf[at:end] (RFC 8200
    section 4.2); a truncated option counts as present (nothing hides behind it)."""
    while at < end:
        kind = buf[at]
        if kind == wanted:
            return True
        if kind == OPT_PAD1:
            at += 1
            continue
        if at + 2 > end:
            return True
        at += 2 + buf[at + 1]
    return at > end
