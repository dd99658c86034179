from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from gtun.app.store import SCHEMA_VERSION, AddressPool, StateFileError, StateStore, StoredPeer
from gtun.errors import ConfigError, RuntimeFailure

NET = IPv4Network("10.66.0.0/24")
SMALL = IPv4Network("10.66.0.0/29")  # hosts .1-.6; .1 is the relay's


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gtun.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[StateStore]:
    s = StateStore(db_path)
    yield s
    s.close()


def _a(text: str) -> IPv4Address:
    return IPv4Address(text)


# ---------------------------------------------------------------------------
# StateStore


def test_creates_private_directory_and_file(db_path: Path, store: StateStore) -> None:
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_reopen_keeps_one_schema_row(db_path: Path) -> None:
    StateStore(db_path).close()
    StateStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)


def test_leases(store: StateStore) -> None:
    assert store.get_lease("k1") is None
    store.set_lease("k1", "10.66.0.2", "alice")
    store.set_lease("k2", "10.66.0.3", "bob")
    assert store.get_lease("k1") == "10.66.0.2"
    assert store.leases() == {"k1": "10.66.0.2", "k2": "10.66.0.3"}
    store.set_lease("k1", "10.66.0.4", "alice")
    assert store.get_lease("k1") == "10.66.0.4"
    store.delete_lease("k1")
    store.delete_lease("nobody")
    assert store.leases() == {"k2": "10.66.0.3"}


def test_set_lease_takes_address_from_other_key(store: StateStore) -> None:
    store.set_lease("k1", "10.66.0.2")
    store.set_lease("k2", "10.66.0.2")
    assert store.leases() == {"k2": "10.66.0.2"}


def test_peers(store: StateStore) -> None:
    alice = StoredPeer("alice", "AAAA", "10.66.0.10", ("192.168.88.0/24",))
    bob = StoredPeer("bob", "BBBB")
    store.add_peer(alice)
    store.add_peer(bob)
    assert store.peers() == [alice, bob]
    with pytest.raises(ConfigError, match="name 'alice' already exists"):
        store.add_peer(StoredPeer("alice", "CCCC"))
    with pytest.raises(ConfigError, match="public key already exists"):
        store.add_peer(StoredPeer("carol", "AAAA"))
    store.set_lease("AAAA", "10.66.0.10", "alice")
    assert store.remove_peer("alice") is True
    assert store.remove_peer("alice") is False
    assert store.peers() == [bob]
    assert store.get_lease("AAAA") is None


def test_persists_across_reopen(db_path: Path) -> None:
    with StateStore(db_path) as s:
        s.set_lease("k1", "10.66.0.2", "alice")
        s.add_peer(StoredPeer("alice", "k1", None, ()))
    with StateStore(db_path) as s:
        assert s.leases() == {"k1": "10.66.0.2"}
        assert s.peers() == [StoredPeer("alice", "k1")]


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "gtun.db"
    path.write_bytes(b"this is not an sqlite database at all, " * 100)
    with pytest.raises(StateFileError) as info:
        StateStore(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)


def test_newer_schema_refused(db_path: Path) -> None:
    StateStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateFileError, match="newer gtun"):
        StateStore(db_path)


def test_uncreatable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateFileError) as info:
        StateStore(blocker / "gtun.db")
    assert str(blocker / "gtun.db") in str(info.value)


def test_truncated_file_refused_not_read_half(db_path: Path) -> None:
    with StateStore(db_path) as s:
        for i in range(200):
            s.set_lease(f"k{i}", f"10.66.{i // 250}.{i % 250 + 2}", f"p{i}")
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) - 4096])  # the last page gone
    with pytest.raises(StateFileError, match="corrupt") as info:
        StateStore(db_path)
    assert info.value.exit_code == 2 and str(db_path) in str(info.value)


def test_a_file_truncated_to_nothing_is_refused_not_taken_for_new(db_path: Path) -> None:
    # SQLite opens an empty file as a new database: its leases would go without a word.
    with StateStore(db_path) as s:
        s.set_lease("k1", "10.66.0.2", "alice")
    db_path.write_bytes(b"")
    with pytest.raises(StateFileError, match="empty") as info:
        StateStore(db_path)
    assert info.value.exit_code == 2 and str(db_path) in str(info.value)
    assert db_path.stat().st_size == 0  # left as it was, for its owner to look at
    fresh = db_path.with_name("fresh.db")
    with StateStore(fresh) as s:  # a file gtun creates itself is new, not empty
        assert s.leases() == {}
    with StateStore(fresh) as s:
        assert s.leases() == {}


def test_closed_store_raises_runtime_failure(db_path: Path) -> None:
    s = StateStore(db_path)
    s.close()
    with pytest.raises(RuntimeFailure):
        s.leases()


def test_failed_transaction_rolls_back(store: StateStore) -> None:
    with pytest.raises(KeyError), store.transaction():
        store.set_lease("k1", "10.66.0.2")
        raise KeyError("boom")
    assert store.leases() == {}


_WRITER = """
import sys
from pathlib import Path
from gtun.app.store import StateStore
store = StateStore(Path(sys.argv[1]))
for i in range(50):
    store.set_lease(f"{sys.argv[2]}{i}", f"10.{sys.argv[3]}.0.{i}", "")
store.close()
"""


def test_two_processes_write_at_once(db_path: Path) -> None:
    StateStore(db_path).close()
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(db_path), name, octet], env=env)
        for name, octet in (("a", "1"), ("b", "2"))
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    with StateStore(db_path) as s:
        assert len(s.leases()) == 100


def test_threads_share_a_store(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    results: list[IPv4Address] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(20):
            address = pool.assign(f"t{n}-{i}")
            with lock:
                results.append(address)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 80


# ---------------------------------------------------------------------------
# AddressPool


def test_lowest_free_host_skipping_relay(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    assert pool.assign("k1") == _a("10.66.0.2")
    assert pool.assign("k2") == _a("10.66.0.3")
    assert pool.assign("k1") == _a("10.66.0.2")
    pool.release("k1")
    assert pool.lookup("k1") is None
    assert pool.assign("k3") == _a("10.66.0.2")
    assert pool.lookup("k3") == _a("10.66.0.2")


def test_reserved_addresses_are_skipped(store: StateStore) -> None:
    pool = AddressPool(NET, store, reserved=[_a("10.66.0.2"), _a("10.66.0.4")])
    assert [pool.assign(f"k{i}") for i in range(3)] == [
        _a("10.66.0.3"),
        _a("10.66.0.5"),
        _a("10.66.0.6"),
    ]


def test_exhausted(store: StateStore) -> None:
    pool = AddressPool(SMALL, store)
    got = [pool.assign(f"k{i}") for i in range(5)]
    assert got == [_a(f"10.66.0.{i}") for i in range(2, 7)]
    with pytest.raises(RuntimeFailure) as info:
        pool.assign("one-too-many")
    assert str(info.value) == "address pool 10.66.0.0/29 is exhausted"
    # A key that already holds an address still gets it.
    assert pool.assign("k3") == _a("10.66.0.5")


def test_fixed_address_wins(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    assert pool.assign("dynamic") == _a("10.66.0.2")
    assert pool.assign("fixed", fixed=_a("10.66.0.2"), name="alice") == _a("10.66.0.2")
    assert store.get_lease("dynamic") is None
    assert pool.assign("dynamic") == _a("10.66.0.3")
    assert pool.assign("fixed", fixed=_a("10.66.0.2")) == _a("10.66.0.2")


def test_fixed_address_moves_a_key(store: StateStore) -> None:
    pool = AddressPool(NET, store)
    assert pool.assign("k") == _a("10.66.0.2")
    assert pool.assign("k", fixed=_a("10.66.0.50")) == _a("10.66.0.50")
    assert store.leases() == {"k": "10.66.0.50"}


@pytest.mark.parametrize(
    ("fixed", "fragment"),
    [
        ("10.67.0.2", "outside network 10.66.0.0/24"),
        ("10.66.0.1", "reserved"),
        ("10.66.0.0", "network or broadcast"),
        ("10.66.0.255", "network or broadcast"),
    ],
)
def test_bad_fixed_address(store: StateStore, fixed: str, fragment: str) -> None:
    pool = AddressPool(NET, store)
    with pytest.raises(ConfigError, match=fragment):
        pool.assign("k", fixed=_a(fixed))
    assert store.leases() == {}


def test_leases_survive_a_new_pool_and_reopening(db_path: Path) -> None:
    with StateStore(db_path) as s:
        pool = AddressPool(NET, s)
        assert pool.assign("k1") == _a("10.66.0.2")
        assert pool.assign("k2") == _a("10.66.0.3")
        assert pool.assign("k3") == _a("10.66.0.4")
        pool.release("k1")
        assert AddressPool(NET, s).assign("k3") == _a("10.66.0.4")
    with StateStore(db_path) as s:
        pool = AddressPool(NET, s)
        # Assigned in another order, each key still gets its own address back.
        assert pool.assign("k3") == _a("10.66.0.4")
        assert pool.assign("k2") == _a("10.66.0.3")
        assert pool.assign("k1") == _a("10.66.0.2")


def test_lease_outside_a_changed_network_is_replaced(store: StateStore) -> None:
    assert AddressPool(NET, store).assign("k") == _a("10.66.0.2")
    other = IPv4Network("10.77.0.0/24")
    pool = AddressPool(other, store)
    assert pool.lookup("k") is None
    assert pool.assign("k") == _a("10.77.0.2")
    assert store.leases() == {"k": "10.77.0.2"}


def test_lease_on_a_newly_reserved_address_is_replaced(store: StateStore) -> None:
    assert AddressPool(NET, store).assign("k") == _a("10.66.0.2")
    pool = AddressPool(NET, store, reserved=[_a("10.66.0.2")])
    assert pool.assign("k") == _a("10.66.0.3")


def test_two_pools_on_one_file_never_collide(db_path: Path) -> None:
    # The relay and `gtun peer add` each have their own pool over the same file.
    with StateStore(db_path) as a, StateStore(db_path) as b:
        pool_a, pool_b = AddressPool(NET, a), AddressPool(NET, b)
        got = [pool_a.assign("x"), pool_b.assign("y"), pool_a.assign("z")]
        assert got == [_a("10.66.0.2"), _a("10.66.0.3"), _a("10.66.0.4")]


def test_enabled_column_added_to_an_older_file(db_path: Path) -> None:
    db_path.parent.mkdir(mode=0o700)
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.execute(
            "CREATE TABLE peers (name TEXT PRIMARY KEY, public_key TEXT UNIQUE NOT NULL, "
            "address TEXT, subnets TEXT, created REAL)"
        )
        db.execute("INSERT INTO peers VALUES ('alice', 'AAAA', NULL, '[]', 1.0)")
    with StateStore(db_path) as s:
        assert s.peers() == [StoredPeer("alice", "AAAA")]
        assert s.set_enabled("alice", False) is True
        assert s.set_enabled("nobody", False) is False
        assert s.peers()[0].enabled is False
        s.add_peer(StoredPeer("bob", "BBBB", enabled=False))
        assert [p.enabled for p in s.peers()] == [False, False]
