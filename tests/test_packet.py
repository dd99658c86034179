from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from gtun.core import packet
from gtun.core.packet import (
    build_icmp_echo,
    build_ipv4,
    build_udp4,
    ip_version,
    ipv4_checksum,
    packet_length,
    parse_addresses,
)

SRC = IPv4Address("10.66.0.2").packed
DST = IPv4Address("10.66.0.3").packed


def _ipv6(payload: bytes, src: str = "fd66::2", dst: str = "fd66::3") -> bytes:
    header = struct.pack("!IHBB", 6 << 28, len(payload), 17, 64)
    return header + IPv6Address(src).packed + IPv6Address(dst).packed + payload


def test_ip_version() -> None:
    assert ip_version(b"") == 0
    assert ip_version(build_ipv4(SRC, DST, 17, b"x")) == 4
    assert ip_version(_ipv6(b"")) == 6
    assert ip_version(b"\x10") == 1


def test_parse_ipv4() -> None:
    pkt = build_ipv4(SRC, DST, 17, b"hello")
    assert parse_addresses(pkt) == (SRC, DST)
    assert packet_length(pkt) == 25


def test_parse_ipv6() -> None:
    pkt = _ipv6(b"abcd")
    assert parse_addresses(pkt) == (
        IPv6Address("fd66::2").packed,
        IPv6Address("fd66::3").packed,
    )
    assert packet_length(pkt) == 44


def test_padding_is_trimmed_by_length() -> None:
    # WireGuard pads the plaintext to a multiple of 16 with zeros.
    pkt = build_ipv4(SRC, DST, 17, b"abc")
    padded = pkt + b"\x00" * (16 - len(pkt) % 16)
    assert parse_addresses(padded) == (SRC, DST)
    n = packet_length(padded)
    assert n is not None
    assert padded[:n] == pkt
    pkt6 = _ipv6(b"xyz")
    assert packet_length(pkt6 + b"\x00" * 13) == len(pkt6)


def test_ipv4_with_options() -> None:
    pkt = bytearray(build_ipv4(SRC, DST, 17, b"\x01\x01\x01\x00" + b"data"))
    pkt[0] = 0x46  # IHL 6: the first payload word becomes an option (NOPs and EOL)
    assert parse_addresses(bytes(pkt)) == (SRC, DST)


@pytest.mark.parametrize("size", [0, 1, 19])
def test_truncated_ipv4(size: int) -> None:
    pkt = build_ipv4(SRC, DST, 17, b"payload")[:size]
    assert parse_addresses(pkt) is None
    assert packet_length(pkt) is None


def test_ipv4_truncated_payload() -> None:
    pkt = build_ipv4(SRC, DST, 17, b"payload")
    assert parse_addresses(pkt[:-1]) is None
    assert packet_length(pkt[:-1]) is None


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_header_too_short(ihl: int) -> None:
    pkt = bytearray(build_ipv4(SRC, DST, 17, b"payload"))
    pkt[0] = 0x40 | ihl
    assert parse_addresses(bytes(pkt)) is None
    assert packet_length(bytes(pkt)) is None


def test_ipv4_header_longer_than_total() -> None:
    pkt = bytearray(build_ipv4(SRC, DST, 17, b"1234"))
    pkt[0] = 0x46  # header of 24 bytes in a packet whose total length is 24: fine
    assert parse_addresses(bytes(pkt)) == (SRC, DST)
    pkt[0] = 0x47  # 28 > total length 24
    assert parse_addresses(bytes(pkt)) is None


@pytest.mark.parametrize("total", [0, 19, 26, 0xFFFF])
def test_ipv4_bad_total_length(total: int) -> None:
    pkt = bytearray(build_ipv4(SRC, DST, 17, b"hello"))
    struct.pack_into("!H", pkt, 2, total)
    assert parse_addresses(bytes(pkt)) is None
    assert packet_length(bytes(pkt)) is None


@pytest.mark.parametrize("size", [1, 20, 39])
def test_truncated_ipv6(size: int) -> None:
    pkt = _ipv6(b"")[:size]
    assert parse_addresses(pkt) is None
    assert packet_length(pkt) is None


def test_ipv6_payload_length_beyond_buffer() -> None:
    pkt = bytearray(_ipv6(b"abcd"))
    struct.pack_into("!H", pkt, 4, 5)
    assert parse_addresses(bytes(pkt)) is None
    assert packet_length(bytes(pkt)) is None


@pytest.mark.parametrize("version", [0, 1, 5, 7, 15])
def test_other_versions(version: int) -> None:
    pkt = bytearray(build_ipv4(SRC, DST, 17, b"x" * 40))
    pkt[0] = (version << 4) | 5
    assert parse_addresses(bytes(pkt)) is None
    assert packet_length(bytes(pkt)) is None


def test_accepts_memoryview_and_bytearray() -> None:
    pkt = build_ipv4(SRC, DST, 17, b"hi")
    assert parse_addresses(bytearray(pkt)) == (SRC, DST)
    assert parse_addresses(memoryview(pkt)) == (SRC, DST)
    assert packet_length(memoryview(pkt)) == len(pkt)


def test_checksum_known_value() -> None:
    # The worked example of RFC 1071 section 3 sums to 0xddf2; the checksum is its complement.
    assert ipv4_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)
    assert ipv4_checksum(b"") == 0xFFFF
    assert ipv4_checksum(b"\x01") == (~0x0100 & 0xFFFF)


def test_ipv4_header() -> None:
    pkt = build_ipv4("192.0.2.1", IPv4Address("198.51.100.7"), 6, b"abc", ttl=9, ident=0x1234)
    assert len(pkt) == 23
    version_ihl, _, total, ident, frag, ttl, proto = struct.unpack("!BBHHHBB", pkt[:10])
    assert (version_ihl, total, ident, frag, ttl, proto) == (0x45, 23, 0x1234, 0, 9, 6)
    assert pkt[12:16] == socket.inet_aton("192.0.2.1")
    assert pkt[16:20] == socket.inet_aton("198.51.100.7")
    assert ipv4_checksum(pkt[:20]) == 0
    assert pkt[20:] == b"abc"


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_ipv4(b"\x01\x02\x03", DST, 17, b"")
    with pytest.raises(ValueError):
        build_ipv4("::1", DST, 17, b"")
    with pytest.raises(ValueError):
        build_ipv4(SRC, DST, 17, b"\x00" * 65516)


@pytest.mark.parametrize("reply", [False, True])
def test_icmp_echo(reply: bool) -> None:
    pkt = build_icmp_echo(SRC, DST, ident=0xBEEF, seq=7, payload=b"ping!", reply=reply)
    assert parse_addresses(pkt) == (SRC, DST)
    assert pkt[9] == packet.IPPROTO_ICMP
    assert ipv4_checksum(pkt[:20]) == 0
    icmp = pkt[20:]
    assert icmp[0] == (0 if reply else 8)
    assert struct.unpack("!HH", icmp[4:8]) == (0xBEEF, 7)
    assert icmp[8:] == b"ping!"
    assert ipv4_checksum(icmp) == 0


@pytest.mark.parametrize("payload", [b"", b"x", b"even", b"odd!!"])
def test_udp4(payload: bytes) -> None:
    pkt = build_udp4(SRC, DST, 5353, 53, payload)
    assert parse_addresses(pkt) == (SRC, DST)
    assert packet_length(pkt) == len(pkt) == 28 + len(payload)
    assert pkt[9] == packet.IPPROTO_UDP
    assert ipv4_checksum(pkt[:20]) == 0
    udp = pkt[20:]
    sport, dport, length, checksum = struct.unpack("!HHHH", udp[:8])
    assert (sport, dport, length) == (5353, 53, 8 + len(payload))
    assert checksum != 0
    pseudo = SRC + DST + struct.pack("!BBH", 0, 17, length)
    assert ipv4_checksum(pseudo + udp) == 0
    assert udp[8:] == payload
