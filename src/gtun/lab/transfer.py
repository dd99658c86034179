"""The two ends of `GtunNet.transfer`, a program run with the interpreter inside lab
namespaces (it imports nothing from gtun):

    transfer.py receive PORT [BIND]    accept one TCP stream on BIND (default 0.0.0.0)
                                       and print the SHA-256 of what came
    transfer.py send HOST PORT SIZE    send SIZE random bytes to HOST:PORT, half-close,
                                       wait for the receiver to close, print their SHA-256
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

CHUNK = 1 << 16


def receive(port: int, bind: str) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(1)
    s.settimeout(60)
    c, _ = s.accept()
    c.settimeout(60)
    h = hashlib.sha256()
    while b := c.recv(CHUNK):
        h.update(b)
    print(h.hexdigest(), flush=True)


def send(host: str, port: int, size: int) -> None:
    s = socket.create_connection((host, port), timeout=30)
    h = hashlib.sha256()
    left = size
    while left:
        b = os.urandom(min(left, CHUNK))
        h.update(b)
        s.sendall(b)
        left -= len(b)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    print(h.hexdigest())


def main(argv: list[str]) -> None:
    if argv[:1] == ["receive"] and len(argv) in (2, 3):
        receive(int(argv[1]), argv[2] if len(argv) > 2 else "0.0.0.0")
    elif argv[:1] == ["send"] and len(argv) == 4:
        send(argv[1], int(argv[2]), int(argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
