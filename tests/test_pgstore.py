"""The shared store on a real PostgreSQL server (gtun.lab.postgres, one per session; a
fresh database per test): StateStore's tests that apply, leases handed out by two
processes at once, migrations, the import of a single relay's SQLite state, and NOTIFY."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import psycopg
import pytest

from gtun.app.pgstore import (
    SCHEMA_VERSION,
    PgStore,
    StoreSchemaError,
    StoreUnavailable,
    StoreWatch,
    migrate,
    redact,
    schema_version,
)
from gtun.app.store import AddressPool, LeaseWanted, StateStore, StoredPeer
from gtun.errors import ConfigError, RuntimeFailure

NET = IPv4Network("10.66.0.0/24")
SMALL = IPv4Network("10.66.0.0/29")


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def store(dsn: str) -> Iterator[PgStore]:
    s = PgStore(dsn, NET)
    yield s
    s.close()


def _a(text: str) -> IPv4Address:
    return IPv4Address(text)


# -- schema ------------------------------------------------------------------------------


def test_migrate_is_versioned_and_idempotent(pg_dsn: str) -> None:
    assert schema_version(pg_dsn) == 0
    assert migrate(pg_dsn) == (0, SCHEMA_VERSION)
    assert migrate(pg_dsn) == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert schema_version(pg_dsn) == SCHEMA_VERSION


def test_unmigrated_or_newer_schema_refused(pg_dsn: str) -> None:
    with pytest.raises(StoreSchemaError, match="version 0.*gtun store migrate"):
        PgStore(pg_dsn, NET)
    migrate(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE gtun_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreSchemaError, match="newer|upgrade gtun") as info:
        PgStore(pg_dsn, NET)
    assert info.value.exit_code == 2
    with pytest.raises(StoreSchemaError, match="newer"):
        migrate(pg_dsn)


def test_unreachable_server_is_a_runtime_failure(tmp_path: Path) -> None:
    dsn = f"postgresql://gtun:secret@/gtun?host={tmp_path}"
    with pytest.raises(StoreUnavailable) as info:
        PgStore(dsn, NET)
    assert info.value.exit_code == 1
    assert "secret" not in str(info.value) and "unavailable" in str(info.value)
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    # doctor says so, without the password.
    from gtun.app.config import load_server_config
    from gtun.app.keys import generate_private_key
    from gtun.doctor.probes import LiveSystem
    from gtun.lab.net import write_key

    write_key(tmp_path / "relay.key", generate_private_key())
    (tmp_path / "relay.toml").write_text(
        f'[server]\nstore = "{dsn}"\nprivate_key_file = "relay.key"\nnetwork = "{NET}"\n'
    )
    facts = LiveSystem().store(load_server_config(tmp_path / "relay.toml"))
    assert facts is not None and facts.error is not None and "unavailable" in facts.error
    assert "secret" not in facts.error and "secret" not in facts.where


# -- what StateStore's tests check ----------------------------------------------------------


def test_leases(store: PgStore) -> None:
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
    store.set_lease("k3", "10.66.0.3")  # taken from k2
    assert store.leases() == {"k3": "10.66.0.3"}


def test_networks_are_kept_apart(dsn: str, store: PgStore) -> None:
    with PgStore(dsn, "10.77.0.0/24") as other:
        store.set_lease("k", "10.66.0.2")
        other.set_lease("k", "10.77.0.2")
        other.add_peer(StoredPeer("alice", "k"))
        assert store.leases() == {"k": "10.66.0.2"} and store.peers() == []
        assert other.leases() == {"k": "10.77.0.2"}


def test_unique_constraints_hold_without_the_lock(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO leases (network, public_key, address) VALUES ('n', 'a', 'x')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO leases (network, public_key, address) VALUES ('n', 'b', 'x')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO leases (network, public_key, address) VALUES ('n', 'a', 'y')")


def test_peers(store: PgStore) -> None:
    alice = StoredPeer("alice", "AAAA", "10.66.0.10", ("192.168.88.0/24",))
    bob = StoredPeer("bob", "BBBB")
    store.add_peer(alice)
    store.add_peer(bob)
    assert store.peers() == [alice, bob]
    with pytest.raises(ConfigError, match="name 'alice' already exists"):
        store.add_peer(StoredPeer("alice", "CCCC"))
    with pytest.raises(ConfigError, match="public key already exists"):
        store.add_peer(StoredPeer("carol", "AAAA"))
    assert store.set_enabled("bob", False) is True
    assert store.set_enabled("nobody", False) is False
    assert store.peers()[1].enabled is False
    store.set_lease("AAAA", "10.66.0.10", "alice")
    assert store.remove_peer("alice") is True
    assert store.remove_peer("alice") is False
    assert [p.name for p in store.peers()] == ["bob"]
    assert store.get_lease("AAAA") is None


def test_failed_transaction_rolls_back(store: PgStore) -> None:
    with pytest.raises(KeyError), store.transaction():
        store.set_lease("k1", "10.66.0.2")
        raise KeyError("boom")
    assert store.leases() == {}


def test_closed_store_raises_runtime_failure(dsn: str) -> None:
    s = PgStore(dsn, NET)
    s.close()
    with pytest.raises(RuntimeFailure):
        s.leases()


def test_endpoints_relays_and_presence(store: PgStore) -> None:
    store.save_endpoints("R1", {"k1": '["192.0.2.1", 5000]'})
    store.save_endpoints("R1", {"k1": '["192.0.2.1", 5001]', "k2": '["192.0.2.2", 1]'})
    store.save_endpoints("R2", {"k1": '["198.51.100.1", 7]'})
    assert store.endpoints("R1") == {"k1": '["192.0.2.1", 5001]', "k2": '["192.0.2.2", 1]'}
    store.register_relay("R1", "relay-a", "vpn-a.example.com:9621")
    store.register_relay("R1", "relay-a", "vpn-a2.example.com:9621")
    store.register_relay("R2", "relay-b", None)
    assert store.relays() == [("R1", "relay-a", "vpn-a2.example.com:9621"), ("R2", "relay-b", None)]
    store.heartbeat("R1", ["k1", "k2"], ttl=30)
    store.heartbeat("R2", ["k2"], ttl=30)
    store.heartbeat("R2", ["k3"], ttl=0)  # expired at once
    assert store.presence() == {"k1": "R1", "k2": "R2"}


def test_publish_config_peers(store: PgStore) -> None:
    """Each relay's [[peers]] become store peers of that source; clashes left out."""
    a, b, c = (
        StoredPeer("a", "ka"),
        StoredPeer("b", "kb", subnets=("192.168.1.0/24",)),
        StoredPeer("c", "kc"),
    )
    assert store.publish_config_peers("r1", [a, b]) == []
    assert store.publish_config_peers("r2", [b, c]) == []  # b: the same peer, r1's row
    assert {p.name: p.source for p in store.peers()} == {"a": "r1", "b": "r1", "c": "r2"}
    store.add_peer(StoredPeer("phone", "kp"))  # `gtun peer add`
    clashing = [StoredPeer("phone", "kx"), StoredPeer("d", "ka"), StoredPeer("b", "other")]
    assert store.publish_config_peers("r2", [c, *clashing]) == ["phone", "d", "b"]
    AddressPool(NET, store).assign("ka")
    # r1 changes b's subnets and drops a: updated, removed with its lease.
    assert store.publish_config_peers("r1", [StoredPeer("b", "kb")]) == []
    peers = {p.name: p for p in store.peers()}
    assert set(peers) == {"b", "c", "phone"} and peers["b"].subnets == ()
    assert "ka" not in store.leases() and peers["phone"].source is None


def test_preshared_keys_in_the_store(store: PgStore, tmp_path: Path) -> None:
    """Schema 4: a peer's preshared key is stored with it (`peer add`), published with a
    relay's [[peers]] and updated when its file changes, and copied by `store import`.
    A relay's own peer given a new key in its file is updated, not a clash."""
    store.add_peer(StoredPeer("phone", "kp", preshared_key="psk-phone"))
    assert store.publish_config_peers("r1", [StoredPeer("a", "ka", preshared_key="p1")]) == []
    assert {p.name: p.preshared_key for p in store.peers()} == {"phone": "psk-phone", "a": "p1"}
    AddressPool(NET, store).assign("ka")
    assert store.publish_config_peers("r1", [StoredPeer("a", "ka2", preshared_key="p2")]) == []
    peers = {p.name: p for p in store.peers()}
    assert (peers["a"].public_key, peers["a"].preshared_key) == ("ka2", "p2")
    assert "ka" not in store.leases()  # the old key's lease went with it
    with StateStore(tmp_path / "gtun.sqlite") as single:
        single.add_peer(StoredPeer("tablet", "kt", preshared_key="pt", enabled=False))
        store.import_state(single, "r1")
    tablet = next(p for p in store.peers() if p.name == "tablet")
    assert tablet.preshared_key == "pt" and not tablet.enabled


def test_relay_health_for_doctor(store: PgStore, dsn: str, tmp_path: Path) -> None:
    """A relay's heartbeat records that it is alive and its clock's offset from the
    database's; doctor reads both, and the database's clock, through LiveSystem."""
    from gtun.app.config import load_server_config
    from gtun.app.keys import encode_key, generate_private_key, public_key
    from gtun.doctor.probes import LiveSystem
    from gtun.lab.net import write_key

    write_key(tmp_path / "relay.key", generate_private_key())
    (tmp_path / "relay.toml").write_text(
        f'[server]\nstore = "{dsn}"\nprivate_key_file = "relay.key"\nnetwork = "{NET}"\n'
    )
    cfg = load_server_config(tmp_path / "relay.toml")
    own = encode_key(cfg.public_key)
    store.register_relay(own, "relay-a", "192.0.2.1:9621")
    other = encode_key(public_key(generate_private_key()))
    store.register_relay(other, "relay-b", "192.0.2.2:9621")
    assert abs(store.clock() - time.time()) < 1.0  # one machine
    assert [(h.name, h.seen_ago) for h in store.relay_health()] == [
        ("relay-a", None),
        ("relay-b", None),
    ]
    store.relay_alive(own, time.time())
    store.relay_alive(other, time.time() + 7.5)  # its clock is 7.5 s ahead
    health = {h.name: h for h in store.relay_health()}
    b = health["relay-b"]
    assert b.seen_ago is not None and 0 <= b.seen_ago < 1.0
    assert b.clock_offset is not None and 7.0 < b.clock_offset < 8.0
    facts = LiveSystem().store(cfg)
    assert facts is not None and facts.error is None
    assert facts.schema == facts.wanted_schema == SCHEMA_VERSION
    assert facts.clock_offset is not None and abs(facts.clock_offset) < 1.0
    assert {r.name for r in facts.relays} == {"relay-a", "relay-b"}
    from gtun.doctor.checks import check_clock_skew

    skew = check_clock_skew(own, facts)
    assert skew is not None and not skew.ok and "relay-b +7." in skew.detail


# -- AddressPool over PostgreSQL ---------------------------------------------------------------


def test_pool_lowest_free_fixed_and_exhausted(store: PgStore) -> None:
    pool = AddressPool(SMALL, store)
    assert pool.assign("k1") == _a("10.66.0.2")
    assert pool.assign("k2") == _a("10.66.0.3")
    assert pool.assign("k1") == _a("10.66.0.2")
    assert pool.assign("fixed", fixed=_a("10.66.0.2")) == _a("10.66.0.2")
    assert store.get_lease("k1") is None
    assert [pool.assign(f"x{i}") for i in range(3)] == [_a(f"10.66.0.{i}") for i in (4, 5, 6)]
    with pytest.raises(RuntimeFailure, match="exhausted"):
        pool.assign("one-too-many")
    pool.release("x0")
    assert pool.lookup("x0") is None
    assert pool.assign("k1") == _a("10.66.0.4")


def test_two_pools_on_one_database_never_collide(dsn: str) -> None:
    with PgStore(dsn, NET) as a, PgStore(dsn, NET) as b:
        pool_a, pool_b = AddressPool(NET, a), AddressPool(NET, b)
        got = [pool_a.assign("x"), pool_b.assign("y"), pool_a.assign("z")]
        assert got == [_a("10.66.0.2"), _a("10.66.0.3"), _a("10.66.0.4")]


def test_threads_with_their_own_connections(dsn: str) -> None:
    results: list[IPv4Address] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with PgStore(dsn, NET) as s:
            pool = AddressPool(NET, s)
            for i in range(15):
                address = pool.assign(f"t{n}-{i}")
                with lock:
                    results.append(address)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 60 and len(set(results)) == 60


# Two relays leasing at the same moment: each process waits for a go file, then leases
# its own keys one transaction at a time, then its whole set at once beside the other's.
_RACER = """
import sys, time
from pathlib import Path
from ipaddress import IPv4Network
from gtun.app.pgstore import PgStore
from gtun.app.store import AddressPool, LeaseWanted
dsn, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = PgStore(dsn, "10.66.0.0/24")
pool = AddressPool(IPv4Network("10.66.0.0/24"), store)
while not go.exists():
    time.sleep(0.005)
for i in range(40):
    print(name + str(i), pool.assign(name + str(i)), flush=True)
both = [LeaseWanted("shared" + str(i)) for i in range(40)]
got = pool.assign_all(both)
for key, address in got.addresses.items():
    print(key, address, flush=True)
store.close()
"""


def test_two_processes_lease_at_the_same_moment(dsn: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, dsn, name, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    time.sleep(0.5)  # both connected and waiting
    go.touch()
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    seen: dict[str, str] = {}
    for out in outputs:
        for line in out.splitlines():
            key, address = line.split()
            assert seen.setdefault(key, address) == address  # a shared key: one address
    own = {k: a for k, a in seen.items() if not k.startswith("shared")}
    assert len(own) == 80 and len(set(own.values())) == 80
    assert len(set(seen.values())) == 120  # no address handed out twice
    with PgStore(dsn, NET) as s:
        assert s.leases() == seen


def test_assign_all_waits_for_the_other_relays_transaction(dsn: str) -> None:
    """While one relay holds the network's lease lock, another's assignment waits and
    then sees what the first wrote."""
    with PgStore(dsn, NET) as a, PgStore(dsn, NET) as b:
        pool_b = AddressPool(NET, b)
        got: list[IPv4Address] = []
        with a.transaction():
            a.set_lease("first", "10.66.0.2")
            t = threading.Thread(target=lambda: got.append(pool_b.assign("second")))
            t.start()
            time.sleep(0.3)
            assert got == []  # waiting for the lock
        t.join(timeout=10)
        assert got == [_a("10.66.0.3")]
        assert AddressPool(NET, a).assign_all([LeaseWanted("first")]).addresses == {
            "first": _a("10.66.0.2")
        }


# -- import ----------------------------------------------------------------------------------


def test_import_from_sqlite_is_idempotent(store: PgStore, tmp_path: Path) -> None:
    with StateStore(tmp_path / "gtun.sqlite") as old:
        old.add_peer(StoredPeer("alice", "AAAA", None, ("192.168.88.0/24",)))
        old.add_peer(StoredPeer("bob", "BBBB"))
        old.set_lease("AAAA", "10.66.0.2", "alice")
        old.set_lease("BBBB", "10.66.0.3", "bob")
        old.set_lease("CCCC", "10.99.0.3", "elsewhere")  # outside the network
        old.save_endpoints("RELAY", {"AAAA": '["192.0.2.1", 5000]'})
        old.save_endpoints("OTHER", {"AAAA": '["192.0.2.9", 9]'})
        store.set_lease("DDDD", "10.66.0.3")  # taken here already
        first = store.import_state(old, "RELAY")
        assert (first.peers, first.leases, first.leases_skipped, first.endpoints) == (2, 1, 2, 1)
        again = store.import_state(old, "RELAY")
    assert (again.peers, again.peers_there, again.leases, again.leases_there) == (0, 2, 0, 1)
    assert (again.endpoints, again.endpoints_there) == (0, 1)
    assert "peers 0 new, 2 already there" in again.line("a", "b")
    assert [p.name for p in store.peers()] == ["alice", "bob"]
    assert store.peers()[0].subnets == ("192.168.88.0/24",)
    assert store.leases() == {"AAAA": "10.66.0.2", "DDDD": "10.66.0.3"}
    assert store.endpoints("RELAY") == {"AAAA": '["192.0.2.1", 5000]'}


# -- NOTIFY ----------------------------------------------------------------------------------


def test_watch_hears_peer_changes_of_its_network(dsn: str, store: PgStore) -> None:
    changes = threading.Semaphore(0)
    states: list[bool] = []
    watch = StoreWatch(dsn, str(NET), changes.release, lambda up, _: states.append(up))
    watch.start()
    try:
        deadline = time.monotonic() + 10
        while not states and time.monotonic() < deadline:
            time.sleep(0.01)
        assert states and states[0] is True
        with PgStore(dsn, "10.77.0.0/24") as other:
            other.add_peer(StoredPeer("x", "XXXX"))  # another network: not heard
        started = time.monotonic()
        store.add_peer(StoredPeer("alice", "AAAA"))
        assert changes.acquire(timeout=5)
        assert time.monotonic() - started < 2
        store.set_enabled("alice", False)
        assert changes.acquire(timeout=5)
        store.remove_peer("alice")
        assert changes.acquire(timeout=5)
        assert not changes.acquire(timeout=0.7)  # nothing else (nor the other network)
    finally:
        watch.stop()
