"""Three relays on one shared store (PostgreSQL), real `gtun` processes in namespaces,
under faults:

  - a client's relay is killed (SIGKILL): the client fails over to another relay of
    the mesh keeping its tunnel address, the other relays learn where it went, and
    traffic to and from a client of another relay flows again within a bound;
  - the store goes away: the sessions the relays have keep flowing across the mesh,
    each relay says so once, and a new peer (which needs the store for its lease) is
    refused with one clear line; when the store is back the relays say so and the new
    peer joins, with no address handed out twice.

    underlay: gtun.lab.mesh's (every node routed through a "wan" namespace), 10.245.x.x
    overlay:  10.66.0.0/24 on every relay's TUN; the leases are the store's, so unique.

Every address lives inside the lab's namespaces (prefix "gtmf")."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtun.app.keys import decode_key
from gtun.app.pgstore import PgStore, migrate
from gtun.lab.mesh import MeshNet
from gtun.lab.net import Node, write_key
from gtun.lab.netns import Lab, Namespace
from gtun.lab.postgres import PostgresServer, find_bindir
from labkit import run_gtun, wait_until, wg_quick_fields

pytestmark = pytest.mark.netns

NETWORK = "10.66.0.0/24"
UNDERLAY = 245
SIZE = 4 * 1024 * 1024  # bytes moved across the mesh
PING_BOUND = 30.0  # seconds for a first cross-relay ping to be answered (generous)
FAILOVER_BOUND = 15.0  # seconds from the SIGKILL to c1 reaching c2 again (about 4 here)
LEARNT_BOUND = 15.0  # seconds for a client to keep the other relays its relay pushed
STORE_NOTICED = 15.0  # seconds for every relay to say the store is away, or back
JOIN_BOUND = 30.0  # seconds for a new peer to be configured once the store is back
DOWN_LINE = "refusing new peers and leases"  # the relay's one line for a store outage


@pytest.fixture
def lab_prefix() -> str:
    return "gtmf"


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop and start (the session's
    shared one must stay up for the other tests)."""
    if find_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (scripts/setup installs it)")
        pytest.skip("needs PostgreSQL (apt install postgresql)")
    pg = PostgresServer()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


def first_answer(ns: Namespace, address: str, bound: float) -> float:
    """Ping `address` once a try (1 s to answer) until one answer; the seconds it took.
    Raises AssertionError after `bound` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        out = ns.run(["ping", "-n", "-c", "1", "-W", "1", address], check=False, timeout=5)
        if out.returncode == 0:
            return time.monotonic() - started
    raise AssertionError(f"no answer from {address} in {ns.name} within {bound:g} s")


def start_flowing(net: MeshNet, *clients: Node, transport: str = "udp") -> dict[str, str]:
    """Start the relays and `clients` (on `transport`); wait until each is configured,
    every relay sees it at its home relay, and the first reaches the second across the
    mesh.  Their addresses by name."""
    net.start_relays()
    for c in clients:
        net.start_client(c, transport)
    addresses = {c.name: net.wait_configured(c) for c in clients}
    assert len(set(addresses.values())) == len(clients)
    for c in clients:
        net.wait_presence(c, net.home[c.name])
    first_answer(clients[0].ns, addresses[clients[1].name], PING_BOUND)
    return addresses


def log_lines(node: Node, needle: str) -> list[str]:
    return [ln for ln in node.log.read_text(errors="replace").splitlines() if needle in ln]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_killed_relays_client_fails_over_keeping_its_address(
    lab: Lab, tmp_path: Path, pg_dsn: str, transport: str
) -> None:
    migrate(pg_dsn)
    net = MeshNet(
        lab,
        tmp_path / "mesh",
        pg_dsn,
        relays=3,
        clients={"c1": "r1", "c2": "r2"},
        underlay=UNDERLAY,
    )
    c1, c2 = net.clients
    r1, r2, r3 = net.relays
    try:
        addresses = start_flowing(net, c1, c2, transport=transport)
        a1, a2 = addresses["c1"], addresses["c2"]
        assert net.ping(c2.ns, a1, count=3) > 0
        # c1 was pushed the other relays and keeps them: it has somewhere to go.
        net.wait_learnt(c1, LEARNT_BOUND)

        assert r1.proc is not None
        killed = time.monotonic()
        r1.proc.kill()
        r1.proc.wait(10)
        first_answer(c1.ns, a2, FAILOVER_BOUND + 10)
        took = time.monotonic() - killed
        print(f"\nfailover ({transport}): c1 reached c2 again {took:.2f} s after r1's SIGKILL")
        assert took < FAILOVER_BOUND

        # c1 is at another relay of the mesh, with the same tunnel address.
        st = net.status(c1)
        assert st is not None
        assert st["address"].split("/")[0] == a1
        by_key = {r.public: r for r in (r2, r3)}
        assert st["peers"][0]["public_key"] in by_key
        new = by_key[st["peers"][0]["public_key"]]
        assert new.underlay in st["peers"][0]["endpoint"]
        assert st["peers"][0]["transport"] == transport
        # Its log names the relay it is at now, not the configured one.
        assert log_lines(c1, f"handshake with relay {new.underlay}:"), net.log_tail(c1)
        # The live relays see it there (presence), and r1's old claim is gone.
        net.wait_presence(c1, new, among=[r2, r3])
        # Traffic both ways: c2 (at r2) reaches c1 at its new relay, and data moves intact.
        assert net.ping(c2.ns, a1, count=3) > 0
        assert net.ping(c1.ns, a2, count=3) > 0
        sent, received, _ = net.transfer(c1.ns, c2.ns, a2, SIZE)
        assert len(sent) == len(hashlib.sha256().hexdigest())
        assert sent == received
    except BaseException:
        print(net.logs())
        raise
    finally:
        net.stop_all()


def peer_add(relay: Node, name: str, out: Path) -> tuple[int, str]:
    """`gtun peer add NAME -c <relay's config> -o OUT`: (exit code, standard error)."""
    done = run_gtun(relay.ns, "peer", "add", name, "-c", str(relay.config), "-o", str(out))
    return done.returncode, done.stderr


def test_sessions_flow_while_the_store_is_away_and_new_peers_wait_for_it(
    lab: Lab, tmp_path: Path, own_pg: PostgresServer
) -> None:
    dsn = own_pg.create_database("gtun")
    migrate(dsn)
    # c3 is no peer of the relays' configs: it needs the store to be added and leased.
    # (A [[peers]] entry would not do: every configured peer is leased at relay start.)
    net = MeshNet(
        lab,
        tmp_path / "mesh",
        dsn,
        relays=3,
        clients={"c1": "r1", "c2": "r2", "c3": "r3"},
        peers={"c1", "c2"},
        underlay=UNDERLAY,
    )
    c1, c2, c3 = net.clients
    r1, r2, r3 = net.relays
    wg_file = net.dir / "c3.conf"
    try:
        addresses = start_flowing(net, c1, c2)
        a1, a2 = addresses["c1"], addresses["c2"]

        own_pg.stop()
        for r in net.relays:
            wait_until(lambda r=r: log_lines(r, DOWN_LINE), STORE_NOTICED, f"{r.name}'s error line")
        # The sessions the relays have flow across the mesh, both ways, data intact.
        assert net.ping(c1.ns, a2, count=3) > 0
        assert net.ping(c2.ns, a1, count=3) > 0
        sent, received, _ = net.transfer(c1.ns, c2.ns, a2, SIZE)
        assert sent == received
        # A new peer needs a lease from the store: refused, one line saying why, and
        # nothing left behind.
        code, err = peer_add(r3, "c3", wg_file)
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gtun: store "), err
        assert "unavailable" in lines[0], err
        print(f"\nwhile the store is away, `gtun peer add c3`: {lines[0]}")
        assert not wg_file.exists()
        time.sleep(2.5)  # a few reconnection attempts of each relay's watch
        assert net.ping(c1.ns, a2, count=3) > 0
        for r in net.relays:
            said = log_lines(r, DOWN_LINE)
            assert len(said) == 1, (r.name, said)
            assert "unavailable" in said[0]

        own_pg.start()
        for r in net.relays:
            wait_until(lambda r=r: log_lines(r, "is back"), STORE_NOTICED, f"{r.name}: store back")
        added = time.monotonic()
        code, err = peer_add(r3, "c3", wg_file)
        assert code == 0, err
        fields = wg_quick_fields(wg_file.read_text())
        c3.key = decode_key(fields["PrivateKey"])
        net.write_client_config(c3, r3)
        # The preshared key `peer add` gave c3, which every relay has from the store.
        write_key(net.dir / "c3.psk", decode_key(fields["PresharedKey"]))
        c3.config.write_text(c3.config.read_text() + 'preshared_key_file = "c3.psk"\n')
        net.start_client(c3)
        a3 = net.wait_configured(c3, timeout=JOIN_BOUND)
        assert a3 == fields["Address"].split("/")[0]
        net.wait_presence(c3, r3)
        first_answer(c3.ns, a1, PING_BOUND)  # across the mesh, r3 to r1
        print(
            f"store back: c3 added, configured and reaching c1 in {time.monotonic() - added:.2f} s"
        )
        assert net.ping(c1.ns, a3, count=3) > 0
        # No address handed out twice, and every client has the one the store leased.
        with PgStore(dsn, NETWORK) as store:
            leases = store.leases()
        assert len(set(leases.values())) == len(leases)
        assert {leases[c.public] for c in (c1, c2, c3)} == {a1, a2, a3}
        assert len({a1, a2, a3}) == 3
        # The return did not make any relay think the store was away once more.
        for r in net.relays:
            assert len(log_lines(r, DOWN_LINE)) == 1, (r.name, log_lines(r, DOWN_LINE))
    except BaseException:
        print(net.logs())
        raise
    finally:
        net.stop_all()
