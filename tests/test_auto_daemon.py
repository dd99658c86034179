"""Tier 2: the client daemon's side of transport "auto" (app/client.py), in-process on
loopback with test_daemons' relay and fake platforms.  The relay's UDP port is reached
through a gate that drops everything until it is opened, its TCP port through a plain
proxy: the client falls back to TCP, keeps its UDP socket for the probes, and once the
gate opens is back on UDP with its TCP connection closed, on both sides."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from test_daemons import LIMIT, Net, configured, exchange, free_port, pipe_to, status, until


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


class UdpGate(asyncio.DatagramProtocol):
    """A UDP port that passes datagrams to `target` and back while `open`, and drops
    (and counts) them otherwise."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.open = False
        self.dropped = 0
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None
        self.client: tuple[str, int] | None = None

    def connection_made(self, transport: Any) -> None:
        self.front = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.open or self.back is None:
            self.dropped += 1
            return
        self.client = addr
        self.back.sendto(data, self.target)

    def from_relay(self, data: bytes) -> None:
        if self.open and self.front is not None and self.client is not None:
            self.front.sendto(data, self.client)
        else:
            self.dropped += 1


class _Back(asyncio.DatagramProtocol):
    def __init__(self, gate: UdpGate) -> None:
        self.gate = gate

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.gate.from_relay(data)


def test_auto_returns_to_udp_and_closes_tcp(
    net: Net, platforms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gtun.core.client.FALLBACK_AFTER", 0.3)
    monkeypatch.setattr("gtun.core.client.UDP_PROBE_WAIT", 0.3)
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            loop = asyncio.get_running_loop()
            port = free_port()
            gate = UdpGate(("127.0.0.1", net.port))
            front, _ = await loop.create_datagram_endpoint(
                lambda: gate, local_addr=("127.0.0.1", port)
            )
            back, _ = await loop.create_datagram_endpoint(
                lambda: _Back(gate), local_addr=("127.0.0.1", 0)
            )
            gate.back = back
            proxy = await asyncio.start_server(
                lambda r, w: pipe_to(r, w, net.port), "127.0.0.1", port
            )
            net.write_client(port=port, transport="auto")
            with (net.tmp / "c1.toml").open("a") as f:
                f.write("udp_probe_interval = 1\n")
            try:
                async with configured(net, relay_pf, client_pf) as (server, client):
                    assert client.transport == "tcp" and client.dialer is not None
                    await until(lambda: client.core.reachability == "udp_blocked")  # type: ignore[union-attr]
                    st = await status(net.tmp / "c1.sock")
                    assert st["reachability"] == "udp_blocked"
                    assert st["peers"][0]["transport"] == "tcp"
                    assert 0 < st["udp_probe_in"] <= 1.0
                    await exchange(relay_pf, client_pf, b"over tcp")
                    assert client.driver is not None and client.driver.udp is not None
                    dropped = gate.dropped
                    assert dropped >= 2  # the start's initiation and the first probe
                    gate.open = True
                    await until(lambda: client.dialer is None)
                    assert client.transport == "udp"
                    st = await status(net.tmp / "c1.sock")
                    assert st["peers"][0]["transport"] == "udp" and st["reachability"] is None
                    assert st["udp_probe_in"] is None
                    await exchange(relay_pf, client_pf, b"over udp")
                    assert server.tcp is not None
                    await until(lambda: not server.tcp.connections)  # type: ignore[union-attr]
                    rst = await status(net.tmp / "relay.sock")
                    assert rst["peers"][0]["transport"] == "udp"
                    assert rst["tcp_connections"] == 0
                    assert client.core is not None and client.core.udp_returns == 1
            finally:
                proxy.close()
                await proxy.wait_closed()
                front.close()
                back.close()

    asyncio.run(scenario())
