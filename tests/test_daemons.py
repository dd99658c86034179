"""Tier 2: the relay and client daemons in-process, on one event loop.

Real UDP and TCP on 127.0.0.1, FakeTun devices, and the fake platform
(gtun.testing.platform) for everything that would change the machine: no namespace, no
netlink, no nft.  Each test is bounded by asyncio.timeout and takes about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Interface, ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun.app.client import Client
from gtun.app.config import load_client_config, load_server_config
from gtun.app.control import query
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.server import Server
from gtun.core.packet import build_udp4
from gtun.lab.net import write_key
from gtun.testing.platform import FakePlatform

LIMIT = 10.0  # seconds any one scenario may take
RELAY = "10.66.0.1"
C1 = "10.66.0.2"
LAN = "192.168.77.0/24"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (as the relay binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class Net:
    """Config files for one relay (c1 and, with `add_peer`, c2 as peers) and client c1."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.keys = {name: generate_private_key() for name in ("relay", "c1", "c2")}
        for name, key in self.keys.items():
            write_key(tmp / f"{name}.key", key)
        self.peers = ["c1"]
        self.write_relay()
        self.write_client()

    def public(self, name: str) -> str:
        return encode_key(public_key(self.keys[name]))

    def write_relay(self) -> None:
        text = (
            "[server]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            'private_key_file = "relay.key"\n'
            'network = "10.66.0.0/24"\n'
            'device = "gtr0"\n'
            "mtu = 1400\n"
            f'routes = ["{LAN}"]\n'
            f'dns = ["{RELAY}"]\n'
            "nat = true\n"
            "offload = false\n"
            'state_dir = "state"\n'
            'control_socket = "relay.sock"\n'
        )
        for i, name in enumerate(self.peers):
            text += (
                f'[[peers]]\nname = "{name}"\npublic_key = "{self.public(name)}"\n'
                f'address = "10.66.0.{i + 2}"\n'
            )
        (self.tmp / "relay.toml").write_text(text)

    def write_client(self, port: int | None = None, transport: str = "udp") -> None:
        (self.tmp / "c1.toml").write_text(
            "[client]\n"
            f'server = "127.0.0.1:{port or self.port}"\n'
            f'server_public_key = "{self.public("relay")}"\n'
            'private_key_file = "c1.key"\n'
            f'transport = "{transport}"\n'
            'device = "gtc0"\n'
            "offload = false\n"
            'state_dir = "state"\n'
            'control_socket = "c1.sock"\n'
        )

    def add_peer(self, name: str) -> None:
        self.peers.append(name)
        self.write_relay()


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


async def until(condition: Callable[[], object], step: float = 0.01) -> None:
    while not condition():
        await asyncio.sleep(step)


@contextlib.asynccontextmanager
async def running(daemon: Server | Client) -> AsyncIterator[asyncio.Task[None]]:
    """Run a daemon until the block ends, then stop it and wait for its clean-up."""
    task = asyncio.create_task(daemon.run())
    try:
        await until(lambda: daemon.cfg.control_socket.exists() or task.done())
        yield task
    finally:
        daemon.stop.set()
        await task


@contextlib.asynccontextmanager
async def configured(
    net: Net, relay_pf: FakePlatform, client_pf: FakePlatform
) -> AsyncIterator[tuple[Server, Client]]:
    """A relay and client c1, running until the block ends, c1 configured by the push."""
    server, client = start_relay(net, relay_pf), start_client(net, client_pf)
    async with running(server), running(client):
        await until(lambda: client.applied is not None)
        yield server, client


def start_relay(net: Net, platform: FakePlatform) -> Server:
    return Server(load_server_config(net.tmp / "relay.toml"), platform)


def start_client(net: Net, platform: FakePlatform) -> Client:
    return Client(load_client_config(net.tmp / "c1.toml"), platform)


async def exchange(relay_pf: FakePlatform, client_pf: FakePlatform, payload: bytes) -> None:
    """A packet from c1's device comes out of the relay's, and one back."""
    loop = asyncio.get_running_loop()
    c_end, r_end = client_pf.ends["gtc0"], relay_pf.ends["gtr0"]
    out = build_udp4(C1, RELAY, 4000, 5000, payload)
    await loop.sock_sendall(c_end, out)
    assert await loop.sock_recv(r_end, 65536) == out
    back = build_udp4(RELAY, C1, 5000, 4000, payload[::-1])
    await loop.sock_sendall(r_end, back)
    assert await loop.sock_recv(c_end, 65536) == back


async def status(path: Path) -> dict[str, Any]:
    return await asyncio.to_thread(query, path, {"command": "status"})


def test_config_push_then_a_packet_both_ways(net: Net, platforms: Any) -> None:
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, client):
                link = client_pf.links["gtc0"]
                assert link.addresses == [IPv4Interface(f"{C1}/24")]
                assert link.mtu == 1400 and link.up
                assert list(link.routes) == [ip_network(LAN)]
                assert any(c.what.startswith("DNS tun.gtc0") for c in client_pf.changes)
                relay_link = relay_pf.links["gtr0"]
                assert relay_link.addresses == [IPv4Interface(f"{RELAY}/24")]
                await exchange(relay_pf, client_pf, b"hello")
                st = await status(net.tmp / "c1.sock")
                assert st["role"] == "client" and st["connected"]
                assert st["address"] == f"{C1}/24" and st["routes"] == [LAN]
                assert st["peers"][0]["rx_packets"] > 0
                rst = await status(net.tmp / "relay.sock")
                assert rst["role"] == "relay" and rst["peers"][0]["name"] == "c1"
                assert rst["peers"][0]["transport"] == "udp"

    asyncio.run(scenario())


def test_client_rejoins_a_restarted_relay(net: Net, platforms: Any) -> None:
    # Over TCP the relay's going is seen at once (the connection ends); over UDP only
    # WireGuard's 15 s timer would notice, too slow for this tier.
    net.write_client(transport="tcp")
    client_pf = platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            first_pf, second_pf = platforms(), platforms()
            first = start_relay(net, first_pf)
            first_run = asyncio.create_task(first.run())
            await until(first.cfg.control_socket.exists)
            client = start_client(net, client_pf)
            async with running(client):
                await until(lambda: client.applied is not None)
                await exchange(first_pf, client_pf, b"before")
                first.stop.set()
                await first_run
                assert first_pf.outstanding() == []
                second = start_relay(net, second_pf)
                async with running(second):
                    # Joined: the relay has had the client's configuration request.
                    await until(lambda: joined(second, "c1"))
                    await exchange(second_pf, client_pf, b"after")
                    assert client.dialer is not None and client.dialer.connects == 2

    asyncio.run(scenario())


def joined(server: Server, name: str) -> bool:
    peer = server.relay.peer_by_name(name) if server.relay is not None else None
    return peer is not None and peer.rx_packets > 0


def test_auto_falls_back_to_tcp_when_udp_is_unanswered(
    net: Net, platforms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gtun.core.client.FALLBACK_AFTER", 0.3)
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            # The client's port: UDP that nothing answers, TCP passed on to the relay.
            port = free_port()
            hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            hole.bind(("127.0.0.1", port))
            proxy = await asyncio.start_server(
                lambda r, w: pipe_to(r, w, net.port), "127.0.0.1", port
            )
            net.write_client(port=port, transport="auto")
            try:
                async with configured(net, relay_pf, client_pf) as (_, client):
                    assert client.transport == "tcp"
                    await exchange(relay_pf, client_pf, b"over tcp")
                    rst = await status(net.tmp / "relay.sock")
                    assert rst["peers"][0]["transport"] == "tcp"
            finally:
                proxy.close()
                await proxy.wait_closed()
                hole.close()

    asyncio.run(scenario())


async def pipe_to(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


def test_sighup_adds_a_peer_and_keeps_the_session(net: Net, platforms: Any) -> None:
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, client):
                assert server.relay is not None
                peer = server.relay.peer_by_name("c1")
                assert peer is not None and peer.current is not None
                session = peer.current
                net.add_peer("c2")
                os.kill(os.getpid(), signal.SIGHUP)
                await until(lambda: server.relay.peer_by_name("c2") is not None)
                assert server.relay.peer_by_name("c1") is peer and peer.current is session
                await exchange(relay_pf, client_pf, b"after reload")
                rst = await status(net.tmp / "relay.sock")
                assert [p["name"] for p in rst["peers"]] == ["c1", "c2"]

    asyncio.run(scenario())


def test_stop_undoes_every_change(net: Net, platforms: Any) -> None:
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, client):
                assert relay_pf.outstanding() and client_pf.outstanding()
            assert relay_pf.outstanding() == []
            assert client_pf.outstanding() == []
            assert all(d.closed for d in relay_pf.devices + client_pf.devices)
            assert client_pf.links["gtc0"].closed
            assert not (net.tmp / "relay.sock").exists()
            assert not (net.tmp / "c1.sock").exists()
            changed = {c.what for c in relay_pf.changes}
            assert {"IPv4 forwarding", "gtr0: up"} <= changed
            assert any(w.startswith("NAT from 10.66.0.0/24") for w in changed)

    asyncio.run(scenario())


@pytest.mark.parametrize("restore_fails", [False, True])
def test_the_journal_goes_only_once_everything_it_lists_is_undone(
    net: Net, platforms: Any, monkeypatch: pytest.MonkeyPatch, restore_fails: bool
) -> None:
    from gtun.errors import RuntimeFailure
    from gtun.system import journal
    from gtun.testing.platform import FakeForwarding

    if restore_fails:

        def refuse(self: FakeForwarding) -> None:
            raise RuntimeFailure("cannot write net.ipv4.ip_forward")

        monkeypatch.setattr(FakeForwarding, "restore", refuse)
    relay_pf, client_pf = platforms(), platforms()
    paths: list[Path] = []

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, client):
                path = journal.host_journal_path(server.cfg.state_dir, server.cfg.path)
                assert path.exists()  # written before the first change
                paths.append(path)

    asyncio.run(scenario())
    # Kept when forwarding could not be restored: the next run retries from it.
    assert paths[0].exists() == restore_fails
