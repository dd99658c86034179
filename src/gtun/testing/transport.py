"""In-memory transports (gtun.io.transport), as wireguard-go's conn/bindtest.

`fake_pair()` makes two FakeTransports joined like two UDP sockets on one network: each
has an address, and a datagram one sends to the other's address arrives at the other
from the sender's address.  Delivery is asynchronous, as on a network: what one side
sends in one call is queued for the other and handed to its receive callback as one
batch on the next iteration of the event loop, never from inside send() (which would
run the other Driver inside this one's after()).

Loss is injected per side: `lose(data, addr)` returning True loses that datagram on the
wire (it was sent; it does not arrive).  Everything sent is recorded in `sent`, lost or
not, and `stats` counts what happened.  A test may also hold one side itself, opening it
with its own receive callback, to play a peer by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from gtun.io.transport import Receive

# Tuning knob: datagrams queued for one side before more are lost ("overflow").
INBOX = 4096


class FakeTransport:
    """One end of an in-memory link; endpoints are (host, port) tuples, like UDP."""

    addressed = True

    def __init__(self, loop: asyncio.AbstractEventLoop, address: tuple[str, int]) -> None:
        self.loop = loop
        self.address = address
        self.peer: FakeTransport | None = None
        self.lose: Callable[[bytes, Any], bool] | None = None
        self.sent: list[tuple[bytes, Any]] = []
        self.stats = {"sent": 0, "lost": 0, "unroutable": 0, "overflow": 0, "received": 0}
        self.closed = False
        self._receive: Receive | None = None
        self._inbox: list[tuple[bytes, Any]] = []

    def open(self, receive: Receive) -> None:
        self._receive = receive

    def send(self, datagrams: Sequence[tuple[bytes, Any]]) -> int:
        """Datagrams to the peer's address travel; the number dropped is those to any
        other address, or all of them once this side is closed (lost ones are sent)."""
        stats = self.stats
        dropped = 0
        for data, addr in datagrams:
            self.sent.append((data, addr))
            peer = self.peer
            if self.closed or peer is None or addr != peer.address:
                stats["unroutable"] += 1
                dropped += 1
            elif self.lose is not None and self.lose(data, addr):
                stats["sent"] += 1
                stats["lost"] += 1
            else:
                stats["sent"] += 1
                peer._arrive(bytes(data), self.address)
        return dropped

    def _arrive(self, data: bytes, source: tuple[str, int]) -> None:
        if self.closed:
            return
        if len(self._inbox) >= INBOX:
            self.stats["overflow"] += 1
            return
        if not self._inbox:
            self.loop.call_soon(self._deliver)
        self._inbox.append((data, source))

    def _deliver(self) -> None:
        batch, self._inbox = self._inbox, []
        if self._receive is None or self.closed or not batch:
            return
        self.stats["received"] += len(batch)
        self._receive(batch, self.loop.time())

    def close(self) -> None:
        self.closed = True
        self._receive = None
        self._inbox = []


def fake_pair(
    loop: asyncio.AbstractEventLoop,
    a: tuple[str, int] = ("192.0.2.1", 51820),
    b: tuple[str, int] = ("192.0.2.2", 51820),
) -> tuple[FakeTransport, FakeTransport]:
    """Two transports at addresses `a` and `b`, each the other's peer."""
    first, second = FakeTransport(loop, a), FakeTransport(loop, b)
    first.peer, second.peer = second, first
    return first, second
