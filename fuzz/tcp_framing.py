#!/usr/bin/env python3
"""Fuzz the TCP transport's framing (gtun.io.framing.FrameDecoder) with arbitrary
chunkings of an arbitrary stream.

Oracle: feed() raises nothing but FrameError; the messages it gives, over all chunks,
are those a plain reading of the whole stream finds (2-byte length, then the message),
in order, up to the first impossible length, where it must raise FrameError; at the end
it holds exactly the unfinished frame, never more than one frame's worth."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.io.framing import HEADER_SIZE, MAX_FRAME, MIN_FRAME, FrameDecoder, FrameError

import oracles
from common import main


def reference(stream: bytes) -> tuple[list[bytes], bool, int]:
    """(messages, whether a bad length ends them, bytes of the unfinished frame)."""
    messages: list[bytes] = []
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        length = int.from_bytes(stream[pos : pos + 2], "big")
        if length < MIN_FRAME:
            return messages, True, 0
        if len(stream) - pos - HEADER_SIZE < length:
            break
        messages.append(stream[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
        pos += HEADER_SIZE + length
    return messages, False, len(stream) - pos


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 8), 0, 4096))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    want, bad, rest = reference(stream)
    decoder = FrameDecoder()
    got: list[bytes] = []
    failed = False
    start = 0
    for cut in [*cuts, len(stream)]:
        chunk, start = stream[start:cut], max(start, cut)
        try:
            got.extend(decoder.feed(chunk))
        except FrameError as exc:
            oracles.reason_known(exc)
            failed = True
            break
        oracles.check(decoder.buffered <= HEADER_SIZE + MAX_FRAME, "decoder holds too much")
    oracles.check(failed == bad, f"bad length {'missed' if bad else 'invented'}")
    oracles.check(got == want[: len(got)], "messages differ from the stream's")
    if not bad:
        oracles.check(got == want, "messages lost")
        oracles.check(decoder.buffered == rest, f"holds {decoder.buffered}, not {rest}")


if __name__ == "__main__":
    main(test_one)
