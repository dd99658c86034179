"""Relays on the shared store: two relay daemons in-process (as tests/test_daemons.py:
real UDP on 127.0.0.1, fake devices and platform) on one PostgreSQL database.  A peer
added through `gtun peer add` beside one relay reaches the other through NOTIFY, with no
SIGHUP; the store stopped and started again under a relay with a client flowing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.app.config import load_server_config
from gtun.app.control import query
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.peers import add_peer, list_peers, remove_peer, set_peer_enabled
from gtun.app.pgstore import PgStore, migrate
from gtun.app.server import Server
from gtun.app.store import StoredPeer
from gtun.errors import ConfigError, GtunError
from gtun.lab.net import write_key
from gtun.lab.postgres import PostgresServer
from test_daemons import Net, exchange, free_port, running, start_client, status, until

LIMIT = 20.0  # seconds any one scenario may take
NOTIFIED_WITHIN = 2.0  # seconds for a change to reach every relay


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


@pytest.fixture
def own_store() -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL server of the test's own (to stop and start), with a migrated
    database; stopped and removed at the end."""
    pg = PostgresServer()
    try:
        pg.start()
        dsn = pg.create_database("gtun")
        migrate(dsn)
        yield pg, dsn
    finally:
        pg.close()


def shared_relays(net: Net, dsn: str, count: int = 2) -> list[Path]:
    """relay.toml (net's, c1 its peer) and relay2.toml... on one store, each with its
    own key, port, control socket and state directory."""
    base = (net.tmp / "relay.toml").read_text()
    first = base.replace("[server]\n", f'[server]\nstore = "{dsn}"\n', 1)
    (net.tmp / "relay.toml").write_text(first)
    paths = [net.tmp / "relay.toml"]
    for n in range(2, count + 1):
        write_key(net.tmp / f"relay{n}.key", generate_private_key())
        text = (
            first.replace(f"127.0.0.1:{net.port}", f"127.0.0.1:{free_port()}")
            .replace('"relay.key"', f'"relay{n}.key"')
            .replace('"relay.sock"', f'"relay{n}.sock"')
            .replace('state_dir = "state"', f'state_dir = "state{n}"')
        )
        (net.tmp / f"relay{n}.toml").write_text(text)
        paths.append(net.tmp / f"relay{n}.toml")
    return paths


def addresses(server: Server) -> dict[str, str]:
    assert server.relay is not None
    relay = server.relay
    return {
        p.data.spec.name: str(p.data.spec.address)
        for p in relay.wg.peers.values()
        if not relay.is_mesh(p)  # the other relays of the mesh
    }


async def within(seconds: float, condition: Any) -> float:
    """Wait for `condition`; how long it took.  Fails after `seconds`."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        await until(condition)
    return time.monotonic() - started


def test_a_peer_added_beside_one_relay_reaches_the_other(
    net: Net, platforms: Any, pg_dsn: str
) -> None:
    migrate(pg_dsn)
    one, two = shared_relays(net, pg_dsn)
    a = Server(load_server_config(one), platforms())
    b = Server(load_server_config(two), platforms())

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), running(a), running(b):
            await within(5, lambda: a.store_up and b.store_up)
            # `gtun peer add` with relay b's config: stored once, heard by both.
            cfg = load_server_config(two)
            text, _ = await asyncio.to_thread(add_peer, cfg, "phone", ("192.0.2.1", 9621))
            took = await within(
                NOTIFIED_WITHIN, lambda: "phone" in addresses(a) and "phone" in addresses(b)
            )
            assert took < NOTIFIED_WITHIN
            assert addresses(a)["phone"] == addresses(b)["phone"]
            assert f"Address = {addresses(a)['phone']}/24" in text
            # `gtun peer disable`, `enable` and `remove` beside relay a: heard by b.
            phone = addresses(a)["phone"]
            await asyncio.to_thread(set_peer_enabled, load_server_config(one), "phone", False)
            await within(
                NOTIFIED_WITHIN,
                lambda: "phone" not in addresses(a) and "phone" not in addresses(b),
            )
            assert set(addresses(b)) == {"c1"}
            await asyncio.to_thread(set_peer_enabled, cfg, "phone", True)
            await within(NOTIFIED_WITHIN, lambda: addresses(b).get("phone") == phone)
            await asyncio.to_thread(remove_peer, cfg, "phone")
            await within(NOTIFIED_WITHIN, lambda: "phone" not in addresses(a))
            with PgStore(pg_dsn, cfg.network) as store:
                assert phone not in store.leases().values()  # the lease went too
                relays = {name for _, name, _ in store.relays()}
                assert relays == {"relay", "relay2"}

    asyncio.run(scenario())


def test_a_peer_in_one_relays_config_is_served_by_every_relay(
    net: Net, platforms: Any, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A [[peers]] entry of one relay's file is put in the store (source: that relay),
    so every relay serves it; removed from the file, it goes from every relay.  The same
    peer in both files (c1) is one row and no clash."""
    caplog.set_level(logging.WARNING, logger="gtun")
    migrate(pg_dsn)
    one, two = shared_relays(net, pg_dsn)
    a = Server(load_server_config(one), platforms())
    b = Server(load_server_config(two), platforms())
    tablet = encode_key(public_key(generate_private_key()))
    entry = (
        f'\n[[peers]]\nname = "tablet"\npublic_key = "{tablet}"\nsubnets = ["192.168.50.0/24"]\n'
    )
    base = one.read_text()

    async def reload(path: Path) -> dict[str, Any]:
        sock = load_server_config(path).control_socket
        return await asyncio.to_thread(query, sock, {"command": "reload"}, 10.0)

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), running(a), running(b):
            await within(5, lambda: a.store_up and b.store_up)
            assert set(addresses(b)) == {"c1"}
            one.write_text(base + entry)
            assert (await reload(one))["ok"]
            await within(NOTIFIED_WITHIN, lambda: "tablet" in addresses(b))
            assert addresses(a)["tablet"] == addresses(b)["tablet"]
            assert b.relay is not None
            spec = b.relay.peer_by_name("tablet")
            assert spec is not None and [str(n) for n in spec.data.spec.subnets] == [
                "192.168.50.0/24"
            ]
            # Beside relay b it is listed as relay a's, and cannot be changed there.
            cfg_b = load_server_config(two)
            rows = {r[0]: r for r in await asyncio.to_thread(list_peers, cfg_b)}
            assert rows["tablet"][2] == "config of relay relay"
            with pytest.raises(ConfigError, match=r"\[\[peers\]\] of relay relay"):
                await asyncio.to_thread(remove_peer, cfg_b, "tablet")
            # Out of a's file: gone from both, and its lease with it.
            one.write_text(base)
            assert (await reload(one))["ok"]
            await within(NOTIFIED_WITHIN, lambda: "tablet" not in addresses(b))
            with PgStore(pg_dsn, cfg_b.network) as store:
                assert tablet not in store.leases()
                assert [p.name for p in store.peers()] == ["c1"]
            assert not [r for r in caplog.records if "not shared" in r.getMessage()]

    asyncio.run(scenario())


def test_the_store_goes_away_and_comes_back(
    net: Net,
    platforms: Any,
    caplog: pytest.LogCaptureFixture,
    own_store: tuple[PostgresServer, str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="gtun")
    pg, dsn = own_store
    (path,) = shared_relays(net, dsn, count=1)
    cfg = load_server_config(path)
    relay_pf, client_pf = platforms(), platforms()
    server = Server(cfg, relay_pf)
    client = start_client(net, client_pf)

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT + 20), running(server), running(client):
            await within(5, lambda: client.applied is not None and server.store_up)
            await exchange(relay_pf, client_pf, b"before")
            await asyncio.to_thread(pg.stop)
            await within(5, lambda: server.store_up is False)
            # The session flows; new peers are refused, said once in the log.
            await exchange(relay_pf, client_pf, b"while the store is away")
            for _ in range(3):
                answer = await asyncio.to_thread(
                    query, cfg.control_socket, {"command": "reload"}, 10.0
                )
                assert answer["ok"] is False and "unavailable" in answer["error"]
            with pytest.raises(GtunError, match="unavailable"):
                await asyncio.to_thread(add_peer, cfg, "late", ("192.0.2.1", 9621))
            await asyncio.sleep(2.5)  # a few reconnection attempts of the watch
            await exchange(relay_pf, client_pf, b"still")
            errors = [
                r
                for r in caplog.records
                if r.levelno >= logging.ERROR and "unavailable" in r.getMessage()
            ]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert "refusing new peers and leases" in errors[0].getMessage()
            # Back: re-LISTEN, catch up, and new peers join again.
            await asyncio.to_thread(pg.start)
            await within(15, lambda: server.store_up is True)
            with PgStore(dsn, cfg.network) as store:
                phone = encode_key(public_key(generate_private_key()))
                store.add_peer(StoredPeer("phone", phone))
                await within(NOTIFIED_WITHIN + 1, lambda: "phone" in addresses(server))
                leases = store.leases()
            assert len(set(leases.values())) == len(leases)
            assert addresses(server)["phone"] != addresses(server)["c1"]
            await exchange(relay_pf, client_pf, b"after")
            rst = await status(cfg.control_socket)
            assert [p["name"] for p in rst["peers"]] == ["c1", "phone"]
            assert any("is back" in r.getMessage() for r in caplog.records)

    asyncio.run(scenario())


def test_the_first_use_of_the_store_after_its_return_finds_it_up(
    net: Net,
    platforms: Any,
    caplog: pytest.LogCaptureFixture,
    own_store: tuple[PostgresServer, str],
) -> None:
    """The relay's own connection died with the server while nothing used it: the
    catch-up after the return must not find that out and say the store is away again
    (a second error line, and new peers refused until the next liveness check)."""
    caplog.set_level(logging.DEBUG, logger="gtun")
    pg, dsn = own_store
    (path,) = shared_relays(net, dsn, count=1)
    cfg = load_server_config(path)
    server = Server(cfg, platforms())

    def down_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.ERROR and "refusing new peers" in r.getMessage()
        ]

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT + 20), running(server):
            await within(5, lambda: server.store_up)
            await asyncio.to_thread(pg.stop)
            await within(5, lambda: server.store_up is False)
            await asyncio.to_thread(pg.start)  # nothing used the store meanwhile
            await within(15, lambda: server.store_up is True)
            with PgStore(dsn, cfg.network) as store:
                store.add_peer(StoredPeer("phone", encode_key(public_key(generate_private_key()))))
            await within(NOTIFIED_WITHIN + 1, lambda: "phone" in addresses(server))
            assert server.store_up is True
            assert len(down_lines()) == 1, down_lines()

    asyncio.run(scenario())


def with_endpoints(paths: list[Path]) -> None:
    """Each relay's `endpoint`: its own listen address (so the others can reach it)."""
    for path in paths:
        text = path.read_text()
        port = text.split('listen = "127.0.0.1:')[1].split('"')[0]
        path.write_text(text.replace("[server]\n", f'[server]\nendpoint = "127.0.0.1:{port}"\n', 1))


def held_at(server: Server, name: str) -> str | None:
    """The relay that `server` says holds peer `name`'s session (None: here)."""
    assert server.relay is not None
    peer = server.relay.peer_by_name(name)
    return None if peer is None else server.relay.presence_of(peer)


def test_a_session_that_came_while_the_store_was_away_is_told_when_it_returns(
    net: Net, platforms: Any, own_store: tuple[PostgresServer, str]
) -> None:
    """A client joins relay a while the store is away (a configured peer is leased at
    start, so it may): its presence cannot be written then.  When the store is back,
    relay b learns that the client is at a, without waiting for anything else to
    happen."""
    pg, dsn = own_store
    paths = shared_relays(net, dsn)
    with_endpoints(paths)
    a = Server(load_server_config(paths[0]), platforms())
    b = Server(load_server_config(paths[1]), platforms())
    client = start_client(net, platforms())

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT + 20), running(a), running(b):
            await within(5, lambda: a.store_up and b.store_up)
            await asyncio.to_thread(pg.stop)
            await within(5, lambda: a.store_up is False and b.store_up is False)
            async with running(client):
                await within(5, lambda: client.applied is not None)
                assert held_at(a, "c1") is None  # here, as far as a knows
                await asyncio.to_thread(pg.start)
                await within(15, lambda: a.store_up is True and b.store_up is True)
                await within(NOTIFIED_WITHIN + 1, lambda: held_at(b, "c1") == "relay")

    asyncio.run(scenario())


def test_relays_feed_their_mesh_and_presence_from_the_store(
    net: Net, platforms: Any, pg_dsn: str
) -> None:
    """Each relay registers itself (name, key, endpoint, routes); every relay makes the
    others its mesh through NOTIFY, and a client's session completing at one relay is
    the presence every other relay reads."""
    migrate(pg_dsn)
    paths = shared_relays(net, pg_dsn)
    with_endpoints(paths)
    a = Server(load_server_config(paths[0]), platforms())
    b = Server(load_server_config(paths[1]), platforms())
    client = start_client(net, platforms())

    def mesh(server: Server) -> set[str]:
        assert server.relay is not None
        return {p.data.name for p in server.relay.wg.peers.values() if server.relay.is_mesh(p)}

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT), running(a), running(b), running(client):
            await within(5, lambda: mesh(a) == {"relay2"} and mesh(b) == {"relay"})
            assert a.relay is not None and b.relay is not None
            assert (a.relay.name, b.relay.name) == ("relay", "relay2")
            await within(5, lambda: client.applied is not None)
            await within(NOTIFIED_WITHIN + 1, lambda: held_at(b, "c1") == "relay")
            assert held_at(a, "c1") is None  # here
            rst = await status(b.cfg.control_socket)
            assert [r["name"] for r in rst["mesh"]] == ["relay"]
            assert rst["relay_name"] == "relay2"
            assert [p["relay"] for p in rst["peers"] if p["name"] == "c1"] == ["relay"]
            # The mesh session between the relays comes up (keepalives, initiations).
            await within(10, lambda: all(p.last_received is not None for p in mesh_peers(a)))

    def mesh_peers(server: Server) -> list[Any]:
        assert server.relay is not None
        return [p for p in server.relay.wg.peers.values() if server.relay.is_mesh(p)]

    asyncio.run(scenario())
