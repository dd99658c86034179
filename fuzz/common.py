"""What every harness shares: this tree's src/ first on sys.path (so a checkout is fuzzed,
not whatever gtun the interpreter has installed), the main loop, and the mutations of
recorded datagrams.  Import it before atheris and gtun; it imports no gtun module, so
that the harness's own `atheris.instrument_imports()` block instruments them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parent.parent / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)


def main(test_one: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


def datagram(fdp: Any, recorded: Sequence[bytes]) -> bytes:
    """A datagram chosen by the fuzzer: raw bytes, or a recorded (real, authenticated)
    one replayed as it was, with bytes flipped, or cut and extended, so that the input
    gets past the MACs and the AEAD as far as a real message does."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0 or not recorded:
        return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)))
    data = bytearray(recorded[fdp.ConsumeIntInRange(0, len(recorded) - 1)])
    if kind == 2 and data:
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            data[fdp.ConsumeIntInRange(0, len(data) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
    elif kind == 3:
        cut = fdp.ConsumeIntInRange(0, len(data))
        data = data[:cut] + bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    return bytes(data)


def tcp_packet(
    fdp: Any,
    *,
    flow: int = 0,
    seq: int | None = None,
    size: int | None = None,
    addrs: tuple[bytes, bytes] | None = None,
) -> bytes:
    """A TCP packet over IPv4 or IPv6 whose lengths agree (RFC 791, RFC 8200, RFC 9293),
    fields chosen by the fuzzer, sometimes with one byte flipped: the codecs' checks pass
    and the fuzzer explores what lies behind them.  `flow` picks one of a few address
    pairs; `seq` and `size` pin the sequence number and payload size (for coalescing);
    `addrs` (source, destination: 4 or 16 bytes each) replaces the address pair."""
    v6 = len(addrs[0]) == 16 if addrs is not None else fdp.ConsumeBool()
    options = bytes(4 * fdp.ConsumeIntInRange(0, 2))
    flags = fdp.ConsumeIntInRange(0, 255) if fdp.ConsumeIntInRange(0, 3) == 0 else 0x10
    payload = bytes(size if size is not None else fdp.ConsumeIntInRange(0, 3000))
    tcp = (
        (1000 + flow).to_bytes(2, "big")
        + (2000).to_bytes(2, "big")
        + (seq if seq is not None else fdp.ConsumeIntInRange(0, 2**32 - 1)).to_bytes(4, "big")
        + bytes(4)
        + bytes([(5 + len(options) // 4) << 4, flags])
        + (65535).to_bytes(2, "big")
        + bytes(4)
        + options
        + payload
    )
    if addrs is None:
        addrs = (
            (bytes(15) + bytes([1 + flow]), bytes(15) + bytes([2]))
            if v6
            else (bytes([10, 0, 0, 1 + flow]), bytes([10, 0, 0, 2]))
        )
    if v6:
        head = bytes([0x60, 0, 0, 0]) + len(tcp).to_bytes(2, "big") + bytes([6, 64])
    else:
        head = bytes([0x45, 0]) + (20 + len(tcp)).to_bytes(2, "big")
        head += bytes([0, 0, 0x40, 0, 64, 6, 0, 0])
    head += addrs[0] + addrs[1]
    packet = bytearray(head + tcp)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        packet[fdp.ConsumeIntInRange(0, len(packet) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
    return bytes(packet)


def gso_header(fdp: Any, packet: bytes) -> Any:
    """A virtio-net header (offload.Gso) for `packet`: all six fields fuzzed, or the one
    an offloading TUN gives with a TCP super-packet (type of the packet's IP version,
    maybe ECN, checksum where TCP keeps it) and a fuzzed segment size."""
    from gtun.core.offload import F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, Gso

    if fdp.ConsumeBool():
        return Gso(*(fdp.ConsumeIntInRange(0, 0xFFFF if i > 1 else 0xFF) for i in range(6)))
    v6 = packet[:1] == b"\x60"
    l3 = 40 if v6 else 20
    tcp_len = (packet[l3 + 12] >> 4) * 4 if len(packet) > l3 + 12 else 20
    gso = (GSO_TCPV6 if v6 else GSO_TCPV4) | (GSO_ECN if fdp.ConsumeBool() else 0)
    return Gso(F_NEEDS_CSUM, gso, l3 + tcp_len, fdp.ConsumeIntInRange(0, 2000), l3, 16)
