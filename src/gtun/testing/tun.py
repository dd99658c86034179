"""An in-memory stand-in for a TUN device (as wireguard-go's tun/tuntest): the
`PacketDevice` of gtun.io.tun over a socketpair, for tests."""

from __future__ import annotations

import socket

from gtun.core.offload import PLAIN, Gso
from gtun.errors import RuntimeFailure
from gtun.io.tun import MAX_PACKET, PACKET_ERRNOS, write_segments


class FakeTun:
    """An in-memory stand-in for a TUN device, for tests.

    Built on a SOCK_SEQPACKET socketpair: it has a real file descriptor that an event
    loop can watch, and keeps packet boundaries.  The test holds the other end: what it
    sends arrives as if from the kernel, and it receives what gtun wrote.
    """

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._name = name
        sock.setblocking(False)

    @classmethod
    def create(cls, name: str = "fake0") -> tuple[FakeTun, socket.socket]:
        """A fake device and the test's end of it (blocking, SOCK_SEQPACKET)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours, name), theirs

    @property
    def name(self) -> str:
        return self._name

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting.

        Raises RuntimeFailure when the test closed its end.
        """
        try:
            data = self._sock.recv(MAX_PACKET)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise RuntimeFailure(f"cannot read from {self._name}: {exc.strerror}") from exc
        if not data:
            raise RuntimeFailure(f"cannot read from {self._name}: the other end is closed")
        return data

    def write(self, packet: bytes) -> bool:
        try:
            self._sock.send(packet)
        except OSError as exc:
            if exc.errno in PACKET_ERRNOS:
                return False
            raise RuntimeFailure(f"cannot write to {self._name}: {exc.strerror}") from exc
        return True

    def read_super(self) -> tuple[Gso, bytes] | None:
        packet = self.read()
        return None if packet is None else (PLAIN, packet)

    def write_super(self, hdr: Gso, packet: bytes) -> int:
        return write_segments(self, hdr, packet)

    def close(self) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        return f"<FakeTun {self._name}>"
