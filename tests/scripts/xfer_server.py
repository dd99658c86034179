"""The XferServer of labkit's checked transfers: `xfer_server.py PORT`, run inside a lab
namespace.  Listens on "::" (IPv4 through mapped addresses) for TCP jobs and echoes UDP
datagrams on the same port; prints "ready" once both sockets are bound, then one line per
job.  The protocol is described in labkit.py."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
import threading


def exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        b = c.recv(n - len(buf))
        if not b:
            raise OSError(f"stream ended after {len(buf)} of {n} header bytes")
        buf += b
    return buf


def serve(c: socket.socket) -> None:
    try:
        c.settimeout(60)
        head = exact(c, 9)
        mode, size = head[:1], struct.unpack("!Q", head[1:])[0]
        h, n = hashlib.sha256(), 0
        if mode == b"U":
            while b := c.recv(1 << 18):
                h.update(b)
                n += len(b)
            c.sendall(struct.pack("!Q", n) + h.digest())
        elif mode == b"D":
            while n < size:
                b = os.urandom(min(size - n, 1 << 16))
                h.update(b)
                c.sendall(b)
                n += len(b)
            c.sendall(h.digest())
        print(mode.decode(), size, n, h.hexdigest(), flush=True)
    except OSError as e:
        print("error", e, flush=True)
    finally:
        c.close()


def echo(u: socket.socket) -> None:
    while True:
        data, addr = u.recvfrom(65535)
        u.sendto(data, addr)


def main(port: int) -> None:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(64)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    threading.Thread(target=echo, args=(u,), daemon=True).start()
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]))
