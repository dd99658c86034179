"""The edge's batching (tier 2) and the TUN offload fallback (tier 3).

- write_tun(): decrypted packets are coalesced into super-packets for an offloading
  device and written one by one otherwise; super-packets that arrived whole are written
  whole, or cut into packets for a device without offloads.
- open_tun(offload=True) on a kernel that refuses TUNSETOFFLOAD opens the device
  without offloads, says why, and the device still carries packets.
"""

from __future__ import annotations

import json

import pytest
from scapy.layers.inet import IP, TCP, UDP

from gtun.core.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    PLAIN,
    Gso,
    finish_tcp_checksum,
    segment,
    to_partial,
)
from gtun.io.driver import write_tun
from gtun.lab.netns import Lab
from gtun.testing.tun import FakeTun
from labkit import run_python

MSS = 1380


@pytest.fixture
def lab_prefix() -> str:
    return "gtv"


def tcp_super(size: int, sport: int = 40000) -> tuple[Gso, bytes]:
    payload = bytes((i * 13 + 1) & 0xFF for i in range(size))
    raw = bytes(
        IP(src="10.243.0.2", dst="10.243.0.1", id=5)
        / TCP(sport=sport, dport=5201, seq=7, ack=1, flags="A")
        / payload
    )
    return Gso(F_NEEDS_CSUM, GSO_TCPV4, 40, MSS, 20, 16), raw


class VnetRecorder:
    """An offloading device that records what is written."""

    vnet = True
    name = "rec0"

    def __init__(self) -> None:
        self.written: list[tuple[Gso, bytes]] = []

    def write(self, packet: bytes) -> bool:
        self.written.append((PLAIN, packet))
        return True

    def write_super(self, hdr: Gso, packet: bytes) -> int:
        self.written.append((hdr, packet))
        return 0


def test_decrypted_segments_are_coalesced_for_an_offloading_device() -> None:
    hdr, whole = tcp_super(20 * MSS + 3)
    segments = segment(hdr, whole)
    other = bytes(IP(src="10.243.0.2", dst="10.243.0.1") / TCP(sport=1, dport=2, flags="S"))
    arrived = (hdr, whole)  # a bulk frame: written whole
    dev = VnetRecorder()
    counts = {"tun_super_writes": 0}
    assert write_tun(dev, [*segments, arrived, other], counts) == 0  # type: ignore[arg-type]
    assert len(dev.written) == 3
    coalesced_hdr, coalesced = dev.written[0]
    assert coalesced_hdr.gso_type == GSO_TCPV4 and coalesced_hdr.gso_size == MSS
    assert segment(coalesced_hdr, coalesced) == segments  # nothing lost or changed
    assert dev.written[1] == arrived
    # A lone TCP packet goes as NEEDS_CSUM with the pseudo-header sum: the kernel
    # completes the checksum a gtun peer may have left partial.
    assert dev.written[2] == to_partial(other)
    assert dev.written[2][0].flags == F_NEEDS_CSUM and dev.written[2][0].csum_start == 20
    assert finish_tcp_checksum(dev.written[2][1]) == other
    assert counts["tun_super_writes"] == 2


def test_non_tcp_is_written_plain_and_partial_checksums_finished_without_offloads() -> None:
    udp = bytes(IP(src="10.243.0.2", dst="10.243.0.1") / UDP(sport=1, dport=2) / b"data")
    dev = VnetRecorder()
    write_tun(dev, [udp], {"tun_super_writes": 0})  # type: ignore[arg-type]
    assert dev.written == [(PLAIN, udp)]
    # Without offloads (finish=True) partial TCP checksums are completed before writing.
    hdr, whole = tcp_super(3 * MSS)
    partial = segment(hdr, whole, partial=True)
    assert partial != segment(hdr, whole)
    plain, kernel = FakeTun.create()
    try:
        write_tun(plain, [*partial, udp], {"tun_super_writes": 0}, finish=True)
        got = [kernel.recv(65535) for _ in range(4)]
    finally:
        plain.close()
        kernel.close()
    assert got == [*segment(hdr, whole), udp]


def test_super_packets_are_cut_for_a_device_without_offloads() -> None:
    hdr, whole = tcp_super(7 * MSS)
    dev, kernel = FakeTun.create()
    try:
        assert write_tun(dev, [(hdr, whole)], {"tun_super_writes": 0}) == 0
        got = [kernel.recv(65535) for _ in range(7)]
    finally:
        dev.close()
        kernel.close()
    assert got == segment(hdr, whole)
    for raw in got:
        pkt = IP(raw)
        rebuilt = IP(raw)
        del rebuilt[TCP].chksum
        assert IP(bytes(rebuilt))[TCP].chksum == pkt[TCP].chksum  # valid for any kernel


REFUSE_SCRIPT = """
import errno, fcntl, json, os, select, time
import gtun.io.tun as tun_mod
from ipaddress import ip_interface
from gtun.system.netlink import LinkConfig

real_ioctl = fcntl.ioctl
def refusing_ioctl(fd, request, arg=0, *rest):
    if request == tun_mod.TUNSETOFFLOAD:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    return real_ioctl(fd, request, arg, *rest)
tun_mod.fcntl.ioctl = refusing_ioctl

dev = tun_mod.open_tun("gtvoff0", offload=True)
link = LinkConfig(dev.name)
link.add_address(ip_interface("10.243.9.1/24"))
link.set_up()
# The device carries packets: a datagram sent to the far side comes out of it.
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"through the fallback", ("10.243.9.2", 9))
packet = None
deadline = time.monotonic() + 5
while packet is None and time.monotonic() < deadline:
    select.select([dev.fileno()], [], [], 0.2)
    got = dev.read_super()
    if got is not None and got[1][0] >> 4 == 4 and got[1][9] == 17:
        packet = got
hdr, raw = packet
print(json.dumps({"vnet": dev.vnet, "error": dev.offload_error, "hdr": list(hdr),
                  "payload": raw[28:].decode()}))
"""


@pytest.mark.netns
def test_refused_offloads_fall_back_to_a_plain_device(lab: Lab) -> None:
    ns = lab.add_ns("f")
    out = json.loads(run_python(ns, REFUSE_SCRIPT).stdout.splitlines()[-1])
    assert out["vnet"] is False
    assert "TUNSETOFFLOAD was refused" in out["error"]
    assert out["hdr"] == list(PLAIN)
    assert out["payload"] == "through the fallback"


GRANTED_SCRIPT = """
import json, select, socket, time
from ipaddress import ip_interface
from gtun.system.netlink import LinkConfig
from gtun.io.tun import open_tun

dev = open_tun("gtvon0", offload=True)
link = LinkConfig(dev.name)
link.add_address(ip_interface("10.243.8.1/24"))
link.set_up()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"x" * 100, ("10.243.8.2", 9))
found = None
deadline = time.monotonic() + 5
while found is None and time.monotonic() < deadline:
    select.select([dev.fileno()], [], [], 0.2)
    got = dev.read_super()
    if got is not None and got[1][0] >> 4 == 4 and got[1][9] == 17:
        found = got
hdr, raw = found
print(json.dumps({"vnet": dev.vnet, "hdr": list(hdr), "len": len(raw)}))
"""


@pytest.mark.netns
def test_granted_offloads_leave_the_udp_checksum_to_us(lab: Lab) -> None:
    """With TUN_F_CSUM the kernel hands over a UDP datagram with its checksum to finish
    (NEEDS_CSUM at the UDP checksum field): proof the offloads are really on."""
    ns = lab.add_ns("g")
    out = json.loads(run_python(ns, GRANTED_SCRIPT).stdout.splitlines()[-1])
    assert out["vnet"] is True
    flags, gso_type, _, _, csum_start, csum_offset = out["hdr"]
    assert flags & F_NEEDS_CSUM and gso_type == GSO_NONE
    assert (csum_start, csum_offset) == (20, 6)
    assert out["len"] == 128
