#!/usr/bin/env python3
"""Microbenchmark of the UDP data path's Python work, client to relay, without I/O:

    python3 bench/datapath_micro.py [--supers 200] [--trials 5]

The client core cuts 64 KB TCP super-packets (as an offloading TUN reads them) into
WireGuard transport messages; the relay core decrypts them, routes them and hands them
to its device, where the edge coalesces them into super-packets (driver.write_tun, to a
device that only counts).  Prints microseconds per wire packet for each side, the best
of `--trials`, and whether the compiled (mypyc) modules were loaded (GTUN_PURE=1 forces
the pure-Python ones).  A script that prints figures, not a test: nothing here asserts a
speed (other processes share the CPU), and bench/bench.py is the measure that counts.
"""

from __future__ import annotations

import argparse
import secrets
import struct
import sys
from ipaddress import IPv4Address
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun import native  # noqa: E402
from gtun.core.client import ClientCore  # noqa: E402
from gtun.core.offload import F_NEEDS_CSUM, GSO_TCPV4, Gso  # noqa: E402
from gtun.core.relay import PeerSpec, Relay  # noqa: E402
from gtun.io.driver import write_tun  # noqa: E402
from gtun.testing.link import CoreLink, relay_settings  # noqa: E402

MSS = 1368  # what a 1420-byte tunnel MTU leaves TCP with timestamps


class CountingTun:
    """An offloading device that keeps nothing."""

    vnet = True

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, packet: bytes) -> bool:
        self.writes += 1
        self.bytes += len(packet)
        return True

    def write_super(self, hdr: Gso, packet: bytes) -> int:
        self.writes += 1
        self.bytes += len(packet)
        return 0


def super_packet(seq: int, payload: bytes) -> tuple[Gso, bytes]:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, 0x80, 0x10, 512, 0, 0)
    tcp += b"\x01\x01\x08\x0a" + bytes(8)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, b"\n\x42\0\2", b"\n\x42\0\1"
    )
    return Gso(F_NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16), ip + tcp + payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--supers", type=int, default=200, help="super-packets per trial")
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()

    # Both ends' devices offload, as in the daemons: TCP checksums travel partial.
    relay = Relay(secrets.token_bytes(32), relay_settings(partial_ok=True))
    net = CoreLink(relay, now=100.0)
    client = ClientCore(
        secrets.token_bytes(32), relay.wg.public_key, "R", transport="udp", accept_partial=True
    )
    net.add_client("c1", client)
    relay.set_peers([PeerSpec("c1", client.wg.public_key, IPv4Address("10.66.0.2"))])
    net.start()
    assert client.connected and client.server.data.caps.partial, "no session"
    now = net.now
    payload = secrets.token_bytes(44 * MSS)
    seq = 1000
    client_best = relay_best = float("inf")
    tun = CountingTun()
    counts = {"tun_super_reads": 0, "tun_super_writes": 0}
    for _ in range(args.trials):
        supers = []
        for _ in range(args.supers):
            supers.append(super_packet(seq, payload))
            seq = (seq + len(payload)) & 0xFFFFFFFF
        datagrams: list[tuple[bytes, Any]] = []
        start = perf_counter()
        for hdr, packet in supers:
            client.tun_super(hdr, packet, now)
            datagrams.extend(client.datagrams_to_send())
        client_s = perf_counter() - start
        n = len(datagrams)
        written = tun.bytes
        start = perf_counter()
        receive = relay.receive_datagrams
        for i in range(0, n, 64):  # the Driver's FAIR_BUDGET per wake-up
            receive([(data, "c1") for data, _ in datagrams[i : i + 64]], now)
            relay.datagrams_to_send()
            write_tun(tun, relay.tun_writes(), counts)
        relay_s = perf_counter() - start
        assert tun.bytes - written >= args.supers * len(payload), "packets lost"
        client_best = min(client_best, client_s / n)
        relay_best = min(relay_best, relay_s / n)
    print(f"compiled modules: {', '.join(native.compiled()) or 'none'}")
    print(f"wire packets per trial: {n}")
    print(f"client (segment + encrypt): {client_best * 1e6:.2f} us per packet")
    print(f"relay (decrypt + route + coalesce): {relay_best * 1e6:.2f} us per packet")


if __name__ == "__main__":
    main()
