"""Bulk frames: a whole TCP super-packet in one WireGuard transport message.

Between two gtun nodes connected over TCP, a super-packet read from an offloading TUN
(up to 64 KB, tun.py) travels as ONE encrypted message instead of ~45: one AEAD call, one
stream write, and on the far side one TUN write of the same super-packet.  The plaintext
is gtun's own (first byte 0x00, like tunnelmsg.py), so a stock WireGuard peer never gets
one: the relay and the client send them only after both said they take them (the
"bulk" key of the configuration request and of the configuration), and only over a
stream (TCP) endpoint, whose frames may be that large.  Likewise they take them only
from a peer that said so: the relay drops any other peer's, the client a relay's that
did not grant them ("not_negotiated").

    magic(4) = 00 'g' 't' 03   virtio-net header(10, offload.py)   IP packet

A received bulk frame is checked before its header reaches the kernel: the header must
describe what follows (GSO_NONE, or TCPV4/TCPV6 over a TCP packet of that IP version,
the checksum where TCP keeps it, segments that fit), and the packet's IP total length
must be its length (WireGuard's zero padding is trimmed).  Anything else is the sender's
protocol error, counted as "bad_bulk".
"""

from __future__ import annotations

from gtun.core.errors import LocalProtocolError, RemoteProtocolError
from gtun.core.offload import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_HDR_LEN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    Gso,
    OffloadError,
    pull_gso,
    push_gso,
    segment,
    split,
)
from gtun.core.tunnel import BULK_MAGIC
from gtun.core.wg import Peer, WireGuard

MAGIC = BULK_MAGIC
HEADER_LEN = len(MAGIC) + GSO_HDR_LEN
# The largest IP packet in one bulk frame: a TCP frame holds 65535 bytes, less the
# transport message's header (16) and tag (16), WireGuard's padding (up to 15) and ours.
MAX_PACKET = 65535 - 32 - 15 - HEADER_LEN
_MIN_GSO_SIZE = 88  # Linux's TCP_MIN_MSS: smaller segments are no real flow's; refused

_TCP = 6


class BulkError(RemoteProtocolError):
    """A peer sent a bulk frame whose header or packet is impossible."""


def is_bulk(plaintext: bytes) -> bool:
    return plaintext[:4] == MAGIC


def push_bulk(hdr: Gso, packet: bytes) -> bytes:
    """The plaintext of a bulk frame.  Raises LocalProtocolError (the caller's misuse) when the
    packet is larger than MAX_PACKET: split it first (offload.split)."""
    if len(packet) > MAX_PACKET:
        raise LocalProtocolError(f"packet of {len(packet)} bytes does not fit a bulk frame")
    return MAGIC + push_gso(hdr) + packet


def pull_bulk(plaintext: bytes) -> tuple[Gso, bytes]:
    """(header, packet) of a bulk frame, padding trimmed.  Raises BulkError."""
    if len(plaintext) < HEADER_LEN + 20 or plaintext[:4] != MAGIC:
        raise BulkError("truncated bulk frame")
    return check_super(pull_gso(plaintext[4:HEADER_LEN]), plaintext[HEADER_LEN:])


def check_super(hdr: Gso, packet: bytes) -> tuple[Gso, bytes]:
    """(header, packet) as a receiver of a bulk frame takes them (the checks in this
    module's docstring), padding trimmed.  Raises BulkError."""
    if len(packet) < 20:
        raise BulkError("truncated bulk frame")
    version = packet[0] >> 4
    if version == 4:
        length = (packet[2] << 8) | packet[3]
        ip_len = (packet[0] & 0x0F) * 4
        proto = packet[9]
    elif version == 6 and len(packet) >= 40:
        length = 40 + ((packet[4] << 8) | packet[5])
        ip_len = 40
        proto = packet[6]
    else:
        raise BulkError("not an IP packet")
    if not ip_len <= length <= len(packet) or ip_len < 20:
        raise BulkError("IP length does not match the frame")
    if length < len(packet):
        if any(packet[length:]):
            raise BulkError("data after the IP packet")
        packet = packet[:length]
    return _checked_header(hdr, version, ip_len, proto, packet), packet


def _checked_header(hdr: Gso, version: int, ip_len: int, proto: int, packet: bytes) -> Gso:
    """`hdr` if it describes `packet`, with hdr_len set to the real IP + TCP header
    length (the kernel's own reads give only a hint there)."""
    if hdr.flags & ~F_NEEDS_CSUM:
        raise BulkError("unknown header flags")
    gso = hdr.gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if hdr.gso_type != GSO_NONE or hdr.gso_size:
            raise BulkError("ECN or segment size without segmentation")
        if hdr.flags & F_NEEDS_CSUM and not (
            hdr.csum_start >= ip_len and hdr.csum_start + hdr.csum_offset + 2 <= len(packet)
        ):
            raise BulkError("checksum outside the packet")
        return hdr
    if gso != (GSO_TCPV4 if version == 4 else GSO_TCPV6) or proto != _TCP:
        raise BulkError("segmentation type does not match the packet")
    if not hdr.flags & F_NEEDS_CSUM or hdr.csum_start != ip_len or hdr.csum_offset != 16:
        raise BulkError("TCP checksum not where TCP keeps it")
    if len(packet) < ip_len + 20:
        raise BulkError("truncated TCP header")
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    if tcp_len < 20 or ip_len + tcp_len > len(packet):
        raise BulkError("TCP header does not fit the packet")
    if hdr.gso_size < _MIN_GSO_SIZE:
        raise BulkError("segment size too small")
    if ip_len + tcp_len == len(packet):
        raise BulkError("segmentation of a TCP packet without payload")
    if version == 4 and (packet[6] << 8 | packet[7]) & 0x3FFF:
        raise BulkError("segmentation of an IPv4 fragment")
    return hdr._replace(hdr_len=ip_len + tcp_len)


def takes_bulk(peer: Peer) -> bool:
    """Bulk frames may go to `peer`: it negotiated them (its `data.caps`, tunnel.Caps)
    and its endpoint is a stream (`stream` is true: the TCP transport's endpoints)."""
    return peer.data.caps.bulk and getattr(peer.endpoint, "stream", False)


def send_super(wg: WireGuard, peer: Peer, hdr: Gso, packet: bytes, now: float) -> None:
    """Send a super-packet to `peer`: as bulk frames when it takes them (takes_bulk)
    and would take this one (check_super: never a frame the receiver refuses, such as
    one of segments under _MIN_GSO_SIZE, which Linux does send), else as the packets it
    stands for, each its own transport message no longer than the tunnel MTU (`wg.mtu`;
    segments of a larger `gso_size` are cut to it), valid for any WireGuard peer.  A
    packet without GSO longer than the MTU goes to no peer, bulk or not: nothing can cut
    it.  Raises OffloadError: "too_big" for that packet, and for a super-packet that
    cannot be cut."""
    if hdr.gso_type == GSO_NONE:
        if wg.mtu and len(packet) > wg.mtu:
            raise OffloadError("too_big", f"{len(packet)} bytes without GSO, the MTU is {wg.mtu}")
        if not hdr.flags:
            wg.send(peer, packet, now)
            return
    if takes_bulk(peer) and _takes(hdr, packet):
        if len(packet) <= MAX_PACKET:
            wg.send(peer, push_bulk(hdr, packet), now)
        else:
            for piece_hdr, piece in split(hdr, packet, MAX_PACKET):
                wg.send(peer, push_bulk(piece_hdr, piece), now)
    else:
        segments = segment(hdr, packet, partial=peer.data.caps.partial, max_len=wg.mtu)
        wg.send_many(peer, segments, now)


def _takes(hdr: Gso, packet: bytes) -> bool:
    """Whether a receiver takes (hdr, packet) as a bulk frame (check_super)."""
    try:
        check_super(hdr, packet)
    except BulkError:
        return False
    return True
