#!/usr/bin/env python3
"""Datagrams per second through gtun.udpio on loopback: send() with and without UDP GSO,
recv() with and without UDP GRO.

    python3 bench/udpio_bench.py [--seconds 2] [--size 1456] [--batch 44]

Sender and receiver sockets live in this one process on 127.0.0.1.  Only the measured side
is timed: for send(), the receiver is drained between rounds off the clock; for recv(), the
socket is filled first (by GSO sends when the receiver has GRO, so trains arrive whole) and
then drained on the clock.  Loopback delivery runs inside the sender's system call, so send
figures include the kernel's receive work (and GSO splitting when the receiver has no GRO).
A script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun.udpio import UdpBatch  # noqa: E402

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; needs root, else SO_RCVBUF (capped) is used
RCVBUF = 1 << 25
ROUND = 20  # batches per round, between drains


def make_pair(gso: bool, gro: bool) -> tuple[socket.socket, socket.socket, UdpBatch, UdpBatch]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    for sock in (tx, rx):
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    return tx, rx, UdpBatch(tx, gso=gso), UdpBatch(rx, gro=gro)


def bench_send(gso: bool, gro: bool, seconds: float, size: int, batch: int) -> tuple[float, int]:
    tx, rx, sender, receiver = make_pair(gso, gro)
    addr = rx.getsockname()
    datagrams = [(bytes([i % 256]) * size, addr) for i in range(batch)]
    sent = dropped = 0
    clock = 0.0
    while clock < seconds:
        start = time.perf_counter()
        for _ in range(ROUND):
            dropped += sender.send(datagrams)
        clock += time.perf_counter() - start
        sent += ROUND * batch
        while receiver.recv(4096):
            pass
    tx.close()
    rx.close()
    return sent / clock, dropped


def bench_recv(gro: bool, seconds: float, size: int, batch: int) -> tuple[float, int]:
    tx, rx, sender, receiver = make_pair(True, gro)
    addr = rx.getsockname()
    datagrams = [(bytes([i % 256]) * size, addr) for i in range(batch)]
    got = 0
    clock = 0.0
    while clock < seconds:
        for _ in range(ROUND):
            sender.send(datagrams)
        start = time.perf_counter()
        while True:
            n = len(receiver.recv(64))
            if not n:
                break
            got += n
        clock += time.perf_counter() - start
    coalesced = receiver.stats["gro_reads"]
    tx.close()
    rx.close()
    return got / clock, coalesced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=1456)
    parser.add_argument("--batch", type=int, default=44)
    args = parser.parse_args()
    print(f"{args.size}-byte datagrams, send() batches of {args.batch}, loopback")
    for gso in (True, False):
        for gro in (True, False):
            rate, dropped = bench_send(gso, gro, args.seconds, args.size, args.batch)
            print(
                f"send()  GSO {'on ' if gso else 'off'} (receiver GRO {'on ' if gro else 'off'})"
                f"  {rate:>10,.0f} datagrams/s  dropped {dropped}"
            )
    for gro in (True, False):
        rate, coalesced = bench_recv(gro, args.seconds, args.size, args.batch)
        print(
            f"recv()  GRO {'on ' if gro else 'off'}  (64 per call)        "
            f"  {rate:>10,.0f} datagrams/s  coalesced reads {coalesced}"
        )


if __name__ == "__main__":
    main()
