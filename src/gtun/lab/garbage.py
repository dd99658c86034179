"""A garbage sender, a program run with the interpreter inside lab namespaces (gtun
importable, Namespace.spawn puts it on the path):

    garbage.py HOST PORT SECONDS [gso|plain]

sends transport-message shaped garbage (type 4, reserved zero, random receiver index,
counter and body: 148 bytes) to HOST:PORT over UDP for SECONDS, as fast as it can: in
trains of 64 datagrams per GSO send (gso, the default) or one datagram per send
(plain); then prints how many datagrams the kernel took."""

from __future__ import annotations

import os
import socket
import sys
import time

from gtun.io.udp import UdpBatch

TRAIN = 64
SIZE = 144  # random bytes after the 4-byte header


def main(host: str, port: int, seconds: float, gso: bool) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((host, port))
    batch = UdpBatch(sock, gso=gso)
    addr = (host, port)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        train = [(b"\x04\x00\x00\x00" + os.urandom(SIZE), addr) for _ in range(TRAIN)]
        for _ in range(50):
            sent += TRAIN - batch.send(train)
    print(sent, flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["gso"], ["plain"]):
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:] != ["plain"])
