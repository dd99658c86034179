#!/usr/bin/env python3
"""Datagrams per second through gtun.io.udp on loopback: send() with and without UDP GSO,
recv() with and without UDP GRO.

    python3 bench/udpio_bench.py [--seconds 0.5] [--trials 5] [--size 1456] [--batch 44]

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
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun.io.udp import UdpBatch  # noqa: E402

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


def bench_recv(
    gro: bool, seconds: float, size: int, batch: int, gso: bool = True
) -> tuple[float, int]:
    tx, rx, sender, receiver = make_pair(gso, gro)
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


def best_and_median(run: Callable[[], tuple[float, int]], trials: int) -> str:
    results = sorted(run()[0] for _ in range(trials))
    return f"best {results[-1]:>10,.0f}  median {statistics.median(results):>10,.0f} datagrams/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per trial")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--size", type=int, default=1456)
    parser.add_argument("--batch", type=int, default=44)
    args = parser.parse_args()
    s, n, b, t = args.seconds, args.size, args.batch, args.trials
    print(f"{n}-byte datagrams, send() batches of {b}, loopback, {t} trials of {s:g} s")
    for gso in (True, False):
        for gro in (True, False):
            label = f"send()  GSO {'on' if gso else 'off'}, receiver GRO {'on' if gro else 'off'}"
            print(f"{label:<42}", best_and_median(partial(bench_send, gso, gro, s, n, b), t))
    for gro, gso in ((True, True), (False, True), (True, False)):
        label = f"recv()  GRO {'on' if gro else 'off'}, sender GSO {'on' if gso else 'off'}"
        print(f"{label:<42}", best_and_median(partial(bench_recv, gro, s, n, b, gso), t))


if __name__ == "__main__":
    main()
