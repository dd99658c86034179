"""The TCP framing: exact reads and the sans-IO decoder, bounds, truncation."""

from __future__ import annotations

import asyncio
import random

import pytest

from gtun.io.framing import (
    HEADER_SIZE,
    MAX_FRAME,
    MIN_FRAME,
    FrameDecoder,
    FrameError,
    push_frame,
    read_frame,
)


def _read(data: bytes) -> bytes:
    async def main() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader)

    return asyncio.run(main())


def test_round_trip_across_split_reads() -> None:
    messages = [b"\x01" * 148, b"\x04" * 32, b"\x04" * MAX_FRAME]
    stream = b"".join(push_frame(m) for m in messages)

    async def main() -> list[bytes]:
        reader = asyncio.StreamReader()
        for i in range(0, len(stream), 7):  # the stream arrives in odd pieces
            reader.feed_data(stream[i : i + 7])
        reader.feed_eof()
        return [await read_frame(reader) for _ in messages]

    assert asyncio.run(main()) == messages


@pytest.mark.parametrize("length", [0, 1, MIN_FRAME - 1])
def test_impossible_lengths_are_remote_errors(length: int) -> None:
    data = length.to_bytes(2, "big") + b"\x00" * 16
    with pytest.raises(FrameError):
        _read(data)


def test_truncated_frame_and_clean_end() -> None:
    with pytest.raises(asyncio.IncompleteReadError) as info:
        _read(push_frame(b"\x04" * 100)[:50])
    assert info.value.partial  # mid-frame
    with pytest.raises(asyncio.IncompleteReadError) as clean:
        _read(b"")
    assert clean.value.partial == b""


@pytest.mark.parametrize("size", [0, MIN_FRAME - 1, MAX_FRAME + 1, 0x10000])
def test_push_refuses_what_cannot_be_framed(size: int) -> None:
    with pytest.raises(ValueError):
        push_frame(b"x" * size)


# --- the sans-IO decoder --------------------------------------------------------------


def test_decoder_reassembles_any_split_of_a_stream() -> None:
    rng = random.Random(7)
    messages = [b"\x04" * rng.choice([4, 32, 148, 1400, MAX_FRAME]) for _ in range(40)]
    messages = [m[:1] + bytes([i]) + m[2:] for i, m in enumerate(messages)]
    stream = b"".join(push_frame(m) for m in messages)
    for _ in range(20):
        decoder, got, pos = FrameDecoder(), [], 0
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 100, 1402, 70000])
            got += decoder.feed(stream[pos : pos + step])
            pos += step
        assert got == messages
        assert decoder.buffered == 0


def test_decoder_holds_one_incomplete_frame_at_most() -> None:
    decoder = FrameDecoder()
    whole = push_frame(b"\x04" * MAX_FRAME)
    assert decoder.feed(push_frame(b"\x01" * 148) + whole[:-1]) == [b"\x01" * 148]
    assert decoder.buffered == HEADER_SIZE + MAX_FRAME - 1
    assert decoder.feed(whole[-1:] + b"\x00") == [b"\x04" * MAX_FRAME]
    assert decoder.buffered == 1  # half a header: the stream would end truncated
    assert decoder.feed(b"") == []


@pytest.mark.parametrize("split", [0, 1, 2, 3])
@pytest.mark.parametrize("length", [0, 1, MIN_FRAME - 1])
def test_decoder_refuses_impossible_lengths(length: int, split: int) -> None:
    stream = push_frame(b"\x04" * 32) + length.to_bytes(2, "big") + bytes(8)
    decoder = FrameDecoder()
    cut = len(stream) - 10 + split
    with pytest.raises(FrameError):
        decoder.feed(stream[:cut])
        decoder.feed(stream[cut:])
