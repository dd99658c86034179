"""Two relays on one shared store (PostgreSQL), each in a namespace of its own, real
`gtun` processes: one client on each; client A reaches client B's tunnel address across
the relay mesh (one hop, A's relay to B's), pings both ways and moves SHA-256-checked
data.

    underlay: gtun.lab.mesh's (every node routed through a "wan" namespace)
    overlay:  10.66.0.0/24 on both relays' TUNs; the leases are the store's, so unique.

Every address lives inside the lab's namespaces (prefix "gtmw")."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from gtun.app.pgstore import migrate
from gtun.lab.mesh import MeshNet
from gtun.lab.net import GTUN
from gtun.lab.netns import Lab

pytestmark = pytest.mark.netns

NETWORK = "10.66.0.0/24"
PING_BOUND = 30.0  # seconds for the first cross-relay ping to be answered (generous)
SIZE = 4 * 1024 * 1024  # bytes moved across the mesh


@pytest.fixture
def lab_prefix() -> str:
    return "gtmw"


def test_clients_of_two_relays_reach_each_other_across_the_mesh(
    lab: Lab, tmp_path: Path, pg_dsn: str
) -> None:
    migrate(pg_dsn)
    net = MeshNet(lab, tmp_path / "mesh", pg_dsn, relays=2, underlay=241)
    c1, c2 = net.clients
    r1, r2 = net.relays
    try:
        net.start_relays()  # each relay has the other as its mesh, from the store
        for c in (c1, c2):
            net.start_client(c)
        a1, a2 = net.wait_configured(c1), net.wait_configured(c2)
        assert a1 != a2
        # r1 learns that c2's session is at r2 (presence, NOTIFY) and the other way round.
        net.wait_presence(c1, r1)
        net.wait_presence(c2, r2)
        started = time.monotonic()
        while True:
            try:
                net.ping(c1.ns, a2, count=1, timeout=10)
                break
            except RuntimeError:
                if time.monotonic() - started > PING_BOUND:
                    raise
        assert net.ping(c1.ns, a2, count=3) > 0
        assert net.ping(c2.ns, a1, count=3) > 0
        sent, received, _ = net.transfer(c1.ns, c2.ns, a2, SIZE)
        assert len(sent) == len(hashlib.sha256().hexdigest())
        assert sent == received
        sent, received, _ = net.transfer(c2.ns, c1.ns, a1, SIZE, port=5202)
        assert sent == received
        # doctor on r1: the store answers, a session with r2, clocks in step.
        out = r1.ns.run([*GTUN, "doctor", "-c", str(r1.config), "--json"], check=False)
        found = {r["check"]: r for r in json.loads(out.stdout)}
        for check in ("store", "mesh", "clock"):
            assert found[check]["ok"], found[check]
        assert "sessions with r2" in found["mesh"]["detail"]
        # status on r1: the relays, and c2's session at r2.
        text = r1.ns.run([*GTUN, "status", "-s", str(r1.socket)]).stdout
        assert "relays of the network: r1 (this one), r2" in text, text
        row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["c2"])
        assert "r2" in row and c2.public in row, text
        # Both relays carried it over the mesh: each took traffic from the other.
        for r in (r1, r2):
            st = net.status(r)
            assert st is not None
            assert st["mesh"][0]["rx_bytes"] > SIZE
    except BaseException:
        print(net.logs())
        raise
    finally:
        net.stop_all()
