"""The TCP framing: exact reads, bounds, truncation."""

from __future__ import annotations

import asyncio

import pytest

from gtun.io.framing import MAX_FRAME, MIN_FRAME, FrameError, push_frame, read_frame


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
