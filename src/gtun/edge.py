"""The asyncio edge shared by the relay and the client: UDP socket, TUN device, timer.

After every call into the core the edge does the same three things (as aioquic's
protocol.transmit()): drain events, transmit (datagrams and TUN writes), re-arm the
timer.  Sends never block: a datagram that does not fit the socket's bounded send buffer, or
a TUN write the kernel refuses, is dropped and counted ("queue_full").  A datagram whose
address is a TCP connection (gtun.tcp.TcpEndpoint) is handed to that connection, which
frames it and queues it in its own bounded buffer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from gtun.tun import PacketDevice
from gtun.wg.events import Event

log = logging.getLogger("gtun")

TUN_BATCH = 64  # packets read from the TUN per wake-up, so UDP input is not starved
UDP_BATCH = 64  # datagrams read per wake-up, likewise
UDP_MAX = 65535


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


SOCKET_BUFFER = 4 << 20


def set_buffers(sock: socket.socket) -> None:
    """Large socket buffers absorb bursts.  The *FORCE options (root) go past the
    namespace's rmem_max/wmem_max without changing those sysctls."""
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        for opt in (force, plain):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                break
            except OSError:
                continue


class Driver:
    """Runs a core on the event loop.  The UDP socket is read directly (up to UDP_BATCH
    datagrams per wake-up) rather than through an asyncio transport, which would cost a
    loop iteration and a callback per datagram; sends go straight to the socket, whose
    kernel buffer is the bound: when it is full the datagram is dropped and counted."""

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
        self.sock: socket.socket | None = None
        self.tun: PacketDevice | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # --- UDP ---------------------------------------------------------------------------

    def attach_udp(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        set_buffers(sock)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._udp_readable)

    def detach_udp(self) -> None:
        """Stop using the UDP socket and close it (a client falling back to TCP)."""
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _udp_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        now = self.loop.time()
        core = self.core
        recv = sock.recvfrom
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(UDP_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                self._udp_error(exc)
                continue
            core.receive_datagram(data, addr, now)
        self.after()

    def _udp_error(self, exc: Exception) -> None:
        if self.on_udp_error is not None:
            self.on_udp_error(exc)

    # --- TUN ---------------------------------------------------------------------------

    def attach_tun(self, tun: PacketDevice) -> None:
        self.tun = tun
        self.loop.add_reader(tun.fileno(), self._tun_readable)

    def detach_tun(self) -> None:
        if self.tun is not None:
            fd = self.tun.fileno()
            if fd >= 0:  # a closed device no longer has a descriptor to watch
                self.loop.remove_reader(fd)
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
            sock = self.sock
            for data, addr in datagrams:
                if addr.__class__ is not tuple:  # a stream endpoint (gtun.tcp): it frames
                    if not addr.send(data):  # and queues, or refuses when full or closed
                        core.drops["queue_full"] += 1
                    continue
                if sock is None:
                    core.drops["queue_full"] += 1
                    continue
                try:
                    sock.sendto(data, addr)
                except (BlockingIOError, InterruptedError):
                    core.drops["queue_full"] += 1  # the socket's send buffer is full
                except OSError as exc:
                    core.drops["queue_full"] += 1
                    self._udp_error(exc)
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
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
