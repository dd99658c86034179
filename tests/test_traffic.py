"""Traffic history, sources, quotas and settings on SQLite (tier 1: the pure fold of
app/traffic.py and the store in tmp_path), `gtun peer quota` and `peer list`, and tier 2:
in-process relays (tests/test_daemons.py's way) whose history survives a restart and
that disable a peer over its quota, with the month and quota metrics."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from calendar import timegm
from pathlib import Path
from typing import Any

import pytest

from gtun.app.config import load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.metrics import RelayCollector
from gtun.app.peers import format_size, list_peers, parse_size, set_peer_quota
from gtun.app.peerset import STATE_FILE
from gtun.app.store import (
    KEEP,
    MAX_SOURCES,
    PERIODS,
    SCHEMA_VERSION,
    SOURCES_KEEP,
    Source,
    StateStore,
    StoredPeer,
    bucket_start,
)
from gtun.app.traffic import QUOTA_REASON, enforce_quotas, fold, quota_changes
from gtun.cli import main
from gtun.errors import ConfigError
from test_daemons import LIMIT, Net, configured, exchange, running, start_relay, until
from test_metrics import scrape, value

T = float(timegm((2026, 3, 15, 13, 37, 42)))  # 2026-03-15 13:37:42 UTC


def utc(*when: int) -> float:
    return float(timegm(when))


# --- tier 1: buckets and the fold ---------------------------------------------------------


def test_bucket_start_is_utc() -> None:
    assert bucket_start("minute", T) == utc(2026, 3, 15, 13, 37, 0)
    assert bucket_start("hour", T) == utc(2026, 3, 15, 13, 0, 0)
    assert bucket_start("day", T) == utc(2026, 3, 15, 0, 0, 0)
    assert bucket_start("month", T) == utc(2026, 3, 1, 0, 0, 0)
    assert bucket_start("month", utc(2026, 3, 1, 0, 0, 0) - 1) == utc(2026, 2, 1, 0, 0, 0)
    assert bucket_start("minute", T + 0.5) == bucket_start("minute", T)
    with pytest.raises(ValueError, match="unknown period 'week'"):
        bucket_start("week", T)
    assert PERIODS == ("minute", "hour", "day", "month")


def peer(key: str, rx: int, tx: int, endpoint: str | None = "198.51.100.7:4000") -> dict[str, Any]:
    return {
        "public_key": key,
        "rx_bytes": rx,
        "tx_bytes": tx,
        "endpoint": endpoint,
        "transport": None if endpoint is None else "udp",
    }


def test_fold_counts_deltas_and_the_sources_that_carried_them() -> None:
    first = fold({}, [peer("a", 100, 40), peer("b", 0, 0), peer("c", 5, 0, None)])
    assert first.deltas == [("a", 100, 40), ("c", 5, 0)]
    assert first.seen == [("a", "198.51.100.7:4000", "udp")]  # c has no endpoint
    assert first.totals == {"a": (100, 40), "b": (0, 0), "c": (5, 0)}
    second = fold(first.totals, [peer("a", 150, 40), peer("b", 0, 0), peer("c", 5, 0, None)])
    assert second.deltas == [("a", 50, 0)]
    assert second.seen == [("a", "198.51.100.7:4000", "udp")]
    # a's counters went down (a worker restarted, or a was re-added): nothing counted,
    # the new value is the base; b is gone.
    third = fold(second.totals, [peer("a", 30, 7), peer("c", 9, 1, None)])
    assert third.deltas == [("c", 4, 1)]
    assert third.totals["a"] == (30, 7) and "b" not in third.totals
    fourth = fold(third.totals, [peer("a", 45, 7)])
    assert fourth.deltas == [("a", 15, 0)]


def test_fold_skips_entries_without_counters() -> None:
    result = fold({}, [{"public_key": "a"}, {"rx_bytes": 3, "tx_bytes": 3}])
    assert result.deltas == [] and result.totals == {}


def test_quota_changes() -> None:
    stored = [
        StoredPeer("over", "k1", quota=1000),
        StoredPeer("under", "k2", quota=1000),
        StoredPeer("none", "k3"),
        StoredPeer("back", "k4", quota=1000, enabled=False, disabled_reason=QUOTA_REASON),
        StoredPeer("still", "k5", quota=10, enabled=False, disabled_reason=QUOTA_REASON),
        StoredPeer("admin", "k6", quota=1000, enabled=False),
        StoredPeer("lifted", "k7", enabled=False, disabled_reason=QUOTA_REASON),
    ]
    month = {"k1": (600, 400), "k2": (600, 399), "k3": (10**12, 0), "k4": (1, 1), "k5": (9, 1)}
    month["k6"] = (0, 0)
    assert quota_changes(stored, month) == (["over"], ["back", "lifted"])


def test_sizes() -> None:
    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("50G") == 50 * 1024**3
    assert parse_size("1t") == 1024**4
    assert parse_size("1.5GiB") == 3 * 1024**3 // 2
    assert parse_size("12345") == 12345
    assert parse_size("none") is None
    for bad in ("", "G", "-5", "5X", "five"):
        with pytest.raises(ConfigError, match="powers of 1024"):
            parse_size(bad)
    assert format_size(50 * 1024**3) == "50G" and format_size(1536 * 1024**2) == "1536M"
    assert format_size(1000) == "1000" and format_size(0) == "0"


# --- tier 1: the SQLite store ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = StateStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def test_traffic_adds_into_every_period(store: StateStore) -> None:
    store.add_traffic([("a", 100, 10), ("b", 1, 2), ("z", 0, 0)], T)
    store.add_traffic([("a", 5, 5)], T + 1)  # the same minute
    store.add_traffic([("a", 7, 0)], T + 60)  # the next minute, same hour
    assert store.traffic("a", "minute", 0) == [
        (bucket_start("minute", T), 105, 15),
        (bucket_start("minute", T + 60), 7, 0),
    ]
    assert store.traffic("a", "minute", bucket_start("minute", T + 60)) == [
        (bucket_start("minute", T + 60), 7, 0)
    ]
    for period in ("hour", "day", "month"):
        assert store.traffic("a", period, 0) == [(bucket_start(period, T), 112, 15)]
    assert store.totals("month", bucket_start("month", T)) == {"a": (112, 15), "b": (1, 2)}
    assert store.totals("day", bucket_start("day", T) - 86400) == {}
    assert store.traffic("z", "minute", 0) == []  # nothing added, no row
    with pytest.raises(ValueError):
        store.traffic("a", "fortnight", 0)


def test_old_buckets_are_pruned_so_the_size_is_bounded(store: StateStore) -> None:
    keys = [f"k{i}" for i in range(5)]
    start = utc(2026, 1, 1, 0, 0, 0)
    # Two days of a fold every 10 minutes (injected time): minute buckets older than a
    # day go, the others are all kept.
    t = start
    while t < start + 2 * 86400:
        store.add_traffic([(k, 1, 1) for k in keys], t)
        t += 600
    now = t - 600
    minutes = store.traffic("k0", "minute", 0)
    assert minutes and minutes[0][0] >= now - KEEP["minute"] - 60
    assert len(minutes) <= KEEP["minute"] // 600 + 2
    assert len(store.traffic("k0", "hour", 0)) == 48
    assert len(store.traffic("k0", "day", 0)) == 2
    # Far later: only the month bucket of long ago stays until its KEEP passes.
    later = start + KEEP["day"] + 3 * 86400
    store.add_traffic([("k0", 1, 1)], later)
    assert [b[0] for b in store.traffic("k1", "day", 0)] == []
    assert [b[0] for b in store.traffic("k1", "month", 0)] == [start]
    assert store.traffic("k1", "hour", 0) == []
    store.add_traffic([("k0", 1, 1)], start + KEEP["month"] + 86400 * 40)
    assert store.traffic("k1", "month", 0) == []
    rows = store._query("SELECT DISTINCT public_key FROM traffic")
    assert rows == [("k0",)]  # the others' buckets all went


def test_pruning_runs_at_most_once_a_minute(store: StateStore) -> None:
    store.add_traffic([("a", 1, 1)], T)  # pruned (nothing to prune) at T
    old = T - 10 * 86400
    store._db.execute("INSERT INTO traffic VALUES ('old', 'minute', ?, 1, 1)", (old,))
    store.add_traffic([("a", 1, 1)], T + 30)
    assert store.traffic("old", "minute", 0) == [(old, 1, 1)]  # not yet: 30 s after
    store.add_traffic([("a", 1, 1)], T + 60)
    assert store.traffic("old", "minute", 0) == []


def test_sources_keep_first_seen_and_at_most_twenty(store: StateStore) -> None:
    store.note_sources("", [("a", "198.51.100.7:4000", "udp")], 100.0)
    store.note_sources("", [("a", "198.51.100.7:4000", "udp"), ("b", "x:1", "tcp")], 200.0)
    assert store.sources("a") == [Source("198.51.100.7:4000", "udp", "", 100.0, 200.0)]
    assert store.sources("b") == [Source("x:1", "tcp", "", 200.0, 200.0)]
    for i in range(MAX_SOURCES + 5):
        store.note_sources("r1", [("a", f"203.0.113.{i}:9", "udp")], 1000.0 + i)
    got = store.sources("a")
    assert len(got) == MAX_SOURCES
    assert got[0] == Source(f"203.0.113.{MAX_SOURCES + 4}:9", "udp", "r1", 1024.0, 1024.0)
    assert [s.last_seen for s in got] == sorted((s.last_seen for s in got), reverse=True)
    assert all(s.endpoint != "198.51.100.7:4000" for s in got)  # the oldest went
    assert len(store.sources("b")) == 1  # another peer's are its own


def test_sources_unseen_for_the_hourly_history_are_pruned(store: StateStore) -> None:
    # A removed peer's sources, never seen again, go with the history's pruning.
    store.note_sources("", [("gone", "198.51.100.9:1", "udp")], T)
    store.note_sources("", [("kept", "198.51.100.8:1", "udp")], T + SOURCES_KEEP - 10)
    store.add_traffic([("kept", 1, 1)], T + SOURCES_KEEP + 1)
    assert store.sources("gone") == []
    assert len(store.sources("kept")) == 1


def test_quota_reason_and_settings(store: StateStore) -> None:
    store.add_peer(StoredPeer("p", "k"))
    assert store.set_quota("p", 5 * 1024**3)
    assert not store.set_quota("nobody", 1)
    assert store.peers()[0].quota == 5 * 1024**3
    assert store.set_enabled("p", False, QUOTA_REASON)
    assert store.peers()[0].disabled_reason == "quota" and not store.peers()[0].enabled
    assert store.set_enabled("p", True)
    assert store.peers()[0].disabled_reason is None and store.peers()[0].enabled
    assert store.set_enabled("p", False)
    assert store.peers()[0].disabled_reason is None
    assert store.set_quota("p", None) and store.peers()[0].quota is None
    assert store.get_setting("console_admin") is None
    store.set_setting("console_admin", "scrypt$1")
    store.set_setting("console_admin", "scrypt$2")
    assert store.get_setting("console_admin") == "scrypt$2"


def test_quota_disable_and_enable_through_the_fold(store: StateStore) -> None:
    store.add_peer(StoredPeer("phone", "kp", quota=1000))
    store.add_peer(StoredPeer("laptop", "kl", quota=1000))
    march, april = utc(2026, 3, 30, 12, 0, 0), utc(2026, 4, 1, 0, 0, 5)
    last: dict[str, tuple[int, int]] = {}
    result = fold(last, [peer("kp", 700, 300), peer("kl", 10, 10)])
    store.add_traffic(result.deltas, march)
    done = enforce_quotas(store, march)
    assert (done.disabled, done.enabled) == (["phone"], [])
    assert done.month == {"kp": (700, 300), "kl": (10, 10)}
    by_name = {p.name: p for p in store.peers()}
    assert not by_name["phone"].enabled and by_name["phone"].disabled_reason == "quota"
    assert by_name["laptop"].enabled
    assert (enforce_quotas(store, march).disabled, enforce_quotas(store, march).enabled) == (
        [],
        [],
    )
    # A raised quota lets it back in; lowered again, out; a new month, back in.
    store.set_quota("phone", 2000)
    assert enforce_quotas(store, march).enabled == ["phone"]
    store.set_quota("phone", 1000)
    assert enforce_quotas(store, march).disabled == ["phone"]
    done = enforce_quotas(store, april)
    assert done.enabled == ["phone"] and done.month == {}
    assert all(p.enabled and p.disabled_reason is None for p in store.peers())


def test_a_schema_2_state_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE schema_version (version INTEGER NOT NULL);"
        "INSERT INTO schema_version VALUES (2);"
        "CREATE TABLE leases (public_key TEXT PRIMARY KEY, address TEXT UNIQUE NOT NULL,"
        " name TEXT, updated REAL);"
        "CREATE TABLE peers (name TEXT PRIMARY KEY, public_key TEXT UNIQUE NOT NULL,"
        " address TEXT, subnets TEXT, created REAL, enabled INTEGER NOT NULL DEFAULT 1,"
        " preshared_key TEXT);"
        "CREATE TABLE endpoints (relay TEXT NOT NULL, public_key TEXT NOT NULL,"
        " endpoint TEXT NOT NULL, updated REAL, PRIMARY KEY (relay, public_key));"
        "INSERT INTO peers (name, public_key, subnets, created, enabled, preshared_key)"
        " VALUES ('old', 'k', '[]', 1, 0, 'psk');"
        "INSERT INTO leases VALUES ('k', '10.66.0.9', 'old', 1);"
    )
    db.commit()
    db.close()
    with StateStore(path) as store:
        assert store.peers() == [StoredPeer("old", "k", enabled=False, preshared_key="psk")]
        assert store.leases() == {"k": "10.66.0.9"}
        assert store.set_quota("old", 10)
        store.add_traffic([("k", 1, 2)], T)
        store.note_sources("", [("k", "a:1", "udp")], T)
        store.set_setting("x", "y")
        assert store.traffic("k", "day", 0) == [(bucket_start("day", T), 1, 2)]
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()
    assert SCHEMA_VERSION == 3
    with StateStore(path) as store:  # opened again: nothing to do, nothing lost
        assert store.peers()[0].quota == 10 and store.get_setting("x") == "y"


# --- the CLI --------------------------------------------------------------------------------


def test_peer_quota_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = Net(tmp_path)
    cfg_path = tmp_path / "relay.toml"
    cfg = load_server_config(cfg_path)
    with StateStore(cfg.state_dir / STATE_FILE) as store:
        store.add_peer(StoredPeer("phone", "kp"))
        store.add_peer(StoredPeer("tab", "kt", enabled=False, disabled_reason="quota"))
    assert main(["peer", "quota", "phone", "50G", "-c", str(cfg_path)]) == 0
    assert "peer phone has a quota of 50G/month" in capsys.readouterr().err
    assert main(["peer", "list", "-c", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("phone"))
    assert "stored, quota 50G/month" in line
    line = next(x for x in out.splitlines() if x.startswith("tab"))
    assert "disabled (over its quota)" in line
    assert main(["peer", "quota", "phone", "none", "-c", str(cfg_path)]) == 0
    assert "no quota" in capsys.readouterr().err
    rows = {r[0]: r for r in list_peers(cfg)}
    assert "quota" not in rows["phone"][2]
    # A [[peers]] peer, an unknown one and a bad size: exit 2, one line.
    assert main(["peer", "quota", "c1", "1G", "-c", str(cfg_path)]) == 2
    assert "[[peers]]" in capsys.readouterr().err
    assert main(["peer", "quota", "ghost", "1G", "-c", str(cfg_path)]) == 2
    assert "no stored peer named ghost" in capsys.readouterr().err
    assert main(["peer", "quota", "phone", "lots", "-c", str(cfg_path)]) == 2
    assert "powers of 1024" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="negative"):
        set_peer_quota(cfg, "phone", -1)
    # tell=False: the note says nothing of a relay (none was asked).
    assert set_peer_quota(cfg, "phone", 1, tell=False) == ""
    assert net.peers == ["c1"]


def test_peer_quota_help_says_powers_of_1024(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["peer", "quota", "--help"])
    assert "powers of 1024" in capsys.readouterr().out


# --- tier 2: in-process relays ----------------------------------------------------------


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


def test_history_survives_a_relay_restart(net: Net, platforms: Any) -> None:
    cfg = load_server_config(net.tmp / "relay.toml")
    c1 = net.public("c1")

    def month_total() -> tuple[int, int]:
        with StateStore(cfg.state_dir / STATE_FILE) as store:
            return store.totals("month", bucket_start("month", _now())).get(c1, (0, 0))

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            relay_pf, client_pf = platforms(), platforms()
            async with configured(net, relay_pf, client_pf) as (server, _):
                await exchange(relay_pf, client_pf, b"first run" * 50)
                held = next(p for p in (await server.status())["peers"] if p["name"] == "c1")
            first = await asyncio.to_thread(month_total)
            # Written at stop: what the relay counted (a keepalive may come after).
            assert first[0] >= held["rx_bytes"] > 450 and first[1] >= held["tx_bytes"] > 450
            with StateStore(cfg.state_dir / STATE_FILE) as store:
                sources = store.sources(c1)
                assert [(s.endpoint.split(":")[0], s.transport) for s in sources] == [
                    ("127.0.0.1", "udp")
                ]
                assert sum(b[1] for b in store.traffic(c1, "minute", 0)) == first[0]
            relay_pf, client_pf = platforms(), platforms()
            async with configured(net, relay_pf, client_pf) as (server, _):
                await exchange(relay_pf, client_pf, b"second run" * 50)
            second = await asyncio.to_thread(month_total)
            assert second[0] > first[0] + 500 and second[1] > first[1] + 500

    asyncio.run(scenario())


def test_a_peer_removed_between_folds_keeps_its_traffic(net: Net, platforms: Any) -> None:
    # c1 leaves the config and the relay reloads well before its next fold (10 s): the
    # bytes it carried since the last one are in the history all the same.
    cfg = load_server_config(net.tmp / "relay.toml")
    c1 = net.public("c1")

    def month_total() -> tuple[int, int]:
        with StateStore(cfg.state_dir / STATE_FILE) as store:
            return store.totals("month", bucket_start("month", _now())).get(c1, (0, 0))

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            relay_pf, client_pf = platforms(), platforms()
            async with configured(net, relay_pf, client_pf) as (server, _):
                await exchange(relay_pf, client_pf, b"carried, then removed" * 40)
                held = next(p for p in (await server.status())["peers"] if p["name"] == "c1")
                assert await asyncio.to_thread(month_total) == (0, 0)  # no fold yet
                net.peers.remove("c1")
                net.write_relay()
                answer = await server.reload()
                assert answer["ok"] and answer["removed"] == ["c1"], answer
                total = await asyncio.to_thread(month_total)
                assert total[0] >= held["rx_bytes"] > 800 and total[1] >= held["tx_bytes"] > 800

    asyncio.run(scenario())


def _now() -> float:
    import time

    return time.time()


def test_relay_disables_a_peer_over_its_quota(net: Net, platforms: Any) -> None:
    cfg = load_server_config(net.tmp / "relay.toml")
    with StateStore(cfg.state_dir / STATE_FILE) as store:
        store.add_peer(StoredPeer("hog", net.public("c2"), quota=1000))
        store.add_peer(StoredPeer("fine", encode_key(public_key(generate_private_key()))))
        store.set_quota("fine", 10**9)
        store.add_traffic([(net.public("c2"), 900, 200)], _now())

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            server = start_relay(net, platforms())
            server.fold_interval = 0.05
            async with running(server):
                relay = server.relay
                assert relay is not None
                await until(lambda: relay.peer_by_name("hog") is None)
                assert relay.peer_by_name("fine") is not None
                await until(lambda: server.quotas.get("hog") == (1000, True))
                assert server.month_bytes["hog"] == 1100
                samples = scrape(RelayCollector(relay, _now, quotas=server.quota_rows))
                assert value(samples, "gtun_peer_month_bytes", peer="hog") == 1100
                assert value(samples, "gtun_peer_quota_bytes", peer="hog") == 1000
                assert value(samples, "gtun_peer_over_quota", peer="hog") == 1
                assert value(samples, "gtun_peer_over_quota", peer="fine") == 0
                assert value(samples, "gtun_peer_month_bytes", peer="c1") == 0
                # Raised: the next fold serves it again.
                await asyncio.to_thread(set_peer_quota, cfg, "hog", 5000, tell=False)
                await until(lambda: relay.peer_by_name("hog") is not None)
                assert server.quotas["hog"] == (5000, False)

    asyncio.run(scenario())
    rows = {r[0]: r for r in list_peers(cfg)}
    assert rows["hog"][2] == "stored, quota 5000/month"


def test_a_fold_that_cannot_write_is_retried(net: Net, platforms: Any, caplog: Any) -> None:
    """A store that refuses the history (a full disk, say) is said once; the deltas
    are written by the next fold that works, and the relay serves on."""
    caplog.set_level(logging.INFO, logger="gtun")
    cfg = load_server_config(net.tmp / "relay.toml")
    c1 = net.public("c1")

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            relay_pf, client_pf = platforms(), platforms()
            async with configured(net, relay_pf, client_pf) as (server, _):
                server.fold_interval = 3600.0
                real = server.store.add_traffic
                calls = 0

                def failing(*args: Any) -> None:
                    nonlocal calls
                    calls += 1
                    raise ConfigError("disk full (test)")

                server.store.add_traffic = failing  # type: ignore[method-assign]
                await exchange(relay_pf, client_pf, b"lost?" * 100)
                await server.fold_traffic()
                await server.fold_traffic()
                assert calls == 2
                server.store.add_traffic = real  # type: ignore[method-assign]
                await server.fold_traffic()
                with StateStore(cfg.state_dir / STATE_FILE) as store:
                    month = store.totals("month", bucket_start("month", _now()))
                # Everything counted since the start, written once.
                assert month[c1] == server._fold_last[c1] and month[c1][0] > 500

    asyncio.run(scenario())
    said = [r for r in caplog.records if "cannot write the traffic history" in r.getMessage()]
    assert len(said) == 1
    assert any("written again" in r.getMessage() for r in caplog.records)
