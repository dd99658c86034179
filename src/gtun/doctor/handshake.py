"""The handshake probe of `gtun doctor`: does the relay answer this client's handshake,
over UDP and over TCP, and what does it say to the configuration request?

Bounded: UDP_HANDSHAKE_WAIT and TCP_HANDSHAKE_WAIT for the handshake, CONFIG_WAIT more
for the relay's CONFIG or REFUSED once it answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from gtun.app.config import ClientConfig
from gtun.core import tunnel as tm
from gtun.core.wg import HandshakeCompleted, PacketReceived, WireGuard
from gtun.doctor.checks import TCP_HANDSHAKE_WAIT, UDP_HANDSHAKE_WAIT, Probe
from gtun.io.framing import HEADER_SIZE, LENGTH, FrameError, check_length, push_frame

CONFIG_WAIT = 1.5  # after the handshake, for the relay's CONFIG or REFUSED, in seconds


class HandshakeProbe:
    """A WireGuard initiator that asks the relay for its configuration once.

    After start() and each receive()/handle_timer(), send datagrams_to_send().  Done when
    `done` (a CONFIG or REFUSED arrived); `answered` once the handshake completed."""

    RELAY = "relay"  # the one endpoint: the edge knows where it goes

    def __init__(self, private_key: bytes, server_key: bytes, mode: str | None) -> None:
        self.wg = WireGuard(private_key, wall_offset=time.time() - time.monotonic())
        self.peer = self.wg.add_peer(server_key, endpoint=self.RELAY)
        self.mode = mode
        self.answered = False
        self.config: dict[str, Any] | None = None
        self.refused: str | None = None

    @property
    def done(self) -> bool:
        return self.config is not None or self.refused is not None

    def start(self, now: float) -> None:
        self.wg.initiate_handshake(self.peer, now)
        self._drain(now)

    def receive(self, data: bytes, now: float) -> None:
        self.wg.receive_datagram(data, self.RELAY, now)
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        self._drain(now)

    def datagrams_to_send(self) -> list[bytes]:
        return [d for d, _ in self.wg.datagrams_to_send()]

    def _drain(self, now: float) -> None:
        while (event := self.wg.next_event()) is not None:
            if isinstance(event, HandshakeCompleted) and not self.answered:
                self.answered = True
                payload = {"mode": self.mode} if self.mode else {}
                self.wg.send(self.peer, tm.push_message(tm.CONFIG_REQUEST, payload), now)
            elif isinstance(event, PacketReceived) and tm.is_tunnel_message(event.data):
                try:
                    msg = tm.pull_message(event.data)
                except tm.TunnelMessageError:
                    continue
                if msg.type == tm.CONFIG:
                    self.config = msg.payload
                elif msg.type == tm.REFUSED:
                    self.refused = str(msg.payload.get("reason", "refused"))


async def _pump(
    probe: HandshakeProbe,
    recv: Callable[[float], Any],
    send: Callable[[bytes], Any],
    wait: float,
    result: Probe,
) -> None:
    """Drive `probe` until done or `wait` seconds; `recv(timeout)` returns bytes or None."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + wait
    probe.start(time.monotonic())
    for d in probe.datagrams_to_send():
        await send(d)
    while not probe.done:
        now = loop.time()
        limit = deadline + (CONFIG_WAIT if probe.answered else 0)
        if now >= limit:
            break
        timer = probe.wg.get_timer()
        mono = time.monotonic()
        timeout = limit - now
        if timer is not None:
            timeout = max(0.0, min(timeout, timer - mono))
        data = await recv(timeout)
        if data is not None:
            was = probe.answered
            probe.receive(data, time.monotonic())
            if probe.answered and not was:
                result.rtt = loop.time() - started
        else:
            probe.handle_timer(time.monotonic())
        for d in probe.datagrams_to_send():
            await send(d)
    result.answered = probe.answered
    result.config = probe.config
    result.refused = probe.refused


async def probe_udp(cfg: ClientConfig, wait: float = UDP_HANDSHAKE_WAIT) -> Probe:
    result = Probe("udp")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(*cfg.server, type=socket.SOCK_DGRAM)
    except OSError as exc:
        result.error = f"cannot resolve {cfg.server[0]}: {exc}"
        return result
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    probe = HandshakeProbe(cfg.private_key, cfg.server_public_key, cfg.mode)

    async def recv(timeout: float) -> bytes | None:
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except TimeoutError:
            return None

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    try:
        await loop.sock_connect(sock, addr)
        await _pump(probe, recv, send, wait, result)
    except ConnectionRefusedError:
        result.error = "refused"
    except OSError as exc:
        result.error = exc.strerror or str(exc)
    finally:
        sock.close()
    return result


async def probe_tcp(cfg: ClientConfig, wait: float = TCP_HANDSHAKE_WAIT) -> Probe:
    """The same handshake over gtun's TCP framing (framing.py)."""
    result = Probe("tcp")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*cfg.server), wait)
    except TimeoutError:
        result.error = "timed out"
        return result
    except ConnectionRefusedError:
        result.error = "refused"
        return result
    except OSError as exc:
        result.error = exc.strerror or str(exc)
        return result
    result.connected = True
    probe = HandshakeProbe(cfg.private_key, cfg.server_public_key, cfg.mode)

    async def recv(timeout: float) -> bytes | None:
        # A timeout while waiting for a header consumes nothing (readexactly takes its
        # bytes only once they are all there); once a header is read, its body must follow.
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER_SIZE), timeout)
        except TimeoutError:
            return None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Closed(str(exc) or "connection closed") from exc
        try:
            (length,) = LENGTH.unpack(header)
            check_length(length)
            return await asyncio.wait_for(reader.readexactly(length), CONFIG_WAIT)
        except (TimeoutError, asyncio.IncompleteReadError, FrameError, ConnectionError) as exc:
            raise _Closed(str(exc) or "truncated frame") from exc

    async def send(data: bytes) -> None:
        writer.write(push_frame(data))
        await writer.drain()

    try:
        await _pump(probe, recv, send, max(0.1, deadline - loop.time()), result)
    except _Closed as exc:
        result.answered = probe.answered
        result.error = f"the relay closed the connection ({exc})"
    except OSError as exc:
        result.error = exc.strerror or str(exc)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    return result


class _Closed(Exception):
    """The relay ended the TCP connection or broke the framing."""
