"""Tier 2: what a TCP connection must show before it keeps a slot (gtun.io.tcp), on
loopback: an authentic message (the core says so), not WireGuard-shaped bytes; and at
most `max_pending_per_source` connections per address until then, so that a slowloris
from one source cannot take the slots of others."""

from __future__ import annotations

import asyncio
import secrets

from gtun.core.wg import WireGuard
from gtun.io.framing import push_frame
from gtun.io.tcp import TcpEndpoint, TcpLimits
from test_tcp import (
    BOUND,
    CoresOverTcp,
    Rig,
    close_writer,
    closed_by_server,
    run,
    until,
    wg_message,
)

LIMITS = TcpLimits(
    first_frame=1.0, idle=10.0, stall=5.0, max_connections=8, max_pending_per_source=3
)
GOOD = 0xAA  # the fill byte of the frames the fake core takes as authentic


def selective_rig(limits: TcpLimits = LIMITS) -> Rig:
    """A rig whose core takes only frames filled with GOOD as authentic."""
    return Rig(limits, accept=lambda frame: frame[-1] == GOOD)


async def connect_from(rig: Rig, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", rig.port, local_addr=(host, 0))


def test_wireguard_shaped_frames_do_not_keep_a_connection() -> None:
    async def main() -> None:
        async with selective_rig() as rig:
            loop = asyncio.get_running_loop()
            started = loop.time()
            shaped_reader, shaped = await rig.connect()  # frames, never authentic
            drip_reader, drip = await rig.connect()  # a byte at a time
            good_reader, good = await rig.connect()
            good.write(push_frame(wg_message(64, GOOD)))

            async def feed() -> None:
                frame = push_frame(wg_message(64, 1))
                i = 0
                while True:
                    shaped.write(push_frame(wg_message(64, 1)))
                    drip.write(frame[i % len(frame) : i % len(frame) + 1])
                    i += 1
                    await asyncio.sleep(0.05)

            feeder = asyncio.ensure_future(feed())
            assert await closed_by_server(shaped_reader)
            assert await closed_by_server(drip_reader)
            assert LIMITS.first_frame is not None
            assert loop.time() - started >= LIMITS.first_frame - 0.05
            assert rig.server.counts["tcp_timeout"] == 2
            assert any(d[-1] == 1 for d, _ in rig.core.received)  # they did reach the core
            # The authentic one outlives first_frame (its idle time is 10 s).
            await asyncio.sleep(LIMITS.first_frame)
            assert not good_reader.at_eof()
            [ep] = rig.server.connections
            assert ep.authentic
            assert rig.server.pending == {}
            feeder.cancel()
            for w in (shaped, drip, good):
                close_writer(w)

    run(main)


def test_one_source_holds_at_most_its_share_of_pending_connections() -> None:
    async def main() -> None:
        async with selective_rig() as rig:
            n = LIMITS.max_pending_per_source
            mute = [await connect_from(rig, "127.0.0.1") for _ in range(n)]
            await until(lambda: len(rig.server.connections) == n, "the first ones")
            extra_reader, extra = await connect_from(rig, "127.0.0.1")
            assert await closed_by_server(extra_reader)
            assert rig.server.counts["tcp_source_limit"] == 1
            assert rig.server.counts["tcp_refused"] == 0
            # Another source is welcome ...
            other_reader, other = await connect_from(rig, "127.0.0.2")
            other.write(push_frame(wg_message(64, GOOD)))
            await until(lambda: len(rig.core.received) == 1, "the other source's frame")
            assert not other_reader.at_eof()
            # ... and once one of the first source's connections authenticates, it no
            # longer counts against that source: a new one is accepted.
            mute[0][1].write(push_frame(wg_message(64, GOOD)))
            await until(lambda: len(rig.core.received) == 2, "the authentic frame")
            again_reader, again = await connect_from(rig, "127.0.0.1")
            again.write(push_frame(wg_message(64, GOOD)))
            await until(lambda: len(rig.core.received) == 3, "the new connection's frame")
            assert rig.server.counts["tcp_source_limit"] == 1
            # The mute ones time out; the pending count goes back to nothing.
            for reader, _ in mute[1:]:
                assert await closed_by_server(reader)
            await until(lambda: rig.server.pending == {}, "no pending connections")
            assert len(rig.server.connections) == 3
            for _, w in [
                *mute,
                (extra_reader, extra),
                (other_reader, other),
                (again_reader, again),
            ]:
                close_writer(w)

    run(main)


def test_when_full_a_newcomer_takes_the_slot_of_the_oldest_pending_connection() -> None:
    """Many sources holding connections that prove nothing cannot lock peers out: a new
    connection closes the oldest of them; authentic ones are never touched."""

    async def main() -> None:
        async with selective_rig() as rig:
            peers = []
            for i in (10, 11):
                reader, writer = await connect_from(rig, f"127.0.0.{i}")
                writer.write(push_frame(wg_message(64, GOOD)))
                peers.append((reader, writer))
            await until(lambda: len(rig.core.received) == 2, "the peers' frames")
            mute = []
            for host in ("127.0.0.1", "127.0.0.2"):
                for _ in range(LIMITS.max_pending_per_source):
                    mute.append(await connect_from(rig, host))
                    await asyncio.sleep(0.005)  # distinct opening times
            await until(lambda: len(rig.server.connections) == LIMITS.max_connections, "full")
            new_reader, new = await connect_from(rig, "127.0.0.3")
            assert await closed_by_server(mute[0][0])  # the oldest pending one went
            new.write(push_frame(wg_message(64, GOOD)))
            await until(lambda: len(rig.core.received) == 3, "the newcomer's frame")
            assert rig.server.counts["tcp_refused"] == 1
            assert all(not r.at_eof() for r, _ in peers)
            assert sum(ep.authentic for ep in rig.server.connections) == 3
            for w in [*(w for _, w in peers), *(w for _, w in mute), new]:
                close_writer(w)

    run(main)


def test_the_real_core_marks_only_a_peers_connection_authentic() -> None:
    """A relay and a client over TCP, and a stranger that sends initiations with a valid
    mac1 from an unknown key on its own connection: the stranger's frames reach the
    core and are dropped; its connection times out while the client's stays."""

    async def main() -> None:
        async with CoresOverTcp(LIMITS) as net:
            relay, server = net.relay, net.server
            stranger = WireGuard(secrets.token_bytes(32), wall_offset=1.7e9)
            speer = stranger.add_peer(relay.wg.public_key, endpoint="relay")
            s_reader, s_writer = await asyncio.open_connection(*net.sock.getsockname())
            for i in range(3):
                speer.last_initiation_sent = None
                stranger.initiate_handshake(speer, 100.0 + i)
                [(init, _)] = stranger.datagrams_to_send()
                s_writer.write(push_frame(init))
            await net.configured()
            await until(lambda: relay.wg.drops["unknown_peer"] == 3, "the stranger's frames")
            peer = relay.peer_by_name("c1")
            assert peer is not None and isinstance(peer.endpoint, TcpEndpoint)
            assert peer.endpoint.authentic  # the relay's side of the client's connection
            dialer = net.dialer
            assert dialer.endpoint is not None and dialer.endpoint.authentic  # the client's
            assert await closed_by_server(s_reader, BOUND)
            assert server.counts["tcp_timeout"] == 1
            assert peer.endpoint in server.connections and server.pending == {}
            s_writer.transport.abort()

    run(main)
