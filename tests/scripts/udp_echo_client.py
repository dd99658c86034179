"""The UDP side of labkit's checked transfers: `udp_echo_client.py ADDRESS PORT SIZES
TRIES`, run inside a lab namespace.  Sends a random datagram of each size in SIZES (a JSON
list) to an XferServer and waits half a second for its exact echo, up to TRIES attempts;
prints JSON {"attempts": {size: attempts it took, 0 for none}, "wrong": datagrams that
came back matching nothing sent}."""

from __future__ import annotations

import json
import os
import socket
import sys


def main(address: str, port: int, sizes: list[int], tries: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.connect((address, port))
    u.settimeout(0.5)
    attempts: dict[int, int] = {}
    sent: set[bytes] = set()
    wrong = 0
    for size in sizes:
        attempts[size] = 0
        for attempt in range(1, tries + 1):
            data = os.urandom(size)
            sent.add(data)
            u.send(data)
            try:
                while (got := u.recv(65535)) != data:
                    wrong += got not in sent  # else a late echo of an earlier attempt
            except TimeoutError:
                continue
            attempts[size] = attempt
            break
    print(json.dumps({"attempts": attempts, "wrong": wrong}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]))
