"""The address pool at scale (issue 11): a whole peer set leased in one transaction,
leases unique per address, a full pool refusing only the peers that do not fit."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from gtun.app.config import load_server_config
from gtun.app.keys import encode_key
from gtun.app.peerset import read_peers, refused_lines
from gtun.app.store import AddressPool, LeaseWanted, StateStore, StoredPeer
from gtun.errors import ConfigError
from test_cli import server_toml, write_key

NET = IPv4Network("10.66.0.0/24")
SMALL = IPv4Network("10.66.0.0/29")  # hosts .2-.6 for peers; .1 is the relay's


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "gtun.db")
    yield s
    s.close()


def _a(text: str) -> IPv4Address:
    return IPv4Address(text)


def _commits(store: StateStore) -> list[str]:
    seen: list[str] = []
    store._db.set_trace_callback(
        lambda sql: seen.append(sql) if sql.split()[0] in ("BEGIN", "COMMIT") else None
    )
    return seen


def test_a_thousand_keys_in_one_transaction(store: StateStore) -> None:
    pool = AddressPool(IPv4Network("10.66.0.0/20"), store)
    seen = _commits(store)
    got = pool.assign_all([LeaseWanted(f"k{i}", name=f"n{i}") for i in range(1000)])
    assert seen == ["BEGIN IMMEDIATE", "COMMIT"]
    assert not got.refused and len(set(got.addresses.values())) == 1000
    assert got.addresses["k0"] == _a("10.66.0.2") and got.addresses["k999"] == _a("10.66.3.233")
    assert store.leases() == {k: str(a) for k, a in got.addresses.items()}
    # The same set again: one read, nothing written.
    seen.clear()
    again = pool.assign_all([LeaseWanted(f"k{i}", name=f"n{i}") for i in range(1000)])
    assert again.addresses == got.addresses
    assert seen == ["BEGIN IMMEDIATE", "COMMIT"]


def test_leases_are_unique_per_address(store: StateStore) -> None:
    indexes = store._db.execute("PRAGMA index_list(leases)").fetchall()
    columns = {
        store._db.execute(f"PRAGMA index_info({row[1]!r})").fetchone()[2]
        for row in indexes
        if row[2]  # unique
    }
    assert {"public_key", "address"} <= columns
    store.set_lease("k1", "10.66.0.2")
    store.set_lease("k2", "10.66.0.2")  # taken from k1
    assert store.leases() == {"k2": "10.66.0.2"}


def test_fixed_first_previous_kept_released_reused(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    first = pool.assign_all([LeaseWanted(k) for k in ("a", "b", "c", "d")])
    assert [str(first.addresses[k]) for k in "abcd"] == [f"10.66.0.{i}" for i in (2, 3, 4, 5)]
    pool.release("b")
    # "e" takes c's address by config: c moves to the lowest free (b's released one);
    # a and d keep theirs; "f" gets the next free after that.
    got = pool.assign_all(
        [
            LeaseWanted("e", fixed=_a("10.66.0.4"), name="e"),
            LeaseWanted("a"),
            LeaseWanted("c"),
            LeaseWanted("d"),
            LeaseWanted("f"),
        ]
    )
    assert {k: str(v) for k, v in got.addresses.items()} == {
        "e": "10.66.0.4",
        "a": "10.66.0.2",
        "c": "10.66.0.3",
        "d": "10.66.0.5",
        "f": "10.66.0.6",
    }
    assert store.leases() == {k: str(v) for k, v in got.addresses.items()}


def test_a_key_not_asked_for_keeps_its_lease(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    pool.assign_all([LeaseWanted("gone"), LeaseWanted("stays")])
    got = pool.assign_all([LeaseWanted("stays"), LeaseWanted("new")])
    assert got.addresses == {"stays": _a("10.66.0.3"), "new": _a("10.66.0.4")}
    assert store.leases()["gone"] == "10.66.0.2"


def test_a_full_pool_refuses_only_the_excess(store: StateStore) -> None:
    pool = AddressPool(SMALL, store, reserved=[_a("10.66.0.3")])
    pool.assign_all([LeaseWanted("old")])  # .2
    got = pool.assign_all(
        [LeaseWanted("x"), LeaseWanted("old"), LeaseWanted("y"), LeaseWanted("z"), LeaseWanted("w")]
    )
    # .2 is old's, .3 reserved: x .4, y .5, z .6; w does not fit.
    assert {k: str(v) for k, v in got.addresses.items()} == {
        "old": "10.66.0.2",
        "x": "10.66.0.4",
        "y": "10.66.0.5",
        "z": "10.66.0.6",
    }
    assert got.refused == ["w"]
    assert "w" not in store.leases()


def test_fixed_addresses_are_checked_before_anything_is_written(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    for bad in ("10.66.0.1", "10.66.0.0", "10.66.0.255", "10.77.0.2"):
        with pytest.raises(ConfigError):
            pool.assign_all([LeaseWanted("ok"), LeaseWanted("k", fixed=_a(bad))])
    with pytest.raises(ConfigError, match="two keys"):
        pool.assign_all(
            [LeaseWanted("a", fixed=_a("10.66.0.9")), LeaseWanted("b", fixed=_a("10.66.0.9"))]
        )
    assert store.leases() == {}


def test_random_sets_match_one_by_one_assignment(tmp_path: Path) -> None:
    """assign_all() gives what assigning each key alone, in order, gave before."""
    rng = random.Random(11)
    with StateStore(tmp_path / "a.db") as a, StateStore(tmp_path / "b.db") as b:
        b._db.execute("PRAGMA synchronous = OFF")  # a commit per key: no fsync each
        bulk, single = AddressPool(SMALL.supernet(3), a), AddressPool(SMALL.supernet(3), b)
        for _ in range(30):
            keys = rng.sample([f"k{i}" for i in range(80)], rng.randint(1, 70))
            for key in rng.sample(keys, min(3, len(keys))):
                bulk.release(key)
                single.release(key)
            got = bulk.assign_all([LeaseWanted(k) for k in keys])
            expected = {}
            for k in keys:
                try:
                    expected[k] = single.assign(k)
                except Exception:  # noqa: BLE001 - the pool is full: refused
                    single.release(k)
            assert got.addresses == expected
            assert a.leases() == b.leases()


def _config_with_peers(tmp_path: Path, n: int, network: str) -> Path:
    write_key(tmp_path / "server.key")
    peers = "".join(
        f'[[peers]]\nname = "p{i:03d}"\npublic_key = "{encode_key(os.urandom(32))}"\n'
        for i in range(n)
    )
    path = server_toml(tmp_path, peers=peers)
    path.write_text(path.read_text().replace('"10.66.0.0/24"', f'"{network}"'))
    return path


def test_read_peers_names_the_peers_a_full_pool_refused(tmp_path: Path) -> None:
    cfg = load_server_config(_config_with_peers(tmp_path, 8, "10.66.0.0/29"))
    with StateStore(tmp_path / "state" / "gtun.sqlite") as store:
        store.add_peer(StoredPeer("s-stored", encode_key(os.urandom(32)), "10.66.0.6"))
        peerset = read_peers(cfg, store)
    # .6 fixed for the stored peer, .2-.5 for p000-p003; p004-p007 do not fit.
    assert [s.name for s in peerset.specs] == ["s-stored", "p000", "p001", "p002", "p003"]
    assert peerset.refused == ["p004", "p005", "p006", "p007"]
    lines = refused_lines(peerset.refused, cfg.network)
    assert len(lines) == 4 and "p004" in lines[0] and "10.66.0.0/29" in lines[0]
    many = refused_lines([f"p{i}" for i in range(50)], cfg.network)
    assert len(many) == 1 and "50 peers" in many[0] and "p49" in many[0]


def test_ten_thousand_peers_lease_in_one_go(tmp_path: Path) -> None:
    cfg = load_server_config(_config_with_peers(tmp_path, 10_000, "10.64.0.0/18"))
    with StateStore(tmp_path / "state" / "gtun.sqlite") as store:
        seen = _commits(store)
        peerset = read_peers(cfg, store)
        assert len(peerset.specs) == 10_000 and not peerset.refused
        assert len({s.address for s in peerset.specs}) == 10_000
        assert seen.count("COMMIT") == 2  # the stored peers' read, and the leasing


def test_peer_add_into_a_full_pool_fails_and_keeps_nothing(tmp_path: Path) -> None:
    from gtun.app.peers import add_peer
    from gtun.errors import RuntimeFailure

    cfg = load_server_config(_config_with_peers(tmp_path, 5, "10.66.0.0/29"))  # full
    with StateStore(tmp_path / "state" / "gtun.sqlite") as store:
        read_peers(cfg, store)  # the relay ran: its peers hold their leases
    with pytest.raises(RuntimeFailure, match="no free address left in 10.66.0.0/29"):
        add_peer(cfg, "one-more", ("192.0.2.1", 9621))
    with StateStore(tmp_path / "state" / "gtun.sqlite") as store:
        assert store.peers() == []
        assert len(store.leases()) == 5
