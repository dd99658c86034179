"""A stand-in for a core (gtun.io.driver.Core), to test the edges without WireGuard."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from gtun.core.offload import VnetHdr
from gtun.core.wg.events import Event


class FakeCore:
    """Records the datagrams that arrive (`received`) and sends what a test queues in
    `out`, plus whatever `reply(data, addr)` returns for each arrival.  It has no TUN
    side: a packet from the device is a test's mistake (AssertionError)."""

    def __init__(self) -> None:
        self.drops: dict[str, int] = {"queue_full": 0}
        self.received: list[tuple[bytes, Hashable]] = []
        self.out: list[tuple[bytes, Any]] = []
        self.reply: Callable[[bytes, Hashable], list[tuple[bytes, Any]]] = lambda d, a: []

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.received.append((data, addr))
        self.out.extend(self.reply(data, addr))

    def tun_packet(self, packet: bytes, now: float) -> None:
        raise AssertionError("no TUN here")

    def tun_super(self, hdr: VnetHdr, packet: bytes, now: float) -> None:
        raise AssertionError("no TUN here")

    def handle_timer(self, now: float) -> None:
        pass

    def get_timer(self) -> float | None:
        return None

    def next_event(self) -> Event | None:
        return None

    def tun_writes(self) -> list[bytes | tuple[VnetHdr, bytes]]:
        return []

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        out, self.out = self.out, []
        return out
