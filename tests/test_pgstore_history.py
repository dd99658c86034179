"""Traffic history, sources, quotas, settings, live rows and relays' stats on a real
PostgreSQL server (the session's throwaway server, gtun.lab.postgres; a fresh database
per test): every new method, migration 5 of an older schema through `gtun store
migrate`, pruning, two relays adding into one bucket at once, quota enforcement, and an
in-process relay on the store publishing its sessions and stats."""

from __future__ import annotations

import asyncio
import threading
import time
from calendar import timegm
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gtun.app import pgstore
from gtun.app.pgstore import LIVE_FRESH, SCHEMA_VERSION, LiveRow, PgStore, migrate, schema_version
from gtun.app.store import (
    KEEP,
    MAX_SOURCES,
    PERIODS,
    SOURCES_KEEP,
    Source,
    StoredPeer,
    bucket_start,
)
from gtun.app.traffic import QUOTA_REASON, enforce_quotas
from gtun.cli import main
from test_daemons import LIMIT, Net, configured, exchange, running, start_relay, until
from test_pgstore_relays import shared_relays

NET = IPv4Network("10.66.0.0/24")
T = float(timegm((2026, 3, 15, 13, 37, 42)))


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def store(dsn: str) -> Iterator[PgStore]:
    s = PgStore(dsn, NET)
    yield s
    s.close()


def test_traffic_buckets_and_totals(store: PgStore, dsn: str) -> None:
    store.add_traffic([("a", 100, 10), ("b", 1, 2), ("z", 0, 0)], T)
    store.add_traffic([("a", 5, 5)], T + 1)
    store.add_traffic([("a", 7, 0)], T + 60)
    assert store.traffic("a", "minute", 0) == [
        (bucket_start("minute", T), 105, 15),
        (bucket_start("minute", T + 60), 7, 0),
    ]
    for period in ("hour", "day", "month"):
        assert store.traffic("a", period, 0) == [(bucket_start(period, T), 112, 15)]
    assert store.totals("month", bucket_start("month", T)) == {"a": (112, 15), "b": (1, 2)}
    assert store.traffic("z", "minute", 0) == []
    with pytest.raises(ValueError):
        store.totals("week", 0)
    # Another network in the same database keeps its own.
    with PgStore(dsn, "10.77.0.0/24") as other:
        assert other.totals("month", bucket_start("month", T)) == {}
        other.add_traffic([("a", 1, 1)], T)
    assert store.traffic("a", "month", 0) == [(bucket_start("month", T), 112, 15)]


def test_old_buckets_are_pruned(store: PgStore) -> None:
    start = float(timegm((2026, 1, 1, 0, 0, 0)))
    for i in range(0, 2 * 86400, 1800):
        store.add_traffic([("k0", 1, 1), ("k1", 1, 1)], start + i)
        store._pruned = float("-inf")  # prune at every call here (once a minute really)
    now = start + 2 * 86400 - 1800
    minutes = store.traffic("k1", "minute", 0)
    assert minutes[0][0] >= now - KEEP["minute"] and len(minutes) <= 49
    assert len(store.traffic("k1", "hour", 0)) == 48
    store.add_traffic([("k0", 1, 1)], start + KEEP["month"] + 40 * 86400)
    assert store.traffic("k1", "month", 0) == []
    assert store.traffic("k1", "day", 0) == [] and store.traffic("k1", "minute", 0) == []
    rows = store._rows("SELECT count(*) FROM traffic WHERE public_key = 'k0'")
    assert rows[0][0] <= len(PERIODS) + 1  # now's buckets, and none of two years ago


def test_two_relays_add_into_one_bucket(dsn: str) -> None:
    """Two relays' folds at once, into the same buckets of the same peers (written in
    opposite orders): every byte counted, no deadlock."""
    keys = [f"k{i:02}" for i in range(40)]
    errors: list[BaseException] = []

    def relay(order: list[str]) -> None:
        try:
            with PgStore(dsn, NET) as s:
                for _ in range(20):
                    s.add_traffic([(k, 3, 1) for k in order], T)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=relay, args=(keys,)),
        threading.Thread(target=relay, args=(keys[::-1],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with PgStore(dsn, NET) as s:
        month = s.totals("month", bucket_start("month", T))
        assert month == dict.fromkeys(keys, (2 * 20 * 3, 2 * 20 * 1))
        assert s.traffic("k07", "minute", 0) == [(bucket_start("minute", T), 120, 40)]


def test_sources_unseen_for_the_hourly_history_are_pruned(store: PgStore) -> None:
    store.note_sources("r1", [("gone", "198.51.100.9:1", "udp")], T)
    store.note_sources("r1", [("kept", "198.51.100.8:1", "udp")], T + SOURCES_KEEP - 10)
    store._pruned = float("-inf")
    store.add_traffic([("kept", 1, 1)], T + SOURCES_KEEP + 1)
    assert store.sources("gone") == []
    assert len(store.sources("kept")) == 1


def test_sources(store: PgStore) -> None:
    store.note_sources("r1", [("a", "198.51.100.7:4000", "udp")], 100.0)
    store.note_sources("r2", [("a", "198.51.100.7:4000", "udp")], 150.0)
    store.note_sources("r1", [("a", "198.51.100.7:4000", "udp")], 200.0)
    assert store.sources("a") == [
        Source("198.51.100.7:4000", "udp", "r1", 100.0, 200.0),
        Source("198.51.100.7:4000", "udp", "r2", 150.0, 150.0),
    ]
    for i in range(MAX_SOURCES + 3):
        store.note_sources("r1", [("a", f"203.0.113.{i}:9", "tcp")], 1000.0 + i)
    got = store.sources("a")
    assert len(got) == MAX_SOURCES
    assert got[0] == Source(f"203.0.113.{MAX_SOURCES + 2}:9", "tcp", "r1", 1022.0, 1022.0)
    assert all(s.endpoint != "198.51.100.7:4000" for s in got)
    assert store.sources("b") == []


def test_quota_reason_settings_and_enforcement(store: PgStore, dsn: str) -> None:
    store.add_peer(StoredPeer("phone", "kp", quota=1000))
    store.add_peer(StoredPeer("laptop", "kl"))
    assert store.set_quota("laptop", 10**6) and not store.set_quota("ghost", 1)
    assert {p.name: p.quota for p in store.peers()} == {"phone": 1000, "laptop": 10**6}
    store.add_traffic([("kp", 999, 1), ("kl", 5, 5)], T)
    notified: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {pgstore.CHANNEL}")
        done = enforce_quotas(store, T)
        assert (done.disabled, done.enabled) == (["phone"], [])
        notified = [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)]
    assert notified == [str(NET)]  # every relay hears of it, as of any disable
    phone = next(p for p in store.peers() if p.name == "phone")
    assert not phone.enabled and phone.disabled_reason == QUOTA_REASON
    assert enforce_quotas(store, T).disabled == []
    april = float(timegm((2026, 4, 1, 0, 0, 1)))
    assert enforce_quotas(store, april).enabled == ["phone"]
    phone = next(p for p in store.peers() if p.name == "phone")
    assert phone.enabled and phone.disabled_reason is None
    assert store.get_setting("console_admin") is None
    store.set_setting("console_admin", "scrypt$a")
    store.set_setting("console_admin", "scrypt$b")
    assert store.get_setting("console_admin") == "scrypt$b"
    with PgStore(dsn, "10.77.0.0/24") as other:
        assert other.get_setting("console_admin") is None


def test_live_rows_and_relay_stats(store: PgStore) -> None:
    store.register_relay("KEY1", "r1", "192.0.2.1:9621")
    store.register_relay("KEY2", "r2", None)
    row = LiveRow("a", "r1", "198.51.100.7:4000", "udp", T, 10, 20, 0.0)
    store.publish_live("r1", [row], {"peers": 1, "store_up": True, "mesh": {"r2": True}})
    store.publish_live("r2", [LiveRow("b", "r2", None, None, None, 0, 0, 0.0)], {"peers": 0})
    live = store.live()
    assert set(live) == {"a", "b"}
    clock = store.clock()
    assert live["a"].relay == "r1" and live["a"].rx_bytes == 10 and live["a"].tx_bytes == 20
    assert live["a"].endpoint == "198.51.100.7:4000" and live["a"].last_handshake == T
    assert abs(live["a"].updated - clock) < 5
    # The peer moved to r2: the latest writer wins.
    store.publish_live("r2", [LiveRow("a", "r2", "203.0.113.1:1", "tcp", T + 5, 1, 2, 0.0)], {})
    assert store.live()["a"].relay == "r2" and store.live()["a"].transport == "tcp"
    # A row not refreshed within LIVE_FRESH is not live.
    store._rows(
        "UPDATE live SET updated = now() - make_interval(secs => %s) WHERE public_key = 'b'",
        (LIVE_FRESH + 1,),
    )
    assert set(store.live()) == {"a"}
    store._rows("UPDATE live SET updated = now() - interval '2 days' WHERE public_key = 'b'")
    store.publish_live("r1", [], {"peers": 1, "store_up": True, "mesh": {"r2": True}})
    # another relay's stale row stays
    assert store._rows("SELECT count(*) FROM live WHERE public_key = 'b'") == [(1,)]
    store.publish_live("r2", [], {})  # its own goes
    assert store._rows("SELECT count(*) FROM live WHERE public_key = 'b'") == [(0,)]
    store.relay_alive("KEY1", clock)
    stats = {name: rest for name, *rest in store.relay_stats()}
    assert stats["r1"][0] == "KEY1" and stats["r1"][1] == "192.0.2.1:9621"
    assert stats["r1"][2] is not None and stats["r1"][2] < 5
    assert stats["r1"][3] == {"peers": 1, "store_up": True, "mesh": {"r2": True}}
    assert stats["r2"][2] is None and stats["r2"][3] == {}


def test_an_old_schema_is_migrated_by_gtun_store_migrate(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    with monkeypatch.context() as m:  # a gtun of schema 4
        m.setattr(pgstore, "MIGRATIONS", pgstore.MIGRATIONS[:4])
        m.setattr(pgstore, "SCHEMA_VERSION", 4)
        assert migrate(pg_dsn) == (0, 4)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # what that gtun wrote
        conn.execute(
            "INSERT INTO peers (network, name, public_key, enabled) "
            "VALUES (%s, 'kept', 'kk', false)",
            (str(NET),),
        )
        conn.execute(
            "INSERT INTO leases (network, public_key, address, name) "
            "VALUES (%s, 'kk', '10.66.0.9', 'kept')",
            (str(NET),),
        )
    with pytest.raises(pgstore.StoreSchemaError, match="version 4"):
        PgStore(pg_dsn, NET)
    net = Net(tmp_path)
    (cfg,) = shared_relays(net, pg_dsn, count=1)
    assert main(["store", "migrate", "-c", str(cfg)]) == 0
    assert f"schema version 4 -> {SCHEMA_VERSION}" in capsys.readouterr().out
    assert schema_version(pg_dsn) == SCHEMA_VERSION == 5
    with PgStore(pg_dsn, NET) as s:
        (peer,) = s.peers()
        assert (peer.name, peer.enabled, peer.quota, peer.disabled_reason) == (
            "kept",
            False,
            None,
            None,
        )
        assert s.leases() == {"kk": "10.66.0.9"}
        assert s.set_quota("kept", 7)
        s.add_traffic([("kk", 1, 1)], T)
        assert s.totals("day", bucket_start("day", T)) == {"kk": (1, 1)}


def test_a_relay_on_the_store_publishes_its_sessions(
    tmp_path: Path, pg_dsn: str, platforms: Any
) -> None:
    migrate(pg_dsn)
    net = Net(tmp_path)
    shared_relays(net, pg_dsn, count=1)
    c1 = net.public("c1")

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            relay_pf, client_pf = platforms(), platforms()
            async with configured(net, relay_pf, client_pf) as (server, _):
                await exchange(relay_pf, client_pf, b"to the store" * 40)
                await server.fold_traffic()
                with PgStore(pg_dsn, NET) as s:
                    live = await asyncio.to_thread(s.live)
                    stats = {r[0]: r[4] for r in await asyncio.to_thread(s.relay_stats)}
                    sources = await asyncio.to_thread(s.sources, c1)
                assert live[c1].relay == "relay" and live[c1].rx_bytes > 480
                assert live[c1].transport == "udp" and live[c1].last_handshake is not None
                assert stats["relay"]["peers"] == 1 and stats["relay"]["store_up"] is True
                assert stats["relay"]["rx_bytes"] >= live[c1].rx_bytes
                assert stats["relay"]["handshakes"] >= 1 and stats["relay"]["mesh"] == {}
                assert [(s.relay, s.transport) for s in sources] == [("relay", "udp")]
            # The last fold, at stop, wrote everything counted.
            with PgStore(pg_dsn, NET) as s:
                month = s.totals("month", bucket_start("month", time.time()))
            assert month[c1] == server._fold_last[c1]

    asyncio.run(scenario())


def test_a_relay_on_the_store_disables_a_peer_over_its_quota(
    tmp_path: Path, pg_dsn: str, platforms: Any
) -> None:
    """The fold disables the peer in the store; the NOTIFY reloads the relay (no local
    reload on a shared store), and the peer is served no more."""
    migrate(pg_dsn)
    net = Net(tmp_path)
    shared_relays(net, pg_dsn, count=1)
    hog = net.public("c2")
    with PgStore(pg_dsn, NET) as s:
        s.add_peer(StoredPeer("hog", hog, quota=100))
        s.add_traffic([(hog, 60, 40)], time.time())

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            server = start_relay(net, platforms())
            server.fold_interval = 0.05
            async with running(server):
                relay = server.relay
                assert relay is not None
                await until(lambda: relay.peer_by_name("hog") is None)
                assert server.quotas["hog"] == (100, True)
                with PgStore(pg_dsn, NET) as s:
                    peer = next(p for p in s.peers() if p.name == "hog")
                    assert not peer.enabled and peer.disabled_reason == QUOTA_REASON
                    s.set_quota("hog", None)
                await until(lambda: relay.peer_by_name("hog") is not None)

    asyncio.run(scenario())
