"""gtun.core.offload against the Linux kernel's own TSO/GRO, run inside a fresh namespace by
tests/test_offload_netns.py (as root):  python3 tests/offload_kernel.py

Two TUN devices: `gtoofl` with IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6), address
10.244.7.1/24 and fd00:244:7::1/64, and `gtoplain` without offloads, 10.244.8.1/24 and
fd00:244:8::1/64; forwarding on (IPv4 and IPv6).

1. coalesce(): segments from 10.244.7.2 to 10.244.8.2 are coalesced and written to
   gtoofl as one super-packet.  The kernel forwards it out of gtoplain, where it must cut
   it in software and finish every TCP checksum from the pseudo-header sum we left in
   the field: what gtoplain gives back must be the original segments (TTL - 1).
   split() pieces go the same way, and IPv6 super-packets too.
2. segment(): a local TCP socket sends 256 KB to 10.244.7.2, a peer this script plays
   on gtoofl; the kernel hands over TSO super-packets, which segment() must turn into
   segments scapy finds valid, carrying the bytes sent.  Then the peer answers with one
   coalesced super-packet, which the local socket must receive whole.

Prints one line of figures; raises (exit 1) on any mismatch.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from gtun.core import offload
from gtun.core.offload import PLAIN, Gso

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
PEER, LOCAL, FAR = "10.244.7.2", "10.244.7.1", "10.244.8.2"
PEER6, FAR6 = "fd00:244:7::2", "fd00:244:8::2"


def open_tun(name: str, vnet: bool) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    if vnet:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10)


def read_tcp(fd: int, vnet: bool, deadline: float, v6: bool = False) -> tuple[Gso, bytes]:
    """The next IPv4 (or IPv6) TCP packet the device gives (others are skipped)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no TCP packet from the TUN in time")
        if not select.select([fd], [], [], left)[0]:
            continue
        data = os.read(fd, 70000)
        h = offload.pull_gso(data) if vnet else PLAIN
        pkt = data[offload.GSO_HDR_LEN :] if vnet else data
        if not v6 and len(pkt) >= 20 and pkt[0] >> 4 == 4 and pkt[9] == 6:
            return h, pkt
        if v6 and len(pkt) >= 40 and pkt[0] >> 4 == 6 and pkt[6] == 6:
            return h, pkt


def assert_valid(raw: bytes) -> IP:
    """scapy recomputes the checksums and finds the same bytes."""
    cls = IPv6 if raw[0] >> 4 == 6 else IP
    pkt = cls(raw)
    fresh = pkt.copy()
    if cls is IP:
        del fresh.chksum
    del fresh[TCP].chksum
    assert bytes(cls(bytes(fresh))) == raw, f"bad checksum in {pkt.summary()}"
    return pkt


def segments(n: int, mss: int, seq: int, ident: int, v6: bool = False) -> list[bytes]:
    out = []
    for i in range(n):
        payload = bytes((i + j) & 0xFF for j in range(mss))
        l3 = IPv6(src=PEER6, dst=FAR6) if v6 else IP(src=PEER, dst=FAR, id=ident + i, flags="DF")
        pkt = l3 / TCP(sport=40000, dport=5555, seq=seq + i * mss, ack=1, flags="A", window=1000)
        out.append(bytes(pkt / Raw(payload)))
    return out


def forwarded(raw: bytes) -> bytes:
    """`raw` as the kernel forwards it: TTL - 1, IPv4 checksum recomputed."""
    if raw[0] >> 4 == 6:
        return raw[:7] + bytes([raw[7] - 1]) + raw[8:]
    pkt = IP(raw)
    pkt.ttl -= 1
    del pkt.chksum
    return bytes(pkt)


def check_kernel_segments(
    off: int, plain: int, pieces: list[tuple[Gso, bytes]], want: list[bytes]
) -> None:
    for h, raw in pieces:
        os.write(off, offload.push_gso(h) + raw)
    deadline = time.monotonic() + 10
    v6 = want[0][0] >> 4 == 6
    got = [read_tcp(plain, False, deadline, v6)[1] for _ in want]
    for g in got:
        assert_valid(g)
    assert got == [forwarded(w) for w in want], "the kernel cut something else"


def gro_forward(off: int, plain: int) -> int:
    want = segments(45, 1380, 1000, 7)
    batch = [w + bytes(-len(w) % 16) for w in want]  # WireGuard's padding
    co = offload.coalesce(batch)
    assert len(co) == 1 and co[0][0].gso_type == offload.GSO_TCPV4, [h for h, _ in co]
    check_kernel_segments(off, plain, co, want)
    want = segments(40, 1380, 5_000_000, 900)
    ((h, whole),) = offload.coalesce(want)
    pieces = offload.split(h, whole, 9000)
    assert len(pieces) == 7
    check_kernel_segments(off, plain, pieces, want)
    want = segments(30, 1300, 12345, 0, v6=True)
    co = offload.coalesce(want)
    assert len(co) == 1 and co[0][0].gso_type == offload.GSO_TCPV6, [h for h, _ in co]
    check_kernel_segments(off, plain, co, want)
    check_kernel_segments(off, plain, offload.split(*co[0], 4000), want)
    return len(co[0][1])


def tso_read(off: int) -> tuple[int, int]:
    """The kernel sends; we are the peer.  Returns (super-packets read, segments)."""
    listen_port = 5201
    data = os.urandom(256 * 1024)
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((PEER, listen_port))
    deadline = time.monotonic() + 20
    h, raw = read_tcp(off, True, deadline)
    syn = IP(offload.segment(h, raw)[0])
    assert syn[TCP].flags == "S", syn.summary()
    isn = 77_000
    synack = IP(src=PEER, dst=LOCAL) / TCP(
        sport=listen_port, dport=syn[TCP].sport, seq=isn, ack=syn[TCP].seq + 1,
        flags="SA", window=65535, options=[("MSS", 1400), ("WScale", 8)],
    )  # fmt: skip
    os.write(off, offload.push_gso(PLAIN) + bytes(synack))
    assert select.select([], [s], [], 5)[1], "connect did not finish"
    base = syn[TCP].seq + 1
    received = bytearray()
    supers = segs = 0
    sent = 0
    while len(received) < len(data):
        if sent < len(data):
            try:
                sent += s.send(data[sent : sent + 65536])
            except BlockingIOError:
                pass
        h, raw = read_tcp(off, True, deadline)
        if h.gso_type:
            supers += 1
        for seg in offload.segment(h, raw):
            pkt = assert_valid(seg)
            payload = bytes(pkt[TCP].payload)
            segs += 1
            if payload and pkt[TCP].seq - base == len(received):
                received += payload
        ack = IP(src=PEER, dst=LOCAL) / TCP(
            sport=listen_port, dport=syn[TCP].sport, seq=isn + 1,
            ack=(base + len(received)) & 0xFFFFFFFF, flags="A", window=65535,
        )  # fmt: skip
        os.write(off, offload.push_gso(PLAIN) + bytes(ack))
    assert bytes(received) == data, "the bytes differ"
    # And back: segments to the local socket, coalesced, delivered as one super-packet.
    mss, count = 1380, 30
    back = os.urandom(mss * count)
    ack = (base + len(received)) & 0xFFFFFFFF
    batch = [
        bytes(
            IP(src=PEER, dst=LOCAL, id=i, flags="DF")
            / TCP(sport=listen_port, dport=syn[TCP].sport, seq=isn + 1 + i * mss, ack=ack,
                  flags="PA" if i == count - 1 else "A", window=65535)
            / Raw(back[i * mss : (i + 1) * mss])
        )
        for i in range(count)
    ]  # fmt: skip
    ((h, raw),) = offload.coalesce(batch)
    assert h.gso_type == offload.GSO_TCPV4
    os.write(off, offload.push_gso(h) + raw)
    got = bytearray()
    while (
        len(got) < len(back) and select.select([s], [], [], max(0, deadline - time.monotonic()))[0]
    ):
        got += s.recv(1 << 20)
    assert bytes(got) == back, f"the local socket got {len(got)} of {len(back)} bytes"
    s.close()
    return supers, segs


def main() -> None:
    off = open_tun("gtoofl", True)
    plain = open_tun("gtoplain", False)
    ip("addr", "add", f"{LOCAL}/24", "dev", "gtoofl")
    ip("addr", "add", "10.244.8.1/24", "dev", "gtoplain")
    ip("addr", "add", "fd00:244:7::1/64", "dev", "gtoofl")
    ip("addr", "add", "fd00:244:8::1/64", "dev", "gtoplain")
    ip("link", "set", "gtoofl", "up")
    ip("link", "set", "gtoplain", "up")
    for knob in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        with open(f"/proc/sys/net/{knob}", "w") as f:  # this namespace only
            f.write("1")
    size = gro_forward(off, plain)
    supers, segs = tso_read(off)
    assert supers > 0, "the kernel sent no super-packet"
    print(f"OK coalesced={size} supers={supers} segments={segs}")


if __name__ == "__main__":
    main()
