"""Super-packets without I/O: the core's description of one (Gso), TCP segmentation,
splitting and coalescing.  The one place gtun cuts and merges TCP super-packets.

A super-packet is an IP packet of up to 64 KB that stands for several wire packets, with
a `Gso` that says how: the segmentation type and size, and where a checksum is left for
someone else to finish (CHECKSUM_PARTIAL: the TCP checksum field holds the folded
pseudo-header sum, not complemented).  These are the fields Linux keeps for one
(skb_shared_info, virtio spec 1.2 section 5.1.6), and `Gso`'s 10-byte encoding
(pull_gso/push_gso) is the layout of `struct virtio_net_hdr` without num_buffers, fields
little-endian: the offloading TUN device (io/tun.py, which owns the ioctls) prefixes its
reads and writes with it, and bulk frames (bulk.py) carry it on the wire unchanged.  A
big-endian host would need TUNSETVNETLE.

- `segment()` turns what a read gave into packets a stock peer accepts (its kernel
  verifies every checksum): the software TSO of the kernel's tcp_gso_segment().
- `split()` cuts a super-packet at segment boundaries into smaller super-packets.
- `coalesce()` merges consecutive segments of one TCP flow into a super-packet for a
  TUN write: the kernel's GRO (tcp_gro_receive()) done before the write.

Checksums: the ones'-complement sum of 16-bit big-endian words (RFC 1071) equals the
big-endian integer of the data modulo 0xFFFF, because 2**16 is 1 modulo 0xFFFF; CPython
converts and reduces big integers at C speed, which beats any per-word Python loop by
far.  A residue of 0 stands for the ones'-complement 0xFFFF of non-zero data.

Bad input raises `OffloadError` and nothing else; its `.reason` names the drop counter.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from gtun.core.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "GSO_UDP_L4",
    "MAX_SEGMENTS",
    "PLAIN",
    "GSO_HDR_LEN",
    "OffloadError",
    "Gso",
    "checksum",
    "coalesce",
    "pull_gso",
    "push_gso",
    "segment",
    "split",
    "sum16",
]

# From <linux/virtio_net.h> (virtio 1.2 section 5.1.6).
GSO_HDR_LEN = 10  # the encoded size: struct virtio_net_hdr, without num_buffers
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

# From the specifications: IPv4 RFC 791, IPv6 RFC 8200, TCP RFC 9293 section 3.1.
IPPROTO_TCP = 6
_IPPROTO_UDP = 17
_IPPROTO_ICMPV6 = 58
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80
TCP_CSUM_OFFSET = 16  # the checksum field within the TCP header
_UDP_CSUM_OFFSET = 6  # ... and within the UDP header (RFC 768)
MAX_IP_PACKET = 0xFFFF  # IPv4 total length is 16 bits; the TUN reads no more either

# Tuning knob: the most segments one super-packet may be cut into.  Linux never sends
# an MSS below 48 bytes, so a 64 KB super-packet has at most ~1400; the bound caps the
# work a hostile header (gso_size 1) can cause.
MAX_SEGMENTS = 2048

_GSO = struct.Struct("<BBHHHH")
# IPv4 (no options) + TCP: vihl tos total id frag ttl proto csum addrs+ports seq ack
# doff flags window csum urg.
_V4TCP = struct.Struct("!BBHHHBBH12sIIBBHHH")
# IPv6 + TCP: word0 plen next hop addrs+ports seq ack doff flags window csum urg.
_V6TCP = struct.Struct("!IHBB36sIIBBHHH")
_H16 = struct.Struct("!H")


class OffloadError(RemoteProtocolError):
    """A header or packet no correct sender produces.  `.reason` is a drop-counter key:
    "bad_vnet_hdr", "bad_gso" or "too_big"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Gso(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


PLAIN = Gso(0, 0, 0, 0, 0, 0)


def pull_gso(buf: bytes | bytearray | memoryview) -> Gso:
    """The Gso encoded at the start of `buf`.  Raises OffloadError("bad_vnet_hdr")
    if `buf` is shorter than GSO_HDR_LEN.  Field values are checked where they are used
    (`segment`, `split`), so a future flag bit does not drop every packet."""
    if len(buf) < GSO_HDR_LEN:
        raise OffloadError("bad_vnet_hdr", f"{len(buf)} bytes, a header is {GSO_HDR_LEN}")
    return Gso._make(_GSO.unpack_from(buf))


def push_gso(h: Gso) -> bytes:
    """The 10 bytes of `h`.  Raises LocalProtocolError for a field out of range."""
    try:
        return _GSO.pack(*h)
    except struct.error as exc:
        raise LocalProtocolError(f"GSO header {h} does not fit: {exc}") from None


# --- checksums ---------------------------------------------------------------------

# Masks of 2**k - 1 bits for k = 2**e: folding x >> k onto x & mask keeps x modulo
# 0xFFFF (k is a multiple of 16) and halves it with cheap shifts, where % on a big
# integer divides digit by digit.  Up to 64 KB at once; bigger data simply uses %.
_FOLD_MASKS = tuple((1 << (1 << e)) - 1 for e in range(20))


_M6144, _M3072, _M1536 = (1 << 6144) - 1, (1 << 3072) - 1, (1 << 1536) - 1


def _residue(x: int) -> int:
    """x modulo 0xFFFF, fast for big x."""
    n = x.bit_length()
    while n > 12288:
        e = (n - 1).bit_length() - 1
        if e >= len(_FOLD_MASKS):
            return x % 0xFFFF
        x = (x >> (1 << e)) + (x & _FOLD_MASKS[e])
        n = x.bit_length()
    if n > 2048:  # a packet of up to 1536 bytes: three folds of fixed size
        x = (x >> 6144) + (x & _M6144)
        x = (x >> 3072) + (x & _M3072)
        x = (x >> 1536) + (x & _M1536)
    return x % 0xFFFF


def sum16(data: bytes | bytearray | memoryview) -> int:
    """The ones'-complement sum of `data` as 16-bit big-endian words (an odd length is
    padded with a zero byte), as a residue modulo 0xFFFF: 0..0xFFFE, 0 standing for 0xFFFF
    unless the data is all zero.  Sums of several pieces add (mod 0xFFFF) if every piece
    but the last has an even length."""
    r = _residue(int.from_bytes(data, "big"))
    if len(data) & 1:
        r = (r << 8) % 0xFFFF
    return r


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`: the data with it summed gives 0xFFFF.
    Same values as the kernel and scapy: 0 when the sum is 0xFFFF, 0xFFFF for all-zero
    data."""
    x = int.from_bytes(data, "big")
    if not x:
        return 0xFFFF
    r = _residue(x)
    if len(data) & 1:
        r = (r << 8) % 0xFFFF
    return (0xFFFF - r) % 0xFFFF


def _complete(partial: int) -> int:
    """The checksum field for a sum (any non-negative int, not all-zero data)."""
    return (0xFFFF - partial % 0xFFFF) % 0xFFFF


def _fold(partial: int) -> int:
    """A sum folded to 16 bits, not complemented (CHECKSUM_PARTIAL's pseudo-header)."""
    return partial % 0xFFFF or 0xFFFF


# --- segmentation ------------------------------------------------------------------


def segment(h: Gso, packet: bytes, *, partial: bool = False, max_len: int = 0) -> list[bytes]:
    """The wire packets for `packet`, what follows header `h` in a TUN read.

    With `max_len` (an MTU), no TCP segment is longer: a `gso_size` too large for it is
    lowered to fit, as a smaller MSS would have cut the stream (a packet without GSO is
    the caller's to check).

    With `partial`, the TCP segments of a GSO packet carry in their checksum field only
    the pseudo-header sum (as CHECKSUM_PARTIAL packets do), not the full checksum: for
    a receiver that hands every TCP packet to its kernel as F_NEEDS_CSUM (a gtun node,
    see to_partial()), which saves summing the payload.  Never for a stock peer.

    GSO_NONE: the packet itself, its checksum finished first if `h` has F_NEEDS_CSUM
    (whatever the layer 4: the field holds the pseudo-header sum, as in the kernel's
    skb_checksum_help(); a result of 0 is sent as 0xFFFF where UDP keeps its checksum,
    as UDP needs, and elsewhere as 0, as the TCP segments below are, so that split()
    pieces of one segment are byte for byte that segment).
    GSO_TCPV4/GSO_TCPV6 (with or without GSO_ECN): one packet per `gso_size` bytes of
    payload with its own IPv4 total length, ID (+1 per segment), header checksum, IPv6
    payload length, TCP sequence number, flags (FIN and PSH only on the last, CWR only on
    the first) and a TCP checksum computed from scratch.

    Raises OffloadError: "bad_vnet_hdr" for a checksum outside the packet or starting
    inside its IP header,
    "bad_gso" for a GSO packet that is not a well-formed IPv4/IPv6 + TCP packet whose
    header fields agree with its length and `h` (IPv6 extension headers and IPv4
    fragments included), for gso_size 0, no payload, more than MAX_SEGMENTS segments, a
    segment over 65535 bytes, or an unsupported gso_type (UDP); "too_big" when the
    headers alone leave no room for payload in `max_len`.
    """
    if not h.gso_type:
        if h.flags & F_NEEDS_CSUM:
            return [_finish_checksum(packet, h.csum_start, h.csum_offset)]
        return [packet]
    if not isinstance(packet, bytes):
        packet = bytes(packet)
    l3, hl = _parse_tcp_gso(h, packet)
    n = len(packet)
    g = h.gso_size
    pay = n - hl
    if max_len and hl + g > max_len:
        g = max_len - hl
        if g < 1:
            raise OffloadError("too_big", f"TCP/IP headers of {hl} bytes, the limit is {max_len}")
        if -(-pay // g) > MAX_SEGMENTS:
            raise OffloadError("bad_gso", f"more than {MAX_SEGMENTS} segments")
    if hl + min(g, pay) > MAX_IP_PACKET:
        raise OffloadError("bad_gso", f"a segment of {hl + min(g, pay)} bytes")
    return _segment_tcp(packet, l3, hl, g, partial)


def _finish_checksum(packet: bytes, start: int, offset: int) -> bytes:
    at = start + offset
    n = len(packet)
    if at + 2 > n or start >= n:
        raise OffloadError(
            "bad_vnet_hdr", f"checksum at {start}+{offset} outside a {n}-byte packet"
        )
    # The checksum a device leaves is a transport layer's: one starting inside the IP
    # header would overwrite the header the packet was routed by.
    if start < (40 if packet[0] >> 4 == 6 else max(20, (packet[0] & 0x0F) << 2)):
        raise OffloadError("bad_vnet_hdr", f"checksum at {start}, inside the IP header")
    value = checksum(packet[start:])
    if not value and offset == _UDP_CSUM_OFFSET:
        value = 0xFFFF  # UDP's 0 says "no checksum" (RFC 768): send its equal, 0xFFFF
    return b"".join((packet[:at], _H16.pack(value), packet[at + 2 :]))


def _parse_tcp_gso(h: Gso, packet: bytes) -> tuple[int, int]:
    """(IP header length, IP + TCP header length) of a TCP super-packet; raises."""
    kind = h.gso_type & ~GSO_ECN
    n = len(packet)
    if kind == GSO_TCPV4:
        if n < 40 or packet[0] >> 4 != 4:
            raise OffloadError("bad_gso", "GSO_TCPV4 without an IPv4 header")
        l3 = (packet[0] & 0x0F) << 2
        if l3 < 20 or n < l3 + 20:
            raise OffloadError("bad_gso", f"IPv4 header length {l3} in {n} bytes")
        if packet[9] != IPPROTO_TCP:
            raise OffloadError("bad_gso", f"GSO_TCPV4 of IP protocol {packet[9]}")
        if ((packet[6] << 8) | packet[7]) & 0x3FFF:
            raise OffloadError("bad_gso", "GSO of an IPv4 fragment")
        if (packet[2] << 8) | packet[3] != n:
            raise OffloadError("bad_gso", "IPv4 total length disagrees with the packet")
    elif kind == GSO_TCPV6:
        if n < 60 or packet[0] >> 4 != 6:
            raise OffloadError("bad_gso", "GSO_TCPV6 without an IPv6 header")
        if packet[6] != IPPROTO_TCP:
            raise OffloadError("bad_gso", f"GSO_TCPV6 with next header {packet[6]}")
        if 40 + ((packet[4] << 8) | packet[5]) != n:
            raise OffloadError("bad_gso", "IPv6 payload length disagrees with the packet")
        l3 = 40
    else:
        raise OffloadError("bad_gso", f"gso_type {h.gso_type:#x} not supported")
    hl = l3 + ((packet[l3 + 12] >> 4) << 2)
    if hl < l3 + 20 or hl >= n:
        raise OffloadError("bad_gso", f"TCP header ends at {hl} of {n} bytes")
    if h.flags & F_NEEDS_CSUM and (h.csum_start != l3 or h.csum_offset != TCP_CSUM_OFFSET):
        raise OffloadError("bad_gso", f"checksum at {h.csum_start}+{h.csum_offset}")
    # hdr_len is only a hint (Linux puts the linear length there); the TCP header decides.
    if h.hdr_len > n:
        raise OffloadError("bad_gso", f"hdr_len {h.hdr_len} beyond {n} bytes")
    if not h.gso_size:
        raise OffloadError("bad_gso", "gso_size 0")
    if -(-(n - hl) // h.gso_size) > MAX_SEGMENTS:
        raise OffloadError("bad_gso", f"more than {MAX_SEGMENTS} segments")
    return l3, hl


_SEG_STRUCTS: dict[tuple[int, int], struct.Struct] = {}


def _header_struct(l3: int, doff: int) -> struct.Struct:
    """Packs a header from its constant chunks and changing fields (see _segment_tcp)."""
    s = _SEG_STRUCTS.get((l3, doff))
    if s is None:
        if l3 == 40:
            s = struct.Struct(f"!4sH38sI5sB2sH{doff - 18}s")
        else:
            s = struct.Struct(f"!2sHH4sH{l3 - 8}sI5sB2sH{doff - 18}s")
        _SEG_STRUCTS[(l3, doff)] = s
    return s


class _Template(NamedTuple):
    """A super-packet's headers cut into the chunks no segment changes."""

    pack: Callable[..., bytes]  # struct.Struct.pack
    c1: bytes  # IPv4 version/IHL + TOS, or IPv6 first word
    c2: bytes  # IPv4 fragment word, TTL, protocol (empty for IPv6)
    c3: bytes  # addresses (+ IPv4 options, IPv6 next header/hop limit) + ports
    c4: bytes  # acknowledgment number + data offset
    c5: bytes  # window
    c6: bytes  # urgent pointer + TCP options
    ip_base: int  # IPv4 header sum without total length, ID and checksum
    addr_sum: int  # pseudo-header addresses + protocol
    tcp_base: int  # addr_sum + TCP header without seq, flags, checksum
    seq: int
    ident: int
    flags: int


def _template(packet: bytes, l3: int, hl: int) -> _Template:
    frm = int.from_bytes
    t = l3
    if l3 == 40:
        c1, c2, c3 = packet[0:4], b"", packet[6:44]
        addr_sum = frm(packet[8:40], "big") % 0xFFFF + IPPROTO_TCP
        ip_base = 0
        ident = 0
    else:
        c1, c2, c3 = packet[0:2], packet[6:10], packet[12 : l3 + 4]
        addr_sum = frm(packet[12:20], "big") % 0xFFFF + IPPROTO_TCP
        ip_base = (frm(c1, "big") + frm(c2, "big") + frm(packet[12:l3], "big")) % 0xFFFF
        ident = (packet[4] << 8) | packet[5]
    c4 = packet[t + 8 : t + 13]
    c5 = packet[t + 14 : t + 16]
    c6 = packet[t + 18 : hl]
    # The TCP header's words but the sequence number, flags and checksum (all even-aligned).
    tcp_sum = frm(packet[t : t + 4], "big") + frm(packet[t + 8 : t + 12], "big")
    tcp_sum += (packet[t + 12] << 8) + frm(c5, "big") + frm(c6, "big")
    return _Template(
        _header_struct(l3, hl - l3).pack,
        c1,
        c2,
        c3,
        c4,
        c5,
        c6,
        ip_base,
        addr_sum,
        (addr_sum + tcp_sum) % 0xFFFF,
        frm(packet[t + 4 : t + 8], "big"),
        ident,
        packet[t + 13],
    )


_FOLDS: dict[int, tuple[int, int, int, int, int, int]] = {}


def _folds(g: int) -> tuple[int, int, int, int, int, int]:
    """Shifts (multiples of 16 bits, so the value modulo 0xFFFF stays) and masks that
    fold a payload of `g` bytes in three halvings: then one small % beats one % on the
    whole payload by half."""
    f = _FOLDS.get(g)
    if f is None:
        k1 = ((g * 4 + 15) >> 4) << 4
        k2 = ((k1 // 2 + 15) >> 4) << 4
        k3 = ((k2 // 2 + 15) >> 4) << 4
        f = (k1, (1 << k1) - 1, k2, (1 << k2) - 1, k3, (1 << k3) - 1)
        if len(_FOLDS) >= 64:  # a bound, for hostile gso_sizes
            _FOLDS.clear()
        _FOLDS[g] = f
    return f


def _segment_tcp(packet: bytes, l3: int, hl: int, g: int, partial: bool = False) -> list[bytes]:
    n = len(packet)
    tp = _template(packet, l3, hl)
    pack = tp.pack
    c1, c2, c3, c4, c5, c6 = tp.c1, tp.c2, tp.c3, tp.c4, tp.c5, tp.c6
    doff = hl - l3
    tcp_base = tp.tcp_base
    ip_base = tp.ip_base
    seq = tp.seq
    ident = tp.ident
    f0 = tp.flags
    f_first = f0 & ~(TCP_FIN | TCP_PSH)
    f_mid = f_first & ~TCP_CWR
    f_last = f0 & ~TCP_CWR
    # Two folds sized for gso_size, then one small %, beat one % on the whole payload.
    k1, m1, k2, m2, k3, m3 = _folds(g)
    full_base = tcp_base + doff + g  # the TCP length of a full segment included
    addr_sum = tp.addr_sum
    out: list[bytes] = []
    append = out.append
    v6 = l3 == 40
    off = hl
    fl = f_first
    while off < n:
        end = off + g
        pay = packet[off:end]
        if partial:
            plen = g if end < n else n - off
            tcs = (addr_sum + doff + plen) % 0xFFFF or 0xFFFF
            r = 0
        else:
            x = int.from_bytes(pay, "big")
            x = (x >> k1) + (x & m1)
            x = (x >> k2) + (x & m2)
            r = ((x >> k3) + (x & m3)) % 0xFFFF
        if end >= n:
            end = n
            fl = f_last if off > hl else f0  # a single segment keeps every flag
            plen = n - off
            if plen & 1:
                r <<= 8
            r += tcp_base + doff + plen
        else:
            plen = g
            if g & 1:
                r <<= 8
            r += full_base
        tlen = doff + plen
        if not partial:
            tcs = -(r + (seq >> 16) + (seq & 0xFFFF) + fl) % 0xFFFF
        if v6:
            hdr = pack(c1, tlen, c3, seq, c4, fl, c5, tcs, c6)
        else:
            tot = l3 + tlen
            hdr = pack(
                c1, tot, ident, c2, -(ip_base + tot + ident) % 0xFFFF, c3, seq, c4, fl, c5, tcs, c6
            )
            ident = (ident + 1) & 0xFFFF
        append(hdr + pay)
        seq = (seq + plen) & 0xFFFFFFFF
        off = end
        fl = f_mid
    return out


# --- partial checksums between gtun nodes ------------------------------------------


def tcp_header_at(packet: bytes) -> int:
    """Where the TCP header of a plain TCP packet starts (IPv4, not a fragment, or IPv6
    without extension headers), or 0 for anything else."""
    n = len(packet)
    if n < 40:
        return 0
    v = packet[0] >> 4
    if v == 4:
        l3 = (packet[0] & 0x0F) << 2
        if packet[9] != IPPROTO_TCP or l3 < 20 or ((packet[6] << 8) | packet[7]) & 0x3FFF:
            return 0
        if (packet[2] << 8) | packet[3] != n or n < l3 + 20:
            return 0
        return l3
    if v == 6 and n >= 60 and packet[6] == IPPROTO_TCP and 40 + ((packet[4] << 8) | packet[5]) == n:
        return 40
    return 0


def _pseudo_sum(header: bytes | bytearray, l3: int, tcp_len: int) -> int:
    """The TCP pseudo-header sum of an IP header `l3` bytes long for `tcp_len` bytes of
    TCP, folded, not complemented: what a CHECKSUM_PARTIAL packet's field holds."""
    addrs = header[8:40] if l3 == 40 else header[12:20]
    return _fold(sum16(addrs) + IPPROTO_TCP + tcp_len)


def to_partial(packet: bytes) -> tuple[Gso, bytes]:
    """A plain packet for an offloading TUN: a TCP packet (whatever its checksum field
    holds) as F_NEEDS_CSUM with the pseudo-header sum in the field, so the kernel
    completes or trusts the checksum; anything else unchanged, as (PLAIN, packet)."""
    l3 = tcp_header_at(packet)
    if not l3:
        return PLAIN, packet
    at = l3 + TCP_CSUM_OFFSET
    field = _H16.pack(_pseudo_sum(packet, l3, len(packet) - l3))
    hdr = Gso(F_NEEDS_CSUM, GSO_NONE, 0, 0, l3, TCP_CSUM_OFFSET)
    return hdr, b"".join((packet[:at], field, packet[at + 2 :]))


def finish_tcp_checksum(packet: bytes) -> bytes:
    """A TCP packet with its checksum computed from scratch (for a receiver that checks
    it: a stock peer, or a TUN without offloads); anything else unchanged."""
    hdr, partial = to_partial(packet)
    if not hdr.flags:
        return packet
    return _finish_checksum(partial, hdr.csum_start, hdr.csum_offset)


# --- splitting ---------------------------------------------------------------------


def split(h: Gso, packet: bytes, max_len: int) -> list[tuple[Gso, bytes]]:
    """`packet` (with header `h`) as pieces of at most `max_len` bytes each.

    A packet that fits comes back whole: [(h, packet)].  A TCP super-packet is cut at
    segment boundaries; each piece is a super-packet of its own (same gso_type and
    gso_size, F_NEEDS_CSUM, the TCP checksum field holding the pseudo-header sum, IPv4
    header checksum valid) or, if it holds a single segment, a GSO_NONE packet with
    F_NEEDS_CSUM.  Lengths, IPv4 ID, sequence number and flags are set so that
    `segment()` of the pieces gives exactly the packets `segment()` of the whole does,
    and a kernel given the pieces makes the same segments too.

    Raises OffloadError: as `segment()` does for a bad GSO packet, and "too_big" for a
    packet without GSO, or a segment with its headers, longer than `max_len`.
    """
    n = len(packet)
    if not h.gso_type:
        if n <= max_len:
            return [(h, packet)]
        raise OffloadError("too_big", f"{n} bytes without GSO, the limit is {max_len}")
    if not isinstance(packet, bytes):
        packet = bytes(packet)
    l3, hl = _parse_tcp_gso(h, packet)
    if n <= max_len:
        return [(h, packet)]
    g = h.gso_size
    per = (max_len - hl) // g
    if per < 1:
        raise OffloadError("too_big", f"a segment of {hl + g} bytes, the limit is {max_len}")
    chunk = per * g
    tp = _template(packet, l3, hl)
    pack = tp.pack
    doff = hl - l3
    f0 = tp.flags
    f_first = f0 & ~(TCP_FIN | TCP_PSH)
    f_mid = f_first & ~TCP_CWR
    f_last = f0 & ~TCP_CWR
    gso_hdr = Gso(F_NEEDS_CSUM, h.gso_type, hl, g, l3, TCP_CSUM_OFFSET)
    one_hdr = Gso(F_NEEDS_CSUM, GSO_NONE, hl, 0, l3, TCP_CSUM_OFFSET)
    out: list[tuple[Gso, bytes]] = []
    off = hl
    fl = f_first
    while off < n:
        end = off + chunk
        if end >= n:
            end = n
            fl = f_last
        plen = end - off
        tlen = doff + plen
        seq = (tp.seq + off - hl) & 0xFFFFFFFF
        tcs = _fold(tp.addr_sum + tlen)
        if l3 == 40:
            hdr = pack(tp.c1, tlen, tp.c3, seq, tp.c4, fl, tp.c5, tcs, tp.c6)
        else:
            tot = l3 + tlen
            ident = (tp.ident + (off - hl) // g) & 0xFFFF
            ics = _complete(tp.ip_base + tot + ident)
            hdr = pack(tp.c1, tot, ident, tp.c2, ics, tp.c3, seq, tp.c4, fl, tp.c5, tcs, tp.c6)
        out.append((gso_hdr if plen > g else one_hdr, hdr + packet[off:end]))
        off = end
        fl = f_mid
    return out


# --- coalescing --------------------------------------------------------------------


class _Run:
    """Consecutive segments of one flow becoming one super-packet."""

    __slots__ = ("first", "l3", "hl", "sig", "next_seq", "g", "parts", "total", "psh", "same")

    same: list[tuple[int, bytes]]

    def __init__(
        self, first: bytes, l3: int, hl: int, sig: tuple[object, ...], seq: int, tot: int
    ) -> None:
        self.first = first
        self.l3 = l3
        self.hl = hl
        self.sig = sig
        self.g = tot - hl
        self.next_seq = (seq + self.g) & 0xFFFFFFFF
        self.parts: list[bytes | bytearray] = [b"", first[hl:tot]]  # [0]: the header
        self.total = tot
        self.psh = 0
        # The fast lane (coalesce): a packet whose header has these bytes where this
        # first one has them -- all but the IP identification and checksum, the TCP
        # sequence number and checksum -- is a full-size segment of the run's flow with
        # the same signature and flags (an ACK without PSH, as a run still open has).
        cuts: tuple[tuple[int, int], ...]
        if l3 == 40:
            cuts = ((0, 44), (48, 56), (58, hl))
        else:
            cuts = ((0, 4), (6, 10), (12, 24), (28, 36), (38, hl))
        self.same = [(a, first[a:b]) for a, b in cuts]

    def build(self) -> tuple[Gso, bytes]:
        first, l3, hl = self.first, self.l3, self.hl
        if len(self.parts) == 2:
            return PLAIN, first[: self.total]
        header = bytearray(first[:hl])
        total = self.total
        header[l3 + 13] |= self.psh
        if l3 == 40:
            header[4:6] = _H16.pack(total - 40)
            gso_type = GSO_TCPV6
        else:
            header[2:4] = _H16.pack(total)
            header[10:12] = b"\0\0"
            header[10:12] = _H16.pack(checksum(header[:20]))
            gso_type = GSO_TCPV4
        header[l3 + 16 : l3 + 18] = _H16.pack(_pseudo_sum(header, l3, total - l3))
        self.parts[0] = header
        h = Gso(F_NEEDS_CSUM, gso_type, hl, self.g, l3, TCP_CSUM_OFFSET)
        return h, b"".join(self.parts)


def coalesce(packets: list[bytes]) -> list[tuple[Gso, bytes]]:
    """GRO for decrypted IP packets about to be written to a TUN with a vnet header.

    Each packet may carry zero padding beyond its IP length (WireGuard pads to 16
    bytes): it is trimmed.  Runs of TCP segments of one flow (same addresses, ports, IP
    version, TOS/traffic class (and IPv6 flow label), TTL/hop limit, DF, acknowledgment
    number, window, TCP options; ACK set, no SYN/FIN/RST/URG/ECE/CWR; contiguous sequence
    numbers; the same payload size but for a shorter last one; PSH only on the last) become
    one super-packet of at most 65535 bytes with a GSO_TCPV4/GSO_TCPV6 header and the
    TCP checksum field holding the pseudo-header sum, as the kernel expects of
    CHECKSUM_PARTIAL.  Segments of different flows are gathered per flow within the
    batch; a super-packet takes the place of its first segment, so each flow's order is
    kept.  Everything else -- non-TCP, fragments, IPv4 options, IPv6 extension headers,
    malformed packets, and runs of one -- comes back as (PLAIN, packet) in order; an
    unusual TCP packet also ends every open run, so nothing overtakes it.

    Checksums are NOT verified: WireGuard's AEAD authenticated every byte, so they are
    what the peer's kernel computed, and checking them again would cost as much as
    coalescing.  The super-packet goes to the kernel as CHECKSUM_PARTIAL, which it
    trusts without a check either.

    Never raises for any input.
    """
    out: list[tuple[Gso, bytes] | _Run] = []
    runs: dict[bytes, _Run] = {}
    v4tcp = _V4TCP.unpack_from
    v6tcp = _V6TCP.unpack_from
    hot: _Run | None = None  # the open run the last packet went to
    for p in packets:
        if hot is not None:
            # Most packets continue the run the previous one went to: checked against
            # its first packet's header without taking this one apart (Run.same).
            hl = hot.hl
            tot = hl + hot.g  # a full-size segment's IP length, the first one's
            at = hot.l3 + 4
            if (
                len(p) >= tot
                and hot.total + hot.g <= MAX_IP_PACKET
                and (p[at] << 24 | p[at + 1] << 16 | p[at + 2] << 8 | p[at + 3]) == hot.next_seq
            ):
                for a, b in hot.same:
                    if not p.startswith(b, a):
                        break
                else:
                    hot.parts.append(p[hl:tot])
                    hot.total += hot.g
                    hot.next_seq = (hot.next_seq + hot.g) & 0xFFFFFFFF
                    continue
            hot = None
        n = len(p)
        if n >= 40 and p[0] == 0x45:
            (_, tos, tot, _, frag, ttl, proto, _, key, seq, ack, doffb, fl, win, _, urg) = v4tcp(p)
            if proto != IPPROTO_TCP:
                out.append((PLAIN, _trim(p)))
                continue
            hl = 20 + ((doffb >> 4) << 2)
            if frag & 0x3FFF or tot > n or doffb < 0x50 or tot < hl:
                runs.clear()
                out.append((PLAIN, p[:tot] if 20 <= tot < n else p))
                continue
            sig: tuple[object, ...] = (tos, frag, ttl, ack, doffb, win, urg, p[40:hl])
            l3 = 20
        elif n >= 60 and p[0] >> 4 == 6:
            (w0, plen6, nh, hop, key, seq, ack, doffb, fl, win, _, urg) = v6tcp(p)
            tot = 40 + plen6
            if nh != IPPROTO_TCP:
                if nh != _IPPROTO_UDP and nh != _IPPROTO_ICMPV6:
                    runs.clear()  # an extension header, perhaps before TCP
                out.append((PLAIN, _trim(p)))
                continue
            hl = 40 + ((doffb >> 4) << 2)
            if tot > n or doffb < 0x50 or tot < hl:
                runs.clear()
                out.append((PLAIN, p[:tot] if tot < n else p))
                continue
            sig = (w0, hop, ack, doffb, win, urg, p[60:hl])
            l3 = 40
        else:
            if n >= 20 and p[0] >> 4 == 4 and p[9] == IPPROTO_TCP:
                runs.clear()  # TCP with IPv4 options
            out.append((PLAIN, _trim(p)))
            continue
        plen = tot - hl
        run = runs.get(key)
        if plen == 0 or (fl != TCP_ACK and fl != TCP_ACK | TCP_PSH):
            if run is not None:
                del runs[key]
            out.append((PLAIN, p[:tot] if tot < n else p))
            continue
        if run is not None:
            if (
                seq == run.next_seq
                and plen <= run.g
                and run.total + plen <= MAX_IP_PACKET
                and sig == run.sig
            ):
                run.parts.append(p[hl:tot])
                run.total += plen
                run.next_seq = (seq + plen) & 0xFFFFFFFF
                if plen < run.g or fl & TCP_PSH:
                    run.psh = fl & TCP_PSH
                    del runs[key]
                else:
                    hot = run
                continue
            del runs[key]
        run = _Run(p, l3, hl, sig, seq, tot)
        out.append(run)
        if not fl & TCP_PSH:
            runs[key] = run
            hot = run
    return [item.build() if isinstance(item, _Run) else item for item in out]


def _trim(p: bytes) -> bytes:
    """`p` without bytes beyond its IP length, when that length makes sense."""
    n = len(p)
    if n >= 20 and p[0] >> 4 == 4:
        tot = (p[2] << 8) | p[3]
        if 20 <= tot < n:
            return p[:tot]
    elif n >= 40 and p[0] >> 4 == 6:
        tot = 40 + ((p[4] << 8) | p[5])
        if tot < n:
            return p[:tot]
    return p
