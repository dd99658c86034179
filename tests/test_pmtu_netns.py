"""Tier 3: a path MTU black hole between a real client and relay, healed by the client.

The black hole is an nftables rule in the relay's namespace that drops tunnel datagrams
over 1400 bytes (IP length) with no ICMP: packets over 1340 bytes inside the tunnel
(1400 - 20 IP - 8 UDP - 32 WireGuard) vanish.  The client finds it by itself, lowers its
device's MTU to what passes (1328: sizes are multiples of 16), and raises it again once
the rule is gone.  Figures come from bench-like runs, the bounds here are generous.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator

import pytest

from gtun.lab.net import PORT, GtunNet
from gtun.lab.netns import Lab, Namespace
from labkit import gtun_stdout, ping_count, set_config_keys, wait_until

pytestmark = pytest.mark.netns

UNDERLAY = 234  # 10.234.x.x inside this module's namespaces
TABLE = "gtmtblack"
LIMIT = 1400  # the largest underlay IP datagram the black hole lets through
FOUND = (LIMIT - 60) // 16 * 16  # what the client should settle on: 1328
RAISE_INTERVAL = 2  # the client's pmtu_raise_interval for this test
HEAL_BOUND = 20.0  # seconds: detection (<= 1 s), 3 lost probes (3 s), a few rounds
RAISE_BOUND = 15.0


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtmt{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab, tmp_path_factory.mktemp("pmtu"), clients=1, underlay=UNDERLAY, lan=False
        )
        # Over a veth a UDP GSO send arrives at the rule as one aggregate: the client
        # sends one datagram per call, so that the rule sees each datagram's own size.
        set_config_keys(
            gnet.clients[0].config,
            "client",
            {"offload": "false", "pmtu_raise_interval": str(RAISE_INTERVAL)},
        )
        gnet.start_all()
        gnet.wait_configured(gnet.clients[0])
        yield gnet


def black_hole(ns: Namespace) -> None:
    ns.run(
        ["nft", "-f", "-"],
        input=f"table inet {TABLE} {{\n chain input {{\n"
        "  type filter hook input priority 0;\n"
        f"  udp dport {PORT} ip length > {LIMIT} drop\n }}\n}}\n",
    )


def heal(ns: Namespace) -> None:
    ns.run(["nft", "delete", "table", "inet", TABLE], check=False)


def device_mtu(ns: Namespace) -> int:
    out = ns.run(["ip", "-j", "link", "show", "gtun0"]).stdout
    return int(json.loads(out)[0]["mtu"])


def big_ping(ns: Namespace, address: str) -> bool:
    """A 1400-byte ping (fragmented by the client's kernel when its MTU is lower)."""
    return ping_count(ns, address, 1, "-s", str(1400 - 28), "-W", "1", deadline=2) == 1


def test_black_hole_is_healed_and_the_mtu_raised_again(net: GtunNet) -> None:
    c1, relay = net.clients[0], net.relay
    ns = c1.ns
    st = net.wait_status(c1, lambda s: s.get("path_mtu") == 1420, 10, "the MTU confirmed")
    assert st["mtu"] == 1420 and device_mtu(ns) == 1420
    assert big_ping(ns, "10.66.0.1")

    # A transfer in flight when the black hole opens resumes by itself.
    result: dict[str, object] = {}

    def transfer() -> None:
        try:
            result["r"] = net.transfer(ns, relay.ns, "10.66.0.1", 200_000_000, timeout=90)
        except Exception as exc:  # noqa: BLE001 (reported by the test below)
            result["error"] = exc

    mover = threading.Thread(target=transfer)
    mover.start()
    try:
        time.sleep(1.0)
        black_hole(relay.ns)
        opened = time.monotonic()
        try:
            lowered = wait_until(
                lambda: device_mtu(ns) < 1420, HEAL_BOUND, "the device MTU lowered"
            )
            healed_in = time.monotonic() - opened
            assert lowered
            assert device_mtu(ns) == FOUND, net.log_tail(c1)
            assert big_ping(ns, "10.66.0.1")
            st = net.status(c1)
            assert st is not None and st["path_mtu"] == FOUND and st["mtu"] == FOUND
            text = gtun_stdout(ns, "status", "-s", str(c1.socket))
            assert f"mtu {FOUND}; path MTU {FOUND} (probed)" in text, text
            mover.join(90)
            assert not mover.is_alive() and "error" not in result, result
            sent, received, took = result["r"]  # type: ignore[misc]
            print(f"transfer of 200 MB: {took:.1f} s")
            assert sent == received, result
            peer = next(p for p in net.status(relay)["peers"] if p["name"] == "c1")  # type: ignore[index]
            assert peer["path_mtu"] == FOUND, peer
            log = c1.log.read_text()
            assert "path MTU: black hole" in log and f"gtun0 mtu {FOUND}" in log, log
        finally:
            heal(relay.ns)
        healed = time.monotonic()
        wait_until(lambda: device_mtu(ns) == 1420, RAISE_BOUND, "the device MTU raised")
        raised_in = time.monotonic() - healed
        assert big_ping(ns, "10.66.0.1")
        assert ping_count(ns, "10.66.0.1", 1, "-M", "do", "-s", str(1420 - 28)) == 1
        print(f"lowered in {healed_in:.1f} s, raised in {raised_in:.1f} s")
    finally:
        heal(relay.ns)
        mover.join(100)
