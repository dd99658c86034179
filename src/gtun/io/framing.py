"""WireGuard messages over a TCP stream: each message prefixed by its length.

    length(2, big-endian)   message(length)

The message is exactly what would have been one UDP datagram (a handshake initiation,
response, cookie reply or transport data message), so the WireGuard core is the same over
both transports.  This is the framing of Mullvad's udp-over-tcp.  A frame shorter than
MIN_FRAME (no room for a WireGuard message type) is a protocol error of the remote end:
the connection that sent it is closed, nothing else.  The 2-byte length allows frames up
to 65535 bytes: transport messages between gtun nodes carry whole TCP super-packets
there (bulk.py); everyone else's are MTU-sized.

TCP delivers a byte stream, so one read is never one frame: a reader either reads
exactly (`read_frame`, over a StreamReader) or feeds whatever arrived to a FrameDecoder,
which holds the incomplete frame at the end until the rest comes.
"""

from __future__ import annotations

import asyncio
import struct

from gtun.core.errors import LocalProtocolError, RemoteProtocolError

LENGTH = struct.Struct(">H")
HEADER_SIZE = LENGTH.size
MIN_FRAME = 4  # a WireGuard message type is 4 bytes (whitepaper section 5.4)
# The largest frame the length field can say: bulk frames (bulk.py) fill it.
MAX_FRAME = 0xFFFF


class FrameError(RemoteProtocolError):
    """The remote end sent a frame of an impossible size."""


def push_frame(message: bytes) -> bytes:
    """One frame for `message`.  Raises ValueError (a local error) when it does not fit."""
    if not MIN_FRAME <= len(message) <= MAX_FRAME:
        raise LocalProtocolError(f"message of {len(message)} bytes cannot be framed")
    return LENGTH.pack(len(message)) + message


def check_length(length: int) -> None:
    """Raises FrameError for a length no valid frame has."""
    if length < MIN_FRAME:
        raise FrameError(f"frame of {length} bytes is too short")


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next message from `reader`.

    Raises FrameError for a bad length, asyncio.IncompleteReadError when the stream ends
    (cleanly between frames: `partial` is empty; mid-frame: a truncated frame)."""
    header = await reader.readexactly(HEADER_SIZE)
    (length,) = LENGTH.unpack(header)
    check_length(length)
    return await reader.readexactly(length)


class FrameDecoder:
    """Sans-IO: bytes of a stream in, complete messages out.

    It holds at most one incomplete frame between calls (HEADER_SIZE + MAX_FRAME bytes
    at the most), so a connection's read buffer is bounded by the framing itself.
    After a FrameError the stream cannot be resynchronised: drop the decoder with its
    connection."""

    __slots__ = ("_partial", "_need")

    def __init__(self) -> None:
        self._partial = bytearray()  # the start of an incomplete frame
        self._need = 0  # bytes _partial must reach before a frame can complete

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (non-zero at the end of a stream: truncated)."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes, in order; [] when it completes none.

        Raises FrameError for a length no valid frame has (the messages before it in
        the same `data` are lost with the connection)."""
        partial = self._partial
        if partial:
            partial += data
            if len(partial) < self._need:
                return []
            data = bytes(partial)
            partial.clear()
        messages: list[bytes] = []
        pos, end, n = 0, HEADER_SIZE, len(data)
        while end <= n:  # a whole header at pos
            length = (data[pos] << 8) | data[pos + 1]
            check_length(length)
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            messages.append(data[pos + HEADER_SIZE : end])
            pos, end = end, end + HEADER_SIZE
        if pos < n:
            partial += data[pos:]
            self._need = end - pos
        return messages
