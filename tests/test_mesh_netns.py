"""Two relays on one shared store (PostgreSQL), each in a namespace of its own, real
`gtun` processes: one client on each; client A reaches client B's tunnel address across
the relay mesh (one hop, A's relay to B's), pings both ways and moves SHA-256-checked
data.

    underlay: c1 <-- 10.241.1.0/24 --> r1 <-- 10.241.0.0/24 --> r2 <-- 10.241.2.0/24 --> c2
    overlay:  10.66.0.0/24 on both relays' TUNs; the leases are the store's, so unique.

Every address lives inside the lab's namespaces (prefix "gtmw")."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from gtun.app.keys import generate_private_key
from gtun.app.pgstore import migrate
from gtun.lab.net import PORT, GtunNet, Node, write_key
from gtun.lab.netns import Lab

pytestmark = pytest.mark.netns

NETWORK = "10.66.0.0/24"
PING_BOUND = 30.0  # seconds for the first cross-relay ping to be answered (generous)
SIZE = 4 * 1024 * 1024  # bytes moved across the mesh


@pytest.fixture
def lab_prefix() -> str:
    return "gtmw"


class TwoRelays(GtunNet):
    """GtunNet's processes and traffic helpers over a topology of two relays sharing
    `dsn`, one client on each."""

    def __init__(self, lab: Lab, workdir: Path, dsn: str) -> None:  # noqa: PLR0915
        self.lab = lab
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network = NETWORK
        self.network6 = None
        self.debug = True
        self.metrics = False
        self.lan = None
        r1, r2 = lab.add_ns("r1"), lab.add_ns("r2")
        lab.veth(r1, "mesh0", "10.241.0.1/24", r2, "mesh0", "10.241.0.2/24")
        relays: list[Node] = []
        self.clients = []
        for i, ns in ((1, r1), (2, r2)):
            relays.append(
                Node(
                    ns,
                    f"r{i}",
                    generate_private_key(),
                    self.dir / f"r{i}.toml",
                    self.dir / f"r{i}.sock",
                    self.dir / f"r{i}.log",
                    underlay=f"10.241.0.{i}",
                )
            )
            c = lab.add_ns(f"c{i}")
            lab.veth(ns, f"rc{i}", f"10.241.{i}.1/24", c, "up0", f"10.241.{i}.2/24")
            self.clients.append(
                Node(
                    c,
                    f"c{i}",
                    generate_private_key(),
                    self.dir / f"c{i}.toml",
                    self.dir / f"c{i}.sock",
                    self.dir / f"c{i}.log",
                    underlay=f"10.241.{i}.1",
                )
            )
        self.relay = relays[0]
        self.relays = relays
        peers = "".join(
            f'\n[[peers]]\nname = "{c.name}"\npublic_key = "{c.public}"\n' for c in self.clients
        )
        for r in relays:
            write_key(self.dir / f"{r.name}.key", r.key)
            r.config.write_text(
                "[server]\n"
                f'store = "{dsn}"\n'
                f'listen = "0.0.0.0:{PORT}"\n'
                f'endpoint = "{r.underlay}:{PORT}"\n'
                f'private_key_file = "{r.name}.key"\n'
                f'network = "{NETWORK}"\n'
                'device = "gtun0"\n'
                "nat = false\n"
                f'state_dir = "{self.dir / ("state-" + r.name)}"\n'
                f'control_socket = "{r.socket}"\n' + peers
            )
        for c, r in zip(self.clients, relays, strict=True):
            write_key(self.dir / f"{c.name}.key", c.key)
            c.config.write_text(
                "[client]\n"
                f'server = "{c.underlay}:{PORT}"\n'
                f'server_public_key = "{r.public}"\n'
                f'private_key_file = "{c.name}.key"\n'
                'device = "gtun0"\n'
                f'control_socket = "{c.socket}"\n'
                f'state_dir = "{self.dir / c.name}"\n'
            )

    def start_relays(self, timeout: float = 15.0) -> None:
        for r in self.relays:
            self._gtun(r, "server")
        for r in self.relays:
            self.wait_status(r, lambda s: True, timeout, f"{r.name} to start")

    def logs(self) -> str:
        return "\n".join(
            f"--- {n.name}\n{self.log_tail(n, 40)}" for n in (*self.relays, *self.clients)
        )


def test_clients_of_two_relays_reach_each_other_across_the_mesh(
    lab: Lab, tmp_path: Path, pg_dsn: str
) -> None:
    migrate(pg_dsn)
    net = TwoRelays(lab, tmp_path / "mesh", pg_dsn)
    c1, c2 = net.clients
    r1, r2 = net.relays
    try:
        net.start_relays()
        # Each relay has the other as its mesh, from the store.
        for r, other in ((r1, r2), (r2, r1)):
            net.wait_status(
                r,
                lambda s, o=other.name: [m["name"] for m in s.get("mesh", [])] == [o],
                15,
                f"{r.name}'s mesh",
            )
        for c in (c1, c2):
            net.start_client(c)
        a1, a2 = net.wait_configured(c1), net.wait_configured(c2)
        assert a1 != a2
        # r1 learns that c2's session is at r2 (presence, NOTIFY) and the other way round.
        for r, c, other in ((r1, c2, r2), (r2, c1, r1)):
            net.wait_status(
                r,
                lambda s, n=c.name, o=other.name: any(
                    p["name"] == n and p.get("relay") == o for p in s["peers"]
                ),
                15,
                f"{r.name} to see {c.name} at {other.name}",
            )
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
        # Both relays carried it over the mesh: each took traffic from the other.
        for r in (r1, r2):
            st = net.status(r)
            assert st is not None
            assert st["mesh"][0]["rx_bytes"] > SIZE
    except BaseException:
        print(net.logs())
        raise
    finally:
        for node in (*net.clients, *net.relays):
            net.stop(node)
