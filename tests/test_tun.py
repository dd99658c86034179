"""The TUN/TAP edge: FakeTun in memory, and real devices inside a namespace."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gtun.errors import RuntimeFailure
from gtun.io.tun import open_tun
from gtun.lab.netns import Lab
from gtun.testing.tun import FakeTun
from labkit import run_python

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture
def lab_prefix() -> str:
    return "gta"


# -- a little IPv4/ICMP, for the echo responder ---------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo_reply(packet: bytes) -> bytes | None:
    """The echo reply to an IPv4 ICMP echo request, or None for any other packet."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack("!H", packet[2:4])[0]
    if packet[9] != 1 or len(packet) < total or total < ihl + 8 or packet[ihl] != 8:
        return None
    header = bytearray(packet[:ihl])
    header[12:16], header[16:20] = packet[16:20], packet[12:16]
    header[8] = 64  # TTL
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", checksum(bytes(header)))
    icmp = bytearray(packet[ihl:total])
    icmp[0] = 0  # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    return bytes(header + icmp)


def icmp_echo_request(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload)
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(icmp),
            1,
            0,
            64,
            1,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
    )
    header[10:12] = struct.pack("!H", checksum(bytes(header)))
    return bytes(header + icmp)


def test_icmp_echo_reply_code() -> None:
    request = icmp_echo_request("10.201.5.1", "10.201.5.2", 7, 1, b"hello")
    reply = icmp_echo_reply(request)
    assert reply is not None
    assert socket.inet_ntoa(reply[12:16]) == "10.201.5.2"
    assert socket.inet_ntoa(reply[16:20]) == "10.201.5.1"
    assert reply[20] == 0 and reply[-5:] == b"hello"
    assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0
    assert icmp_echo_reply(reply) is None  # a reply is not answered
    assert icmp_echo_reply(b"\x60" + bytes(39)) is None  # IPv6
    assert icmp_echo_reply(b"\x45\x00") is None  # truncated


# -- in memory ------------------------------------------------------------------------


def test_invalid_name_is_a_runtime_failure() -> None:
    # Refused before the kernel is asked, so this creates nothing anywhere.
    for name in ("a/b", "x" * 16, "has space", ".."):
        with pytest.raises(RuntimeFailure, match="invalid device name"):
            open_tun(name)


def test_missing_tun_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gtun.io.tun.TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(RuntimeFailure, match=r"is missing: load the tun module \(modprobe tun\)"):
        open_tun("gtun0")


def test_fake_tun_round_trip() -> None:
    tun, kernel = FakeTun.create("fake0")
    try:
        assert tun.name == "fake0"
        assert tun.read() is None
        kernel.send(b"first")
        kernel.send(b"second packet")
        assert tun.read() == b"first"  # boundaries are kept
        assert tun.read() == b"second packet"
        assert tun.read() is None
        assert tun.write(b"out" * 500)
        assert kernel.recv(65535) == b"out" * 500
        big = bytes(65535)
        kernel.send(big)
        assert tun.read() == big
        kernel.close()
        assert tun.write(b"lost") is False  # a drop, not an exception
        with pytest.raises(RuntimeFailure, match="fake0"):
            tun.read()
    finally:
        tun.close()
        kernel.close()


def test_fake_tun_with_event_loop() -> None:
    tun, kernel = FakeTun.create()

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        done = asyncio.Event()

        def on_readable() -> None:
            while (packet := tun.read()) is not None:
                got.append(packet)
                tun.write(packet[::-1])
            if len(got) == 3:
                done.set()

        loop.add_reader(tun.fileno(), on_readable)
        try:
            for packet in (b"abc", b"de", b"f"):
                kernel.send(packet)
            await asyncio.wait_for(done.wait(), 5)
        finally:
            loop.remove_reader(tun.fileno())
        return got

    try:
        assert asyncio.run(main()) == [b"abc", b"de", b"f"]
        assert [kernel.recv(100) for _ in range(3)] == [b"cba", b"ed", b"f"]
    finally:
        tun.close()
        kernel.close()


# -- real devices in a namespace ------------------------------------------------------

ECHO_SCRIPT = """
import json, select, sys, time
from ipaddress import ip_interface
sys.path.insert(0, {tests!r})
from test_tun import icmp_echo_reply
from gtun.system.netlink import LinkConfig
from gtun.io.tun import open_tun

name, addr, ready, tap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "tap"
tun = open_tun(name, tap=tap)
link = LinkConfig(tun.name)
link.set_mtu(1400)
link.add_address(ip_interface(addr))
link.set_up()
with open(ready, "w") as f:
    f.write(tun.name)
replies, frames = 0, []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    select.select([tun.fileno()], [], [], 0.5)
    while (packet := tun.read()) is not None:
        if tap:
            frames.append(packet.hex())
            # An ARP request (ethertype 0x0806, opcode 1) ends the TAP run.
            if packet[12:14] == bytes([8, 6]) and packet[20:22] == bytes([0, 1]):
                print(json.dumps(frames), flush=True)
                sys.exit(0)
        elif (reply := icmp_echo_reply(packet)) is not None:
            assert tun.write(reply)
            replies += 1
            print("replied", replies, flush=True)
sys.exit(3)
"""


def _start_device_script(
    lab: Lab, tmp_path: Path, name: str, addr: str, mode: str
) -> tuple[subprocess.Popen[bytes], Path, str]:
    ns = lab.add_ns("t")
    script = tmp_path / "device.py"
    script.write_text(ECHO_SCRIPT.format(tests=str(TESTS_DIR)))
    ready = tmp_path / "ready"
    log = tmp_path / "device.log"
    proc = ns.spawn([sys.executable, str(script), name, addr, str(ready), mode], log_path=log)
    deadline = time.monotonic() + 15
    while not ready.exists() or not ready.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"device script did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, log, ready.read_text()


@pytest.mark.netns
def test_tun_answers_ping(lab: Lab, tmp_path: Path) -> None:
    proc, log, name = _start_device_script(lab, tmp_path, "gtat%d", "10.201.5.1/24", "tun")
    ns = lab.namespaces[0]
    assert name == "gtat0"  # the kernel filled in the %d
    link = ns.run(["ip", "-j", "link", "show", name]).stdout
    info = json.loads(link)[0]
    assert info["mtu"] == 1400 and "UP" in info["flags"]
    result = ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.201.5.2"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
    assert " 3 received" in result.stdout
    assert "replied 3" in log.read_text()
    assert proc.poll() is None


@pytest.mark.netns
def test_tap_reads_an_ethernet_frame(lab: Lab, tmp_path: Path) -> None:
    proc, log, name = _start_device_script(lab, tmp_path, "gtatap0", "10.201.6.1/24", "tap")
    ns = lab.namespaces[0]
    assert name == "gtatap0"
    assert "link/ether" in ns.run(["ip", "link", "show", name]).stdout
    # Nobody answers, so ping fails; the kernel's ARP request is what we want.
    ns.run(["ping", "-c", "1", "-W", "1", "10.201.6.2"], check=False)
    assert proc.wait(timeout=15) == 0, log.read_text()
    frames = [bytes.fromhex(f) for f in json.loads(log.read_text().splitlines()[-1])]
    arp = frames[-1]
    assert arp[0:6] == b"\xff" * 6  # broadcast
    assert socket.inet_ntoa(arp[28:32]) == "10.201.6.1"  # sender protocol address
    assert socket.inet_ntoa(arp[38:42]) == "10.201.6.2"  # target protocol address


OPEN_SCRIPT = """
import sys
from gtun.errors import RuntimeFailure
from gtun.io.tun import open_tun
results, held = [], []
for name, tap in (("gtax%d%d", False), ("gtabusy", False), ("gtabusy", False), ("gtabusy", True)):
    try:
        held.append(open_tun(name, tap=tap))  # held open: opening it again must fail
        results.append("opened " + held[-1].name)
    except RuntimeFailure as exc:
        results.append("failed " + str(exc))
print("\\n".join(results))
"""


@pytest.mark.netns
def test_open_errors_from_the_kernel(lab: Lab) -> None:
    ns = lab.add_ns("e")
    lines = run_python(ns, OPEN_SCRIPT).stdout.splitlines()
    assert lines[0].startswith("failed cannot create TUN device 'gtax%d%d': invalid name")
    assert lines[1] == "opened gtabusy"
    assert lines[2] == "failed TUN device gtabusy is busy: another program has it open"
    assert lines[3].startswith("failed cannot create TAP device 'gtabusy'")  # it is a TUN
