"""The client of labkit's checked transfers: `xfer_client.py JOBS`, run inside a lab
namespace, where JOBS is a JSON list of [address, port, direction, size].  Runs every
job at once (one thread each) against XferServers and prints a JSON list, in the order
of the jobs, of [sent sha256, received sha256, bytes received, seconds, error or null]."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any


def exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        b = c.recv(n - len(buf))
        if not b:
            break
        buf += b
    return buf


def run(address: str, port: int, direction: str, size: int) -> list[Any]:
    h, n, sent, received, error = hashlib.sha256(), 0, "", "", None
    started = time.monotonic()
    try:
        c = socket.create_connection((address, port), timeout=30)
        c.settimeout(60)
        if direction == "up":
            c.sendall(b"U" + struct.pack("!Q", size))
            left = size
            while left:
                b = os.urandom(min(left, 1 << 16))
                h.update(b)
                c.sendall(b)
                left -= len(b)
            c.shutdown(socket.SHUT_WR)
            answer = exact(c, 40)
            sent = h.hexdigest()
            if len(answer) != 40:
                error = f"no answer from the server ({len(answer)} bytes)"
            else:
                n, received = struct.unpack("!Q", answer[:8])[0], answer[8:].hex()
        else:
            c.sendall(b"D" + struct.pack("!Q", size))
            while n < size:
                b = c.recv(min(size - n, 1 << 18))
                if not b:
                    break
                h.update(b)
                n += len(b)
            received = h.hexdigest()
            digest = exact(c, 32)
            sent = digest.hex()
            if len(digest) != 32:
                error = f"stream ended after {n} of {size} bytes"
            elif c.recv(1):
                error = "bytes after the end of the stream"
        c.close()
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    return [sent, received, n, time.monotonic() - started, error]


def main(jobs: list[list[Any]]) -> None:
    results: list[list[Any] | None] = [None] * len(jobs)

    def one(i: int, job: list[Any]) -> None:
        results[i] = run(*job)

    threads = [threading.Thread(target=one, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
