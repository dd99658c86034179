"""gtun.core.offload against packets scapy builds and checks independently (tier 1, pure)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import Packet, Raw
from scapy.utils import checksum as scapy_checksum

from gtun.core import offload
from gtun.core.offload import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_HDR_LEN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    PLAIN,
    Gso,
    OffloadError,
    coalesce,
    pull_gso,
    push_gso,
    segment,
    split,
)

SRC4, DST4 = "10.244.0.1", "10.244.0.2"
SRC6, DST6 = "fd00:244::1", "fd00:244::2"
TS_OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


# --- independent helpers (scapy only) ----------------------------------------------


def pseudo_partial(src: str, dst: str, proto: int, length: int, v6: bool) -> int:
    """The folded, uncomplemented pseudo-header sum the kernel puts in the field."""
    if v6:
        pseudo = bytes(IPv6(src=src, dst=dst))[8:40] + struct.pack("!IxxxB", length, proto)
    else:
        pseudo = bytes(IP(src=src, dst=dst))[12:20] + struct.pack("!xBH", proto, length)
    return (~scapy_checksum(pseudo)) & 0xFFFF


def tcp_packet(
    payload: bytes,
    *,
    v6: bool = False,
    seq: int = 1000,
    ack: int = 77,
    flags: str = "A",
    ident: int = 100,
    tos: int = 0,
    ttl: int = 64,
    opts: list[tuple[str, object]] | None = None,
    ip_opts: bytes | None = None,
    sport: int = 40000,
    dport: int = 5201,
    window: int = 512,
    chksum: int | None = None,
) -> Packet:
    """A scapy IP/TCP packet; scapy fills in lengths and checksums unless `chksum`."""
    tcp = TCP(
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=TS_OPTS if opts is None else opts,
    )
    if chksum is not None:
        tcp.chksum = chksum
    if v6:
        ip: Packet = IPv6(src=SRC6, dst=DST6, tc=tos, hlim=ttl)
    else:
        ip = IP(src=SRC4, dst=DST4, id=ident, flags="DF", tos=tos, ttl=ttl)
        if ip_opts is not None:
            ip.options = [IPOption(ip_opts)]
    return ip / tcp / Raw(payload)


def expected_segments(payload: bytes, mss: int, flags: str = "A", **kw: object) -> list[bytes]:
    """What a kernel's TSO makes of a super-packet, built by scapy segment by segment."""
    n = -(-len(payload) // mss)
    out = []
    seq0 = int(kw.pop("seq", 1000))  # type: ignore[call-overload]
    id0 = int(kw.pop("ident", 100))  # type: ignore[call-overload]
    for i in range(n):
        f = flags
        if i != n - 1:
            f = f.replace("F", "").replace("P", "")
        if i != 0:
            f = f.replace("C", "")
        pkt = tcp_packet(
            payload[i * mss : (i + 1) * mss],
            seq=(seq0 + i * mss) & 0xFFFFFFFF,
            ident=(id0 + i) & 0xFFFF,
            flags=f,
            **kw,  # type: ignore[arg-type]
        )
        out.append(bytes(pkt))
    return out


def super_packet(
    payload: bytes, mss: int, *, v6: bool = False, ecn: bool = False, **kw: object
) -> tuple[Gso, bytes]:
    """A TCP super-packet as a TUN read gives it: checksum field = pseudo-header sum."""
    pkt = tcp_packet(payload, v6=v6, chksum=0, **kw)  # type: ignore[arg-type]
    raw = bytes(pkt)
    parsed = (IPv6 if v6 else IP)(raw)
    l3 = 40 if v6 else parsed.ihl * 4
    tcp_len = len(raw) - l3
    partial = pseudo_partial(SRC6 if v6 else SRC4, DST6 if v6 else DST4, 6, tcp_len, v6)
    raw = raw[: l3 + 16] + struct.pack("!H", partial) + raw[l3 + 18 :]
    hl = l3 + parsed[TCP].dataofs * 4
    gso = (GSO_TCPV6 if v6 else GSO_TCPV4) | (GSO_ECN if ecn else 0)
    return Gso(F_NEEDS_CSUM, gso, hl, mss, l3, 16), raw


def assert_checksums_valid(raw: bytes) -> None:
    """scapy re-dissects the packet and recomputes every checksum it carries."""
    v6 = raw[0] >> 4 == 6
    pkt = IPv6(raw) if v6 else IP(raw)
    fresh = pkt.copy()
    if not v6:
        del fresh[IP].chksum
    for layer in (TCP, UDP):
        if fresh.haslayer(layer):
            del fresh[layer].chksum
    if fresh.haslayer(ICMPv6EchoRequest):
        del fresh[ICMPv6EchoRequest].cksum
    rebuilt = bytes((IPv6 if v6 else IP)(bytes(fresh)))
    assert rebuilt == raw, pkt.summary()


def payload_of(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# --- virtio-net header ---------------------------------------------------------------


def test_vnet_hdr_round_trip_little_endian() -> None:
    h = Gso(F_NEEDS_CSUM, GSO_TCPV4, 52, 1380, 20, 16)
    raw = push_gso(h)
    assert len(raw) == GSO_HDR_LEN
    assert raw == bytes([1, 1, 52, 0, 0x64, 0x05, 20, 0, 16, 0])
    assert pull_gso(raw + b"packet") == h
    assert pull_gso(memoryview(raw)) == h
    assert push_gso(PLAIN) == bytes(10)


def test_vnet_hdr_short_is_counted() -> None:
    with pytest.raises(OffloadError) as exc:
        pull_gso(b"\x00" * 9)
    assert exc.value.reason == "bad_vnet_hdr"
    with pytest.raises(ValueError):
        push_gso(Gso(0, 0, 70000, 0, 0, 0))


def test_checksum_helpers_match_scapy() -> None:
    for n in (0, 1, 2, 3, 20, 1379, 1380, 4097, 65535):
        data = os.urandom(n)
        assert offload.checksum(data) == scapy_checksum(data), n
    assert offload.checksum(bytes(8)) == scapy_checksum(bytes(8)) == 0xFFFF
    assert offload.checksum(b"\xff\xff") == scapy_checksum(b"\xff\xff") == 0
    big = os.urandom(200_000)  # beyond the fold table
    assert offload.checksum(big) == scapy_checksum(big)


# --- segment() -----------------------------------------------------------------------


def test_plain_packet_unchanged() -> None:
    raw = bytes(tcp_packet(b"hello"))
    assert segment(PLAIN, raw) == [raw]


@pytest.mark.parametrize("v6", [False, True])
def test_segment_64k_matches_scapy(v6: bool) -> None:
    mss = 1380 if not v6 else 1360
    payload = payload_of(65535 - (40 if v6 else 20) - 32)
    h, raw = super_packet(payload, mss, v6=v6, flags="PA")
    assert len(raw) == 65535
    segs = segment(h, raw)
    want = expected_segments(payload, mss, flags="PA", v6=v6)
    assert len(segs) == len(want) == -(-len(payload) // mss)
    assert segs == want
    for s in segs:
        assert_checksums_valid(s)
        assert len(s) <= 65535


@pytest.mark.parametrize("v6", [False, True])
def test_segment_odd_sizes_fin_psh_last(v6: bool) -> None:
    mss = 1001
    payload = payload_of(mss * 5 + 333, seed=9)
    h, raw = super_packet(payload, mss, v6=v6, flags="FPA", seq=0xFFFFF000, ident=0xFFFE)
    segs = segment(h, raw)
    want = expected_segments(payload, mss, flags="FPA", v6=v6, seq=0xFFFFF000, ident=0xFFFE)
    assert segs == want
    flags = [str((IPv6 if v6 else IP)(s)[TCP].flags) for s in segs]
    assert flags == ["A"] * 5 + ["FPA"]
    if not v6:
        assert [IP(s).id for s in segs] == [0xFFFE, 0xFFFF, 0, 1, 2, 3]  # wraps
    assert TCP(segs[-1][(40 if v6 else 20) :]).seq == (0xFFFFF000 + 5 * mss) & 0xFFFFFFFF


@pytest.mark.parametrize("v6", [False, True])
def test_segment_ecn_cwr_only_first(v6: bool) -> None:
    payload = payload_of(4000)
    h, raw = super_packet(payload, 1000, v6=v6, ecn=True, flags="CA", tos=0x02)
    segs = segment(h, raw)
    assert segs == expected_segments(payload, 1000, flags="CA", v6=v6, tos=0x02)
    assert [str((IPv6 if v6 else IP)(s)[TCP].flags) for s in segs] == ["AC", "A", "A", "A"]


def test_segment_ignores_partial_field_and_ip_options() -> None:
    payload = payload_of(3000)
    h, raw = super_packet(payload, 1448, ip_opts=b"\x94\x04\x00\x00", opts=[])
    assert h.csum_start == 24
    junk = raw[:40] + b"\xde\xad" + raw[42:]  # TCP checksum field at 24 + 16
    want = expected_segments(payload, 1448, ip_opts=b"\x94\x04\x00\x00", opts=[])
    assert segment(h, junk) == want
    for s in want:
        assert_checksums_valid(s)


def test_segment_single_segment_keeps_flags() -> None:
    payload = payload_of(500)
    h, raw = super_packet(payload, 1448, flags="FPA")
    assert segment(h, raw) == [bytes(tcp_packet(payload, flags="FPA"))]


def test_needs_csum_udp4() -> None:
    pkt = IP(src=SRC4, dst=DST4) / UDP(sport=53, dport=4444) / Raw(payload_of(777))
    want = bytes(pkt)
    raw = bytearray(want)
    struct.pack_into("!H", raw, 26, pseudo_partial(SRC4, DST4, 17, 8 + 777, False))
    h = Gso(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6)
    assert segment(h, bytes(raw)) == [want]
    assert_checksums_valid(want)


def test_needs_csum_udp_zero_becomes_ffff() -> None:
    # A payload chosen so the UDP checksum computes to 0: it must go out as 0xFFFF.
    base = IP(src=SRC4, dst=DST4) / UDP(sport=1, dport=2) / Raw(b"\x00\x00")
    c = UDP(bytes(base)[20:]).chksum  # scapy's checksum with 0000 payload
    fix = c  # the payload word that brings the sum to 0xFFFF
    pkt = IP(src=SRC4, dst=DST4) / UDP(sport=1, dport=2) / Raw(struct.pack("!H", fix))
    want = bytes(pkt)
    assert UDP(want[20:]).chksum == 0xFFFF
    raw = bytearray(want)
    struct.pack_into("!H", raw, 26, pseudo_partial(SRC4, DST4, 17, 10, False))
    assert segment(Gso(F_NEEDS_CSUM, 0, 0, 0, 20, 6), bytes(raw)) == [want]


def test_split_piece_of_a_segment_whose_tcp_checksum_is_zero() -> None:
    """Found by fuzz/offload_codec.py: a one-segment piece of split() had its checksum
    finished as 0xFFFF where segment() of the whole computes 0 (as the kernel's GSO
    does): both valid, but split() promises the same bytes.  0xFFFF is UDP's alone."""
    # Per segment, the payload word that brings the sum to 0xFFFF (a checksum of 0).
    fix = [
        TCP(bytes(tcp_packet(bytes(2), seq=1000 + 2 * i, flags=f))[20:]).chksum
        for i, f in enumerate(("A", "PA"))
    ]
    h, raw = super_packet(struct.pack("!HH", *fix), 2, flags="PA")
    whole = segment(h, raw)
    assert [TCP(s[20:]).chksum for s in whole] == [0, 0]
    pieces = split(h, raw, len(whole[0]))
    assert [s for ph, pp in pieces for s in segment(ph, pp)] == whole


def test_needs_csum_icmpv6() -> None:
    pkt = IPv6(src=SRC6, dst=DST6) / ICMPv6EchoRequest(id=7, seq=3, data=payload_of(101))
    want = bytes(pkt)
    raw = bytearray(want)
    struct.pack_into("!H", raw, 42, pseudo_partial(SRC6, DST6, 58, len(want) - 40, True))
    got = segment(Gso(F_NEEDS_CSUM, GSO_NONE, 0, 0, 40, 2), bytes(raw))
    assert got == [want]
    assert_checksums_valid(got[0])


def test_needs_csum_tcp_plain() -> None:
    want = bytes(tcp_packet(payload_of(99), flags="PA"))
    raw = bytearray(want)
    struct.pack_into("!H", raw, 36, pseudo_partial(SRC4, DST4, 6, len(want) - 20, False))
    assert segment(Gso(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16), bytes(raw)) == [want]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h, r: (h._replace(gso_size=0), r), "bad_gso"),
        (lambda h, r: (h._replace(gso_type=GSO_UDP), r), "bad_gso"),
        (lambda h, r: (h._replace(gso_type=GSO_TCPV6), r), "bad_gso"),
        (lambda h, r: (h._replace(csum_start=21), r), "bad_gso"),
        (lambda h, r: (h._replace(hdr_len=70000), r), "bad_gso"),
        (lambda h, r: (h._replace(gso_size=1), r), "bad_gso"),  # too many segments
        (lambda h, r: (h, r[:-1]), "bad_gso"),  # IPv4 length disagrees
        (lambda h, r: (h, r[:52]), "bad_gso"),  # no payload
        (lambda h, r: (h, r[:9] + b"\x11" + r[10:]), "bad_gso"),  # UDP, not TCP
        (lambda h, r: (h, r[:6] + b"\x20" + r[7:]), "bad_gso"),  # a fragment
        (lambda h, r: (h._replace(gso_type=0, csum_start=6000), r), "bad_vnet_hdr"),
        # Found by fuzz/tun_super.py: a checksum written over the IP header.
        (lambda h, r: (h._replace(gso_type=0, csum_start=0, csum_offset=0), r), "bad_vnet_hdr"),
        (lambda h, r: (h._replace(gso_type=0, csum_start=19, csum_offset=16), r), "bad_vnet_hdr"),
    ],
)
def test_segment_rejects(change: object, reason: str) -> None:
    h, raw = super_packet(payload_of(5000), 1000)
    h2, raw2 = change(h, raw)  # type: ignore[operator]
    with pytest.raises(OffloadError) as exc:
        segment(h2, raw2)
    assert exc.value.reason == reason


def test_segment_ipv6_extension_header_rejected() -> None:
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt

    pkt = IPv6(src=SRC6, dst=DST6) / IPv6ExtHdrDestOpt() / TCP() / Raw(payload_of(3000))
    h = Gso(F_NEEDS_CSUM, GSO_TCPV6, 68, 1000, 48, 16)
    with pytest.raises(OffloadError) as exc:
        segment(h, bytes(pkt))
    assert exc.value.reason == "bad_gso"


def test_segment_never_exceeds_65535() -> None:
    # An IPv6 super-packet of 65575 bytes with gso_size beyond it would be one segment
    # too big for any IP packet.
    payload = payload_of(65535 - 32)
    h, raw = super_packet(payload, 65535, v6=True, opts=TS_OPTS)
    assert len(raw) == 65575
    with pytest.raises(OffloadError):
        segment(h, raw)
    segs = segment(h._replace(gso_size=60000), raw)
    assert max(map(len, segs)) <= 65535
    assert b"".join(s[72:] for s in segs) == payload


# --- split() -------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("max_len", [1500, 1500 * 3 + 1, 9000, 16384, 65535])
def test_split_pieces_segment_like_the_whole(v6: bool, max_len: int) -> None:
    payload = payload_of(1400 * 30 + 17)
    h, raw = super_packet(payload, 1400, v6=v6, ecn=True, flags="CFPA", ident=0xFFF0)
    whole = segment(h, raw)
    pieces = split(h, raw, max_len)
    if max_len == 65535:
        assert pieces == [(h, raw)]
    else:
        assert len(pieces) > 1
    again = []
    for ph, praw in pieces:
        assert len(praw) <= max_len
        assert pull_gso(push_gso(ph)) == ph
        assert ph.flags == F_NEEDS_CSUM
        l3 = 40 if v6 else 20
        # The checksum field holds the pseudo-header sum, as a kernel expects.
        assert struct.unpack_from("!H", praw, l3 + 16)[0] == pseudo_partial(
            SRC6 if v6 else SRC4, DST6 if v6 else DST4, 6, len(praw) - l3, v6
        )
        if not v6:
            assert scapy_checksum(praw[:20]) == 0
        again += segment(ph, praw)
    assert again == whole


def test_split_one_segment_pieces_are_plain() -> None:
    payload = payload_of(1400 * 3)
    h, raw = super_packet(payload, 1400)
    pieces = split(h, raw, 1500)
    assert [ph.gso_type for ph, _ in pieces] == [GSO_NONE] * 3
    assert [s for ph, p in pieces for s in segment(ph, p)] == segment(h, raw)


def test_split_limits() -> None:
    raw = bytes(tcp_packet(payload_of(100)))
    assert split(PLAIN, raw, 1000) == [(PLAIN, raw)]
    with pytest.raises(OffloadError) as exc:
        split(PLAIN, raw, 100)
    assert exc.value.reason == "too_big"
    h, big = super_packet(payload_of(9000), 1400)
    with pytest.raises(OffloadError) as exc:
        split(h, big, 1400)
    assert exc.value.reason == "too_big"


# --- coalesce() ----------------------------------------------------------------------


def gro_expected(segs: list[bytes], v6: bool = False, psh: bool = False) -> bytes:
    """The super-packet scapy builds for a run: first headers, total lengths, PSH if
    the last had it, the TCP field = pseudo-header sum, valid IPv4 header checksum."""
    first = (IPv6 if v6 else IP)(segs[0])
    l3 = 40 if v6 else 20
    hl = l3 + first[TCP].dataofs * 4
    payload = b"".join(s[hl:] for s in segs)
    tcp_len = hl - l3 + len(payload)
    t = first[TCP]
    flags = str(t.flags) if not psh else "PA"
    return bytes(
        tcp_packet(
            payload,
            v6=v6,
            seq=t.seq,
            ack=t.ack,
            flags=flags,
            ident=0 if v6 else first.id,
            chksum=pseudo_partial(SRC6 if v6 else SRC4, DST6 if v6 else DST4, 6, tcp_len, v6),
        )
    )


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_45_segments(v6: bool) -> None:
    payload = payload_of(1380 * 45, seed=5)
    segs = expected_segments(payload, 1380, flags="PA", v6=v6)
    got = coalesce(segs)
    assert len(got) == 1
    h, raw = got[0]
    hl = (40 if v6 else 20) + 32
    assert h == Gso(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hl, 1380, hl - 32, 16)
    assert raw == gro_expected(segs, v6=v6, psh=True)
    assert segment(h, raw) == segs  # round trip


def test_coalesce_trims_padding_and_short_last() -> None:
    payload = payload_of(1380 * 4 + 100)
    segs = expected_segments(payload, 1380)
    padded = [s + bytes(-len(s) % 16) for s in segs]
    assert any(len(p) != len(s) for p, s in zip(padded, segs, strict=True))
    (h, raw), *rest = coalesce(padded)
    assert rest == []
    assert segment(h, raw) == segs
    # A run of one stays as it was, without the padding.
    one = segs[0] + bytes(12)
    assert coalesce([one]) == [(PLAIN, segs[0])]


def test_coalesce_interleaved_flows_keep_each_order() -> None:
    a = expected_segments(payload_of(1000 * 4, 1), 1000, sport=1111)
    b = expected_segments(payload_of(1000 * 4, 2), 1000, sport=2222)
    udp = bytes(IP(src=SRC4, dst=DST4) / UDP() / Raw(b"dns"))
    mixed = [a[0], b[0], a[1], udp, b[1], a[2], b[2], a[3], b[3]]
    got = coalesce(mixed)
    assert [h.gso_type for h, _ in got] == [GSO_TCPV4, GSO_TCPV4, GSO_NONE]
    assert segment(*got[0]) == a
    assert segment(*got[1]) == b
    assert got[2] == (PLAIN, udp)


def test_coalesce_breaks_runs() -> None:
    segs = expected_segments(payload_of(1000 * 6), 1000)
    # A gap in sequence numbers.
    got = coalesce(segs[:2] + segs[3:])
    assert [segment(h, r) for h, r in got] == [segs[:2], segs[3:]]
    # A different TTL, TOS or window breaks the run as well.
    for kw in ({"ttl": 63}, {"tos": 3}, {"window": 999}):
        odd = bytes(tcp_packet(payload_of(6000)[2000:3000], seq=3000, ident=102, **kw))
        got = coalesce(segs[:2] + [odd] + segs[3:])
        assert [r for h, r in got if h.gso_type == GSO_NONE] == [odd], kw
        assert len(got) == 3
    # PSH closes a run; the next segment starts another.
    psh = bytes(tcp_packet(payload_of(6000)[1000:2000], seq=2000, ident=101, flags="PA"))
    got = coalesce([segs[0], psh] + segs[2:])
    assert [segment(h, r) for h, r in got] == [[segs[0], psh], segs[2:]]
    assert IP(got[0][1])[TCP].flags == "PA"


@pytest.mark.parametrize(
    ("v6", "offset"),
    # A byte of: DF, the acknowledgment number, the window, the urgent pointer, a TCP
    # option (IPv4); the flow label, the hop limit, the acknowledgment number, the
    # window, the urgent pointer, a TCP option (IPv6).
    [(False, 6), (False, 30), (False, 35), (False, 39), (False, 50)]
    + [(True, 3), (True, 7), (True, 50), (True, 55), (True, 59), (True, 70)],
)
def test_coalesce_a_changed_header_field_breaks_a_run(v6: bool, offset: int) -> None:
    # Segments after the first of a run are checked against its header byte by byte
    # (offload._Run.same): any field of the signature that differs ends the run.
    segs = expected_segments(payload_of(1000 * 4), 1000, v6=v6)
    odd = bytearray(segs[2])
    odd[offset] ^= 0x01
    got = coalesce(segs[:2] + [bytes(odd)] + segs[3:])
    assert len(segment(*got[0])) == 2
    assert got[1] == (PLAIN, bytes(odd))
    assert coalesce(segs)[0] == coalesce(segs[:2] + segs[2:])[0]  # the control
    assert len(coalesce(segs)) == 1


@pytest.mark.parametrize("flags", ["FA", "SA", "RA", "UA", "EA", "CA", "A"])
def test_coalesce_flags_that_pass_through(flags: str) -> None:
    segs = expected_segments(payload_of(1000 * 4), 1000)
    odd = bytes(tcp_packet(payload_of(4000)[2000:3000], seq=3000, ident=102, flags=flags))
    if flags == "A":  # the control: the same segment joins
        assert len(coalesce(segs[:2] + [odd])) == 1
        return
    got = coalesce(segs[:2] + [odd] + segs[3:])
    assert got[1] == (PLAIN, odd)
    assert [h.gso_type for h, _ in got] == [GSO_TCPV4, GSO_NONE, GSO_NONE]


def test_coalesce_options_mismatch_and_pure_ack() -> None:
    segs = expected_segments(payload_of(4000), 1000)
    other_ts = [("NOP", None), ("NOP", None), ("Timestamp", (123457, 654321))]
    odd = bytes(tcp_packet(payload_of(4000)[2000:3000], seq=3000, ident=102, opts=other_ts))
    got = coalesce(segs[:2] + [odd, segs[3]])
    assert [len(segment(h, r)) for h, r in got] == [2, 1, 1]
    ack = bytes(tcp_packet(b"", seq=3000))
    got = coalesce(segs[:2] + [ack] + segs[2:])
    assert [len(segment(h, r)) for h, r in got] == [2, 1, 2]


def test_coalesce_respects_65535() -> None:
    payload = payload_of(1448 * 50)
    segs = expected_segments(payload, 1448, opts=[])
    got = coalesce(segs)
    assert len(got) == 2
    assert all(len(r) <= 65535 for _, r in got)
    assert len(got[0][1]) + 1448 > 65535  # the first run is full
    assert [s for h, r in got for s in segment(h, r)] == segs


def test_coalesce_passes_odd_packets() -> None:
    frag = bytes(IP(src=SRC4, dst=DST4, flags="MF") / TCP(flags="A") / Raw(b"x" * 100))
    opts = bytes(tcp_packet(b"y" * 100, ip_opts=b"\x94\x04\x00\x00"))
    udp6 = bytes(IPv6(src=SRC6, dst=DST6) / UDP() / Raw(b"z"))
    junk = [b"", b"\x45", b"\x60" * 50, b"\xff" * 80]
    batch = [frag, opts, udp6, *junk]
    assert coalesce(batch) == [(PLAIN, p) for p in batch]


# --- hostile input -------------------------------------------------------------------

_hdrs = st.builds(
    Gso,
    st.integers(0, 255),
    st.sampled_from([0, 1, 3, 4, 5, 0x80, 0x81, 0x84, 0x7F, 255]),
    st.integers(0, 0xFFFF),
    st.one_of(st.integers(0, 0xFFFF), st.integers(1, 2000)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)

_VALID = [super_packet(payload_of(5000), 1000), super_packet(payload_of(7001), 1448, v6=True)]


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[Gso, bytes]:
    h, raw = draw(st.sampled_from(_VALID))
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        data = data[:cut]
    if draw(st.booleans()):
        h = draw(_hdrs)
    return h, bytes(data)


_inputs = st.one_of(st.tuples(_hdrs, st.binary(max_size=300)), _mutated())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs, st.integers(0, 70000))
def test_fuzz_segment_and_split(inp: tuple[Gso, bytes], max_len: int) -> None:
    h, raw = inp
    try:
        segs = segment(h, raw)
    except OffloadError as exc:
        assert exc.reason in ("bad_vnet_hdr", "bad_gso")
    else:
        assert all(len(s) <= 65535 for s in segs)
        assert len(segs) <= offload.MAX_SEGMENTS
    try:
        pieces = split(h, raw, max_len)
    except OffloadError as exc:
        assert exc.reason in ("bad_gso", "too_big")
    else:
        assert all(len(p) <= max_len for _, p in pieces)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_fuzz_pull_vnet_hdr(data: bytes) -> None:
    try:
        h = pull_gso(data)
    except OffloadError as exc:
        assert exc.reason == "bad_vnet_hdr"
        assert len(data) < GSO_HDR_LEN
    else:
        assert push_gso(h) == data[:GSO_HDR_LEN]


_SEGS = expected_segments(payload_of(5000), 1000) + expected_segments(
    payload_of(3000), 1000, v6=True
)


@st.composite
def _batch(draw: st.DrawFn) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            out.append(draw(st.binary(max_size=120)))
            continue
        data = bytearray(draw(st.sampled_from(_SEGS)))
        for _ in range(draw(st.integers(0, 3))):
            data[draw(st.integers(0, 59))] = draw(st.integers(0, 255))
        out.append(bytes(data[: draw(st.integers(0, len(data)))]))
    return out


@settings(max_examples=300, deadline=None)
@given(_batch())
def test_fuzz_coalesce(batch: list[bytes]) -> None:
    got = coalesce(batch)
    assert all(len(p) <= 65535 for _, p in got)
    # Each input packet comes out once: alone, or as one segment of a super-packet.
    count = 0
    for h, p in got:
        count += len(segment(h, p)) if h.gso_type else 1
    assert count == len(batch)


_FLOWS = [
    expected_segments(payload_of(1000 * 7 + 5, 1), 1000, sport=1111, flags="PA"),
    expected_segments(payload_of(999 * 5, 2), 999, sport=2222, v6=True),
    [bytes(IP(src=SRC4, dst=DST4) / UDP(dport=53) / Raw(b"q" * n)) for n in range(1, 5)],
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2]), max_size=20), st.booleans())
def test_fuzz_coalesce_interleaved_round_trip(order: list[int], pad: bool) -> None:
    """Any interleaving of flows, padded or not: segment() of the output gives back each
    flow's packets, in order, byte for byte."""
    cursor = [0, 0, 0]
    batch, origin = [], {}
    for flow in order:
        if cursor[flow] < len(_FLOWS[flow]):
            pkt = _FLOWS[flow][cursor[flow]]
            cursor[flow] += 1
            origin[pkt] = flow
            batch.append(pkt + bytes(-len(pkt) % 16) if pad else pkt)
    out = [s for h, p in coalesce(batch) for s in (segment(h, p) if h.gso_type else [p])]
    for flow in range(3):
        assert [p for p in out if origin[p] == flow] == _FLOWS[flow][: cursor[flow]]
