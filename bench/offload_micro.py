#!/usr/bin/env python3
"""Microbenchmark of gtun.core.offload: segment(), split() and coalesce() on 64 KB TCP
super-packets, checksum() on common sizes.  Pure Python, no root, no network:

    python3 bench/offload_micro.py [--repeat 5]

Prints the best of `--repeat` timings per call and per packet.  A script that prints
figures, not a test: nothing here asserts a speed (other processes share the CPU).
"""

from __future__ import annotations

import argparse
import struct
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun import offload  # noqa: E402
from gtun.core.offload import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, Gso  # noqa: E402


def _super(v6: bool, mss: int, payload_len: int) -> tuple[Gso, bytes]:
    """A super-packet as a TUN read gives it (timestamps option, partial checksum)."""
    payload = bytes(i & 0xFF for i in range(payload_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 77, 0x80, 0x18, 512, 0, 0)
    tcp += b"\x01\x01\x08\x0a" + bytes(8)
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(tcp) + payload_len, 6, 64) + bytes(32)
        l3 = 40
    else:
        total = 20 + len(tcp) + payload_len
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2"
        )
        l3 = 20
    h = Gso(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, l3 + 32, mss, l3, 16)
    return h, ip + tcp + payload


def _best(fn: object, number: int, repeat: int) -> float:
    """Microseconds per call, best of `repeat`."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    r = args.repeat
    for v6 in (False, True):
        name = "TCPv6" if v6 else "TCPv4"
        h, raw = _super(v6, 1380, 65535 - (40 if v6 else 20) - 32)
        segs = offload.segment(h, raw)
        us = _best(lambda h=h, raw=raw: offload.segment(h, raw), 200, r)
        print(
            f"segment  {name} {len(raw)} B -> {len(segs)} segments: {us:7.1f} us"
            f"  ({us / len(segs):.2f} us/segment, {len(raw) * 8 / us / 1000:.2f} Gbit/s)"
        )
        batch = segs[:45]
        co = offload.coalesce(batch)
        assert len(co) == 1
        us = _best(lambda batch=batch: offload.coalesce(batch), 200, r)
        print(
            f"coalesce {name} 45 segments -> 1 of {len(co[0][1])} B: {us:7.1f} us"
            f"  ({us / 45:.2f} us/segment, {len(co[0][1]) * 8 / us / 1000:.2f} Gbit/s)"
        )
        us = _best(lambda h=h, raw=raw: offload.split(h, raw, 9000), 1000, r)
        n = len(offload.split(h, raw, 9000))
        print(f"split    {name} {len(raw)} B into {n} pieces of <= 9000 B: {us:7.1f} us")
    h, raw = _super(False, 1380, 1380)
    one = offload.segment(h, raw)
    us = _best(lambda: offload.segment(h, raw), 20000, r)
    print(f"segment  TCPv4 one 1432 B packet (NEEDS_CSUM as GSO of 1): {us:7.2f} us")
    plain = offload.Gso(F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    us = _best(lambda: offload.segment(plain, one[0]), 20000, r)
    print(f"segment  GSO_NONE + NEEDS_CSUM 1432 B: {us:7.2f} us")
    us = _best(lambda: offload.coalesce(one), 20000, r)
    print(f"coalesce one lone packet: {us:7.2f} us")
    for size in (20, 1380, 65535):
        data = bytes(range(256)) * (size // 256 + 1)
        data = data[:size]
        us = _best(lambda data=data: offload.checksum(data), 20000 if size < 9000 else 500, r)
        print(f"checksum {size:5d} B: {us:7.2f} us")


if __name__ == "__main__":
    main()
