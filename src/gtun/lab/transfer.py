"""The two ends of `GtunNet.transfer`, a program run with the interpreter inside lab
namespaces (it imports nothing from gtun):

    transfer.py receive PORT [BIND [TIMEOUT]]
                                       accept one TCP stream on BIND (default 0.0.0.0)
                                       and print the SHA-256 of what came
    transfer.py send HOST PORT SIZE [TIMEOUT]
                                       send SIZE random bytes to HOST:PORT, half-close,
                                       wait for the receiver to close, print their SHA-256

TIMEOUT: seconds any one socket call may wait (default 60 to receive, 30 to send).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

CHUNK = 1 << 16


def receive(port: int, bind: str, timeout: float = 60.0) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(1)
    s.settimeout(timeout)
    c, _ = s.accept()
    c.settimeout(timeout)
    h = hashlib.sha256()
    while b := c.recv(CHUNK):
        h.update(b)
    print(h.hexdigest(), flush=True)


def send(host: str, port: int, size: int, timeout: float = 30.0) -> None:
    s = socket.create_connection((host, port), timeout=timeout)
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
    if argv[:1] == ["receive"] and 2 <= len(argv) <= 4:
        bind = argv[2] if len(argv) > 2 else "0.0.0.0"
        receive(int(argv[1]), bind, *(float(a) for a in argv[3:]))
    elif argv[:1] == ["send"] and 4 <= len(argv) <= 5:
        send(argv[1], int(argv[2]), int(argv[3]), *(float(a) for a in argv[4:]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
