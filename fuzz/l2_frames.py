#!/usr/bin/env python3
"""Fuzz the TAP-mode frame codec (gtun.core.l2frame): pull_frame, ipv4_sender and
ipv6_claims.

Oracle: pull_frame raises nothing but L2FrameError with a registered reason, and what
it gives is the frame its header describes, within max_frame; ipv4_sender and
ipv6_claims never raise, and every address a frame speaks for (read independently in
oracles.frame_claims) is one they report: a frame cannot hide a claim from the
anti-spoofing check."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.core import l2frame

import oracles
from common import main

ETHERTYPES = [b"\x08\x00", b"\x08\x06", b"\x86\xdd", b"\x81\x00", b"\x88\xa8", b"\x91\x00"]


def frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    head = fdp.ConsumeBytes(12).ljust(12, b"\0")
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        head += fdp.PickValueInList(ETHERTYPES[3:]) + fdp.ConsumeBytes(2).ljust(2, b"\0")
    head += fdp.PickValueInList(ETHERTYPES)
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    if fdp.ConsumeBool() and payload:  # the IP version where it belongs
        payload = bytes([0x45 if head[-1] == 0 else 0x60]) + payload[1:]
    return head + payload


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    f = frame(fdp)
    max_frame = fdp.ConsumeIntInRange(0, 2000)
    plaintext = l2frame.MAGIC + len(f).to_bytes(2, "big") + f if fdp.ConsumeBool() else f
    plaintext += fdp.ConsumeBytes(fdp.remaining_bytes())
    got = None
    with oracles.only(l2frame.L2FrameError):
        got = l2frame.pull_frame(plaintext, max_frame)
    if got is not None:
        length = int.from_bytes(plaintext[4:6], "big")
        oracles.check(got == plaintext[6 : 6 + length], "pulled frame is not the described one")
        oracles.check(len(got) <= max_frame, "pulled frame over max_frame")
    with oracles.only():
        v4 = l2frame.ipv4_sender(f)
        v6 = l2frame.ipv6_claims(f)
    said = ([v4] if v4 is not None else []) + (v6 or [])
    if b"" in said:
        return  # unreadable: the relay drops the frame as malformed
    for claim in oracles.frame_claims(f):
        oracles.check(claim in said, f"a claim of {claim.hex()} the checks do not see")


if __name__ == "__main__":
    main(test_one)
