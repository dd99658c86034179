"""Where the kernel delivers each datagram once the steering program is attached:
`steer.py HOST WORKERS` binds WORKERS UDP sockets with SO_REUSEPORT to one port of HOST
(in worker order), attaches io/steering.py's program to the group, reads a JSON list of
hex datagrams on stdin, sends each from a socket of its own (a fresh source port each
time) and prints, as JSON, the index of the socket each one arrived at."""

from __future__ import annotations

import json
import select
import socket
import sys
import time

from gtun.io import steering


def main(host: str, workers: int) -> None:
    datagrams = [bytes.fromhex(h) for h in json.load(sys.stdin)]
    assert len(set(datagrams)) == len(datagrams), "datagrams must be told apart"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    group: list[socket.socket] = []
    port = 0
    for _ in range(workers):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]
        group.append(s)
    steering.attach(group[0], workers)
    where: dict[bytes, int] = {}
    for data in datagrams:
        with socket.socket(family, socket.SOCK_DGRAM) as sender:
            sender.sendto(data, (host, port))
    deadline = time.monotonic() + 5.0
    while len(where) < len(datagrams) and time.monotonic() < deadline:
        ready, _, _ = select.select(group, [], [], 0.2)
        for s in ready:
            where[s.recv(65536)] = group.index(s)
    print(json.dumps([where.get(data) for data in datagrams]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
