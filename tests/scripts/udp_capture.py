"""Capture the UDP datagrams a namespace sends, for replay tests:
`udp_capture.py IFACE DPORT SECONDS OUT` records the payload of every outgoing IPv4 UDP
datagram to port DPORT on IFACE (an AF_PACKET socket: what left, as it left), prints
"ready" once it listens, and after SECONDS (or on SIGTERM) writes them to OUT as a JSON
list of hex strings."""

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


def main(iface: str, dport: int, seconds: float, out: str) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    s.bind((iface, ETH_P_ALL))
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    captured: list[str] = []
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
            or len(packet) < 28
            or packet[9] != socket.IPPROTO_UDP
        ):
            continue
        ihl = (packet[0] & 0x0F) * 4
        _, port, length = struct.unpack_from("!HHH", packet, ihl)
        if port == dport:
            captured.append(packet[ihl + 8 : ihl + length].hex())
    with open(out, "w") as f:
        json.dump(captured, f)
    print("done", len(captured), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
