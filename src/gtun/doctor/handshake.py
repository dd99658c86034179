"""The handshake probe of `gtun doctor`: does the relay answer this client's handshake,
over UDP and over TCP, and what does it say to the configuration request?

The probe drives the client's own core (core/client.py) for one handshake and one
configuration request, so it asks exactly what a client would ask: a silent relay, a
refusal and a mode mismatch read as the client reads them.  A relay that grants health
requests (tunnel.Caps.health) is then asked what it sees of its own machine.  Bounded:
UDP_HANDSHAKE_WAIT and TCP_HANDSHAKE_WAIT for the handshake, CONFIG_WAIT more for the
relay's CONFIG or REFUSED once it answered, and CONFIG_WAIT more for its health.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

from gtun.app.config import ClientConfig
from gtun.core.client import (
    ClientCore,
    ConfigReceived,
    Connected,
    GaveUpRound,
    HealthReceived,
    Refused,
)
from gtun.doctor.checks import TCP_HANDSHAKE_WAIT, UDP_HANDSHAKE_WAIT, Probe
from gtun.io.framing import HEADER_SIZE, LENGTH, FrameError, check_length, push_frame

CONFIG_WAIT = 1.5  # after the handshake, for the relay's CONFIG or REFUSED, in seconds
RELAY = "relay"  # the core's one endpoint: the socket knows where it goes


def take_events(core: ClientCore, result: Probe, elapsed: float) -> bool:
    """Note the core's events in `result` (`elapsed`: seconds since the probe started,
    the round trip when the handshake has just completed).  True once the probe is over:
    the relay sent its CONFIG or refused, or the core gave up a round of handshakes."""
    over = False
    while (event := core.next_event()) is not None:
        if isinstance(event, Connected):
            result.answered = True
            result.rtt = elapsed
        elif isinstance(event, ConfigReceived):
            result.config = event.config
            over = True
        elif isinstance(event, HealthReceived):
            result.health = event.health
            over = True
        elif isinstance(event, Refused):
            result.refused = event.reason
            over = True
        elif isinstance(event, GaveUpRound):
            over = True
    return over


async def _pump(
    core: ClientCore,
    recv: Callable[[float], Awaitable[bytes | None]],
    send: Callable[[bytes], Awaitable[None]],
    wait: float,
    result: Probe,
) -> None:
    """Drive `core` until the probe is over or `wait` seconds (CONFIG_WAIT more once the
    relay answered, and CONFIG_WAIT more for its health once it sent its CONFIG);
    `recv(timeout)` returns bytes, or None when nothing came."""
    started = time.monotonic()
    deadline = started + wait
    core.start(started)
    over = take_events(core, result, 0.0)
    asked = False  # the relay's health was asked (once its CONFIG granted it)
    while True:
        if over and not asked and result.config is not None and result.health is None:
            asked = True
            now = time.monotonic()
            if core.ask_health(now) is not None:
                over = False
                deadline = now  # the answer has CONFIG_WAIT from now
        if asked and result.health is not None:
            over = True
        for datagram, _ in core.datagrams_to_send():
            await send(datagram)
        now = time.monotonic()
        limit = deadline + (CONFIG_WAIT if result.answered else 0)
        if over or now >= limit:
            return
        timeout = limit - now
        timer = core.get_timer()
        if timer is not None:
            timeout = max(0.0, min(timeout, timer - now))
        data = await recv(timeout)
        if data is not None:
            core.receive_datagram(data, RELAY, time.monotonic())
        else:
            core.handle_timer(time.monotonic())
        over = take_events(core, result, time.monotonic() - started)


def _client_core(cfg: ClientConfig) -> ClientCore:
    return ClientCore(
        cfg.private_key,
        cfg.server_public_key,
        RELAY,
        mode=cfg.mode,
        wall_offset=time.time() - time.monotonic(),
        preshared_key=cfg.preshared_key,
    )


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
    core = _client_core(cfg)

    async def recv(timeout: float) -> bytes | None:
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except TimeoutError:
            return None

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    try:
        await loop.sock_connect(sock, addr)
        await _pump(core, recv, send, wait, result)
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
    core = _client_core(cfg)

    async def recv(timeout: float) -> bytes | None:
        # Not framing.read_frame: a timeout there could cancel it after the header was
        # consumed.  A timeout while waiting for a header consumes nothing (readexactly
        # takes its bytes only once they are all there); once a header is read, its body
        # must follow.
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
        await _pump(core, recv, send, max(0.1, deadline - loop.time()), result)
    except _Closed as exc:
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
