#!/usr/bin/env python3
"""Fuzz the bulk frame codec (gtun.core.bulk.pull_bulk).

Input: raw bytes, or a bulk frame around a well-formed TCP super-packet with a fuzzed or
real header, sometimes flipped, sometimes padded.

Oracle: pull_bulk raises nothing but BulkError/OffloadError (RemoteProtocolErrors with
registered reasons); a frame it accepts has a header that describes its packet, as its
docstring promises: segment() cuts it without error, and push_bulk() gives the frame
back (padding trimmed)."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.core import bulk
    from gtun.core.offload import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, Gso, OffloadError, segment

import oracles
from common import main, tcp_packet


def frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4000))
    packet = tcp_packet(fdp)
    v6 = packet[:1] == b"\x60"
    if fdp.ConsumeBool():
        h = Gso(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, 0, 1448, 40 if v6 else 20, 16)
    else:
        h = Gso(*(fdp.ConsumeIntInRange(0, 0xFFFF if i > 1 else 0xFF) for i in range(6)))
    data = bulk.MAGIC + bytes(
        [h.flags, h.gso_type, *h.hdr_len.to_bytes(2, "little"), *h.gso_size.to_bytes(2, "little")]
        + [*h.csum_start.to_bytes(2, "little"), *h.csum_offset.to_bytes(2, "little")]
    )
    return data + packet + bytes(fdp.ConsumeIntInRange(0, 15))


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    plaintext = frame(fdp)
    pulled = None
    with oracles.only(bulk.BulkError, OffloadError):
        pulled = bulk.pull_bulk(plaintext)
    if pulled is None:
        return
    hdr, packet = pulled
    oracles.check(plaintext[bulk.HEADER_LEN :].startswith(packet), "packet not from the frame")
    with oracles.only():
        segment(hdr, packet)
    again = bulk.pull_bulk(bulk.push_bulk(hdr, packet))
    oracles.check(again == (hdr, packet), "push_bulk(pull_bulk(x)) does not round-trip")


if __name__ == "__main__":
    main(test_one)
