"""Another program in the way, for port-in-use tests: `hold_port.py KIND HOST PORT` binds
a KIND ("udp" or "tcp") socket to HOST:PORT (and listens, for TCP), prints "bound" and
holds it for a minute."""

from __future__ import annotations

import socket
import sys
import time


def main(kind: str, host: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    s.bind((host, port))
    if kind == "tcp":
        s.listen()
    print("bound", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
