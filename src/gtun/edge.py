"""The asyncio edge shared by the relay and the client: UDP socket, TUN device, timer.

After every call into the core the edge does the same three things (as aioquic's
protocol.transmit()): drain events, transmit (datagrams and TUN writes), re-arm the
timer.  Sends never block: a datagram that does not fit the transport's bounded buffer,
or a TUN write the kernel refuses, is dropped and counted ("queue_full").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from gtun.tun import PacketDevice
from gtun.wg.events import Event

log = logging.getLogger("gtun")

TUN_BATCH = 64  # packets read from the TUN per wake-up, so UDP input is not starved
UDP_BUFFER_LIMIT = 4 * 1024 * 1024  # bytes queued in asyncio's UDP transport at most


def merge_counts(*counters: dict[str, int]) -> dict[str, int]:
    """Sum drop counters that share reasons (the core's and the edge's)."""
    total: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            total[key] = total.get(key, 0) + value
    return total


class Core(Protocol):
    drops: dict[str, int]

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def tun_packet(self, packet: bytes, now: float) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def next_event(self) -> Event | None: ...
    def tun_writes(self) -> list[bytes]: ...
    def datagrams_to_send(self) -> list[tuple[bytes, Any]]: ...


class Driver(asyncio.DatagramProtocol):
    def __init__(
        self,
        core: Core,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[Event], None],
        on_udp_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.core = core
        self.loop = loop
        self.on_event = on_event
        self.on_udp_error = on_udp_error
        self.transport: asyncio.DatagramTransport | None = None
        self.tun: PacketDevice | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # --- asyncio.DatagramProtocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.core.receive_datagram(data, addr, self.loop.time())
        self.after()

    def error_received(self, exc: Exception) -> None:
        if self.on_udp_error is not None:
            self.on_udp_error(exc)

    # --- TUN ---------------------------------------------------------------------------

    def attach_tun(self, tun: PacketDevice) -> None:
        self.tun = tun
        self.loop.add_reader(tun.fileno(), self._tun_readable)

    def detach_tun(self) -> None:
        if self.tun is not None:
            self.loop.remove_reader(self.tun.fileno())
            self.tun = None

    def _tun_readable(self) -> None:
        tun = self.tun
        if tun is None:
            return
        now = self.loop.time()
        core = self.core
        for _ in range(TUN_BATCH):
            packet = tun.read()
            if packet is None:
                break
            core.tun_packet(packet, now)
        self.after()

    # --- after every call: events, transmit, timer --------------------------------------

    def after(self) -> None:
        core = self.core
        while (event := core.next_event()) is not None:
            self.on_event(event)
        writes = core.tun_writes()
        if writes:
            tun = self.tun
            for packet in writes:
                if tun is None or not tun.write(packet):
                    core.drops["queue_full"] += 1
        datagrams = core.datagrams_to_send()
        if datagrams:
            transport = self.transport
            buffered = getattr(transport, "get_write_buffer_size", None)
            for data, addr in datagrams:
                if transport is None or (buffered is not None and buffered() > UDP_BUFFER_LIMIT):
                    core.drops["queue_full"] += 1
                    continue
                transport.sendto(data, addr)
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.core.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self.loop.time())
        self.after()

    def poke(self) -> None:
        """Run the core's timers now (after the edge changed something in the core)."""
        self.after()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.detach_tun()
        if self.transport is not None:
            self.transport.close()
