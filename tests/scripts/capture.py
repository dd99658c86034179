"""Capture what a namespace sends, for replay tests:

    capture.py udp IFACE DPORT SECONDS OUT   the payload of every outgoing IPv4 UDP
                                             datagram to port DPORT
    capture.py tcp IFACE DPORT SECONDS OUT   the bytes each IPv4 TCP connection to port
                                             DPORT that opened meanwhile sent, in order
                                             (reassembled from the sequence numbers from
                                             its SYN on, up to the first gap)

An AF_PACKET socket on IFACE sees what left, as it left.  Prints "ready" once it
listens, and after SECONDS (or on SIGTERM) writes OUT, a JSON list of hex strings."""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator

ETH_P_ALL = 0x0003  # outgoing packets reach only ETH_P_ALL sockets
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SYN = 0x02


def outgoing(iface: str, proto: int, minimum: int, seconds: float) -> Iterator[tuple[bytes, int]]:
    """(packet, IP header length) of each outgoing IPv4 packet of `proto` at least
    `minimum` bytes long, for `seconds` or until SIGTERM; says "ready" first."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    s.bind((iface, ETH_P_ALL))
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while not stop and time.monotonic() < deadline:
        s.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            packet, addr = s.recvfrom(70000)
        except (TimeoutError, InterruptedError):
            continue
        if (
            addr[1] == ETH_P_IP
            and addr[2] == PACKET_OUTGOING
            and len(packet) >= minimum
            and packet[9] == proto
        ):
            yield packet, (packet[0] & 0x0F) * 4


def udp(iface: str, dport: int, seconds: float) -> list[str]:
    captured: list[str] = []
    for packet, ihl in outgoing(iface, socket.IPPROTO_UDP, 28, seconds):
        _, port, length = struct.unpack_from("!HHH", packet, ihl)
        if port == dport:
            captured.append(packet[ihl + 8 : ihl + length].hex())
    return captured


def reassemble(isn: int, segments: list[tuple[int, bytes]]) -> bytes:
    """The stream of a connection whose SYN had sequence number `isn`."""
    stream = bytearray()
    for seq, payload in sorted(segments, key=lambda s: (s[0] - isn - 1) % 2**32):
        offset = (seq - isn - 1) % 2**32
        if offset > len(stream):
            break  # a gap: what follows it is not known
        stream += payload[len(stream) - offset :]
    return bytes(stream)


def tcp(iface: str, dport: int, seconds: float) -> list[str]:
    syns: dict[int, int] = {}  # source port -> ISN, in the order they opened
    segments: dict[int, list[tuple[int, bytes]]] = {}
    for packet, ihl in outgoing(iface, socket.IPPROTO_TCP, 40, seconds):
        total = struct.unpack_from("!H", packet, 2)[0]
        sport, port, seq = struct.unpack_from("!HHI", packet, ihl)
        doff = (packet[ihl + 12] >> 4) * 4
        if port != dport:
            continue
        if packet[ihl + 13] & SYN:
            syns[sport] = seq
            segments[sport] = []
        elif sport in syns and total > ihl + doff:
            segments[sport].append((seq, packet[ihl + doff : total]))
    return [reassemble(isn, segments[p]).hex() for p, isn in syns.items()]


def main(kind: str, iface: str, dport: int, seconds: float, out: str) -> None:
    captured = {"udp": udp, "tcp": tcp}[kind](iface, dport, seconds)
    with open(out, "w") as f:
        json.dump(captured, f)
    print("done", len(captured), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
