"""One console for every relay (tier 3): two real relays on one shared store
(PostgreSQL), the console served by r1 and used through its JSON API, as a script
would.

A peer added in r1's console (POST /api/peers) is a gtun client of r2 with the key the
console handed out.  r1's console shows it online at r2 with its traffic rising (r2's
live rows in the store), lists both relays alive, and disabling the peer in r1's
console ends its traffic at r2 (the store's NOTIFY) while the client of r1 flows on;
enabling it brings it back.

Every address lives inside the lab's namespaces (prefix "gtcm")."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtun.app.keys import decode_key
from gtun.app.pgstore import migrate
from gtun.lab.mesh import MeshNet
from gtun.lab.net import GTUN, write_key
from gtun.lab.netns import Lab, python_env
from gtun.lab.portfwd import NsPortForward
from labkit import ConsoleApi, ping_count, set_config_keys, wait_until, wg_quick_fields

pytestmark = pytest.mark.netns

CONSOLE_PORT = 9680
PASSWORD = "one pane for every relay"
LIVE_BOUND = 40.0  # seconds for r2's fold (10 s) and the console's read (5 s), twice over


@pytest.fixture
def lab_prefix() -> str:
    return "gtcm"


def test_one_console_for_both_relays(lab: Lab, tmp_path: Path, pg_dsn: str) -> None:
    migrate(pg_dsn)
    # c2 is in no relay's [[peers]]: it joins with the key r1's console hands out.
    net = MeshNet(
        lab,
        tmp_path / "mesh",
        pg_dsn,
        relays=2,
        clients={"c1": "r1", "c2": "r2"},
        peers={"c1"},
        underlay=239,
    )
    c1, c2 = net.clients
    r1, r2 = net.relays
    set_config_keys(r1.config, "server", {"console_listen": f'"127.0.0.1:{CONSOLE_PORT}"'})
    forward: NsPortForward | None = None
    try:
        out = r1.ns.run(
            [*GTUN, "console", "passwd", "--stdin", "-c", str(r1.config)],
            input=PASSWORD + "\n",
            check=False,
            env=python_env(),
        )
        assert out.returncode == 0, out.stderr
        net.start_relays()
        net.start_client(c1)
        a1 = net.wait_configured(c1)
        net.wait_presence(c1, r1)

        forward = NsPortForward(r1.ns.name, ("127.0.0.1", CONSOLE_PORT))
        api = ConsoleApi(forward.url)
        assert api.call("GET", "/api/peers")[0] == 401  # no session yet
        api.login(PASSWORD)

        # A peer added in r1's console; c2 uses its key and preshared key with r2.
        status, added = api.call("POST", "/api/peers", {"name": "c2"})
        assert status == 201, added
        fields = wg_quick_fields(added["config"])
        c2.key = decode_key(fields["PrivateKey"])
        net.write_client_config(c2, r2)
        write_key(net.dir / "c2.psk", decode_key(fields["PresharedKey"]))
        c2.config.write_text(c2.config.read_text() + 'preshared_key_file = "c2.psk"\n')
        net.start_client(c2)
        a2 = net.wait_configured(c2, timeout=20)
        assert a2 == fields["Address"].split("/")[0]
        net.wait_presence(c2, r2)
        c1.ns.spawn(["ping", "-n", "-i", "0.2", a2])  # c1 -> c2 across the mesh, all along

        # r1's console shows c2 at r2, online, its counters (r2's) rising.
        first = wait_until(
            lambda: (p := api.peer("c2"))["online"] and p["relay"] == "r2" and p,
            LIVE_BOUND,
            "c2 online at r2 in r1's console",
        )
        wait_until(
            lambda: api.peer("c2")["rx_bytes"] > first["rx_bytes"],
            LIVE_BOUND,
            "c2's traffic (counted at r2) to rise in r1's console",
        )
        status, relays = api.call("GET", "/api/relays")
        assert status == 200, relays
        rows = {r["name"]: r for r in relays["relays"]}
        assert set(rows) == {"r1", "r2"} and rows["r1"]["this"], rows
        assert rows["r2"]["alive"] and rows["r2"]["peers"] >= 1, rows["r2"]

        # Disabled in r1's console: r2 stops serving c2 (NOTIFY), c1 flows on.
        status, answer = api.call("POST", "/api/peers/c2/disable")
        assert status == 200, answer
        wait_until(
            lambda: ping_count(c2.ns, a1, 3, deadline=2) == 0, 15, "c2's traffic to stop at r2"
        )
        assert ping_count(c1.ns, "10.66.0.1", 5) >= 4
        peer = api.peer("c2")
        assert not peer["enabled"] and not peer["online"], peer
        st = net.status(r2)
        assert st is not None and all(p["name"] != "c2" for p in st["peers"]), st["peers"]

        # Enabled again: it flows again through r2.
        status, answer = api.call("POST", "/api/peers/c2/enable")
        assert status == 200, answer
        wait_until(lambda: ping_count(c2.ns, a1, 3, deadline=3) > 0, 30, "c2 back through r2")
        # A forged token changes nothing, on any relay.
        api.csrf = "forged"
        assert api.call("POST", "/api/peers/c2/disable")[0] == 403
        assert ping_count(c2.ns, a1, 3) >= 2
    except BaseException:
        print(net.logs())
        raise
    finally:
        if forward is not None:
            forward.close()
        net.stop_all()
