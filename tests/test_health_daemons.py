"""Tier 2: the relay's health through the daemons, in-process on one event loop (real
UDP on 127.0.0.1, the fake platform): the relay's edge looks at its machine
periodically (Platform.relay_health) and its core answers from that snapshot; the
client's `relay_health` control command asks through its core and waits, bounded; and
the client's status says what it was started with, for doctor to compare with its file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun.app.client import HEALTH_WAIT, Client
from gtun.app.control import query
from gtun.app.server import Server
from gtun.core import tunnel as tm
from gtun.testing.platform import FakePlatform
from test_daemons import LIMIT, Net, free_port, running, start_client, start_relay, until


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


async def ask(net: Net, command: str) -> dict[str, Any]:
    return await asyncio.to_thread(query, net.tmp / "c1.sock", {"command": command})


@contextlib.asynccontextmanager
async def both(
    net: Net, relay_pf: FakePlatform, client_pf: FakePlatform, interval: float = 0.05
) -> AsyncIterator[tuple[Server, Client]]:
    server = start_relay(net, relay_pf)
    server.health_interval = interval
    client = start_client(net, client_pf)
    async with running(server), running(client):
        await until(lambda: client.applied is not None)
        yield server, client


def test_the_client_asks_the_relay_what_its_edge_saw(net: Net, platforms: Any) -> None:
    relay_pf, client_pf = platforms(), platforms()
    relay_pf.health = tm.RelayHealth(
        forwarding=False, dev_forwarding=True, nat=False, device_up=True
    )

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), both(net, relay_pf, client_pf):
            answer = await ask(net, "relay_health")
            health = tm.pull_health(answer["health"])
            assert health.forwarding is False and health.nat is False
            assert health.device == "gtr0" and health.device_up is True
            assert health.store is None  # no shared store
            assert health.age is not None and health.age < LIMIT
            assert answer["relay"] == f"127.0.0.1:{net.port}"
            # The edge looked at its own device, NAT table and routes.
            device, ipv6, table, routes = relay_pf.health_asked[0]
            assert (device, ipv6, table) == ("gtr0", False, "gtun_gtr0")
            assert routes == (ip_network("10.66.0.0/24"),)
            # A later look is what a later answer says.
            relay_pf.health = replace(relay_pf.health, forwarding=True)

            async def healed() -> bool:
                answer = await ask(net, "relay_health")
                return tm.pull_health(answer["health"]).forwarding is True

            while not await healed():
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_status_says_what_the_client_was_started_with(net: Net, platforms: Any) -> None:
    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), both(net, platforms(), platforms()):
            status = await ask(net, "status")
            assert status["server"] == f"127.0.0.1:{net.port}"
            assert status["server_public_key"] == net.public("relay")
            assert status["transport_configured"] == "udp"
            assert status["config_file"] == str(net.tmp / "c1.toml")
            assert status["device"] == "gtc0"
            assert status["relays"] == [net.public("relay")]

    asyncio.run(scenario())


def test_not_connected_is_said_at_once(net: Net, platforms: Any) -> None:
    """No relay runs: the command answers why, without waiting for the relay."""
    net.write_client(port=free_port())

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with running(start_client(net, platforms())):
                answer = await ask(net, "relay_health")
                assert answer == {"health": None, "reason": "not connected to the relay"}

    asyncio.run(scenario())


def test_an_old_relay_is_said_to_be_old(
    net: Net, platforms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that grants no health capability (an older gtun) is never asked."""
    grant = tm.relay_caps
    monkeypatch.setattr(
        tm, "relay_caps", lambda request, **kw: replace(grant(request, **kw), health=False)
    )

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), both(net, platforms(), platforms()) as (server, _):
            answer = await ask(net, "relay_health")
            assert answer["health"] is None and "older gtun" in answer["reason"]
            assert server.relay is not None
            assert server.relay.drops["not_negotiated"] == 0  # nothing was sent

    asyncio.run(scenario())


def test_an_unanswered_request_gives_up_in_time(net: Net, platforms: Any) -> None:
    """The relay's answers are lost: the command says so after HEALTH_WAIT."""

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), both(net, platforms(), platforms()) as (server, _):
            assert server.relay is not None
            server.relay._answer_health = lambda *args: None  # type: ignore[method-assign]
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = await ask(net, "relay_health")
            waited = loop.time() - started
            assert answer["health"] is None and "did not answer" in answer["reason"]
            assert HEALTH_WAIT <= waited < HEALTH_WAIT + 2

    asyncio.run(scenario())


# --- the readers behind LinuxPlatform.relay_health, over a made-up /proc and /sys -------


def test_sysctl_and_link_readers(tmp_path: Path) -> None:
    from gtun.system import health as hostcheck

    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("1\n")
    assert hostcheck.sysctl_on("net/ipv4/ip_forward", tmp_path) is True
    (tmp_path / "net/ipv4/ip_forward").write_text("0\n")
    assert hostcheck.sysctl_on("net/ipv4/ip_forward", tmp_path) is False
    assert hostcheck.sysctl_on("net/ipv6/conf/all/forwarding", tmp_path) is None
    (tmp_path / "gtun0").mkdir()
    (tmp_path / "gtun0/flags").write_text("0x1091\n")
    assert hostcheck.link_up("gtun0", tmp_path) is True
    (tmp_path / "gtun0/flags").write_text("0x1090\n")
    assert hostcheck.link_up("gtun0", tmp_path) is False
    assert hostcheck.link_up("gone0", tmp_path) is False  # no device: not up
    (tmp_path / "gtun0/flags").write_text("garbage\n")
    assert hostcheck.link_up("gtun0", tmp_path) is None
