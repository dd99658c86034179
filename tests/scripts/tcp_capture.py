"""Capture the TCP streams a namespace opens, for replay tests over gtun's TCP transport:
`tcp_capture.py IFACE DPORT SECONDS OUT` records the outgoing IPv4 TCP segments to port
DPORT on IFACE (an AF_PACKET socket: what left, as it left), prints "ready" once it
listens, and after SECONDS (or on SIGTERM) writes to OUT, as a JSON list of hex strings,
the bytes each connection that opened meanwhile sent, in order (reassembled from the
sequence numbers from its SYN on, up to the first gap)."""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003  # outgoing packets reach only ETH_P_ALL sockets
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SYN = 0x02


def reassemble(isn: int, segments: list[tuple[int, bytes]]) -> bytes:
    """The stream of a connection whose SYN had sequence number `isn`."""
    stream = bytearray()
    for seq, payload in sorted(segments, key=lambda s: (s[0] - isn - 1) % 2**32):
        offset = (seq - isn - 1) % 2**32
        if offset > len(stream):
            break  # a gap: what follows it is not known
        stream += payload[len(stream) - offset :]
    return bytes(stream)


def main(iface: str, dport: int, seconds: float, out: str) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    s.bind((iface, ETH_P_ALL))
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    syns: dict[int, int] = {}  # source port -> ISN, in the order they opened
    segments: dict[int, list[tuple[int, bytes]]] = {}
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while not stop and time.monotonic() < deadline:
        s.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            packet, addr = s.recvfrom(70000)
        except (TimeoutError, InterruptedError):
            continue
        if (
            addr[1] != ETH_P_IP
            or addr[2] != PACKET_OUTGOING
            or len(packet) < 40
            or packet[9] != socket.IPPROTO_TCP
        ):
            continue
        ihl = (packet[0] & 0x0F) * 4
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
    with open(out, "w") as f:
        json.dump([reassemble(isn, segments[p]).hex() for p, isn in syns.items()], f)
    print("done", len(syns), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
