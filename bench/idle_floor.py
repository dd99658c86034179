#!/usr/bin/env python3
"""The floor under gtun's idle RTT on this machine: ping through the smallest Python
TUN <-> UDP forwarder there is, in two network namespaces, as bench.py's client->relay
path does (a ping from one side's TUN to the other side's tunnel address, which that
side's kernel answers: three wake-ups of the forwarders per round trip).

    python3 bench/idle_floor.py [--pings 40] [--intervals 0.1,0.002] [--modes ...]

Modes (`--modes`, comma-separated):
  epoll           a bare select.epoll loop, one read per wake-up (no asyncio)
  asyncio         loop.add_reader() callbacks on the default event loop, as gtun's edge
  asyncio-crypto  the same, with a ChaCha20-Poly1305 seal per send and open per receive
                  (cryptography, as gtun's WireGuard core)

Each forwarder reads the one packet that woke it and sends it on: no batches, no
EAGAIN reads, no core.  Prints the median RTT of `--pings` pings at each interval:
after 0.1 s asleep a process runs its first microseconds several times slower than
when it ran 2 ms ago (its caches are cold), and that cost falls on every wake-up of a
round trip.  Run it as root, under the benchmark lock like bench.py (its namespaces are
"gtif*"), and compare with bench.py's RTT idle of OpenVPN and gtun in the same sitting.
A script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun.lab.netns import Lab  # noqa: E402

PREFIX = "gtif"  # every namespace of this script starts with it
UNDERLAY = ("10.241.1.1", "10.241.1.2")
TUNNEL = ("10.241.9.1", "10.241.9.2")
PORT = 7000
DEVICE = "gtfloor0"
MODES = ("epoll", "asyncio", "asyncio-crypto")
KEY = bytes(range(32))  # a fixed key: both forwarders seal and open with it


def forward(mode: str, tunnel: str, peer: str) -> None:
    """One side: a TUN with address `tunnel`, a UDP socket sending to `peer`."""
    from gtun.io.tun import open_tun

    tun = open_tun(DEVICE)
    subprocess.run(["ip", "addr", "add", f"{tunnel}/24", "dev", DEVICE], check=True)
    subprocess.run(["ip", "link", "set", DEVICE, "up"], check=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", PORT))
    sock.setblocking(False)
    fd, dst = tun.fileno(), (peer, PORT)
    seal = open_ = None
    if mode == "asyncio-crypto":
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        aead = ChaCha20Poly1305(KEY)
        nonce = bytes(12)  # a fixed nonce is fine for a latency probe, never for data
        seal, open_ = aead.encrypt, aead.decrypt

    def from_tun() -> None:
        try:
            packet = os.read(fd, 65536)
        except BlockingIOError:
            return
        sock.sendto(packet if seal is None else seal(nonce, packet, None), dst)

    def from_udp() -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        os.write(fd, data if open_ is None else open_(nonce, data, None))

    if mode == "epoll":
        poller = select.epoll()
        poller.register(fd, select.EPOLLIN)
        poller.register(sock.fileno(), select.EPOLLIN)
        while True:
            for ready, _ in poller.poll():
                (from_tun if ready == fd else from_udp)()
    loop = asyncio.new_event_loop()
    loop.add_reader(fd, from_tun)
    loop.add_reader(sock.fileno(), from_udp)
    loop.run_forever()


def measure(mode: str, pings: int, intervals: list[float], workdir: Path) -> dict[float, float]:
    with Lab(PREFIX) as lab:
        a, b = lab.add_ns("a"), lab.add_ns("b")
        lab.veth(a, "u0", f"{UNDERLAY[0]}/24", b, "u0", f"{UNDERLAY[1]}/24")
        for ns, tunnel, peer in ((a, TUNNEL[0], UNDERLAY[1]), (b, TUNNEL[1], UNDERLAY[0])):
            ns.spawn(
                [sys.executable, __file__, "--forward", mode, tunnel, peer],
                log_path=workdir / f"floor-{mode}-{ns.name}.log",
            )
        deadline = time.monotonic() + 10
        while a.run(["ping", "-n", "-c1", "-W", "0.2", TUNNEL[1]], check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: no ping through the forwarders (logs in {workdir})")
            time.sleep(0.1)
        result = {}
        for interval in intervals:
            cmd = ["ping", "-n", "-c", str(pings), "-i", str(interval), "-W", "2", TUNNEL[1]]
            out = a.run(cmd).stdout
            rtts = [float(x) for x in re.findall(r"time=([\d.]+)", out)]
            result[interval] = statistics.median(rtts)
        return result


def main() -> None:
    if sys.argv[1:2] == ["--forward"]:
        forward(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=40)
    ap.add_argument("--intervals", default="0.1,0.002", help="seconds between pings")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"), help="forwarders' logs")
    args = ap.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes: {', '.join(sorted(unknown))}")
    print(f"median RTT ms of {args.pings} pings at intervals {args.intervals} s")
    for mode in modes:
        figures = measure(mode, args.pings, intervals, args.workdir)
        print(f"{mode:15s} " + "  ".join(f"{i:g} s: {ms:.3f}" for i, ms in figures.items()))


if __name__ == "__main__":
    main()
