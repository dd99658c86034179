#!/usr/bin/env python3
"""Fuzz the WireGuard device (gtun.core.wg.WireGuard.receive_datagram).

Each input gets two fresh devices, A (the initiator) and B (the device under test, with
A as its one peer), and a real handshake and first packet between them, recorded.  The
input then chooses a few datagrams (raw bytes, or recorded ones replayed, flipped, cut),
which device gets each and from where: the peer's own endpoint or an unknown one.

Oracle: nothing escapes receive_datagram; the drop counters are registered reasons; the
device's tables stay bounded; no datagram moved B's endpoint for A away from "A" (a
replay from another address must not roam the peer); and afterwards A and B still
exchange a packet both ways."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.core.wg import PacketReceived, WireGuard

import oracles
from common import datagram, main

A_KEY = bytes(range(1, 33))
B_KEY = bytes(range(101, 133))
NOW = 1000.0


class Pair:
    def __init__(self) -> None:
        self.a = WireGuard(A_KEY)
        self.b = WireGuard(B_KEY)
        self.peer_b = self.a.add_peer(self.b.public_key, endpoint="B")
        self.peer_a = self.b.add_peer(self.a.public_key)
        self.recorded: list[bytes] = []
        self.got: dict[str, list[bytes]] = {"A": [], "B": []}

    def pump(self, now: float) -> None:
        for _ in range(20):
            moved = False
            for name, dev, other, other_name in (
                ("A", self.a, self.b, "B"),
                ("B", self.b, self.a, "A"),
            ):
                while (ev := dev.next_event()) is not None:
                    if isinstance(ev, PacketReceived):
                        self.got[name].append(ev.data)
                for data, addr in dev.datagrams_to_send():
                    self.recorded.append(data)
                    if addr == other_name:  # else to an unknown address: lost
                        other.receive_datagram(data, name, now)
                        moved = True
            if not moved:
                return
        raise oracles.OracleFailure("two devices did not settle")

    def exchange(self, tag: bytes, now: float) -> None:
        """A packet each way; both must arrive."""
        self.got = {"A": [], "B": []}
        self.a.send(self.peer_b, b"from A " + tag, now)
        self.pump(now)
        self.b.send(self.peer_a, b"from B " + tag, now)
        self.pump(now)
        oracles.check(any(p.startswith(b"from A " + tag) for p in self.got["B"]), "A->B lost")
        oracles.check(any(p.startswith(b"from B " + tag) for p in self.got["A"]), "B->A lost")


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    pair = Pair()
    pair.exchange(b"first", NOW)
    now = NOW
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        to_b = fdp.ConsumeIntInRange(0, 3) != 0
        known = fdp.ConsumeBool()
        dgram = datagram(fdp, pair.recorded)
        now += fdp.ConsumeIntInRange(0, 1000) / 1000
        if to_b:
            pair.b.receive_datagram(dgram, "A" if known else "X", now)
        else:
            pair.a.receive_datagram(dgram, "B" if known else "X", now)
        pair.pump(now)
    for dev in (pair.a, pair.b):
        oracles.assert_device_bounded(dev)
    oracles.check(pair.peer_a.endpoint == "A", f"B's endpoint for A is {pair.peer_a.endpoint}")
    oracles.check(pair.peer_b.endpoint == "B", f"A's endpoint for B is {pair.peer_b.endpoint}")
    pair.exchange(b"after", now)


if __name__ == "__main__":
    main(test_one)
