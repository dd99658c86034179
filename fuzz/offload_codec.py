#!/usr/bin/env python3
"""Fuzz the super-packet codec (gtun.core.offload): segment, split and coalesce.

A Gso header (fuzzed, or the one a real TCP super-packet has) with a packet (fuzzed bytes
or a well-formed TCP packet, sometimes with a byte flipped); a batch of packets of a few
flows for coalesce().

Oracle: segment() and split() raise nothing but OffloadError; what segment() gives are
packets of at most 65535 bytes; split() gives pieces of at most max_len bytes whose
segments are exactly the segments of the whole (its documented promise); coalesce()
never raises, and segmenting what it gives yields as many packets as went in."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.core import offload
    from gtun.core.offload import Gso, OffloadError

import oracles
from common import gso_header, main, tcp_packet


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 2)
    if op == 2:
        packets = []
        seqs = [0, 0, 0]
        for _ in range(fdp.ConsumeIntInRange(1, 12)):
            flow = fdp.ConsumeIntInRange(0, 2)
            size = fdp.PickValueInList([0, 100, 1000, 1448, fdp.ConsumeIntInRange(0, 1500)])
            packets.append(tcp_packet(fdp, flow=flow, seq=seqs[flow], size=size))
            seqs[flow] += size
            if fdp.ConsumeBool():  # WireGuard's padding, trimmed by coalesce()
                packets[-1] += bytes(fdp.ConsumeIntInRange(0, 15))
        out = offload.coalesce(packets)
        n = 0
        for h, p in out:
            with oracles.only(OffloadError):
                n += len(offload.segment(h, p))
                continue
            raise oracles.OracleFailure(f"coalesce() made {h} that segment() refuses")
        oracles.check(n == len(packets), f"{len(packets)} packets coalesced into {n}")
        return
    if fdp.ConsumeBool():
        packet = tcp_packet(fdp)
    else:
        packet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4000))
    h: Gso = gso_header(fdp, packet)
    whole: list[bytes] | None = None
    with oracles.only(OffloadError):
        whole = offload.segment(h, packet)
    if whole is not None:
        for seg in whole:
            oracles.check(len(seg) <= 0xFFFF, f"a segment of {len(seg)} bytes")
    if op == 1:
        max_len = fdp.ConsumeIntInRange(0, 70000)
        pieces: list[tuple[Gso, bytes]] | None = None
        with oracles.only(OffloadError):
            pieces = offload.split(h, packet, max_len)
        if pieces is not None and whole is not None:
            again: list[bytes] = []
            for ph, pp in pieces:
                oracles.check(len(pp) <= max_len, "a piece over max_len")
                again.extend(offload.segment(ph, pp))
            oracles.check(again == whole, "split() pieces segment differently from the whole")


if __name__ == "__main__":
    main(test_one)
